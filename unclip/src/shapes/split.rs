//! Train / held-out splits and the seeded scene generator.

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use super::palette::Color;
use super::scene::{
    Cell, MIN_GAP, Object, Prompt, PromptKind, Relation, Scene, Shape, Size, bbox_gap,
};

/// (color, shape) pairs never drawn in the training split.
pub const HELD_OUT_PAIRS: [(Color, Shape); 5] = [
    (Color::Red, Shape::Square),
    (Color::Green, Shape::Triangle),
    (Color::Blue, Shape::Circle),
    (Color::Orange, Shape::Triangle),
    (Color::Cyan, Shape::Square),
];

/// (object color, shape, background) triples never drawn in the training split
/// (each pair on its own, and each color as a background, is seen in training).
pub const HELD_OUT_TRIPLES: [(Color, Shape, Color); 4] = [
    (Color::Yellow, Shape::Circle, Color::Black),
    (Color::Purple, Shape::Square, Color::White),
    (Color::White, Shape::Triangle, Color::Gray),
    (Color::Red, Shape::Circle, Color::Green),
];

/// Which attribute combinations a generator may draw.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Split {
    /// Only scenes without any held-out combination.
    Train,
    /// Only scenes with at least one held-out combination.
    HeldOut,
}

/// Whether one object on `background` is a held-out combination.
pub fn is_held_out(obj: &Object, background: Color) -> bool {
    HELD_OUT_PAIRS.contains(&(obj.color, obj.shape))
        || HELD_OUT_TRIPLES.contains(&(obj.color, obj.shape, background))
}

impl Scene {
    /// Whether any object of the scene is a held-out combination.
    pub fn is_held_out(&self) -> bool {
        self.objects.iter().any(|o| is_held_out(o, self.background))
    }

    /// The split this scene belongs to.
    pub fn split(&self) -> Split {
        if self.is_held_out() { Split::HeldOut } else { Split::Train }
    }
}

/// Relative frequency of each prompt kind (single, relation, binding, negation).
pub const DEFAULT_KIND_WEIGHTS: [u32; 4] = [40, 25, 20, 15];

/// Seeded generator of valid scenes of one split. Scene `i` depends only on
/// `(split, seed, i, kind weights)`, so datasets can be read in any order
/// ([`SceneGenerator::scene`]) or iterated.
#[derive(Debug, Clone)]
pub struct SceneGenerator {
    split: Split,
    seed: u64,
    weights: [u32; 4],
    next: u64,
}

impl SceneGenerator {
    /// A generator with the default prompt-kind mix.
    pub fn new(split: Split, seed: u64) -> SceneGenerator {
        SceneGenerator { split, seed, weights: DEFAULT_KIND_WEIGHTS, next: 0 }
    }

    /// Only prompts of these kinds, equally often (all kinds if empty).
    pub fn with_kinds(self, kinds: &[PromptKind]) -> SceneGenerator {
        self.with_kind_weights(PromptKind::ALL.map(|k| u32::from(kinds.contains(&k))))
    }

    /// Prompt kinds drawn in proportion to `weights` (single, relation, binding, negation; see
    /// [`DEFAULT_KIND_WEIGHTS`]); all zero keeps the default mix.
    pub fn with_kind_weights(mut self, weights: [u32; 4]) -> SceneGenerator {
        self.weights = if weights.iter().all(|&w| w == 0) { DEFAULT_KIND_WEIGHTS } else { weights };
        self
    }

    /// Scene number `index`.
    pub fn scene(&self, index: u64) -> Scene {
        // Decorrelate neighbouring (seed, index) pairs before seeding.
        let split_bit = u64::from(self.split == Split::HeldOut) << 63;
        let mix = splitmix(self.seed ^ splitmix(index ^ split_bit));
        let mut rng = StdRng::seed_from_u64(mix);
        loop {
            if let Some(s) = self.try_scene(&mut rng) {
                return s;
            }
        }
    }

