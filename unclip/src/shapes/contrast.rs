//! Counterpart scenes: the same scene with one stated fact changed (a shape, a size, a place,
//! a color, the two objects' colors, shapes or places exchanged, or the scene mirrored).
//!
//! A contrastive batch of unrelated scenes is told apart by background and object color alone
//! (10 x 10 combinations against a batch of 128), so a CLIP trained on such batches never has to
//! see shape, position or which color sits on which object. Putting each scene next to a few of
//! its counterparts makes those the only way to match captions to images.

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use super::palette::Color;
use super::scene::{Cell, MIN_GAP, Object, Prompt, Relation, Scene, Shape, Size, bbox_gap};

/// What a counterpart changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Change {
    /// One object's shape.
    Shape,
    /// One object's color.
    Color,
    /// One object's size.
    Size,
    /// One object moved to another cell.
    Place,
    /// The background color.
    Background,
    /// The two objects' colors exchanged (the binding counterpart).
    SwapColors,
    /// The two objects' shapes exchanged.
    SwapShapes,
    /// The two objects' places exchanged (a stated relation reverses).
    SwapPlaces,
    /// The whole scene mirrored left to right (left and right exchanged in the caption). A
    /// random other place is the mirror only one time in eight: a CLIP trained without this
    /// change embedded "on the left" and "on the right" captions at cosine 0.989
    /// (`scripts/diagnose/clip_position.py`).
    Mirror,
}

impl Change {
    /// Every change, in a fixed order.
    pub const ALL: [Change; 9] = [
        Change::Shape,
        Change::Color,
        Change::Size,
        Change::Place,
        Change::Background,
        Change::SwapColors,
        Change::SwapShapes,
        Change::SwapPlaces,
        Change::Mirror,
    ];
}

impl Scene {
    /// Every valid scene of the same split that differs from this one by one [`Change`] and
    /// whose caption states different facts (same phrasing), in a fixed order.
    pub fn counterparts(&self) -> Vec<(Change, Scene)> {
        let mut out = Vec::new();
        let spec = self.spec();
        let mut keep = |change: Change, s: Scene| {
            if s.validate().is_ok() && s.split() == self.split() && s.spec() != spec {
                out.push((change, s));
            }
        };
        for i in 0..self.objects.len() {
            let o = self.objects[i];
            for shape in Shape::ALL.into_iter().filter(|&x| x != o.shape) {
                keep(Change::Shape, self.with_object(i, |b| b.shape = shape));
            }
            for color in Color::ALL.into_iter().filter(|&x| x != o.color) {
                keep(Change::Color, self.with_object(i, |b| b.color = color));
            }
            for size in Size::ALL.into_iter().filter(|&x| x != o.size) {
                keep(Change::Size, self.with_object(i, |b| b.size = size));
            }
            for cell in Cell::all().filter(|&x| x != o.cell) {
                keep(Change::Place, self.with_object(i, |b| move_to(b, cell)));
            }
        }
        for background in Color::ALL.into_iter().filter(|&x| x != self.background) {
            keep(Change::Background, Scene { background, ..self.clone() });
        }
        if self.objects.len() == 2 {
            if let Some(s) = self.swap_colors() {
                keep(Change::SwapColors, s);
            }
            let mut s = self.clone();
            let (a, b) = (s.objects[0].shape, s.objects[1].shape);
            (s.objects[0].shape, s.objects[1].shape) = (b, a);
            keep(Change::SwapShapes, s);
            if let Some(s) = self.swap_places() {
                keep(Change::SwapPlaces, s);
            }
        }
        keep(Change::Mirror, self.mirrored());
        out
    }

    /// The same scene with the two objects' places exchanged (each keeps its offset within its
    /// cell) and a stated relation reversed, so the caption stays true: the relation
    /// counterpart ("A right of B" for "A left of B"). `None` unless two objects.
    pub fn swap_places(&self) -> Option<Scene> {
        let mut s = self.clone();
        let [a, b] = s.objects.as_mut_slice() else { return None };
        let (cell_a, cell_b) = (a.cell, b.cell);
        move_to(a, cell_b);
        move_to(b, cell_a);
        if let Prompt::Relation(r) = s.prompt {
            s.prompt = Prompt::Relation(reversed(r));
        }
        Some(s)
    }

    /// The scene seen in a mirror: x -> 1 - x for every object (cells and jitter alike), and a
    /// stated left/right relation reversed.
    pub fn mirrored(&self) -> Scene {
        let mut s = self.clone();
        for o in &mut s.objects {
            o.center[0] = 1.0 - o.center[0];
            o.cell.col = 2 - o.cell.col.min(2);
        }
        if let Prompt::Relation(r @ (Relation::LeftOf | Relation::RightOf)) = s.prompt {
            s.prompt = Prompt::Relation(reversed(r));
        }
        s
    }

