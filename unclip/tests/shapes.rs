//! The captioned-shapes dataset and its checker: determinism, caption round
//! trips, held-out exclusion, and the checker passing ground truth and failing
//! wrong images.

use image::{Rgb, RgbImage};
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use unclip::shapes::*;

/// All scenes `0..n` of a split.
fn scenes(split: Split, seed: u64, n: u64) -> Vec<Scene> {
    let g = SceneGenerator::new(split, seed);
    (0..n).map(|i| g.scene(i)).collect()
}

/// How a generated image may differ from the ground truth.
#[derive(Clone, Copy)]
struct Degrade {
    /// Gaussian blur, px.
    blur: f32,
    /// Uniform per-pixel, per-channel noise of +-`noise`.
    noise: f32,
    /// Per-image color offsets of up to +-`drift` per channel, one for the
    /// whole image and another for the objects only (a model's color bias).
    drift: f32,
}

fn degrade(img: &RgbImage, d: Degrade, seed: u64) -> RgbImage {
    let mut out = image::imageops::blur(img, d.blur);
    let mut rng = StdRng::seed_from_u64(seed);
    let mut offset = || [0; 3].map(|_: u8| rng.random_range(-d.drift..=d.drift));
    let (all, objects) = (offset(), offset());
    let bg = img.get_pixel(0, 0);
    for (p, truth) in out.pixels_mut().zip(img.pixels()) {
        let on_object = truth != bg;
        for c in 0..3 {
            let shift = all[c] + if on_object { objects[c] } else { 0.0 };
            let v = f32::from(p.0[c]) + shift + rng.random_range(-d.noise..=d.noise);
            p.0[c] = v.clamp(0.0, 255.0) as u8;
        }
    }
    out
}

/// Checks every scene's rendering against its own caption's parsed spec.
fn score(scenes: &[Scene], size: u32, degrade_with: Option<Degrade>) -> EvalTable {
    let mut table = EvalTable::new();
    for (i, s) in scenes.iter().enumerate() {
        let mut img = render(s, size);
        if let Some(d) = degrade_with {
            img = degrade(&img, d, i as u64);
        }
        let spec = parse_caption(&caption(s)).expect("own caption parses");
        table.add(&check(&img, &spec));
    }
    table
}

fn assert_accuracy(table: &EvalTable, floor: f64, what: &str) {
    for attr in Attribute::ALL {
        if let Some(a) = table.accuracy(attr, None) {
            assert!(a >= floor, "{what}: {} accuracy {a:.3} < {floor}\n{table}", attr.name());
        }
    }
}

#[test]
fn same_seed_same_scenes_and_pixels() {
    let a = scenes(Split::Train, 11, 50);
    let b = scenes(Split::Train, 11, 50);
    assert_eq!(a, b);
    let c = scenes(Split::Train, 12, 50);
    assert_ne!(a, c, "another seed draws other scenes");
    // The iterator and random access agree.
    let it: Vec<Scene> = SceneGenerator::new(Split::Train, 11).take(50).collect();
    assert_eq!(a, it);
    for s in &a[..10] {
        assert_eq!(render(s, 32), render(s, 32));
    }
    let h = scenes(Split::HeldOut, 11, 20);
    assert_eq!(h, scenes(Split::HeldOut, 11, 20));
}

#[test]
fn generated_scenes_are_valid_and_cover_every_kind() {
    let all: Vec<Scene> =
        scenes(Split::Train, 1, 600).into_iter().chain(scenes(Split::HeldOut, 1, 300)).collect();
    for s in &all {
        s.validate().unwrap_or_else(|e| panic!("{s:?}: {e}"));
    }
    for kind in PromptKind::ALL {
        assert!(all.iter().any(|s| s.prompt.kind() == kind), "{kind:?} never drawn");
        let only = SceneGenerator::new(Split::Train, 3).with_kinds(&[kind]);
        assert!((0..40).all(|i| only.scene(i).prompt.kind() == kind));
    }
    assert!(all.iter().any(|s| matches!(s.prompt, Prompt::Negation(_)) && s.objects.is_empty()));
}

