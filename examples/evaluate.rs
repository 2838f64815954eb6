//! Evaluates a trained shapes unCLIP (e.g. the embedded default model, `models/shapes`) on
//! held-out prompts of `unclip::shapes`: generates through the facade pipeline, grades every image
//! with the analytic checker (`unclip::shapes::check`) and prints the accuracy table, then our
//! CLIP's scores: CLIP score (cosine of prompt and generated image) and zero-shot shape / color /
//! background accuracy on held-out renders and on the generated images.
//!
//! `cargo run --release --example evaluate -- --model models/shapes`

use anyhow::Context;
use clap::Parser;
use std::path::PathBuf;
use unclip::clip::normalize;
use unclip::shapes::{
    Cell, CheckReport, Color, EvalTable, Object, PromptKind, Scene, SceneGenerator, Shape, Spec,
    Split, caption, check, render,
};
use unclip::tch::{Kind, Tensor};
use unclip::{DecodeOptions, LoadOptions, TextToImage, Unclip};
use unclip_examples::{RuntimeArgs, SamplingArgs};

#[derive(Parser)]
#[command(about = "Generates held-out shapes prompts with a trained unCLIP and grades the images")]
struct Cli {
    /// The diffusers-layout model folder.
    #[arg(long, default_value = "models/shapes")]
    model: PathBuf,
    /// Held-out single-object prompts.
    #[arg(long, default_value_t = 200)]
    single: usize,
    /// Held-out two-object binding prompts ("a red circle and a blue square ...").
    #[arg(long, default_value_t = 50)]
    binding: usize,
    /// Held-out relation prompts ("... to the left of ...").
    #[arg(long, default_value_t = 50)]
    relation: usize,
    /// Held-out negation prompts ("..., no squares, ...").
    #[arg(long, default_value_t = 50)]
    negation: usize,
    /// Prompts per pipeline call.
    #[arg(long, default_value_t = 25)]
    batch: usize,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Seed of the prompts (held-out generator) and of the sampling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Folder for the generated PNGs, prompts.txt and grades.tsv (each image's failed checks and
    /// the objects found; none when absent).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Decoder-only evaluation: condition the decoder on our CLIP's embedding of each prompt's
    /// ground-truth render instead of a prior sample (tells the prior's errors from the decoder's).
    #[arg(long)]
    oracle_embeddings: bool,
    /// Upsampler-only evaluation: super-resolve each prompt's ground-truth render at the
    /// decoder's size (no prior, no decoder; tells the upsampler's errors from the decoder's).
    #[arg(long, conflicts_with = "oracle_embeddings")]
    upsampler_only: bool,
    /// A diffusers `scheduler_config.json` to sample the decoder with instead of the folder's
    /// (e.g. a `DDIMScheduler`: decoders trained with learned variance sample without it too).
    #[arg(long)]
    decoder_scheduler: Option<PathBuf>,
    /// Grade the PNGs an earlier run saved with `--out` in this folder (`eval-N.png`; the same
    /// prompt counts and seed) instead of generating: regrades a run, or a leading subset of it
    /// (the first N single-object prompts are the same images whatever the other counts); writes
    /// the graded prompts' grades.tsv there.
    #[arg(long, conflicts_with_all = ["oracle_embeddings", "upsampler_only", "out"])]
    grade: Option<PathBuf>,
    /// Prior-only evaluation of the one-object and relation prompts, no decoder: draws the prior's image
    /// embeddings (the draws a generating run with the same flags decodes) and compares each with
    /// our CLIP's embeddings of its scene drawn at each of the nine places. Is the nearest place
    /// the prompted one? Is the draw nearer the mean of two places than any one place (the
    /// decoder draws such an embedding as two copies)? Relation prompts: is the draw nearer the
    /// scene as stated than with its two objects' places exchanged? Every prompt: is its text
    /// embedding nearer its scene than the scene with one object drawn twice? With `--out`,
    /// writes prior.tsv (and relation.tsv) there.
    /// With `--oracle-embeddings`, the same for the ground-truth renders' embeddings (the scale).
    #[arg(long, conflicts_with_all = ["upsampler_only", "grade"])]
    prior_only: bool,
    /// Draw the prompts from the training split instead of the held-out one (tells what the
    /// model learned on its training combinations from what it carries over to new ones).
    #[arg(long)]
    train_split: bool,
    /// libtorch CPU threads.
    #[arg(long, default_value_t = 2, allow_negative_numbers = true, value_parser = clap::value_parser!(i32).range(unclip_examples::THREADS_RANGE))]
    threads: i32,
    #[command(flatten)]
    rt: RuntimeArgs,
}

/// A held-out prompt, the facts it states, and the ground-truth render of its scene at the
/// output size and at the decoder's.
struct Case {
    scene: Scene,
    prompt: String,
    spec: Spec,
    render: Tensor,
    render_small: Tensor,
}

fn cases(
    split: Split,
    seed: u64,
    kind: PromptKind,
    n: usize,
    side: u32,
    small_side: u32,
) -> anyhow::Result<Vec<Case>> {
    let generator = SceneGenerator::new(split, seed).with_kinds(&[kind]);
    let to_tensor = |img| unclip::output::image_to_tensor(&image::DynamicImage::ImageRgb8(img));
    (0..n as u64)
        .map(|i| {
            let scene = generator.scene(i);
            Ok(Case {
                scene: scene.clone(),
                prompt: caption(&scene),
                spec: scene.spec(),
                render: to_tensor(render(&scene, side))?,
                render_small: to_tensor(render(&scene, small_side))?,
            })
        })
        .collect()
}

/// Our CLIP's view of prompts and images (normalized embeddings).
struct ClipProbe<'a> {
    model: &'a Unclip,
}

