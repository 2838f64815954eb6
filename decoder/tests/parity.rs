//! Parity with diffusers 0.42.1 on the fixtures written by `fixtures/gen_decoder.py`
//! (`scripts/make-fixtures.sh decoder`): the tiny unCLIP test models (decoder, text projection,
//! super-res) and a deeper decoder (3 levels, 2 layers per block, per-level head sizes,
//! skip_time_act, ResNet/mid output scale factors), f16-stored weights run in f32,
//! inputs with a padded attention mask, batch 2.

use std::collections::HashMap;
use tch::{Device, Kind, Tensor};
use unclip_core::testing::{assert_close, fixture_path, load_fixture};
use unclip_decoder::checkpoint::{Loaded, load};
use unclip_decoder::upsample::resize_bicubic_aa;
use unclip_decoder::{UNet2DConditionModel, UNet2DModel, UnCLIPTextProjModel};

const TOL: f64 = 1e-4;

fn io(name: &str) -> HashMap<String, Tensor> {
    load_fixture(&format!("decoder/io_{name}.safetensors"))
}

fn decoder(name: &str) -> Loaded<UNet2DConditionModel> {
    load(&fixture_path(&format!("decoder/{name}")), Device::Cpu, Kind::Float).unwrap()
}

fn check_decoder(name: &str) {
    let m = decoder(name);
    let io = io(name);
    let (sample, ehs, class) = (&io["sample"], &io["encoder_hidden_states"], &io["class_labels"]);
    let mask = &io["attention_mask"];
    tch::no_grad(|| {
        let t999 = Tensor::from(999i64);
        let out = m.model.forward(sample, &t999, Some(ehs), Some(class), Some(mask)).unwrap();
        assert_close(&format!("{name} t=999"), &out, &io["out_t999"], TOL, TOL);
        let out =
            m.model.forward(sample, &io["timesteps"], Some(ehs), Some(class), Some(mask)).unwrap();
        assert_close(&format!("{name} t=[10,500]"), &out, &io["out_batch_t"], TOL, TOL);
        let out = m.model.forward(sample, &io["timesteps"], Some(ehs), Some(class), None).unwrap();
        assert_close(&format!("{name} no mask"), &out, &io["out_nomask"], TOL, TOL);
    });
}

#[test]
fn tiny_decoder_matches_diffusers() {
    check_decoder("decoder");
}

#[test]
fn deep_decoder_matches_diffusers() {
    check_decoder("decoder_deep");
}

#[test]
fn text_proj_matches_diffusers() {
    let m: Loaded<UnCLIPTextProjModel> =
        load(&fixture_path("decoder/text_proj"), Device::Cpu, Kind::Float).unwrap();
    let io = io("text_proj");
    tch::no_grad(|| {
        let out = m
            .model
            .forward(&io["image_embeddings"], &io["prompt_embeds"], &io["text_hidden"], true)
            .unwrap();
        assert_close(
            "ehs (cfg)",
            &out.encoder_hidden_states,
            &io["encoder_hidden_states"],
            TOL,
            TOL,
        );
        assert_close(
            "additive (cfg)",
            &out.additive_clip_time_embeddings,
            &io["additive_clip_time_embeddings"],
            TOL,
            TOL,
        );
        let out = m
            .model
            .forward(&io["image_embeddings_nocfg"], &io["prompt_embeds"], &io["text_hidden"], false)
            .unwrap();
        assert_close(
            "ehs",
            &out.encoder_hidden_states,
            &io["encoder_hidden_states_nocfg"],
            TOL,
            TOL,
        );
        assert_close(
            "additive",
            &out.additive_clip_time_embeddings,
            &io["additive_clip_time_embeddings_nocfg"],
            TOL,
            TOL,
        );
        let mask = m.model.decoder_attention_mask(&io["text_mask"]).unwrap();
        assert!(mask.equal(&io["decoder_mask"]));
    });
}

#[test]
fn super_res_matches_diffusers() {
    let m: Loaded<UNet2DModel> =
        load(&fixture_path("decoder/super_res_first"), Device::Cpu, Kind::Float).unwrap();
    let io = io("super_res_first");
    tch::no_grad(|| {
        let up = resize_bicubic_aa(&io["low_res"], 32, 32).unwrap();
        assert_close("upscaled low-res", &up, &io["upscaled"], 1e-5, 1e-5);
        let x = Tensor::cat(&[&io["latents"], &up], 1);
        let out = m.model.forward(&x, &Tensor::from(500i64), None).unwrap();
        assert_close("super-res t=500", &out, &io["out_t500"], TOL, TOL);
        let out = m.model.forward(&x, &Tensor::from_slice(&[0i64, 999]), None).unwrap();
        assert_close("super-res t=[0,999]", &out, &io["out_t0_999"], TOL, TOL);
    });
}

#[test]
fn antialiased_bicubic_matches_torch() {
    let io = io("resize");
    let x = &io["input"];
    assert_close("up", &resize_bicubic_aa(x, 32, 24).unwrap(), &io["up_32x24"], 1e-5, 1e-5);
    assert_close("down", &resize_bicubic_aa(x, 5, 4).unwrap(), &io["down_5x4"], 1e-5, 1e-5);
    // And it is really the antialiased kernel: plain bicubic is measurably different.
    let diff = unclip_core::testing::max_abs_diff(&io["up_32x24"], &io["plain_up_32x24"]);
    assert!(diff > 1e-3, "fixture cannot tell the two kernels apart ({diff})");
}

#[test]
fn deep_super_res_matches_diffusers() {
    // 3 levels, scale_shift (mid attention without group norm), class embedding, centred input,
    // mid_block_scale_factor 1.5.
    let m: Loaded<UNet2DModel> =
        load(&fixture_path("decoder/super_res_deep"), Device::Cpu, Kind::Float).unwrap();
    let io = io("super_res_deep");
    tch::no_grad(|| {
        let t = Tensor::from_slice(&[3i64, 700]);
        let out = m.model.forward(&io["sample"], &t, Some(&io["class_labels"])).unwrap();
        assert_close("deep super-res", &out, &io["out"], TOL, TOL);
    });
}

/// `coordinate_channels: 2`: the UNet takes a 3-channel sample and appends the pixel coordinate
/// maps itself; diffusers' UNet (in_channels 5) was given them by the fixture script.
#[test]
fn coordinate_inputs_match_diffusers_given_the_maps() {
    let m = decoder("decoder_coords");
    assert_eq!(m.model.config().coordinate_channels, 2);
    assert_eq!(m.model.config().sample_channels(), 3);
    let io = io("decoder_coords");
    let (sample, ehs, class) = (&io["sample"], &io["encoder_hidden_states"], &io["class_labels"]);
    tch::no_grad(|| {
        let out = m
            .model
            .forward(sample, &io["timesteps"], Some(ehs), Some(class), Some(&io["attention_mask"]))
            .unwrap();
        assert_close("decoder_coords", &out, &io["out"], TOL, TOL);
        // The maps are an input the caller does not give: 5 channels are refused.
        let five = Tensor::cat(&[sample.shallow_clone(), sample.narrow(1, 0, 2)], 1);
        assert!(m.model.forward(&five, &io["timesteps"], Some(ehs), Some(class), None).is_err());
    });
}