/// Kind weights set the mix: the default weights give the default scenes exactly, zero weights
/// never draw their kind, and a heavier weight draws its kind more often (not exactly in
/// proportion: a draw that breaks a scene rule is redrawn whole, kind included, and two-object
/// scenes break more rules).
#[test]
fn kind_weights_set_the_mix() {
    let plain = SceneGenerator::new(Split::Train, 4);
    let same = SceneGenerator::new(Split::Train, 4).with_kind_weights(DEFAULT_KIND_WEIGHTS);
    assert!((0..100).all(|i| plain.scene(i) == same.scene(i)));
    let share = |w: [u32; 4]| {
        let g = SceneGenerator::new(Split::Train, 4).with_kind_weights(w);
        let kinds: Vec<PromptKind> = (0..400).map(|i| g.scene(i).prompt.kind()).collect();
        assert!(kinds.iter().all(|k| matches!(k, PromptKind::Single | PromptKind::Binding)));
        kinds.iter().filter(|k| **k == PromptKind::Binding).count()
    };
    let (even, heavy) = (share([1, 0, 1, 0]), share([1, 0, 3, 0]));
    assert!(even > 80 && heavy > even + 60, "binding scenes of 400: {even} at 1:1, {heavy} at 1:3");
}

#[test]
fn captions_round_trip_and_stay_short() {
    for s in scenes(Split::Train, 2, 800).iter().chain(&scenes(Split::HeldOut, 2, 200)) {
        let text = caption(s);
        assert_eq!(parse_caption(&text), Some(s.spec()), "{text:?}");
        assert_eq!(s.spec().kind(), s.prompt.kind(), "{text:?}");
        // BPE spends about one token per word here, plus one per comma.
        let tokens = text.split_whitespace().count() + text.matches(',').count();
        assert!(tokens <= 20, "{tokens} tokens: {text:?}");
    }
}

#[test]
fn binding_and_negation_prompts_read_back() {
    let s = parse_caption("a red circle and a blue square").unwrap();
    let t = parse_caption("a blue circle and a red square").unwrap();
    assert_eq!(s.kind(), PromptKind::Binding);
    assert_ne!(s, t);
    assert_eq!(s.objects[0].color, t.objects[1].color);
    let n = parse_caption("a red circle, no squares").unwrap();
    assert_eq!((n.kind(), n.absent), (PromptKind::Negation, Some(Shape::Square)));
    let n = parse_caption("a blue background with no circle").unwrap();
    assert_eq!(
        (n.background, n.absent, n.objects.len()),
        (Some(Color::Blue), Some(Shape::Circle), 0)
    );
}

#[test]
fn train_split_never_draws_a_held_out_combination() {
    let train = scenes(Split::Train, 5, 5000);
    let mut pairs = std::collections::HashSet::new();
    let mut backgrounds = std::collections::HashSet::new();
    for s in &train {
        assert!(!s.is_held_out(), "{}", caption(s));
        backgrounds.insert(s.background);
        for o in &s.objects {
            assert!(!HELD_OUT_PAIRS.contains(&(o.color, o.shape)), "{}", caption(s));
            assert!(
                !HELD_OUT_TRIPLES.contains(&(o.color, o.shape, s.background)),
                "{}",
                caption(s)
            );
            pairs.insert((o.color, o.shape));
        }
    }
    // Every other (color, shape) pair and every background is seen in training,
    // so the held-out combinations are new compositions of known parts.
    assert_eq!(pairs.len(), Color::ALL.len() * Shape::ALL.len() - HELD_OUT_PAIRS.len());
    assert_eq!(backgrounds.len(), Color::ALL.len());
    for (c, s, _) in HELD_OUT_TRIPLES {
        assert!(pairs.contains(&(c, s)), "{c} {s} unseen in training");
    }
    // The held-out split always draws one, and draws every one of them.
    let held = scenes(Split::HeldOut, 5, 1000);
    assert!(held.iter().all(Scene::is_held_out));
    for (c, s) in HELD_OUT_PAIRS {
        assert!(held.iter().any(|h| h.objects.iter().any(|o| (o.color, o.shape) == (c, s))));
    }
    for t in HELD_OUT_TRIPLES {
        assert!(
            held.iter().any(|h| h.objects.iter().any(|o| (o.color, o.shape, h.background) == t))
        );
    }
}

#[test]
fn checker_passes_ground_truth_at_32_64_and_128_px() {
    let train = scenes(Split::Train, 9, 300);
    let held = scenes(Split::HeldOut, 9, 100);
    for size in [32, 64] {
        for (name, set) in [("train", &train), ("held-out", &held)] {
            let table = score(set, size, None);
            assert_accuracy(&table, 0.99, &format!("{name} at {size} px"));
            if size == 32 && name == "train" {
                println!("{table}");
            }
        }
    }
    assert_accuracy(&score(&train[..60], 128, None), 0.99, "train at 128 px");
    // Every kind of prompt was scored.
    let table = score(&train, 64, None);
    for kind in PromptKind::ALL {
        assert!(table.prompts(Some(kind)) > 0);
    }
    assert!(
        table.count(Attribute::Binding, None).1 > 0 && table.count(Attribute::Negation, None).1 > 0
    );
    assert!(
        table.count(Attribute::Relation, None).1 > 0
            && table.count(Attribute::Position, None).1 > 0
    );
}