impl ClipProbe<'_> {
    fn text(&self, prompts: &[String]) -> anyhow::Result<Tensor> {
        let refs: Vec<&str> = prompts.iter().map(String::as_str).collect();
        Ok(normalize(&self.model.clip_text_embeddings(&refs)?)?)
    }

    /// Images (B, 3, H, W) in [0, 1].
    fn images(&self, images: &Tensor) -> anyhow::Result<Tensor> {
        Ok(normalize(&self.model.clip_image_embeddings(images)?)?)
    }

    /// Mean cosine of matching rows, and of rows paired with the next row's (a baseline).
    fn scores(&self, prompts: &[String], images: &Tensor) -> anyhow::Result<(f64, f64)> {
        let (t, i) = (self.text(prompts)?, self.images(images)?);
        let matched = t.f_mul(&i)?.f_sum_dim_intlist(1, false, Kind::Float)?.f_mean(Kind::Float)?;
        let shifted = t.f_roll([1], [0])?;
        let other =
            shifted.f_mul(&i)?.f_sum_dim_intlist(1, false, Kind::Float)?.f_mean(Kind::Float)?;
        Ok((matched.f_double_value(&[])?, other.f_double_value(&[])?))
    }

    /// Zero-shot accuracy on single-object images: for each attribute, the caption variants that
    /// differ from the truth only in that attribute, and the fraction whose true variant scores
    /// highest. Returns (shape, color, background) accuracies.
    fn zero_shot(&self, specs: &[&Spec], images: &Tensor) -> anyhow::Result<[f64; 3]> {
        let img = self.images(images)?;
        let mut hits = [0usize; 3];
        let mut n = 0;
        for (row, spec) in specs.iter().enumerate() {
            let (Some(bg), Some(obj)) = (spec.background, spec.objects.first()) else { continue };
            let Some(color) = obj.color else { continue };
            let text = |c: Color, s: Shape, b: Color| {
                format!("a {} {} on a {} background", c.name(), s.name(), b.name())
            };
            let shapes: Vec<(bool, String)> =
                Shape::ALL.iter().map(|&s| (s == obj.shape, text(color, s, bg))).collect();
            let colors: Vec<(bool, String)> = Color::ALL
                .iter()
                .filter(|&&c| c != bg)
                .map(|&c| (c == color, text(c, obj.shape, bg)))
                .collect();
            let bgs: Vec<(bool, String)> = Color::ALL
                .iter()
                .filter(|&&b| b != color)
                .map(|&b| (b == bg, text(color, obj.shape, b)))
                .collect();
            let im = img.f_get(row as i64)?;
            for (k, labels) in [shapes, colors, bgs].iter().enumerate() {
                let prompts: Vec<String> = labels.iter().map(|(_, p)| p.clone()).collect();
                let sims = self.text(&prompts)?.f_mv(&im)?;
                let best = sims.f_argmax(0, false)?.f_int64_value(&[])? as usize;
                hits[k] += usize::from(labels[best].0);
            }
            n += 1;
        }
        let n = n.max(1) as f64;
        Ok(hits.map(|h| h as f64 / n))
    }
}

