//! What a scene is: a background color and zero to two objects on a 3x3 grid,
//! plus the statement its caption makes about them.

use std::fmt;

use super::palette::Color;
use crate::{Error, Result};

/// The shapes drawn. Triangles are upright (apex up, base down, base = height).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Shape {
    Circle,
    Square,
    Triangle,
}

impl Shape {
    /// Every shape, in a fixed order.
    pub const ALL: [Shape; 3] = [Shape::Circle, Shape::Square, Shape::Triangle];

    /// The caption word (singular).
    pub fn name(self) -> &'static str {
        match self {
            Shape::Circle => "circle",
            Shape::Square => "square",
            Shape::Triangle => "triangle",
        }
    }

    /// Reads a caption word, singular or plural.
    pub fn from_word(word: &str) -> Option<Shape> {
        let singular = word.strip_suffix('s').unwrap_or(word);
        Shape::ALL.into_iter().find(|s| s.name() == singular)
    }
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Object size: the side of its bounding square as a fraction of the image side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Size {
    Small,
    Large,
}

impl Size {
    /// Both sizes.
    pub const ALL: [Size; 2] = [Size::Small, Size::Large];

    /// Bounding-square side as a fraction of the image side.
    pub fn extent(self) -> f32 {
        match self {
            Size::Small => 0.18,
            Size::Large => 0.28,
        }
    }

    /// The caption word.
    pub fn name(self) -> &'static str {
        match self {
            Size::Small => "small",
            Size::Large => "large",
        }
    }

    /// Reads a caption word (`big` is accepted for large).
    pub fn from_word(word: &str) -> Option<Size> {
        match word {
            "small" => Some(Size::Small),
            "large" | "big" => Some(Size::Large),
            _ => None,
        }
    }

    /// The size whose extent is nearest to a measured extent (fraction of the image side).
    pub fn nearest(extent: f32) -> Size {
        if extent < (Size::Small.extent() + Size::Large.extent()) / 2.0 {
            Size::Small
        } else {
            Size::Large
        }
    }
}

/// A cell of the 3x3 grid: `col` 0..3 left to right, `row` 0..3 top to bottom.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cell {
    pub col: u8,
    pub row: u8,
}

/// Where objects are centred along each axis (fraction of the image side), by
/// column/row. Not at thirds: this keeps large objects off the image border.
pub const CELL_CENTERS: [f32; 3] = [0.2, 0.5, 0.8];

/// Borders between cells when reading a position back: halfway between centres.
pub const CELL_BORDERS: [f32; 2] = [0.35, 0.65];

impl Cell {
    /// All nine cells, row by row.
    pub fn all() -> impl Iterator<Item = Cell> {
        (0..3u8).flat_map(|row| (0..3u8).map(move |col| Cell { col, row }))
    }

    /// The cell's centre, `[x, y]` as fractions of the image side.
    pub fn center(self) -> [f32; 2] {
        [CELL_CENTERS[usize::from(self.col.min(2))], CELL_CENTERS[usize::from(self.row.min(2))]]
    }

    /// The cell a point (fractions of the image side) falls in.
    pub fn of_point(p: [f32; 2]) -> Cell {
        let idx = |v: f32| {
            if v < CELL_BORDERS[0] {
                0
            } else if v < CELL_BORDERS[1] {
                1
            } else {
                2
            }
        };
        Cell { col: idx(p[0]), row: idx(p[1]) }
    }

    /// The caption phrase, e.g. "in the top left", "on the right", "in the center".
    pub fn phrase(self) -> &'static str {
        const PHRASES: [[&str; 3]; 3] = [
            ["in the top left", "at the top", "in the top right"],
            ["on the left", "in the center", "on the right"],
            ["in the bottom left", "at the bottom", "in the bottom right"],
        ];
        PHRASES[usize::from(self.row.min(2))][usize::from(self.col.min(2))]
    }

    /// Reads the words after the preposition ("top left", "center", "right", ...).
    pub fn from_words(words: &[&str]) -> Option<Cell> {
        let axis = |w: &str| match w {
            "top" => Some((Some(0), None)),
            "bottom" => Some((Some(2), None)),
            "left" => Some((None, Some(0))),
            "right" => Some((None, Some(2))),
            "middle" | "center" | "centre" => Some((None, None)),
            _ => None,
        };
        if words.is_empty() || words.len() > 2 {
            return None;
        }
        let (mut row, mut col) = (None, None);
        for w in words {
            let (r, c) = axis(w)?;
            row = row.or(r);
            col = col.or(c);
        }
        Some(Cell { col: col.unwrap_or(1), row: row.unwrap_or(1) })
    }
}

/// A spatial relation between the first and the second object of a scene.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Relation {
    LeftOf,
    RightOf,
    Above,
    Below,
}