#[test]
fn checker_tolerates_blur_noise_and_color_drift() {
    let set = scenes(Split::Train, 21, 300);
    // (size, degradation, accuracy floor for every attribute): small blurred
    // objects with drifted colors are the hardest.
    let cases = [
        (32, Degrade { blur: 0.6, noise: 12.0, drift: 0.0 }, 0.97),
        (64, Degrade { blur: 1.0, noise: 12.0, drift: 0.0 }, 0.97),
        (64, Degrade { blur: 0.0, noise: 40.0, drift: 0.0 }, 0.97),
        (32, Degrade { blur: 0.5, noise: 15.0, drift: 25.0 }, 0.95),
        (64, Degrade { blur: 1.0, noise: 15.0, drift: 30.0 }, 0.95),
    ];
    for (size, d, floor) in cases {
        let what = format!("{size} px, blur {}, noise {}, drift {}", d.blur, d.noise, d.drift);
        let table = score(&set, size, Some(d));
        assert_accuracy(&table, floor, &what);
    }
    let d = Degrade { blur: 1.5, noise: 16.0, drift: 25.0 };
    assert_accuracy(&score(&set[..60], 128, Some(d)), 0.97, "128 px, blur 1.5, noise 16, drift 25");
}

/// Renders `wrong`, checks it against `right`'s caption, returns the report.
fn check_wrong(right: &Scene, wrong: &Scene, size: u32) -> CheckReport {
    check(&render(wrong, size), &parse_caption(&caption(right)).unwrap())
}

#[test]
fn checker_fails_a_recolored_background() {
    for s in scenes(Split::Train, 31, 100) {
        let mut img = render(&s, 32);
        let other = Color::ALL
            .into_iter()
            .find(|&c| c != s.background && s.objects.iter().all(|o| o.color != c))
            .unwrap();
        for p in img.pixels_mut() {
            if *p == Rgb(s.background.rgb()) {
                *p = Rgb(other.rgb());
            }
        }
        let r = check(&img, &s.spec());
        assert_eq!(r.background, Some(false), "{}", caption(&s));
        assert!(!r.all_ok());
    }
}

#[test]
fn checker_fails_swapped_binding() {
    let g = SceneGenerator::new(Split::Train, 41).with_kinds(&[PromptKind::Binding]);
    for i in 0..100 {
        let s = g.scene(i);
        let swapped = s.swap_colors().unwrap();
        let r = check_wrong(&s, &swapped, 32);
        // Every color and every shape is there, but not on the right object.
        assert_eq!(
            (r.color, r.shape, r.binding),
            (Some(true), Some(true), Some(false)),
            "{}",
            caption(&s)
        );
        assert!(!r.all_ok());
    }
}

#[test]
fn checker_fails_wrong_shape_size_and_color() {
    let g = SceneGenerator::new(Split::Train, 51).with_kinds(&[PromptKind::Single]);
    let mut sizes = 0;
    for i in 0..150 {
        let s = g.scene(i);
        let o = s.objects[0];
        let mut wrong = s.clone();
        wrong.objects[0].shape = Shape::ALL[(o.shape as usize + 1 + i as usize % 2) % 3];
        assert_eq!(check_wrong(&s, &wrong, 32).shape, Some(false), "{}", caption(&s));
        let mut wrong = s.clone();
        wrong.objects[0].color =
            Color::ALL.into_iter().find(|&c| c != o.color && c != s.background).unwrap();
        assert_eq!(check_wrong(&s, &wrong, 32).color, Some(false), "{}", caption(&s));
        let mut wrong = s.clone();
        wrong.objects[0].size = if o.size == Size::Small { Size::Large } else { Size::Small };
        let r = check_wrong(&s, &wrong, 64);
        let stated = s.spec().objects[0].size.is_some();
        assert_eq!(r.size, stated.then_some(false), "{}", caption(&s));
        sizes += usize::from(stated);
        assert_eq!(r.shape, Some(true));
    }
    assert!(sizes > 50, "only {sizes} captions state a size");
}