/// Batch `b` of a run: its prompts, seeded with `seed + b` (the same draws whatever is measured).
fn batch_request(req: &TextToImage, chunk: &[Case], seed: u64, b: usize) -> TextToImage {
    TextToImage {
        prompts: chunk.iter().map(|c| c.prompt.clone()).collect(),
        seed: Some(seed.wrapping_add(b as u64)),
        ..req.clone()
    }
}

/// `--prior-only`: where the prior's draws for single-object prompts lie among the nine places
/// their scene can take (see the flag). `req` is the sampling; prompts and seeds are filled in
/// per batch as in a generating run, so the draws are that run's.
fn prior_report(
    model: &mut Unclip,
    all: &[Case],
    cli: &Cli,
    req: &TextToImage,
    side: u32,
) -> anyhow::Result<()> {
    let mut drawn = Vec::new();
    for (b, chunk) in all.chunks(cli.batch).enumerate() {
        if cli.oracle_embeddings {
            let renders: Vec<Tensor> = chunk.iter().map(|c| c.render.shallow_clone()).collect();
            drawn.push(model.clip_image_embeddings(&Tensor::f_cat(&renders, 0)?)?);
            continue;
        }
        drawn.push(model.prior_image_embeddings(&batch_request(req, chunk, cli.seed, b))?);
    }
    let raw = Tensor::f_cat(&drawn, 0)?.f_to_kind(Kind::Float)?;
    let norms =
        Vec::<f64>::try_from(&raw.f_norm_scalaropt_dim(2, [1], false)?.f_to_kind(Kind::Double)?)?;
    let drawn = normalize(&raw)?;
    let probe = ClipProbe { model };
    let to_tensor = |img| unclip::output::image_to_tensor(&image::DynamicImage::ImageRgb8(img));
    // Per group (single with a place, single without, negation): prompts, nearest place right,
    // cosine sum, between two places, sum of (pair cosine - cosine).
    let mut tally = [(0usize, 0usize, 0f64, 0usize, 0f64); 3];
    let mut tsv = String::from(
        "image\tprompt\tplace stated\tnearest place\tcosine\tnearest pair\tpair cosine\t\
         between two places\tnorm\tcosines by place (row by row)\n",
    );
    for (i, case) in all.iter().enumerate() {
        let (Some(spec), [object]) = (case.spec.objects.first(), case.scene.objects.as_slice())
        else {
            continue;
        };
        let places: Vec<Cell> = Cell::all().collect();
        let renders = places
            .iter()
            .map(|&cell| {
                let mut scene = case.scene.clone();
                scene.objects[0] = Object::new(object.shape, object.color, object.size, cell);
                to_tensor(render(&scene, side))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let places_emb = probe.images(&Tensor::f_cat(&renders, 0)?)?;
        let row = drawn.f_get(i as i64)?;
        let cos = Vec::<f64>::try_from(&places_emb.f_mv(&row)?.f_to_kind(Kind::Double)?)?;
        let gram = places_emb.f_mm(&places_emb.f_tr()?)?.f_to_kind(Kind::Double)?;
        let gram = Vec::<f64>::try_from(&gram.f_flatten(0, 1)?)?;
        let first = (0..cos.len()).max_by(|&a, &b| cos[a].total_cmp(&cos[b])).unwrap_or(0);
        // The nearest normalized mean of two places, over all 36 pairs: for unit rows a and b,
        // cos(row, a + b) = (cos a + cos b) / |a + b| and |a + b|^2 = 2 + 2 a.b.
        let n = places.len();
        let mut pair = (0, 0, f64::MIN);
        for a in 0..n {
            for b in a + 1..n {
                let c = (cos[a] + cos[b]) / (2.0 + 2.0 * gram[a * n + b]).sqrt();
                if c > pair.2 {
                    pair = (a, b, c);
                }
            }
        }
        let between = pair.2 > cos[first];
        let g = match case.spec.kind() {
            PromptKind::Single => usize::from(spec.cell.is_none()),
            _ => 2,
        };
        tally[g].0 += 1;
        tally[g].1 += usize::from(spec.cell == Some(places[first]));
        tally[g].2 += cos[first];
        tally[g].3 += usize::from(between);
        tally[g].4 += pair.2 - cos[first];
        let name = |c: Cell| format!("{},{}", c.col, c.row);
        let all_cos: Vec<String> = cos.iter().map(|c| format!("{c:.4}")).collect();
        tsv.push_str(&format!(
            "eval-{i}\t{}\t{}\t{}\t{:.4}\t{} {}\t{:.4}\t{}\t{:.3}\t{}\n",
            case.prompt,
            if spec.cell.is_some() { "yes" } else { "no" },
            name(places[first]),
            cos[first],
            name(places[pair.0]),
            name(places[pair.1]),
            pair.2,
            if between { "yes" } else { "no" },
            norms[i],
            all_cos.join(" ")
        ));
    }
    println!(
        "\nprior draws for one-object prompts against our CLIP's embeddings of each scene at the \
         nine places (between two places: nearer the mean of two places than any one; pair - \
         nearest: mean of that cosine minus the nearest place's):"
    );
    println!(
        "{:<18}{:>7}{:>22}{:>19}{:>20}{:>16}",
        "prompts",
        "number",
        "nearest place right",
        "cosine to nearest",
        "between two places",
        "pair - nearest"
    );
    for (name, (n, right, cos, between, margin), placed) in [
        ("single, placed", tally[0], true),
        ("single, no place", tally[1], false),
        ("negation", tally[2], false),
    ] {
        let pct = |k: usize| 100.0 * k as f64 / n.max(1) as f64;
        let right = if placed { format!("{right} ({:.1}%)", pct(right)) } else { "-".into() };
        let mean = |x: f64| x / n.max(1) as f64;
        println!(
            "{name:<18}{n:>7}{right:>22}{:>19.3}{:>20}{:>+16.4}",
            mean(cos),
            format!("{between} ({:.1}%)", pct(between)),
            mean(margin)
        );
    }
    let relation_tsv = relation_report(&probe, all, &drawn, side)?;
    copy_report(&probe, all, side)?;
    if let Some(dir) = &cli.out {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("prior.tsv"), tsv)?;
        println!("per prompt: {}", dir.join("prior.tsv").display());
        if let Some(tsv) = relation_tsv {
            std::fs::write(dir.join("relation.tsv"), tsv)?;
            println!("per relation prompt: {}", dir.join("relation.tsv").display());
        }
    }
    Ok(())
}

/// `--prior-only` on relation prompts: is each draw nearer our CLIP's embedding of the scene as
/// stated than of the same scene with the two objects' places exchanged? Beside it, the same
/// question asked of the prompt's text embedding (our CLIP's zero-shot reading of the relation,
/// which the prior's draws cannot beat). Returns relation.tsv's text; `None` without relation
/// prompts.
fn relation_report(
    probe: &ClipProbe<'_>,
    all: &[Case],
    drawn: &Tensor,
    side: u32,
) -> anyhow::Result<Option<String>> {
    let to_tensor = |img| unclip::output::image_to_tensor(&image::DynamicImage::ImageRgb8(img));
    let (mut n, mut nearer, mut margin, mut text_right, mut text_margin) = (0, 0, 0f64, 0, 0f64);
    let mut text_cos = 0f64;
    let mut tsv = String::from(
        "image\tprompt\tcosine stated\tcosine swapped\tnearer stated\ttext cosine stated\t\
         text cosine swapped\n",
    );
    for (i, case) in all.iter().enumerate() {
        if case.spec.kind() != PromptKind::Relation {
            continue;
        }
        let Some(swapped) = case.scene.swap_places() else { continue };
        let both = Tensor::f_cat(
            &[to_tensor(render(&case.scene, side))?, to_tensor(render(&swapped, side))?],
            0,
        )?;
        let emb = probe.images(&both)?;
        let pair = |v: &Tensor| -> anyhow::Result<(f64, f64)> {
            let c = Vec::<f64>::try_from(&emb.f_mv(v)?.f_to_kind(Kind::Double)?)?;
            Ok((c[0], c[1]))
        };
        let (stated, other) = pair(&drawn.f_get(i as i64)?)?;
        // The prompt and the swapped scene's own caption ("A right of B" for "A left of B").
        let texts = probe.text(&[case.prompt.clone(), caption(&swapped)])?;
        let (t_stated, t_other) = pair(&texts.f_get(0)?)?;
        text_cos += texts.f_get(0)?.f_dot(&texts.f_get(1)?)?.f_double_value(&[])?;
        n += 1;
        nearer += usize::from(stated > other);
        margin += stated - other;
        text_right += usize::from(t_stated > t_other);
        text_margin += t_stated - t_other;
        tsv.push_str(&format!(
            "eval-{i}\t{}\t{stated:.4}\t{other:.4}\t{}\t{t_stated:.4}\t{t_other:.4}\n",
            case.prompt,
            if stated > other { "yes" } else { "no" },
        ));
    }
    if n == 0 {
        return Ok(None);
    }
    let pct = |k: usize| 100.0 * k as f64 / n as f64;
    println!(
        "\nrelation prompts ({n}): the draw is nearer the scene as stated than with the two \
         objects' places exchanged for {nearer} ({:.1}%), mean cosine margin {:+.4}; the \
         prompt's text embedding is, for {text_right} ({:.1}%), margin {:+.4}; the prompt and \
         the exchanged scene's caption embed at cosine {:.4}",
        pct(nearer),
        margin / n as f64,
        pct(text_right),
        text_margin / n as f64,
        text_cos / n as f64
    );
    Ok(Some(tsv))
}

/// `--prior-only`: can our CLIP tell each prompt's scene from the same scene with one object
/// drawn twice (`Scene::copies`, the decoder's commonest wrong count)? Per prompt kind, how
/// often the prompt's text embedding is nearer the scene's render than the copy's: what decoder
/// best-of-N by CLIP (`--decoder-candidates`) has to go on against a repeated object.
fn copy_report(probe: &ClipProbe<'_>, all: &[Case], side: u32) -> anyhow::Result<()> {
    let to_tensor = |img| unclip::output::image_to_tensor(&image::DynamicImage::ImageRgb8(img));
    let prompts: Vec<String> = all.iter().map(|c| c.prompt.clone()).collect();
    let texts = probe.text(&prompts)?;
    // Per prompt kind: prompts, text nearer the scene, sum of (scene - copy) cosines.
    let mut tally: std::collections::BTreeMap<PromptKind, (usize, usize, f64)> = Default::default();
    for (i, case) in all.iter().enumerate() {
        let Some(copy) = case.scene.copies(1, i as u64).pop() else { continue };
        let both = Tensor::f_cat(
            &[to_tensor(render(&case.scene, side))?, to_tensor(render(&copy, side))?],
            0,
        )?;
        let text = texts.f_get(i as i64)?;
        let c = Vec::<f64>::try_from(&probe.images(&both)?.f_mv(&text)?.f_to_kind(Kind::Double)?)?;
        let t = tally.entry(case.spec.kind()).or_default();
        t.0 += 1;
        t.1 += usize::from(c[0] > c[1]);
        t.2 += c[0] - c[1];
    }
    println!(
        "\nthe prompt's text embedding nearer its scene than the scene with one object drawn \
         twice (mean cosine margin):"
    );
    for (kind, (n, right, margin)) in tally {
        println!(
            "  {:<10} {right} of {n} ({:.1}%), {:+.4}",
            kind.name(),
            100.0 * right as f64 / n as f64,
            margin / n as f64
        );
    }
    Ok(())
}

/// Single-object prompts: the prompted shape against the shape the checker reads on the largest
/// object found (which shape the decoder draws instead).
fn print_shape_confusion(all: &[Case], reports: &[CheckReport]) {
    let mut counts = [[0usize; 4]; 3];
    for (case, r) in all.iter().zip(reports) {
        let [obj] = case.spec.objects.as_slice() else { continue };
        if r.kind != PromptKind::Single {
            continue;
        }
        let row = Shape::ALL.iter().position(|s| *s == obj.shape).unwrap_or(0);
        let col = r
            .detected
            .first()
            .map_or(3, |d| Shape::ALL.iter().position(|s| *s == d.shape).unwrap_or(3));
        counts[row][col] += 1;
    }
    if counts.iter().flatten().sum::<usize>() == 0 {
        return;
    }
    println!("shape read on single-object images (rows: prompted; largest object found):");
    println!("{:<10} {:>8} {:>8} {:>8} {:>8}", "", "circle", "square", "triangle", "none");
    for (shape, row) in Shape::ALL.iter().zip(&counts) {
        println!("{:<10} {:>8} {:>8} {:>8} {:>8}", shape.name(), row[0], row[1], row[2], row[3]);
    }
    println!();
}

/// Single-object prompts that state a place: where the largest object found lies when it is not
/// in the stated cell (its left-right mirror, its top-bottom mirror, elsewhere, or nothing found).
/// Then exactly one object, with and without a place in the prompt (extra copies come from
/// prompts without one, README round 9).
fn print_position_errors(all: &[Case], reports: &[CheckReport]) {
    let mut counts = [0usize; 5];
    // [without, with a place]: (one object, images).
    let mut one = [(0usize, 0usize); 2];
    for (case, r) in all.iter().zip(reports) {
        let [obj] = case.spec.objects.as_slice() else { continue };
        if r.kind == PromptKind::Single {
            let e = &mut one[usize::from(obj.cell.is_some())];
            e.0 += usize::from(r.count == Some(true));
            e.1 += 1;
        }
        let (Some(cell), PromptKind::Single) = (obj.cell, r.kind) else { continue };
        let k = match r.detected.first().map(|d| d.cell) {
            Some(c) if c == cell => 0,
            Some(c) if c.row == cell.row && c.col == 2 - cell.col => 1,
            Some(c) if c.col == cell.col && c.row == 2 - cell.row => 2,
            Some(_) => 3,
            None => 4,
        };
        counts[k] += 1;
    }
    if counts.iter().sum::<usize>() == 0 {
        return;
    }
    println!(
        "place of the largest object on single-object images that state one: right {}, \
         left-right mirror {}, top-bottom mirror {}, elsewhere {}, none found {}\n",
        counts[0], counts[1], counts[2], counts[3], counts[4]
    );
    println!(
        "exactly one object on single-object images: {} of {} that state a place, {} of {} that \
         do not\n",
        one[1].0, one[1].1, one[0].0, one[0].1
    );
}

/// One line per image: what the checker found wrong and what it saw (`grades.tsv`, to look up
/// the images behind a table's figures).
fn grades_tsv(all: &[Case], reports: &[CheckReport]) -> String {
    let mut out = String::from("image\tkind\tprompt\twrong\tdetected (color shape size fill)\n");
    for (i, (case, r)) in all.iter().zip(reports).enumerate() {
        let checks = [
            ("background", r.background),
            ("count", r.count),
            ("color", r.color),
            ("shape", r.shape),
            ("size", r.size),
            ("position", r.position),
            ("relation", r.relation),
            ("binding", r.binding),
            ("negation", r.negation),
        ];
        let wrong: Vec<&str> =
            checks.iter().filter(|(_, ok)| *ok == Some(false)).map(|(name, _)| *name).collect();
        let seen: Vec<String> = r
            .detected
            .iter()
            .map(|d| format!("{} {} {:?} {:.2}", d.color.name(), d.shape.name(), d.size, d.fill))
            .collect();
        out += &format!(
            "eval-{i}\t{}\t{}\t{}\t{}\n",
            r.kind.name(),
            case.prompt,
            wrong.join(","),
            seen.join("; ")
        );
    }
    out
}

/// The most prompts of one kind an evaluation takes (a larger count is a typo).
const MAX_CASES: usize = 100_000;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    unclip::tch::set_num_threads(cli.threads);
    let (device, kind) = (cli.rt.device()?, cli.rt.dtype()?);
    let mut model = Unclip::from_pretrained(&cli.model, &LoadOptions::new(device, kind))
        .with_context(|| format!("loading {}", cli.model.display()))?;
    let sampling = cli.sampling.resolve(&model);
    if let Some(path) = &cli.decoder_scheduler {
        let (scheduler, learned, _) = unclip::loading::load_scheduler(path)
            .with_context(|| format!("loading {}", path.display()))?;
        model.decoder_scheduler = scheduler;
        model.decoder_learned_variance = learned;
        println!("decoder sampler: {}", path.display());
    }
    if cli.oracle_embeddings {
        println!("decoder only: image embeddings of the ground-truth renders, no prior");
    }
    if cli.upsampler_only {
        println!("upsampler only: ground-truth renders at the decoder's size, no prior or decoder");
    }
    println!(
        "sampling: {}/{}/{} steps, prior guidance {}, decoder guidance {}, prior candidates {}, \
         decoder candidates {}",
        sampling.prior_steps,
        sampling.decoder_steps,
        sampling.super_res_steps,
        sampling.prior_guidance_scale,
        sampling.decoder_guidance_scale,
        cli.sampling.candidates,
        sampling.decoder_candidates
    );
    // The output size: the last stage's.
    let (_, side, _) = match (&model.upsampler_2, &model.upsampler) {
        (Some(s), _) => s.upsampler.sample_shape()?,
        (None, Some(u)) => u.sample_shape()?,
        (None, None) => model.decoder.sample_shape()?,
    };
    let (_, small_side, _) = model.decoder.sample_shape()?;
    anyhow::ensure!(cli.batch > 0, "--batch must be at least 1");
    anyhow::ensure!(cli.batch <= unclip::pipeline::MAX_BATCH, "--batch {} is too large", cli.batch);
    for (flag, n) in [
        ("--single", cli.single),
        ("--binding", cli.binding),
        ("--relation", cli.relation),
        ("--negation", cli.negation),
    ] {
        anyhow::ensure!(n <= MAX_CASES, "{flag} {n}: at most {MAX_CASES} prompts of a kind");
    }

    let mut all = Vec::new();
    for (kind, n) in [
        (PromptKind::Single, cli.single),
        (PromptKind::Binding, cli.binding),
        (PromptKind::Relation, cli.relation),
        (PromptKind::Negation, cli.negation),
    ] {
        let split = if cli.train_split { Split::Train } else { Split::HeldOut };
        all.extend(cases(split, cli.seed, kind, n, side as u32, small_side as u32)?);
    }
    anyhow::ensure!(!all.is_empty(), "no prompts to evaluate");

    let started = std::time::Instant::now();
    if cli.prior_only {
        let req =
            TextToImage { prior_candidates: cli.sampling.candidates, ..sampling.text_to_image("") };
        prior_report(&mut model, &all, &cli, &req, side as u32)?;
        println!("({:.1} min)", started.elapsed().as_secs_f64() / 60.0);
        return Ok(());
    }
    let mut generated = Vec::new();
    if let Some(dir) = &cli.grade {
        for i in 0..all.len() {
            let path = dir.join(format!("eval-{i}.png"));
            let img = unclip::output::open_image(&path)?;
            anyhow::ensure!(
                img.width() == side as u32 && img.height() == side as u32,
                "{}: {}x{}, the model's output is {side}x{side}",
                path.display(),
                img.width(),
                img.height()
            );
            generated.push(unclip::output::image_to_tensor(&img)?);
        }
        println!("graded: {} PNGs of {}", all.len(), dir.display());
    }
    let chunks = if cli.grade.is_some() { all[..0].chunks(1) } else { all.chunks(cli.batch) };
    for (b, chunk) in chunks.enumerate() {
        let seed = Some(cli.seed.wrapping_add(b as u64));
        let out = if cli.upsampler_only {
            let small: Vec<Tensor> = chunk.iter().map(|c| c.render_small.shallow_clone()).collect();
            model.super_resolve(&Tensor::f_cat(&small, 0)?, sampling.super_res_steps, seed)?
        } else if cli.oracle_embeddings {
            let renders: Vec<Tensor> = chunk.iter().map(|c| c.render.shallow_clone()).collect();
            let embeddings = model.clip_image_embeddings(&Tensor::f_cat(&renders, 0)?)?;
            let prompts: Vec<&str> = chunk.iter().map(|c| c.prompt.as_str()).collect();
            let opts = DecodeOptions { seed, ..sampling.decode_options() };
            model.decode(&embeddings, &prompts, &opts, &mut unclip::no_progress)?.1
        } else {
            let req = TextToImage {
                prior_candidates: cli.sampling.candidates,
                ..sampling.text_to_image("")
            };
            model
                .text_to_image(&batch_request(&req, chunk, cli.seed, b), &mut unclip::no_progress)?
                .images
        };
        generated.push(out.f_to_kind(Kind::Float)?);
        eprintln!(
            "generated {}/{} ({:.0} s)",
            (b * cli.batch + chunk.len()).min(all.len()),
            all.len(),
            started.elapsed().as_secs_f64()
        );
    }
    let images = Tensor::f_cat(&generated, 0)?;
    let rgb = unclip::output::to_rgb_images(&images)?;

    let reports: Vec<CheckReport> =
        all.iter().zip(&rgb).map(|(case, img)| check(img, &case.spec)).collect();
    if let Some(dir) = cli.out.as_ref().or(cli.grade.as_ref()) {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("grades.tsv"), grades_tsv(&all, &reports))?;
    }
    let mut table = EvalTable::new();
    for r in &reports {
        table.add(r);
    }
    println!("\nchecker on {} generated held-out images ({side} px):\n{table}", all.len());
    print_shape_confusion(&all, &reports);
    print_position_errors(&all, &reports);
    // The embedded model's version 2 targets (README, "The embedded model").
    use PromptKind as K;
    use unclip::shapes::Attribute as A;
    for (label, attr, kind, target) in [
        ("single-object background", A::Background, K::Single, 0.95),
        ("single-object one object", A::Count, K::Single, 0.95),
        ("single-object color", A::Color, K::Single, 0.95),
        ("single-object shape", A::Shape, K::Single, 0.90),
        ("single-object position", A::Position, K::Single, 0.90),
        ("single-object all", A::All, K::Single, 0.80),
        ("binding two objects", A::Count, K::Binding, 0.85),
        ("relation two objects", A::Count, K::Relation, 0.85),
        ("binding", A::Binding, K::Binding, 0.50),
        ("relation", A::Relation, K::Relation, 0.70),
    ] {
        if let Some(acc) = table.accuracy(attr, Some(kind)) {
            let verdict = if acc >= target { "meets" } else { "below" };
            println!(
                "{label:<25} {:>5.1}% ({verdict} the {:.0}% target)",
                100.0 * acc,
                100.0 * target
            );
        }
    }

    let probe = ClipProbe { model: &model };
    let prompts: Vec<String> = all.iter().map(|c| c.prompt.clone()).collect();
    let renders =
        Tensor::f_cat(&all.iter().map(|c| c.render.shallow_clone()).collect::<Vec<_>>(), 0)?;
    let (gen_score, gen_other) = probe.scores(&prompts, &images)?;
    let (real_score, real_other) = probe.scores(&prompts, &renders)?;
    println!(
        "\nCLIP score (mean cosine of our CLIP, prompt vs image; other = next prompt's image):"
    );
    println!("  generated images   {gen_score:.3} (other {gen_other:.3})");
    println!("  ground-truth renders {real_score:.3} (other {real_other:.3})");
    let singles: Vec<usize> =
        (0..all.len()).filter(|&i| all[i].spec.kind() == PromptKind::Single).collect();
    if !singles.is_empty() {
        let idx = Tensor::from_slice(&singles.iter().map(|&i| i as i64).collect::<Vec<_>>());
        let specs: Vec<&Spec> = singles.iter().map(|&i| &all[i].spec).collect();
        let real = probe.zero_shot(&specs, &renders.f_index_select(0, &idx)?)?;
        let gen_ = probe.zero_shot(&specs, &images.f_index_select(0, &idx)?)?;
        println!(
            "\nzero-shot accuracy of our CLIP on {} single-object prompts' images:",
            specs.len()
        );
        println!("  {:<22} {:>7} {:>7} {:>11}", "", "shape", "color", "background");
        for (name, a) in [("held-out renders", real), ("generated images", gen_)] {
            println!(
                "  {name:<22} {:>6.1}% {:>6.1}% {:>10.1}%",
                100.0 * a[0],
                100.0 * a[1],
                100.0 * a[2]
            );
        }
    }
    if let Some(dir) = &cli.out {
        unclip::output::save_pngs(&images, dir, "eval-")?;
        let list: String =
            prompts.iter().enumerate().map(|(i, p)| format!("eval-{i}: {p}\n")).collect();
        std::fs::write(dir.join("prompts.txt"), list)?;
        println!("\nimages, prompts.txt and grades.tsv in {}", dir.display());
    }
    println!("({:.1} min)", started.elapsed().as_secs_f64() / 60.0);
    Ok(())
}
