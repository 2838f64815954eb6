//! `CLIPImageProcessor` (transformers 5.24.0, PIL backend) parity on PNGs written by fixtures/gen_clip.py.
//! The stated tolerance is 2/255 per pixel before normalization; the resampler is PIL's integer
//! algorithm, so the 8-bit crops are compared for the maximum difference, which is reported.

use tch::{Device, Kind, Tensor};
use unclip_clip::ImageProcessor;
use unclip_clip::preprocess::Rgb8;
use unclip_core::testing::{assert_close, fixture_path, load_fixture, max_abs_diff};

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
        assert!(d <= 2.0, "{name}: max |diff| {d}/255 exceeds 2/255");
    }
}

#[test]
fn normalized_pixels_match() {
    // 32 px processor (diffusers' image-variation test): resize, crop, rescale, normalize.
    let p = ImageProcessor::from_dir(&fixture_path("clip/images/p32")).unwrap();
    let r = load_fixture("clip/preprocess.safetensors");
    let imgs: Vec<_> = names().iter().map(|n| open(n)).collect();
    let ours = p.preprocess_batch(&imgs).unwrap();
    // 2/255 in [0, 1] is at most 2/255/min(std) after normalization.
    let tol = 2.0 / 255.0 / 0.2613;
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