impl Relation {
    /// All relations.
    pub const ALL: [Relation; 4] =
        [Relation::LeftOf, Relation::RightOf, Relation::Above, Relation::Below];

    /// The caption phrase.
    pub fn phrase(self) -> &'static str {
        match self {
            Relation::LeftOf => "to the left of",
            Relation::RightOf => "to the right of",
            Relation::Above => "above",
            Relation::Below => "below",
        }
    }

    /// Whether the relation holds between two points (image coordinates, y down).
    pub fn holds(self, a: [f32; 2], b: [f32; 2]) -> bool {
        match self {
            Relation::LeftOf => a[0] < b[0],
            Relation::RightOf => a[0] > b[0],
            Relation::Above => a[1] < b[1],
            Relation::Below => a[1] > b[1],
        }
    }

    /// Whether it holds between two grid cells, strictly (different column/row).
    pub fn holds_for_cells(self, a: Cell, b: Cell) -> bool {
        match self {
            Relation::LeftOf => a.col < b.col,
            Relation::RightOf => a.col > b.col,
            Relation::Above => a.row < b.row,
            Relation::Below => a.row > b.row,
        }
    }
}

/// One drawn object.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Object {
    pub shape: Shape,
    pub color: Color,
    pub size: Size,
    /// The grid cell it sits in (the caption may name it).
    pub cell: Cell,
    /// Centre of its bounding square, `[x, y]` as fractions of the image side
    /// (the cell centre plus a small jitter).
    pub center: [f32; 2],
}

impl Object {
    /// An object centred exactly in its cell.
    pub fn new(shape: Shape, color: Color, size: Size, cell: Cell) -> Object {
        Object { shape, color, size, cell, center: cell.center() }
    }

    /// Bounding box `[x0, y0, x1, y1]` in fractions of the image side.
    pub fn bbox(&self) -> [f32; 4] {
        let h = self.size.extent() / 2.0;
        let [x, y] = self.center;
        [x - h, y - h, x + h, y + h]
    }

    /// Whether a point (fractions of the image side) is inside the shape.
    pub fn contains(&self, x: f32, y: f32) -> bool {
        let h = self.size.extent() / 2.0;
        let (dx, dy) = (x - self.center[0], y - self.center[1]);
        match self.shape {
            Shape::Circle => dx * dx + dy * dy <= h * h,
            Shape::Square => dx.abs() <= h && dy.abs() <= h,
            // Width grows linearly from the apex (dy = -h) to the base (dy = h).
            Shape::Triangle => dy.abs() <= h && dx.abs() <= (dy + h) / 2.0,
        }
    }
}

/// What the caption says about the scene.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Prompt {
    /// One object, described fully (size, color, shape, maybe its cell).
    Single,
    /// Two objects and their relation: "A to the left of B".
    Relation(Relation),
    /// Two objects that differ in both color and shape: "a red circle and a blue
    /// square" (attribute binding, a known unCLIP failure).
    Binding,
    /// At most one object, and a shape that is absent: "a red circle, no squares".
    Negation(Shape),
}

/// The kind of a prompt, without its data (for tables and generator weights).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PromptKind {
    Single,
    Relation,
    Binding,
    Negation,
}

impl PromptKind {
    /// All kinds.
    pub const ALL: [PromptKind; 4] =
        [PromptKind::Single, PromptKind::Relation, PromptKind::Binding, PromptKind::Negation];

    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            PromptKind::Single => "single",
            PromptKind::Relation => "relation",
            PromptKind::Binding => "binding",
            PromptKind::Negation => "negation",
        }
    }
}

impl Prompt {
    /// The kind of this prompt.
    pub fn kind(self) -> PromptKind {
        match self {
            Prompt::Single => PromptKind::Single,
            Prompt::Relation(_) => PromptKind::Relation,
            Prompt::Binding => PromptKind::Binding,
            Prompt::Negation(_) => PromptKind::Negation,
        }
    }
}

/// Smallest gap between two objects' bounding boxes (fraction of the image
/// side): two pixels at 32 px, so anti-aliased edges never join them.
pub const MIN_GAP: f32 = 0.07;

/// A captioned scene. `phrasing` picks one of the caption templates of its
/// prompt kind (taken modulo their number).
#[derive(Debug, Clone, PartialEq)]
pub struct Scene {
    pub background: Color,
    pub objects: Vec<Object>,
    pub prompt: Prompt,
    pub phrasing: u8,
}

