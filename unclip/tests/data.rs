//! `unclip::data` on the committed test dataset (`fixtures/dataset/`, remade by
//! `cargo run --example data_fixture -- --out fixtures/dataset`): every source, the loader's
//! order, rank sharding and resumption, bad items, named errors, and the `embed` step.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tch::{Kind, Tensor};
use unclip::data::embed::{EmbedOptions, Embedder, embed_dataset, shard_path};
use unclip::data::export::{ImageFormat, write_tar};
use unclip::data::{
    Batch, Crop, DataError, Dataset, EmbeddingShards, ImageFolder, Loader, LoaderConfig, Shapes,
    Transform, WebDataset, WebDatasetOptions, WithEmbeddings, decode_image, write_embedding_shard,
};
use unclip::stages::{ClipImageEncoder, ClipTextEncoder};
use unclip::{ImageEncoder, TextEncoder};
use unclip_core::fsutil::scratch_dir;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/dataset")
}

fn model_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/shapes")
}

fn webdataset() -> WebDataset {
    let pattern = format!("{}/webdataset/{{00000..00002}}.tar", fixture().display());
    WebDataset::from_pattern(&pattern, &WebDatasetOptions::default()).unwrap()
}

fn config(batch_size: usize, seed: u64, workers: usize) -> LoaderConfig {
    LoaderConfig {
        batch_size,
        seed,
        workers,
        prefetch: 3,
        transform: Some(Transform { crop: Crop::Random, ..Transform::new(32) }),
        clip_resolution: Some(24),
        low_resolution: Some(16),
        max_bad_fraction: 0.0,
        ..LoaderConfig::default()
    }
}

fn keys_of(batches: &[Batch]) -> Vec<String> {
    batches.iter().flat_map(|b| b.keys.clone()).collect()
}

fn same_tensor(a: &Option<Tensor>, b: &Option<Tensor>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => a.size() == b.size() && a.equal(b),
        (None, None) => true,
        _ => false,
    }
}

fn same_batch(a: &Batch, b: &Batch) -> bool {
    a.keys == b.keys
        && a.captions == b.captions
        && same_tensor(&a.images, &b.images)
        && same_tensor(&a.low, &b.low)
        && same_tensor(&a.clip_pixels, &b.clip_pixels)
        && same_tensor(&a.image_embeds, &b.image_embeds)
        && same_tensor(&a.text_embeds, &b.text_embeds)
}

/// Embedding shards of the fixture's first webdataset shard with made-up vectors (row i of
/// item i is i, i+1, ...), so a test can tell rows apart.
fn fake_embeddings(dir: &Path, images: &WebDataset, range: std::ops::Range<usize>) -> PathBuf {
    let keys: Vec<String> = range.clone().map(|i| images.key(i).unwrap()).collect();
    let captions: Vec<String> = range.clone().map(|i| images.item(i).unwrap().caption).collect();
    let n = keys.len() as i64;
    let rows = Tensor::arange(n, (Kind::Float, tch::Device::Cpu)).view([n, 1]);
    let image = &rows + Tensor::arange(6, (Kind::Float, tch::Device::Cpu)).view([1, 6]);
    let text = &rows * -1.0 + Tensor::arange(4, (Kind::Float, tch::Device::Cpu)).view([1, 4]);
    let path = dir.join(format!("{:05}.safetensors", range.start));
    write_embedding_shard(&path, &keys, &captions, &image, &text, &[]).unwrap();
    path
}

#[test]
fn every_source_reads_the_committed_data() {
    let wds = webdataset();
    assert_eq!(wds.len(), 48);
    assert!(wds.warnings().is_empty());
    let first = wds.item(0).unwrap();
    assert_eq!(first.key, "000000000");
    // The caption is the shapes generator's for scene 0 (the fixture's source).
    let shapes = Shapes::train(0, 48, 64).unwrap();
    assert_eq!(first.caption, shapes.item(0).unwrap().caption);
    assert_eq!(wds.key(47).as_deref(), Some("000020015"));

    let folder = ImageFolder::open(fixture().join("folder")).unwrap();
    assert_eq!(folder.len(), 24);
    let keys: Vec<String> = (0..24).map(|i| folder.key(i).unwrap()).collect();
    assert_eq!(keys[0], "jsonl/00000.png");
    assert_eq!(keys[12], "txt/00000.jpg");
    let jsonl = folder.item(0).unwrap();
    assert_eq!(jsonl.caption, Shapes::train(2, 1, 64).unwrap().item(0).unwrap().caption);
    let txt = folder.item(12).unwrap();
    assert_eq!(txt.caption, Shapes::train(1, 1, 64).unwrap().item(0).unwrap().caption);
    // The PNG is lossless: decoding it gives the render back exactly.
    let decoded = decode_image(jsonl.image.as_ref().unwrap(), &jsonl.key, None).unwrap();
    let render = Shapes::train(2, 1, 64).unwrap().item(0).unwrap();
    let unclip::data::ImageData::Decoded(render) = render.image.unwrap() else { panic!() };
    assert_eq!(decoded.data, render.into_raw());
}

