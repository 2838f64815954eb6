"""How much the decoder of a diffusers-layout unCLIP folder (default: the embedded model) uses its
conditioning at high noise, measured with the reference implementation (diffusers 0.42.1,
transformers 5.24.0: the pins of fixtures/requirements.txt), independently of this project's code.

For flat renders "a red circle on a <color> background" it prints, per timestep t:
- the background color (mean of the top-left 8x8 corner, 0..255) of the x0 the decoder implies
  from pure noise (no signal in x_t), for each background's conditioning: a decoder that uses its
  conditioning gives each background its own color;
- the same with the true image noised to t (signal present);
- the mean |epsilon(cond A) - epsilon(cond B)| between the first two backgrounds on the same x_t,
  and the shift a correct background change would need (sqrt(SNR) * |x0_A - x0_B| mean);
- from high to low noise, the RMSE of the x0 the decoder implies for the first background's true
  image, and the mean of its learned-variance interpolation channels (a decoder whose mean is
  imprecise learns to widen its variance, and its samples stay noisy).

With --samples OUT.png it also draws text-to-image samples with diffusers' own UnCLIPPipeline
(rows: decoder steps 25, 100, 250 and 1000), to compare with ours (epsilon and x0 decoders only:
diffusers' UnCLIPScheduler does not take v_prediction).

usage: .venv/bin/python scripts/diagnose/decoder_conditioning.py [--model models/shapes] [--samples OUT.png]
"""
import argparse
import json
import os

import numpy as np
import torch
from PIL import Image, ImageDraw

from common import F32, ROOT, coordinate_maps, load_clip

from diffusers import PriorTransformer, UNet2DConditionModel, UNet2DModel, UnCLIPScheduler
from diffusers.pipelines.deprecated.unclip import UnCLIPPipeline
from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel

BACKGROUNDS = {"blue": (30, 60, 225), "yellow": (245, 230, 40), "white": (245, 245, 245)}
RED = (225, 30, 30)


