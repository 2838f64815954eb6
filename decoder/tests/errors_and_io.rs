//! User errors come back as `Error` values (never a libtorch abort), and saving then loading a
//! component gives back the same model.

use tch::{Device, Kind, Tensor};
use unclip_core::testing::{assert_close, fixture_path};
use unclip_decoder::checkpoint::{Loaded, load, save};
use unclip_decoder::{Error, UNet2DConditionModel, UNet2DModel, UnCLIPTextProjModel};

fn opts() -> (Kind, Device) {
    (Kind::Float, Device::Cpu)
}

fn tiny_decoder() -> Loaded<UNet2DConditionModel> {
    load(&fixture_path("decoder/decoder"), Device::Cpu, Kind::Float).unwrap()
}

#[test]
fn decoder_forward_rejects_bad_inputs() {
    let m = tiny_decoder();
    let ehs = Tensor::randn([2, 11, 100], opts());
    let class = Tensor::randn([2, 128], opts());
    let mask = Tensor::ones([2, 11], opts());
    let t = Tensor::from(10i64);
    let ok = Tensor::randn([2, 3, 8, 8], opts());
    let f =
        |x: &Tensor, e: Option<&Tensor>, c: Option<&Tensor>, mask: Option<&Tensor>, t: &Tensor| {
            tch::no_grad(|| m.model.forward(x, t, e, c, mask))
        };
    assert_eq!(f(&ok, Some(&ehs), Some(&class), Some(&mask), &t).unwrap().size(), [2, 6, 8, 8]);
    let input_err = |r: unclip_decoder::Result<Tensor>, needle: &str| match r {
        Err(Error::Input(s)) => assert!(s.contains(needle), "{s:?} lacks {needle:?}"),
        other => panic!("expected an input error about {needle}, got {other:?}"),
    };
    // Spatial size not divisible by the total downsampling (2 for two levels).
    input_err(
        f(&Tensor::randn([2, 3, 9, 8], opts()), Some(&ehs), Some(&class), None, &t),
        "divisible",
    );
    // Wrong channel count.
    input_err(
        f(&Tensor::randn([2, 4, 8, 8], opts()), Some(&ehs), Some(&class), None, &t),
        "sample",
    );
    // Context of the wrong width, missing context, missing class labels.
    let narrow = Tensor::randn([2, 11, 99], opts());
    input_err(f(&ok, Some(&narrow), Some(&class), None, &t), "encoder_hidden_states");
    input_err(f(&ok, None, Some(&class), None, &t), "encoder_hidden_states");
    input_err(f(&ok, Some(&ehs), None, None, &t), "class_labels");
    // Mask shape not matching the context length, batch mismatch, bad timestep shape.
    input_err(
        f(&ok, Some(&ehs), Some(&class), Some(&Tensor::ones([2, 12], opts())), &t),
        "attention_mask",
    );
    input_err(f(&ok, Some(&ehs), Some(&Tensor::randn([3, 128], opts())), None, &t), "batch");
    input_err(
        f(&ok, Some(&ehs), Some(&class), None, &Tensor::from_slice(&[1i64, 2, 3])),
        "timestep",
    );
    // A sample in another dtype than the weights: an error, not a libtorch panic.
    input_err(f(&ok.to_kind(Kind::Double), Some(&ehs), Some(&class), None, &t), "model is");
}

#[test]
fn text_proj_rejects_mismatched_batches() {
    let m: Loaded<UnCLIPTextProjModel> =
        load(&fixture_path("decoder/text_proj"), Device::Cpu, Kind::Float).unwrap();
    let img = Tensor::randn([1, 32], opts());
    let prompt = Tensor::randn([1, 32], opts());
    let hidden = Tensor::randn([1, 7, 32], opts());
    // With guidance the text inputs need the unconditional rows too (2B).
    assert!(matches!(m.model.forward(&img, &prompt, &hidden, true), Err(Error::Input(_))));
    assert!(m.model.forward(&img, &prompt, &hidden, false).is_ok());
    let wide = Tensor::randn([1, 33], opts());
    assert!(matches!(m.model.forward(&wide, &prompt, &hidden, false), Err(Error::Input(_))));
}

#[test]
fn save_then_load_round_trips_and_mismatches_are_named() {
    let m: Loaded<UNet2DModel> =
        load(&fixture_path("decoder/super_res_first"), Device::Cpu, Kind::Float).unwrap();
    let dir = std::env::temp_dir().join(format!("unclip-decoder-io-{}", std::process::id()));
    save(&m, &dir, None).unwrap();
    let back: Loaded<UNet2DModel> = load(&dir, Device::Cpu, Kind::Float).unwrap();
    assert_eq!(back.config, m.config);
    let x = Tensor::randn([1, 6, 8, 8], opts());
    let t = Tensor::from(3i64);
    tch::no_grad(|| {
        let (a, b) =
            (m.model.forward(&x, &t, None).unwrap(), back.model.forward(&x, &t, None).unwrap());
        assert_close("round trip", &a, &b, 0.0, 0.0);
    });
    // The same weights under a config with other channel counts: a named shape mismatch.
    let cfg_path = dir.join("config.json");
    let text = std::fs::read_to_string(&cfg_path).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["block_out_channels"] = serde_json::json!([32, 96]);
    std::fs::write(&cfg_path, v.to_string()).unwrap();
    match load::<UNet2DModel>(&dir, Device::Cpu, Kind::Float) {
        Err(Error::Core(unclip_core::Error::ShapeMismatch { name, .. })) => {
            assert!(
                name.contains("down_blocks.1")
                    || name.contains("mid_block")
                    || name.contains("up_blocks"),
                "{name}"
            )
        }
        other => panic!("expected a shape mismatch, got {other:?}"),
    }
    // An unsupported block type is a config error naming it.
    v["block_out_channels"] = serde_json::json!([32, 64]);
    v["down_block_types"] = serde_json::json!(["DownBlock2D", "ResnetDownsampleBlock2D"]);
    std::fs::write(&cfg_path, v.to_string()).unwrap();
    let e = load::<UNet2DModel>(&dir, Device::Cpu, Kind::Float).unwrap_err();
    assert!(e.to_string().contains("DownBlock2D"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// f16 weights (as the Karlo checkpoints ship) run in f16 end to end, close to f32 (4e-3 here).
#[test]
fn half_precision_weights_run_close_to_f32() {
    let dir = fixture_path("decoder/decoder");
    let full: Loaded<UNet2DConditionModel> = load(&dir, Device::Cpu, Kind::Float).unwrap();
    let half: Loaded<UNet2DConditionModel> = load(&dir, Device::Cpu, Kind::Half).unwrap();
    let io = unclip_core::testing::load_fixture("decoder/io_decoder.safetensors");
    let (x, e, c, m) =
        (&io["sample"], &io["encoder_hidden_states"], &io["class_labels"], &io["attention_mask"]);
    let t = Tensor::from(500i64);
    tch::no_grad(|| {
        let a = full.model.forward(x, &t, Some(e), Some(c), Some(m)).unwrap();
        let h = |v: &Tensor| v.to_kind(Kind::Half);
        let b = half.model.forward(&h(x), &t, Some(&h(e)), Some(&h(c)), Some(m)).unwrap();
        assert_eq!(b.kind(), Kind::Half);
        let err = unclip_core::testing::max_abs_diff(&a, &b);
        eprintln!("f16 vs f32 max diff {err:.2e}");
        assert!(err < 2e-2, "f16 vs f32: {err}");
    });
}