    /// One attempt; `None` when the draw breaks a rule (the caller redraws).
    fn try_scene(&self, rng: &mut StdRng) -> Option<Scene> {
        let kind = pick_kind(rng, self.weights);
        let background = pick(rng, &Color::ALL);
        let n = match kind {
            PromptKind::Single => 1,
            PromptKind::Relation | PromptKind::Binding => 2,
            // One in three negations is an empty background.
            PromptKind::Negation => usize::from(rng.random_range(0..3) > 0),
        };
        let mut scene = Scene {
            background,
            objects: Vec::new(),
            prompt: Prompt::Single,
            // 12 is a multiple of every kind's template count (4, 3, 3, 2).
            phrasing: rng.random_range(0..12),
        };
        let mut attrs: Vec<(Shape, Color, Size)> = (0..n)
            .map(|_| (pick(rng, &Shape::ALL), pick(rng, &Color::ALL), pick(rng, &Size::ALL)))
            .collect();
        if self.split == Split::HeldOut {
            // Force one object (or, for an empty scene, redraw) into a held-out combination.
            let j = rng.random_range(0..n.max(1));
            let slot = attrs.get_mut(j)?;
            let k = rng.random_range(0..HELD_OUT_PAIRS.len() + HELD_OUT_TRIPLES.len());
            if let Some(&(c, s)) = HELD_OUT_PAIRS.get(k) {
                (slot.0, slot.1) = (s, c);
            } else {
                let (c, s, b) = HELD_OUT_TRIPLES[k - HELD_OUT_PAIRS.len()];
                (slot.0, slot.1) = (s, c);
                scene.background = b;
            }
        }
        scene.prompt = match kind {
            PromptKind::Single => Prompt::Single,
            PromptKind::Relation => Prompt::Relation(pick(rng, &Relation::ALL)),
            PromptKind::Binding => Prompt::Binding,
            PromptKind::Negation => {
                let drawn: Vec<Shape> = attrs.iter().map(|a| a.0).collect();
                let free: Vec<Shape> =
                    Shape::ALL.into_iter().filter(|s| !drawn.contains(s)).collect();
                // At most one shape is drawn, so two are free.
                Prompt::Negation(pick(rng, &free))
            }
        };
        let cells = place(rng, &scene.prompt, &attrs)?;
        scene.objects = attrs
            .iter()
            .zip(cells)
            .map(|(&(shape, color, size), (cell, center))| Object {
                shape,
                color,
                size,
                cell,
                center,
            })
            .collect();
        let ok = scene.validate().is_ok() && scene.split() == self.split;
        ok.then_some(scene)
    }
}

impl Iterator for SceneGenerator {
    type Item = Scene;

    fn next(&mut self) -> Option<Scene> {
        let s = self.scene(self.next);
        self.next += 1;
        Some(s)
    }
}

/// Largest offset of an object's centre from its cell centre (fraction of the side).
pub const JITTER: f32 = 0.02;

/// Draws distinct cells (respecting a relation) and jittered centres, retrying
/// a few times until the objects keep [`MIN_GAP`].
fn place(
    rng: &mut StdRng,
    prompt: &Prompt,
    attrs: &[(Shape, Color, Size)],
) -> Option<Vec<(Cell, [f32; 2])>> {
    let cells: Vec<Cell> = Cell::all().collect();
    'attempt: for _ in 0..20 {
        let mut out: Vec<(Cell, [f32; 2])> = Vec::new();
        for (i, a) in attrs.iter().enumerate() {
            let cell = pick(rng, &cells);
            let c = cell.center();
            let center = [
                c[0] + rng.random_range(-JITTER..=JITTER),
                c[1] + rng.random_range(-JITTER..=JITTER),
            ];
            if i == 1 {
                let (c0, p0) = out[0];
                let related = match prompt {
                    Prompt::Relation(r) => r.holds_for_cells(c0, cell),
                    _ => true,
                };
                let bbox = |p: [f32; 2], z: Size| {
                    let h = z.extent() / 2.0;
                    [p[0] - h, p[1] - h, p[0] + h, p[1] + h]
                };
                if cell == c0
                    || !related
                    || bbox_gap(bbox(p0, attrs[0].2), bbox(center, a.2)) < MIN_GAP
                {
                    continue 'attempt;
                }
            }
            out.push((cell, center));
        }
        return Some(out);
    }
    None
}

/// A uniformly drawn element of a non-empty slice.
fn pick<T: Copy>(rng: &mut StdRng, items: &[T]) -> T {
    items[rng.random_range(0..items.len())]
}

/// Picks a prompt kind by weight.
fn pick_kind(rng: &mut StdRng, w: [u32; 4]) -> PromptKind {
    let total: u32 = w.iter().sum();
    let mut r = rng.random_range(0..total.max(1));
    for (k, wk) in PromptKind::ALL.into_iter().zip(w) {
        if r < wk {
            return k;
        }
        r -= wk;
    }
    PromptKind::Single
}

/// SplitMix64 finaliser: spreads seed bits.
fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}