impl Scene {
    /// Checks the rules every generated scene obeys: object count fits the
    /// prompt, colors differ from the background, objects inside the image, in
    /// their cells, in distinct cells, apart by [`MIN_GAP`], distinguishable, and
    /// the stated relation / absence true.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Input(format!("invalid scene: {m}")));
        let n = self.objects.len();
        let expected = match self.prompt {
            Prompt::Single => n == 1,
            Prompt::Relation(_) | Prompt::Binding => n == 2,
            Prompt::Negation(_) => n <= 1,
        };
        if !expected {
            return bad(format!("{n} objects for a {:?} prompt", self.prompt));
        }
        for o in &self.objects {
            if o.color == self.background {
                return bad(format!("a {} object on a {} background", o.color, o.color));
            }
            let [x0, y0, x1, y1] = o.bbox();
            if !(x0 >= 0.0 && y0 >= 0.0 && x1 <= 1.0 && y1 <= 1.0) {
                return bad(format!("object at {:?} leaves the image", o.center));
            }
            if Cell::of_point(o.center) != o.cell {
                return bad(format!("object at {:?} is not in {:?}", o.center, o.cell));
            }
        }
        if let [a, b] = self.objects.as_slice() {
            if a.cell == b.cell {
                return bad("two objects in one cell".into());
            }
            if bbox_gap(a.bbox(), b.bbox()) < MIN_GAP {
                return bad("objects closer than MIN_GAP".into());
            }
            if a.shape == b.shape && a.color == b.color {
                return bad("two identical objects".into());
            }
        }
        match self.prompt {
            Prompt::Relation(r)
                if !r.holds_for_cells(self.objects[0].cell, self.objects[1].cell) =>
            {
                bad(format!("relation {r:?} does not hold"))
            }
            Prompt::Binding
                if self.objects[0].shape == self.objects[1].shape
                    || self.objects[0].color == self.objects[1].color =>
            {
                bad("binding objects must differ in both shape and color".into())
            }
            Prompt::Negation(s) if self.objects.iter().any(|o| o.shape == s) => {
                bad(format!("a {s} is drawn but negated"))
            }
            _ => Ok(()),
        }
    }

    /// The same scene with the two objects' colors exchanged: the binding
    /// counterpart ("a blue circle and a red square"). `None` unless two objects.
    pub fn swap_colors(&self) -> Option<Scene> {
        let mut s = self.clone();
        if let [a, b] = s.objects.as_mut_slice() {
            std::mem::swap(&mut a.color, &mut b.color);
            Some(s)
        } else {
            None
        }
    }
}

/// Gap between two boxes: the larger of the horizontal and vertical gaps
/// (negative when they overlap).
pub(crate) fn bbox_gap(a: [f32; 4], b: [f32; 4]) -> f32 {
    let gx = (b[0] - a[2]).max(a[0] - b[2]);
    let gy = (b[1] - a[3]).max(a[1] - b[3]);
    gx.max(gy)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cells_round_trip() {
        for c in Cell::all() {
            assert_eq!(Cell::of_point(c.center()), c);
            let words: Vec<&str> = c.phrase().split(' ').skip(2).collect();
            assert_eq!(Cell::from_words(&words), Some(c), "{}", c.phrase());
        }
    }

    #[test]
    fn triangle_geometry() {
        let o = Object::new(Shape::Triangle, Color::Red, Size::Large, Cell { col: 1, row: 1 });
        let h = Size::Large.extent() / 2.0;
        assert!(o.contains(0.5, 0.5 - h + 0.001));
        assert!(!o.contains(0.5 + h / 2.0, 0.5 - h / 2.0));
        assert!(o.contains(0.5 + h * 0.95, 0.5 + h * 0.99));
    }

    #[test]
    fn validate_rejects_bad_scenes() {
        let c = |col, row| Cell { col, row };
        let a = Object::new(Shape::Circle, Color::Red, Size::Small, c(0, 1));
        let b = Object::new(Shape::Square, Color::Blue, Size::Small, c(2, 1));
        let ok = Scene {
            background: Color::White,
            objects: vec![a, b],
            prompt: Prompt::Relation(Relation::LeftOf),
            phrasing: 0,
        };
        ok.validate().unwrap();
        let mut s = ok.clone();
        s.prompt = Prompt::Relation(Relation::RightOf);
        assert!(s.validate().is_err());
        let mut s = ok.clone();
        s.background = Color::Red;
        assert!(s.validate().is_err());
        let mut s = ok.clone();
        s.objects[1] = Object::new(Shape::Square, Color::Blue, Size::Large, c(1, 1));
        s.objects[0].size = Size::Large;
        assert!(s.validate().is_err(), "large neighbours overlap");
        let mut s = ok.clone();
        s.prompt = Prompt::Single;
        assert!(s.validate().is_err());
        let mut s = ok;
        s.prompt = Prompt::Negation(Shape::Circle);
        s.objects.pop();
        assert!(s.validate().is_err());
    }
}