#[test]
fn checker_fails_wrong_position_and_relation() {
    let g = SceneGenerator::new(Split::Train, 61).with_kinds(&[PromptKind::Single]);
    let mut positions = 0;
    for i in 0..100 {
        let s = g.scene(i);
        let mut wrong = s.clone();
        let c = s.objects[0].cell;
        let cell = Cell { col: 2 - c.col, row: (c.row + 1) % 3 };
        wrong.objects[0] =
            Object::new(s.objects[0].shape, s.objects[0].color, s.objects[0].size, cell);
        let r = check_wrong(&s, &wrong, 32);
        if s.spec().objects[0].cell.is_some() {
            positions += 1;
            assert_eq!(r.position, Some(false), "{}", caption(&s));
        }
        assert_eq!(r.color, Some(true));
    }
    assert!(positions > 30);
    // Relation prompts: exchanging the objects' places reverses the relation.
    let g = SceneGenerator::new(Split::Train, 62).with_kinds(&[PromptKind::Relation]);
    for i in 0..100 {
        let s = g.scene(i);
        let mut wrong = s.clone();
        let (a, b) = (s.objects[0], s.objects[1]);
        (wrong.objects[0].center, wrong.objects[1].center) = (b.center, a.center);
        let r = check_wrong(&s, &wrong, 32);
        assert_eq!((r.relation, r.binding), (Some(false), Some(true)), "{}", caption(&s));
    }
}

#[test]
fn checker_fails_negation_and_missing_objects() {
    let g = SceneGenerator::new(Split::Train, 71).with_kinds(&[PromptKind::Negation]);
    for i in 0..100 {
        let s = g.scene(i);
        let Prompt::Negation(absent) = s.prompt else { unreachable!() };
        // Draw the negated shape in a free cell.
        let color = Color::ALL.into_iter().find(|&c| c != s.background).unwrap();
        let mut wrong = s.clone();
        let taken: Vec<Cell> = s.objects.iter().map(|o| o.cell).collect();
        let cell = [Cell { col: 0, row: 0 }, Cell { col: 2, row: 2 }]
            .into_iter()
            .find(|c| taken.iter().all(|t| t.col.abs_diff(c.col) + t.row.abs_diff(c.row) > 1))
            .unwrap_or(Cell { col: 0, row: 2 });
        wrong.objects.push(Object::new(absent, color, Size::Small, cell));
        let r = check_wrong(&s, &wrong, 64);
        assert_eq!(r.negation, Some(false), "{}", caption(&s));
        assert_eq!(r.count, Some(false));
        // The scene itself passes.
        assert_eq!(check(&render(&s, 64), &s.spec()).negation, Some(true));
    }
    // An empty image fails a one-object prompt.
    let s = scenes(Split::Train, 72, 50).into_iter().find(|s| s.prompt == Prompt::Single).unwrap();
    let blank = RgbImage::from_pixel(32, 32, Rgb(s.background.rgb()));
    let r = check(&blank, &s.spec());
    assert_eq!(
        (r.background, r.count, r.color, r.shape),
        (Some(true), Some(false), Some(false), Some(false))
    );
}

#[test]
fn eval_table_counts_and_prints() {
    let set = scenes(Split::Train, 81, 40);
    let mut table = score(&set, 32, None);
    let g = SceneGenerator::new(Split::Train, 82).with_kinds(&[PromptKind::Binding]);
    for i in 0..10 {
        let s = g.scene(i);
        table.add(&check_wrong(&s, &s.swap_colors().unwrap(), 32));
    }
    assert_eq!(table.prompts(None), 50);
    let (ok, n) = table.count(Attribute::Binding, Some(PromptKind::Binding));
    assert_eq!(n - ok, 10, "the ten swapped images fail binding");
    let text = table.to_string();
    for attr in Attribute::ALL {
        assert!(text.contains(attr.name()), "{text}");
    }
    assert!(text.contains("binding") && text.contains('%'));
}

#[test]
fn odd_inputs_do_not_panic() {
    let s = scenes(Split::Train, 91, 1).remove(0);
    for size in [0, 1, 3, 17, 96] {
        let img = render(&s, size);
        assert_eq!(img.dimensions(), (size, size));
        let _ = check(&img, &s.spec());
    }
    let _ = check(&RgbImage::new(40, 7), &Spec::default());
    let bad = Scene { objects: vec![], ..s };
    assert!(bad.validate().is_err() || bad.prompt.kind() == PromptKind::Negation);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn parse_never_panics(text in "\\PC{0,80}") {
        let _ = parse_caption(&text);
    }

    #[test]
    fn any_seed_renders_and_checks(seed in any::<u64>(), index in 0u64..1_000_000, held in any::<bool>()) {
        let split = if held { Split::HeldOut } else { Split::Train };
        let s = SceneGenerator::new(split, seed).scene(index);
        prop_assert!(s.validate().is_ok());
        prop_assert_eq!(s.split(), split);
        prop_assert_eq!(parse_caption(&caption(&s)), Some(s.spec()));
        let r = check(&render(&s, 64), &s.spec());
        prop_assert!(r.all_ok(), "{}: {:?}", caption(&s), r);
    }
}