    /// Up to `n` distinct counterparts: each draw picks a change uniformly among those this
    /// scene has left, then one of its scenes, so rare changes (a swap) are as likely as
    /// common ones (one of nine backgrounds). The same seed gives the same picks.
    pub fn pick_counterparts(&self, n: usize, seed: u64) -> Vec<Scene> {
        if n == 0 {
            return Vec::new();
        }
        let rng = &mut StdRng::seed_from_u64(seed);
        let mut pool = self.counterparts();
        let mut out = Vec::with_capacity(n);
        while out.len() < n && !pool.is_empty() {
            let mut changes: Vec<Change> = pool.iter().map(|(c, _)| *c).collect();
            changes.sort();
            changes.dedup();
            let change = changes[rng.random_range(0..changes.len())];
            let of_change: Vec<usize> = (0..pool.len()).filter(|&j| pool[j].0 == change).collect();
            let j = of_change[rng.random_range(0..of_change.len())];
            out.push(pool.remove(j).1);
        }
        out
    }

    /// Up to `n` distinct scenes with one of its objects drawn a second time (small when a copy
    /// of its size has no room), each at the centre of a free cell that keeps [`MIN_GAP`] to
    /// every object: the decoder's commonest wrong count (a red circle drawn twice beside the
    /// blue square). No caption describes them and [`Scene::validate`] refuses them, so they
    /// serve as negative images without a caption (`clip.copy_negatives`). None without
    /// objects; the same seed gives the same copies.
    pub fn copies(&self, n: usize, seed: u64) -> Vec<Scene> {
        let fits = |copy: &Object| {
            let [x0, y0, x1, y1] = copy.bbox();
            x0 >= 0.0
                && y0 >= 0.0
                && x1 <= 1.0
                && y1 <= 1.0
                && self
                    .objects
                    .iter()
                    .all(|o| o.cell != copy.cell && bbox_gap(o.bbox(), copy.bbox()) >= MIN_GAP)
        };
        let mut pool: Vec<Object> = Vec::new();
        for source in &self.objects {
            // A large object in the middle leaves no cell for a large copy: then a small one.
            let free = [source.size, Size::Small].into_iter().map(|size| {
                Cell::all()
                    .map(|cell| Object::new(source.shape, source.color, size, cell))
                    .filter(|o| fits(o))
                    .collect::<Vec<_>>()
            });
            pool.extend(free.into_iter().find(|f| !f.is_empty()).unwrap_or_default());
        }
        let rng = &mut StdRng::seed_from_u64(seed);
        let mut out = Vec::with_capacity(n.min(pool.len()));
        while out.len() < n && !pool.is_empty() {
            let mut s = self.clone();
            s.objects.push(pool.swap_remove(rng.random_range(0..pool.len())));
            out.push(s);
        }
        out
    }

    fn with_object(&self, i: usize, edit: impl FnOnce(&mut Object)) -> Scene {
        let mut s = self.clone();
        edit(&mut s.objects[i]);
        s
    }
}

/// Moves an object to another cell, keeping its jitter within the cell.
fn move_to(o: &mut Object, cell: Cell) {
    let (from, to) = (o.cell.center(), cell.center());
    o.center = [o.center[0] - from[0] + to[0], o.center[1] - from[1] + to[1]];
    o.cell = cell;
}

