//! Captions: writing a scene as a short English prompt (a few phrasings per
//! prompt kind, all under ~20 words) and reading any such prompt back into the
//! facts it states ([`Spec`]), which is what the checker verifies.

use super::palette::Color;
use super::scene::{Cell, Prompt, PromptKind, Relation, Scene, Shape, Size};

/// What a prompt says about one object. Attributes the prompt leaves out are `None`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ObjectSpec {
    pub shape: Shape,
    pub color: Option<Color>,
    pub size: Option<Size>,
    pub cell: Option<Cell>,
}

/// The facts a prompt states: what the checker verifies in an image.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Spec {
    pub background: Option<Color>,
    /// Zero to two objects, in the order the prompt names them.
    pub objects: Vec<ObjectSpec>,
    /// Relation of `objects[0]` to `objects[1]`.
    pub relation: Option<Relation>,
    /// A shape the prompt says is not there.
    pub absent: Option<Shape>,
}

impl Spec {
    /// The kind of prompt this spec came from.
    pub fn kind(&self) -> PromptKind {
        if self.absent.is_some() {
            PromptKind::Negation
        } else if self.relation.is_some() {
            PromptKind::Relation
        } else if self.objects.len() == 2 {
            PromptKind::Binding
        } else {
            PromptKind::Single
        }
    }
}

/// The scene's caption, in its phrasing (`scene.phrasing` modulo the number
/// of templates for its prompt kind).
pub fn caption(scene: &Scene) -> String {
    describe(scene).0
}

impl Scene {
    /// The facts [`caption`] states about this scene (what `parse_caption` of
    /// the caption returns).
    pub fn spec(&self) -> Spec {
        describe(self).1
    }
}

/// "a" or "an" before a word.
fn article(next: &str) -> &'static str {
    if next.starts_with(['a', 'e', 'i', 'o', 'u']) { "an" } else { "a" }
}

/// Builds the caption and the spec it states together, so they cannot disagree.
fn describe(scene: &Scene) -> (String, Spec) {
    let bg = scene.background.name();
    let mut spec = Spec { background: Some(scene.background), ..Spec::default() };
    // "[a] [size] color shape", and the spec entry it states.
    let mut noun = |i: usize, with_size: bool, with_cell: bool| -> String {
        let o = scene.objects[i];
        spec.objects.push(ObjectSpec {
            shape: o.shape,
            color: Some(o.color),
            size: with_size.then_some(o.size),
            cell: with_cell.then_some(o.cell),
        });
        let words = if with_size {
            format!("{} {} {}", o.size.name(), o.color.name(), o.shape.name())
        } else {
            format!("{} {}", o.color.name(), o.shape.name())
        };
        let cell = if with_cell { format!(" {}", o.cell.phrase()) } else { String::new() };
        format!("{} {words}{cell}", article(&words))
    };
    let bg_a = article(bg);
    let text = match (scene.prompt, scene.objects.len()) {
        (Prompt::Single, 1) => match scene.phrasing % 4 {
            0 => format!("{} on {bg_a} {bg} background", noun(0, true, true)),
            1 => format!("{}, {bg} background", noun(0, false, true)),
            2 => format!("{bg_a} {bg} background with {}", noun(0, true, true)),
            _ => format!("{} on {bg_a} {bg} background", noun(0, true, false)),
        },
        (Prompt::Relation(r), 2) => {
            spec.relation = Some(r);
            let rel = r.phrase();
            match scene.phrasing % 3 {
                0 => {
                    let (a, b) = (noun(0, false, false), noun(1, false, false));
                    format!("{a} {rel} {b} on {bg_a} {bg} background")
                }
                1 => {
                    let (a, b) = (noun(0, true, false), noun(1, true, false));
                    format!("{a} {rel} {b}, {bg} background")
                }
                _ => {
                    let (a, b) = (noun(0, false, false), noun(1, false, false));
                    format!("{bg_a} {bg} background with {a} {rel} {b}")
                }
            }
        }
        (Prompt::Binding, 2) => match scene.phrasing % 3 {
            0 => {
                let (a, b) = (noun(0, false, false), noun(1, false, false));
                format!("{a} and {b} on {bg_a} {bg} background")
            }
            1 => {
                let (a, b) = (noun(0, false, false), noun(1, false, false));
                format!("{bg_a} {bg} background with {a} and {b}")
            }
            _ => {
                let (a, b) = (noun(0, true, false), noun(1, true, false));
                format!("{a} and {b}, {bg} background")
            }
        },
        (Prompt::Negation(s), 1) => {
            spec.absent = Some(s);
            let neg = s.name();
            match scene.phrasing % 2 {
                0 => format!("{}, no {neg}s, on {bg_a} {bg} background", noun(0, false, false)),
                _ => format!("{} and no {neg}s on {bg_a} {bg} background", noun(0, true, false)),
            }
        }
        (Prompt::Negation(s), _) => {
            spec.absent = Some(s);
            let neg = s.name();
            match scene.phrasing % 2 {
                0 => format!("{bg_a} {bg} background with no {neg}s"),
                _ => format!("an empty {bg} background, no {neg}s"),
            }
        }
        // Scenes that fail `validate`: describe the objects plainly.
        _ => {
            let parts: Vec<String> =
                (0..scene.objects.len().min(2)).map(|i| noun(i, true, true)).collect();
            format!("{} on {bg_a} {bg} background", parts.join(" and "))
        }
    };
    (text, spec)
}