def render(bg, side):
    im = Image.new("RGB", (side, side), bg)
    r = side * 9 // 32
    ImageDraw.Draw(im).ellipse((side // 2 - r // 2, side // 2 - r // 2, side // 2 + r // 2, side // 2 + r // 2), fill=RED)
    return im


def corner(x):
    """Mean color of the top-left 8x8 corner of a (1, 3, H, W) tensor in [-1, 1], as 0..255."""
    return [round(v) for v in ((x.clamp(-1, 1)[0, :, :8, :8].mean((1, 2)) + 1) * 127.5).tolist()]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.path.join(ROOT, "models", "shapes"))
    ap.add_argument("--samples", default=None)
    a = ap.parse_args()
    torch.set_num_threads(2)
    torch.set_grad_enabled(False)
    j = lambda n: os.path.join(a.model, n)  # noqa: E731
    tok, te, vis, proc = load_clip(a.model)
    unet = UNet2DConditionModel.from_pretrained(j("decoder"), **F32).eval()
    # A decoder with coordinate inputs (this project's `coordinate_channels`) gets the pixel
    # coordinate maps appended, as unclip-decoder does.
    with open(j("decoder/config.json")) as f:
        coords = json.load(f).get("coordinate_channels", 0)
    maps = coordinate_maps(unet.config.sample_size)
    tp = UnCLIPTextProjModel.from_pretrained(j("text_proj"), **F32).eval()
    sched = UnCLIPScheduler.from_pretrained(j("decoder_scheduler"))
    ac, prediction = sched.alphas_cumprod, sched.config.prediction_type
    side = unet.config.sample_size

    conds, x0s = {}, {}
    for name, bg in BACKGROUNDS.items():
        im = render(bg, side)
        x0s[name] = torch.tensor(np.array(im)).permute(2, 0, 1)[None].float() / 127.5 - 1
        ids = tok([f"a red circle on a {name} background"], padding="max_length",
                  max_length=tok.model_max_length, return_tensors="pt")
        text = te(ids.input_ids, attention_mask=ids.attention_mask)
        emb = vis(**proc([im], return_tensors="pt")).image_embeds
        hs, add = tp(image_embeddings=emb, prompt_embeds=text.text_embeds,
                     text_encoder_hidden_states=text.last_hidden_state, do_classifier_free_guidance=False)
        mask = torch.nn.functional.pad(ids.attention_mask.bool(), (tp.clip_extra_context_tokens, 0), value=True)
        conds[name] = dict(encoder_hidden_states=hs, class_labels=add, attention_mask=mask)

    def eps_and_v(x_t, t, name):
        """The model's epsilon (derived from its x0 or v prediction), and its learned-variance
        interpolation channels (None without learned variance)."""
        x_in = torch.cat([x_t, maps.expand(x_t.shape[0], -1, -1, -1)], 1) if coords else x_t
        full = unet(x_in, t, **conds[name]).sample
        out, var = full[:, :3], (full[:, 3:] if full.shape[1] > 3 else None)
        if prediction == "sample":
            out = (x_t - ac[t].sqrt() * out) / (1 - ac[t]).sqrt()
        elif prediction == "v_prediction":
            out = ac[t].sqrt() * out + (1 - ac[t]).sqrt() * x_t
        return out, var

    def eps(x_t, t, name):
        return eps_and_v(x_t, t, name)[0]

    print(f"decoder {a.model} ({prediction} prediction): background of the implied x0 (top-left corner, 0..255)")
    print(f"{'t':>4}  {'sqrt(ac)':>8}  " + "  ".join(f"{n + ' (no signal)':>22}" for n in BACKGROUNDS)
          + "  " + "  ".join(f"{n + ' (signal)':>18}" for n in BACKGROUNDS))
    gen = torch.Generator().manual_seed(0)
    a_name, b_name = list(BACKGROUNDS)[:2]
    shifts = []
    for t in [958, 917, 875, 833, 750, 500]:
        at = ac[t]
        noise = torch.randn(1, 3, side, side, generator=gen)
        row = []
        for signal in (0.0, 1.0):
            for name in BACKGROUNDS:
                x_t = signal * at.sqrt() * x0s[name] + (1 - at).sqrt() * noise
                x0 = (x_t - (1 - at).sqrt() * eps(x_t, t, name)) / at.sqrt()
                row.append(str(corner(x0)))
        print(f"{t:>4}  {float(at.sqrt()):>8.3f}  " + "  ".join(f"{c:>22}" for c in row[:3])
              + "  " + "  ".join(f"{c:>18}" for c in row[3:]))
        x_t = (1 - at).sqrt() * noise
        moved = (eps(x_t, t, a_name) - eps(x_t, t, b_name)).abs().mean().item()
        needed = (at.sqrt() / (1 - at).sqrt() * (x0s[a_name] - x0s[b_name]).abs().mean()).item()
        shifts.append((t, moved, needed))
    print(f"\nmean |eps({a_name}) - eps({b_name})| on the same pure-noise x_t, and what a correct "
          "background change needs:")
    for t, moved, needed in shifts:
        print(f"  t={t:>4}: {moved:.4f} (needed {needed:.4f})")

    name = a_name
    print(f"\nprecision at low noise and learned variance, true {name} image noised to t: RMSE of the "
          "implied x0 (clamped to [-1, 1]), mean variance interpolation v (learned_range expects [-1, 1])")
    for t in [999, 900, 700, 500, 300, 150, 40, 10, 3]:
        at = ac[t]
        x_t = at.sqrt() * x0s[name] + (1 - at).sqrt() * torch.randn(1, 3, side, side, generator=gen)
        e, var = eps_and_v(x_t, t, name)
        x0 = ((x_t - (1 - at).sqrt() * e) / at.sqrt()).clamp(-1, 1)
        rmse = ((x0 - x0s[name]) ** 2).mean().sqrt().item()
        v = "-" if var is None else f"{var.mean().item():+.3f}"
        print(f"  t={t:>4}: x0 RMSE {rmse:.4f}, v {v}")

    if a.samples and prediction == "v_prediction":
        print("\n--samples: diffusers' UnCLIPScheduler does not sample v-prediction decoders; skipped")
    elif a.samples:
        pipe = UnCLIPPipeline(
            tokenizer=tok, text_encoder=te, prior=PriorTransformer.from_pretrained(j("prior"), **F32),
            text_proj=tp, decoder=unet,
            super_res_first=UNet2DModel.from_pretrained(j("super_res_first"), **F32),
            super_res_last=UNet2DModel.from_pretrained(j("super_res_last"), **F32),
            **{n: UnCLIPScheduler.from_pretrained(j(n))
               for n in ("prior_scheduler", "decoder_scheduler", "super_res_scheduler")})
        pipe.set_progress_bar_config(disable=True)
        prompts = ["a red circle on a blue background",
                   "a small green triangle in the bottom right on a yellow background"]
        rows = []
        for steps in (25, 100, 250, 1000):
            g = torch.Generator().manual_seed(0)
            out = pipe(prompts, num_images_per_prompt=4, decoder_num_inference_steps=steps,
                       generator=g, output_type="np").images
            rows.append(np.concatenate(list(out), axis=1))
        Image.fromarray((np.concatenate(rows, axis=0) * 255).round().astype(np.uint8)).save(a.samples)
        print(f"\ndiffusers samples (rows: 25, 100, 250, 1000 decoder steps): {a.samples}")


if __name__ == "__main__":
    main()
