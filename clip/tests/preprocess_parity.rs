//! `CLIPImageProcessor` (transformers 5.24.0, PIL backend) parity on PNGs written by fixtures/gen_clip.py.
//! The issue allows 2/255 per pixel before normalization; the resampler reproduces Pillow's integer
//! algorithm and pass order, so the 8-bit results are required to be identical (and the 2/255
//! bound is checked too).

use tch::{Device, Kind, Tensor};
use unclip_clip::ImageProcessor;
use unclip_clip::preprocess::{Filter, Rgb8, resize};
use unclip_core::testing::{assert_close, fixture_path, load_fixture, max_abs_diff};

#[test]
fn resize_is_bit_identical_to_pil_in_every_direction() {
    let r = load_fixture("clip/resize_grid.safetensors");
    let src = &r["source"];
    let (h, w) = (src.size()[0] as usize, src.size()[1] as usize);
    let img = Rgb8 { width: w, height: h, data: Vec::<u8>::try_from(src.flatten(0, -1)).unwrap() };
    let mut quadrants = std::collections::BTreeSet::new();
    for (key, want) in &r {
        let Some((tw, th)) = key.split_once('x') else { continue };
        let (tw, th): (usize, usize) = (tw.parse().unwrap(), th.parse().unwrap());
        let ours = resize(&img, tw, th, Filter::Bicubic).unwrap();
        let want = Vec::<u8>::try_from(want.flatten(0, -1)).unwrap();
        assert_eq!(ours.data, want, "{w}x{h} -> {key}");
        quadrants.insert((tw > w, th > h));
    }
    assert_eq!(quadrants.len(), 4, "the grid should cover up/down in both axes");
}

/// The fixture's image names: all of them, or those with 224 px reference crops.
fn names_of(which: &str) -> Vec<String> {
    let text = std::fs::read_to_string(fixture_path("clip/images/names.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    serde_json::from_value(v[which].clone()).unwrap()
}

fn names() -> Vec<String> {
    names_of("all")
}

fn open(name: &str) -> image::DynamicImage {
    image::open(fixture_path(&format!("clip/images/{name}"))).unwrap()
}

#[test]
fn crops_match_pil_within_2_of_255() {
    let p = ImageProcessor::from_dir(&fixture_path("clip/images/p224")).unwrap();
    let r = load_fixture("clip/preprocess.safetensors");
    let crops = r["crops_u8"].to_kind(Kind::Double);
    for (i, name) in names_of("crops").iter().enumerate() {
        let img = Rgb8::from_image(&open(name)).unwrap();
        let ours = p.resize_and_crop(&img).unwrap();
        let ours = Tensor::from_slice(&ours.data)
            .view([ours.height as i64, ours.width as i64, 3])
            .permute([2, 0, 1])
            .to_kind(Kind::Double);
        let d = max_abs_diff(&ours, &crops.get(i as i64));
        eprintln!("{name}: max |diff| {d} / 255");
        // The issue asks for 2/255; the integer resampler in fact reproduces PIL exactly.
        assert!(d <= 2.0, "{name}: max |diff| {d}/255 exceeds 2/255");
        assert_eq!(d, 0.0, "{name}: not bit-identical to PIL");
    }
}

#[test]
fn normalized_pixels_match() {
    // 32 px processor (diffusers' image-variation test): resize, crop, rescale, normalize.
    let p = ImageProcessor::from_dir(&fixture_path("clip/images/p32")).unwrap();
    let r = load_fixture("clip/preprocess.safetensors");
    let imgs: Vec<_> = names().iter().map(|n| open(n)).collect();
    let ours = p.preprocess_batch(&imgs).unwrap();
    // The bound, 2/255 before normalization, would be 2/255/min(std) here; with the exact
    // resampler only float rounding remains.
    let tol = 1e-5;
    assert_close("pixel_values", &ours, &r["pixel_values_32"], tol, 0.0);
    eprintln!("pixel_values max |diff| {:.2e}", max_abs_diff(&ours, &r["pixel_values_32"]));

    // The same image as a float tensor in [0, 1] (transformers turns it into 8 bits first).
    let land = names().iter().position(|n| n == "landscape.png").unwrap();
    let rgb = imgs[land].to_rgb8();
    let (w, h) = (rgb.width() as i64, rgb.height() as i64);
    let t =
        Tensor::from_slice(rgb.as_raw()).view([h, w, 3]).permute([2, 0, 1]).to_kind(Kind::Float)
            / 255.0;
    let ours = p.preprocess_tensor(&t).unwrap();
    assert_close("float tensor input", &ours, &r["landscape_float_32"], tol, 0.0);
    let u8s = p
        .preprocess_tensor(&(t * 255.0).round().to_kind(Kind::Uint8).to_device(Device::Cpu))
        .unwrap();
    assert_close(
        "uint8 tensor input",
        &u8s,
        &r["pixel_values_32"].narrow(0, land as i64, 1),
        tol,
        0.0,
    );
}