/// Reads a prompt in the caption language back into the facts it states.
///
/// Accepts every caption [`caption`] writes and free variations of them (word
/// order of the background clause, `grey`, `big`, `an`, `without`, punctuation).
/// Returns `None` for anything it cannot read completely (an unknown word, more
/// than two objects, a dangling adjective, a relation not between two objects),
/// so that evaluation never checks half a prompt.
pub fn parse_caption(text: &str) -> Option<Spec> {
    let lower = text.to_lowercase().replace(',', " , ").replace(['.', ';', '!'], " ");
    let words: Vec<&str> = lower.split_whitespace().collect();
    let mut spec = Spec::default();
    let (mut color, mut size): (Option<Color>, Option<Size>) = (None, None);
    let mut i = 0;
    while i < words.len() {
        let w = words[i];
        let rest = &words[i..];
        if let Some((rel, len)) = relation_at(rest) {
            if spec.objects.len() != 1
                || spec.relation.is_some()
                || color.is_some()
                || size.is_some()
            {
                return None;
            }
            spec.relation = Some(rel);
            i += len;
            continue;
        }
        if w == "no" || w == "without" {
            let s = Shape::from_word(words.get(i + 1)?)?;
            if spec.absent.replace(s).is_some() {
                return None;
            }
            i += 2;
            continue;
        }
        if matches!(w, "in" | "at" | "on") && words.get(i + 1) == Some(&"the") {
            let n = words[i + 2..]
                .iter()
                .take(2)
                .take_while(|w| {
                    matches!(
                        **w,
                        "top" | "bottom" | "left" | "right" | "middle" | "center" | "centre"
                    )
                })
                .count();
            let cell = Cell::from_words(&words[i + 2..i + 2 + n])?;
            let last = spec.objects.last_mut()?;
            if last.cell.replace(cell).is_some() || color.is_some() || size.is_some() {
                return None;
            }
            i += 2 + n;
            continue;
        }
        if let Some(c) = Color::from_word(w) {
            if words.get(i + 1) == Some(&"background") {
                if spec.background.replace(c).is_some() || size.is_some() || color.is_some() {
                    return None;
                }
                i += 2;
            } else {
                if color.replace(c).is_some() {
                    return None;
                }
                i += 1;
            }
            continue;
        }
        if let Some(z) = Size::from_word(w) {
            if size.replace(z).is_some() || color.is_some() {
                return None;
            }
            i += 1;
            continue;
        }
        if let Some(s) = Shape::from_word(w) {
            if spec.objects.len() == 2 || w.ends_with('s') {
                return None;
            }
            spec.objects.push(ObjectSpec {
                shape: s,
                color: color.take(),
                size: size.take(),
                cell: None,
            });
            i += 1;
            continue;
        }
        if !matches!(w, "a" | "an" | "with" | "and" | "," | "on" | "empty" | "plain") {
            return None;
        }
        i += 1;
    }
    let complete = color.is_none()
        && size.is_none()
        && (spec.relation.is_none() || spec.objects.len() == 2)
        && (spec.background.is_some() || !spec.objects.is_empty());
    complete.then_some(spec)
}

/// A relation phrase at the start of `words`, and its length in words.
fn relation_at(words: &[&str]) -> Option<(Relation, usize)> {
    match words {
        ["to", "the", "left", "of", ..] => Some((Relation::LeftOf, 4)),
        ["to", "the", "right", "of", ..] => Some((Relation::RightOf, 4)),
        ["left", "of", ..] => Some((Relation::LeftOf, 2)),
        ["right", "of", ..] => Some((Relation::RightOf, 2)),
        ["above", ..] => Some((Relation::Above, 1)),
        ["below", ..] | ["under", ..] => Some((Relation::Below, 1)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_free_variations() {
        let s = parse_caption("A big grey circle in the top right, on a cyan background.").unwrap();
        assert_eq!(s.background, Some(Color::Cyan));
        assert_eq!(
            s.objects,
            vec![ObjectSpec {
                shape: Shape::Circle,
                color: Some(Color::Gray),
                size: Some(Size::Large),
                cell: Some(Cell { col: 2, row: 0 }),
            }]
        );
        let s = parse_caption("a red circle and a blue square").unwrap();
        assert_eq!(s.kind(), PromptKind::Binding);
        assert_eq!(s.background, None);
        let s = parse_caption("a blue background without circles").unwrap();
        assert_eq!(s.kind(), PromptKind::Negation);
        assert_eq!(s.absent, Some(Shape::Circle));
        assert!(s.objects.is_empty());
        let s = parse_caption("a red square below an orange triangle").unwrap();
        assert_eq!(s.relation, Some(Relation::Below));
    }

    #[test]
    fn rejects_what_it_cannot_read() {
        for bad in [
            "",
            "a red dog on a white background",
            "a red circle, a blue square and a green triangle",
            "a red on a white background",
            "above a red circle",
            "a red circle above",
            "a white background with no",
            "a red circles",
            "a red circle in the top top left",
        ] {
            assert_eq!(parse_caption(bad), None, "{bad:?}");
        }
    }
}