fn reversed(r: Relation) -> Relation {
    match r {
        Relation::LeftOf => Relation::RightOf,
        Relation::RightOf => Relation::LeftOf,
        Relation::Above => Relation::Below,
        Relation::Below => Relation::Above,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shapes::{SceneGenerator, Split, caption};

    #[test]
    fn counterparts_are_valid_distinct_and_in_the_split() {
        for split in [Split::Train, Split::HeldOut] {
            let generator = SceneGenerator::new(split, 5);
            for i in 0..300 {
                let s = generator.scene(i);
                let parts = s.counterparts();
                for (change, c) in &parts {
                    c.validate().unwrap();
                    assert_eq!(c.split(), split);
                    assert_ne!(caption(c), caption(&s), "{change:?}");
                }
                // A training scene keeps at least some of its other backgrounds (a held-out
                // triple's may have none: any other background leaves the held-out split).
                let bg = parts.iter().any(|(c, _)| *c == Change::Background);
                assert!(bg || split == Split::HeldOut, "{}", caption(&s));
            }
        }
    }

    #[test]
    fn two_object_scenes_get_their_binding_and_relation_counterparts() {
        let generator = SceneGenerator::new(Split::Train, 1);
        let mut seen = std::collections::HashSet::new();
        for i in 0..400 {
            let s = generator.scene(i);
            for (change, c) in s.counterparts() {
                seen.insert(change);
                if change == Change::SwapPlaces {
                    // Only a stated relation makes a swap of places visible in the caption.
                    let (Prompt::Relation(a), Prompt::Relation(b)) = (s.prompt, c.prompt) else {
                        panic!("swap of places without a relation: {}", caption(&s));
                    };
                    assert_eq!(b, reversed(a));
                }
            }
        }
        assert_eq!(seen.len(), Change::ALL.len(), "{seen:?}");
    }

    /// A mirrored scene renders as the mirror image of the original and its caption exchanges
    /// left and right; mirroring twice gives the scene back (up to
    /// float rounding).
    #[test]
    fn mirror_counterparts_are_mirror_images() {
        let generator = SceneGenerator::new(Split::Train, 3);
        let mut mirrors = 0;
        for i in 0..200 {
            let s = generator.scene(i);
            let m = s.mirrored();
            let back = m.mirrored();
            assert_eq!(caption(&back), caption(&s));
            for (u, v) in back.objects.iter().zip(&s.objects) {
                assert_eq!(u.cell, v.cell);
                assert!((u.center[0] - v.center[0]).abs() < 1e-6);
            }
            let (a, b) = (crate::shapes::render(&s, 48), crate::shapes::render(&m, 48));
            for y in 0..48 {
                for x in 0..48 {
                    let (p, q) = (a.get_pixel(x, y).0, b.get_pixel(47 - x, y).0);
                    let close = p.iter().zip(q).all(|(u, v)| u.abs_diff(v) <= 1);
                    assert!(close, "scene {i} ({}) at ({x}, {y})", caption(&s));
                }
            }
            let Some((_, c)) = s.counterparts().into_iter().find(|(c, _)| *c == Change::Mirror)
            else {
                continue;
            };
            mirrors += 1;
            let swap = |t: &str| {
                t.replace("left", "\u{0}").replace("right", "left").replace('\u{0}', "right")
            };
            assert_eq!(caption(&c), swap(&caption(&s)));
        }
        // Scenes all in the middle column, or whose mirror is held out, have none (64 of 200).
        assert!(mirrors > 40, "{mirrors}");
    }

    /// A copy scene keeps every object and adds one more of the same shape and color (and size,
    /// or small), in a free cell, apart from the others; it is invalid (no caption fits it),
    /// distinct from the other copies and reproducible.
    #[test]
    fn copies_add_one_identical_object_in_a_free_cell() {
        let generator = SceneGenerator::new(Split::Train, 4);
        let mut made = 0;
        for i in 0..300 {
            let s = generator.scene(i);
            let copies = s.copies(3, i);
            assert_eq!(s.copies(3, i), copies);
            // Each object leaves at least one free cell far enough away.
            assert!(copies.len() >= s.objects.len().min(3), "{}", caption(&s));
            made += copies.len();
            for (j, c) in copies.iter().enumerate() {
                assert!(!copies[..j].contains(c));
                assert_eq!(c.objects.len(), s.objects.len() + 1);
                assert_eq!(&c.objects[..s.objects.len()], s.objects.as_slice());
                let copy = c.objects[s.objects.len()];
                let same = |o: &&Object| (o.shape, o.color) == (copy.shape, copy.color);
                let source = s.objects.iter().find(same).expect("a copy of an object");
                assert!(copy.size == source.size || copy.size == Size::Small);
                for o in &s.objects {
                    assert_ne!(o.cell, copy.cell);
                    assert!(bbox_gap(o.bbox(), copy.bbox()) >= MIN_GAP);
                }
                assert!(c.validate().is_err(), "{}", caption(&s));
            }
        }
        assert!(made > 500, "{made}");
    }

    #[test]
    fn picks_are_deterministic_and_distinct() {
        let s = SceneGenerator::new(Split::Train, 2).scene(7);
        let a = s.pick_counterparts(3, 9);
        let b = s.pick_counterparts(3, 9);
        assert_eq!(a, b);
        assert_eq!(a.len(), 3);
        let captions: std::collections::HashSet<String> = a.iter().map(caption).collect();
        assert_eq!(captions.len(), 3);
        assert!(!captions.contains(&caption(&s)));
    }
}