#[test]
fn the_same_seed_gives_the_same_batches_from_every_source() {
    let dir = scratch_dir("data-order").unwrap();
    let wds = Arc::new(webdataset());
    fake_embeddings(&dir, &wds, 0..16);
    let embeddings = Arc::new(EmbeddingShards::open_dir(&dir).unwrap());
    let sources: Vec<(Arc<dyn Dataset>, bool)> = vec![
        (wds.clone(), true),
        (Arc::new(ImageFolder::open(fixture().join("folder")).unwrap()), true),
        (Arc::new(Shapes::train(3, 40, 48).unwrap()), true),
        (embeddings, false),
    ];
    for (source, images) in sources {
        let cfg = |seed, workers| {
            let mut c = config(5, seed, workers);
            if !images {
                (c.transform, c.clip_resolution, c.low_resolution) = (None, None, None);
            }
            c
        };
        let a: Vec<Batch> = (0..6)
            .map(|s| Loader::new(source.clone(), cfg(7, 0)).unwrap().batch(s).unwrap())
            .collect();
        let threaded = Loader::new(source.clone(), cfg(7, 2)).unwrap();
        let b: Vec<Batch> = threaded.iter_from(0).take(6).map(Result::unwrap).collect();
        assert!(a.iter().zip(&b).all(|(a, b)| same_batch(a, b)), "{}", source.describe());
        let other: Vec<Batch> = Loader::new(source.clone(), cfg(8, 0))
            .unwrap()
            .iter_from(0)
            .take(6)
            .map(Result::unwrap)
            .collect();
        assert_ne!(keys_of(&a), keys_of(&other), "{}", source.describe());
        let b0 = &a[0];
        if images {
            assert_eq!(b0.images.as_ref().unwrap().size(), [5, 3, 32, 32]);
            assert_eq!(b0.low.as_ref().unwrap().size(), [5, 3, 16, 16]);
            assert_eq!(b0.clip_pixels.as_ref().unwrap().size(), [5, 3, 24, 24]);
            let img = b0.images.as_ref().unwrap();
            assert!(img.min().double_value(&[]) >= -1.0 && img.max().double_value(&[]) <= 1.0);
        } else {
            assert_eq!(b0.image_embeds.as_ref().unwrap().size(), [5, 6]);
            assert_eq!(b0.text_embeds.as_ref().unwrap().size(), [5, 4]);
        }
        // Within an epoch no item repeats.
        let epoch: Vec<String> = keys_of(&a).into_iter().take(source.len().min(30)).collect();
        assert_eq!(
            epoch.iter().collect::<BTreeSet<_>>().len(),
            epoch.len(),
            "{}",
            source.describe()
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn two_ranks_cover_every_item_exactly_once() {
    let wds: Arc<dyn Dataset> = Arc::new(webdataset());
    let mut seen = Vec::new();
    for rank in 0..2 {
        let cfg = LoaderConfig { rank, world_size: 2, transform: None, ..config(4, 11, 0) };
        let cfg = LoaderConfig { clip_resolution: None, low_resolution: None, ..cfg };
        let loader = Loader::new(wds.clone(), cfg).unwrap();
        assert_eq!(loader.steps_per_epoch(), 6);
        let keys: Vec<String> = (0..6).flat_map(|s| loader.batch(s).unwrap().keys).collect();
        seen.push(keys);
    }
    let all: Vec<&String> = seen.iter().flatten().collect();
    let distinct: BTreeSet<&String> = all.iter().copied().collect();
    assert_eq!((all.len(), distinct.len()), (48, 48));
    assert!(seen[0].iter().all(|k| !seen[1].contains(k)));
}

#[test]
fn a_resumed_iteration_continues_where_it_stopped() {
    let wds: Arc<dyn Dataset> = Arc::new(webdataset());
    let whole: Vec<Batch> = Loader::new(wds.clone(), config(6, 3, 2))
        .unwrap()
        .iter_from(0)
        .take(11)
        .map(Result::unwrap)
        .collect();
    // 11 batches of 6 cross the first epoch's end (48 items).
    let resumed = Loader::new(wds.clone(), config(6, 3, 2)).unwrap();
    let tail: Vec<Batch> = resumed.iter_from(7).take(4).map(Result::unwrap).collect();
    for (a, b) in whole[7..].iter().zip(&tail) {
        assert!(same_batch(a, b));
    }
    // Dropping a half-consumed iterator stops its workers (this returns rather than hangs).
    let mut it = resumed.iter_from(0);
    it.next().unwrap().unwrap();
    drop(it);
}

/// A shard with six good samples and five bad ones, each bad in its own way.
fn broken_shard(dir: &Path) -> PathBuf {
    let shapes = Shapes::train(5, 7, 32).unwrap();
    let jpg = |i: usize| {
        let item = shapes.item(i).unwrap();
        let img = decode_image(item.image.as_ref().unwrap(), "x", None).unwrap();
        (ImageFormat::Jpeg(90).encode(&img).unwrap(), item.caption)
    };
    let mut members = Vec::new();
    for i in 0..6 {
        let (bytes, caption) = jpg(i);
        members.push((format!("good{i}.jpg"), bytes));
        members.push((format!("good{i}.txt"), caption.into_bytes()));
    }
    let (bytes, caption) = jpg(6);
    members.push(("bad1.jpg".into(), b"\xff\xd8 this is not a jpeg".to_vec()));
    members.push(("bad1.txt".into(), caption.clone().into_bytes()));
    members.push(("bad2.jpg".into(), bytes.clone())); // no caption
    members.push(("bad3.txt".into(), caption.clone().into_bytes())); // no image
    members.push(("bad4.jpg".into(), bytes.clone()));
    members.push(("bad4.txt".into(), b"  \n".to_vec())); // empty caption
    members.push(("bad5.jpg".into(), bytes));
    members.push(("bad5.txt".into(), vec![0xff, 0xfe, 0x41])); // not UTF-8
    let path = dir.join("broken.tar");
    write_tar(&path, &members).unwrap();
    path
}

#[test]
fn bad_items_are_skipped_counted_and_named() {
    let dir = scratch_dir("data-bad").unwrap();
    let shard = broken_shard(&dir);
    let wds: Arc<dyn Dataset> = Arc::new(
        WebDataset::open(std::slice::from_ref(&shard), &WebDatasetOptions::default()).unwrap(),
    );
    assert_eq!(wds.len(), 11);
    let cfg = LoaderConfig { max_bad_fraction: 0.5, ..config(3, 1, 2) };
    let loader = Loader::new(wds.clone(), cfg).unwrap();
    let batches: Vec<Batch> = loader.iter_from(0).take(8).map(Result::unwrap).collect();
    let keys = keys_of(&batches);
    assert!(keys.iter().all(|k| k.starts_with("good")), "{keys:?}");
    assert_eq!(keys.iter().collect::<BTreeSet<_>>().len(), 6, "every good item is used");
    let stats = loader.skipped();
    assert_eq!((stats.seen, stats.skipped), (11, 5));
    assert!(stats.skips >= 5);
    let log = stats.last.join("\n");
    for (key, why) in [
        ("bad1", "undecodable"),
        ("bad2", "caption"),
        ("bad3", "image"),
        ("bad4", "empty caption"),
        ("bad5", "UTF-8"),
    ] {
        assert!(
            log.lines().any(|l| l.contains(key) && l.contains(why) && l.contains("broken.tar")),
            "{key}: {log}"
        );
    }
    // 5 bad of 11 is more than a tenth: the run stops with a clear error, not a hang.
    let strict =
        Loader::new(wds, LoaderConfig { max_bad_fraction: 0.1, ..config(3, 1, 2) }).unwrap();
    let err = strict.iter_from(0).find_map(Result::err).unwrap();
    assert!(matches!(err, DataError::TooManyBad { .. }), "{err}");
    assert!(err.to_string().contains("bad"), "{err}");

    // A shard cut short: its readable part is used, the rest reported.
    let bytes = std::fs::read(fixture().join("webdataset/00001.tar")).unwrap();
    let cut = dir.join("cut.tar");
    std::fs::write(&cut, &bytes[..bytes.len() / 2 + 100]).unwrap();
    let part = WebDataset::open(&[cut], &WebDatasetOptions::default()).unwrap();
    assert!(part.len() > 4 && part.len() < 16, "{}", part.len());
    assert!(!part.warnings().is_empty());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn missing_shards_and_misaligned_embeddings_are_named_errors() {
    let pattern = format!("{}/webdataset/{{00000..00003}}.tar", fixture().display());
    let err = WebDataset::from_pattern(&pattern, &WebDatasetOptions::default()).unwrap_err();
    assert!(
        matches!(err, DataError::MissingShard { .. }) && err.to_string().contains("00003.tar"),
        "{err}"
    );

    let dir = scratch_dir("data-misaligned").unwrap();
    let all = webdataset();
    let shard0 = fixture().join("webdataset/00000.tar");
    let images: Arc<dyn Dataset> =
        Arc::new(WebDataset::open(&[shard0], &WebDatasetOptions::default()).unwrap());
    // Embeddings of shard 00001's images joined to shard 00000: the first foreign key is named.
    let wrong = fake_embeddings(&dir, &all, 16..20);
    let err = WithEmbeddings::new(
        images.clone(),
        EmbeddingShards::open(std::slice::from_ref(&wrong)).unwrap(),
    )
    .err()
    .unwrap();
    assert!(matches!(err, DataError::Misaligned { .. }), "{err}");
    assert!(
        err.to_string().contains("000010000") && err.to_string().contains("00016.safetensors"),
        "{err}"
    );

    // The right shard joins; rows land on their images; an image without embeddings is bad.
    let right = fake_embeddings(&dir, &all, 0..12);
    let joined =
        WithEmbeddings::new(images.clone(), EmbeddingShards::open(&[right]).unwrap()).unwrap();
    assert_eq!(joined.joined(), 12);
    let item = joined.item(5).unwrap();
    assert_eq!(item.embeddings.unwrap().image, [5.0, 6.0, 7.0, 8.0, 9.0, 10.0]);
    assert!(joined.item(13).unwrap_err().is_bad_item());

    // A caption that differs from the one embedded is caught when read.
    let keys = vec![all.key(0).unwrap()];
    let t = Tensor::zeros([1, 3], (Kind::Float, tch::Device::Cpu));
    let other = dir.join("other.safetensors");
    write_embedding_shard(&other, &keys, &["a different caption".into()], &t, &t, &[]).unwrap();
    let joined = WithEmbeddings::new(images, EmbeddingShards::open(&[other]).unwrap()).unwrap();
    let err = joined.item(0).unwrap_err();
    assert!(
        matches!(err, DataError::Misaligned { .. }) && err.to_string().contains("000000000"),
        "{err}"
    );

    // A malformed shard is named.
    let bad = dir.join("bad.safetensors");
    std::fs::write(&bad, b"\x10\0\0\0\0\0\0\0{not json at all").unwrap();
    let err = EmbeddingShards::open(&[bad]).unwrap_err();
    assert!(err.to_string().contains("bad.safetensors"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn embed_writes_what_clip_computes_and_resumes_after_an_interruption() {
    let dir = scratch_dir("data-embed").unwrap();
    let wds = webdataset();
    let embedder = Embedder::load(&model_dir(), tch::Device::Cpu, Kind::Float).unwrap();
    let opts = EmbedOptions {
        shard_size: 20,
        batch_size: 8,
        workers: 2,
        max_shards: Some(1),
        ..EmbedOptions::default()
    };
    let out = dir.join("interrupted");
    let first = embed_dataset(&embedder, &wds, &out, &opts, &mut |_| {}).unwrap();
    assert_eq!((first.shards_written, first.shards_left, first.items), (1, 2, 20));
    // A crash mid-write leaves at most a hidden temporary file and a torn shard is redone.
    std::fs::write(out.join(".00001.safetensors.tmp-1"), b"partial").unwrap();
    let shard0 = std::fs::read(shard_path(&out, 0)).unwrap();
    std::fs::write(shard_path(&out, 1), &shard0[..shard0.len() / 2]).unwrap();
    let opts = EmbedOptions { max_shards: None, ..opts };
    let rest = embed_dataset(&embedder, &wds, &out, &opts, &mut |_| {}).unwrap();
    assert_eq!((rest.shards_resumed, rest.shards_written, rest.items, rest.skipped), (1, 2, 28, 0));

    // The same bytes as one uninterrupted run.
    let straight = dir.join("straight");
    embed_dataset(&embedder, &wds, &straight, &opts, &mut |_| {}).unwrap();
    for k in 0..3 {
        assert_eq!(
            std::fs::read(shard_path(&out, k)).unwrap(),
            std::fs::read(shard_path(&straight, k)).unwrap()
        );
    }

    // Read back, they equal the encoders' outputs computed one item at a time.
    let shards = EmbeddingShards::open_dir(&out).unwrap();
    assert_eq!(shards.len(), 48);
    let m = model_dir();
    let image_enc = ClipImageEncoder::load(
        &m.join("image_encoder"),
        &m.join("feature_extractor/preprocessor_config.json"),
        tch::Device::Cpu,
        Kind::Float,
    )
    .unwrap();
    let text_enc = ClipTextEncoder::load(
        &m.join("text_encoder"),
        &m.join("tokenizer"),
        tch::Device::Cpu,
        Kind::Float,
    )
    .unwrap();
    let mut worst: f64 = 0.0;
    for i in 0..48 {
        let stored = shards.item(i).unwrap();
        let source = wds.item(i).unwrap();
        assert_eq!((&stored.key, &stored.caption), (&source.key, &source.caption));
        let unclip::data::ImageData::Encoded(bytes) = source.image.unwrap() else { panic!() };
        let img = image::load_from_memory(&bytes).unwrap();
        let direct_image =
            Vec::<f32>::try_from(image_enc.embed_images(&[img]).unwrap().view([-1])).unwrap();
        let enc = text_enc.encode(&[source.caption.as_str()]).unwrap();
        let direct_text = Vec::<f32>::try_from(enc.conditioning.text_embeds.view([-1])).unwrap();
        let e = stored.embeddings.unwrap();
        for (a, b) in e.image.iter().zip(&direct_image).chain(e.text.iter().zip(&direct_text)) {
            worst = worst.max(f64::from((a - b).abs()));
        }
        assert_eq!((e.image.len(), e.text.len()), (direct_image.len(), direct_text.len()));
    }
    assert!(worst < 1e-5, "largest difference {worst}");

    // Another shard size in the same folder is refused (shards would overlap).
    let err =
        embed_dataset(&embedder, &wds, &out, &EmbedOptions { shard_size: 10, ..opts }, &mut |_| {})
            .err()
            .unwrap();
    assert!(err.to_string().contains("shard_size"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn embedding_shards_written_from_python_join_their_images() {
    let shard0 = fixture().join("webdataset/00000.tar");
    let images: Arc<dyn Dataset> =
        Arc::new(WebDataset::open(&[shard0], &WebDatasetOptions::default()).unwrap());
    let python = EmbeddingShards::open_dir(&fixture().join("embeddings")).unwrap();
    assert_eq!((python.len(), python.dims()), (16, (8, 4)));
    let joined: Arc<dyn Dataset> = Arc::new(WithEmbeddings::new(images, python).unwrap());
    let item = joined.item(3).unwrap();
    let e = item.embeddings.unwrap();
    assert_eq!(e.image, (0..8).map(|k| 3.0 + 0.5 * k as f32).collect::<Vec<_>>());
    // float16 in the file; these values are exact in it.
    assert_eq!(e.text, [-3.0, -2.75, -2.5, -2.25]);
    let loader = Loader::new(joined, config(4, 0, 0)).unwrap();
    let b = loader.batch(0).unwrap();
    assert_eq!(b.images.unwrap().size(), [4, 3, 32, 32]);
    assert_eq!(b.image_embeds.unwrap().size(), [4, 8]);
    assert_eq!(b.text_embeds.unwrap().size(), [4, 4]);
}
