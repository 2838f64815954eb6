"""The diffusers side of the side-by-side benchmark: one process per configuration, timing exactly
what benches/side_by_side.rs times for ours (same folder and weights, f32 (or --dtype bf16) CPU, same threads, same
steps, same definition of a step), printing one JSON line."""
import argparse
import json
import os
import resource
import statistics
import sys
import time
import types

import torch
from transformers import CLIPTextModelWithProjection, CLIPTokenizer

from diffusers import PriorTransformer, UNet2DConditionModel, UNet2DModel, UnCLIPScheduler
from diffusers.pipelines.deprecated.unclip import UnCLIPPipeline
from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel

PROMPT = "a high-resolution photograph of a red frog"


def timed(warmup, reps, f):
    for _ in range(warmup):
        f()
    v = []
    for _ in range(reps):
        t0 = time.perf_counter()
        f()
        v.append(time.perf_counter() - t0)
    return statistics.median_low(v) if reps % 2 == 0 else statistics.median(v)


class VPredictionUnCLIPScheduler(UnCLIPScheduler):
    """diffusers' UnCLIPScheduler takes epsilon or sample; for the embedded model's v-prediction
    decoder and upsampler, what a diffusers user would write: v -> x0, then the "sample" step."""

    def step(self, model_output, timestep, sample, **kw):
        a = self.alphas_cumprod[timestep]
        c = sample.shape[1]
        x0 = a.sqrt() * sample - (1 - a).sqrt() * model_output[:, :c]
        return super().step(torch.cat([x0, model_output[:, c:]], 1), timestep, sample, **kw)


def coordinate_maps(side, dtype):
    """(1, 2, side, side): x then y of each pixel centre, -1 at the left / top edge to 1, as
    unclip-decoder appends them to a decoder with `coordinate_channels` (this project's extension;
    scripts/diagnose/common.py has the same maps for the parity diagnostics)."""
    c = (torch.arange(side) + 0.5) / side * 2 - 1
    return torch.cat([c.view(1, 1, 1, side).expand(1, 1, side, side),
                      c.view(1, 1, side, 1).expand(1, 1, side, side)], 1).to(dtype)


class CoordinateDecoder(torch.nn.Module):
    """A diffusers UNet2DConditionModel whose input has `coords` extra coordinate channels, seen by
    UnCLIPPipeline as a decoder of the image's channels: the maps are appended on each call, as
    unclip-decoder does inside its UNet."""

    def __init__(self, unet, coords):
        super().__init__()
        self.unet, self.maps = unet, coordinate_maps(unet.config.sample_size, unet.dtype)
        self.config = types.SimpleNamespace(**dict(unet.config))
        self.config.in_channels = unet.config.in_channels - coords

    @property
    def dtype(self):
        return self.unet.dtype

    @property
    def device(self):
        return self.unet.device

    def forward(self, sample, timestep, **kw):
        maps = self.maps.expand(sample.shape[0], -1, -1, -1)
        return self.unet(sample=torch.cat([sample, maps], 1), timestep=timestep, **kw)


def load_scheduler(path):
    cfg = UnCLIPScheduler.load_config(path)
    if cfg.get("prediction_type") == "v_prediction":
        return VPredictionUnCLIPScheduler.from_pretrained(path, prediction_type="sample")
    return UnCLIPScheduler.from_pretrained(path)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--sr-warmup", type=int, default=None)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--pipeline-reps", type=int, default=1)
    ap.add_argument("--steps", default="25,25,7")
    ap.add_argument("--sr-last", action="store_true")
    ap.add_argument("--dtype", choices=["f32", "bf16"], default="f32")
    a = ap.parse_args()
    dt = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    ps, ds, ss = (int(s) for s in a.steps.split(","))
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    torch.set_grad_enabled(False)
    d = a.model
    t0 = time.perf_counter()
    load = dict(torch_dtype=dt)
    tok = CLIPTokenizer.from_pretrained(os.path.join(d, "tokenizer"))
    te = CLIPTextModelWithProjection.from_pretrained(os.path.join(d, "text_encoder"), **load).eval()
    prior = PriorTransformer.from_pretrained(os.path.join(d, "prior"), **load).eval()
    tp = UnCLIPTextProjModel.from_pretrained(os.path.join(d, "text_proj"), **load).eval()
    dec = UNet2DConditionModel.from_pretrained(os.path.join(d, "decoder"), **load).eval()
    # The embedded decoder has coordinate input channels (`coordinate_channels`, unknown to diffusers).
    coords = UNet2DConditionModel.load_config(os.path.join(d, "decoder")).get("coordinate_channels", 0)
    if coords:
        dec = CoordinateDecoder(dec, coords).eval()
    srf = UNet2DModel.from_pretrained(os.path.join(d, "super_res_first"), **load).eval()
    srl = UNet2DModel.from_pretrained(os.path.join(d, "super_res_last"), **load).eval()
    sch = {n: load_scheduler(os.path.join(d, n))
           for n in ("prior_scheduler", "decoder_scheduler", "super_res_scheduler")}
    pipe = UnCLIPPipeline(tokenizer=tok, text_encoder=te, prior=prior, text_proj=tp, decoder=dec,
                          super_res_first=srf, super_res_last=srl, **sch)
    pipe.set_progress_bar_config(disable=True)
    load_s = time.perf_counter() - t0
    res = {}
    gen = torch.Generator("cpu").manual_seed(0)

    # Text conditioning for guidance, [uncond, cond], as the pipeline's _encode_prompt makes it.
    embeds, hidden, mask = pipe._encode_prompt(PROMPT, "cpu", 1, True)

    # Prior step.
    s = pipe.prior_scheduler
    s.set_timesteps(ps)
    t = s.timesteps[len(s.timesteps) // 2]
    x = torch.randn(1, prior.config.embedding_dim, dtype=dt)

    def prior_step():
        out = prior(torch.cat([x, x]), timestep=t, proj_embedding=embeds, encoder_hidden_states=hidden,
                    attention_mask=mask).predicted_image_embedding
        u, c = out.chunk(2)
        return s.step(u + 4.0 * (c - u), timestep=t, sample=x, generator=gen).prev_sample

    res["prior_step"] = timed(a.warmup, a.reps, prior_step)
    emb = prior.post_process_latents(x)

    # Decoder step with guidance (text projection once, as the pipeline).
    hs, add = tp(image_embeddings=emb, prompt_embeds=embeds, text_encoder_hidden_states=hidden,
                 do_classifier_free_guidance=True)
    dmask = torch.nn.functional.pad(mask, (tp.clip_extra_context_tokens, 0), value=True)
    s = pipe.decoder_scheduler
    s.set_timesteps(ds)
    t = s.timesteps[len(s.timesteps) // 2]
    c = dec.config.in_channels  # the image's channels (without coordinate maps)
    xd = torch.randn(1, c, dec.config.sample_size, dec.config.sample_size, dtype=dt)

    def decoder_step():
        out = dec(sample=torch.cat([xd, xd]), timestep=t, encoder_hidden_states=hs, class_labels=add,
                  attention_mask=dmask).sample
        u, k = out.chunk(2)
        eu, _ = u.split(c, dim=1)
        ek, var = k.split(c, dim=1)
        guided = torch.cat([eu + 8.0 * (ek - eu), var], dim=1)
        return s.step(guided, t, xd, generator=gen).prev_sample

    res["decoder_step"] = timed(a.warmup, a.reps, decoder_step)

    # Upsampler steps.
    size = srf.config.sample_size
    small = xd.clamp(-1, 1)
    # torch has no CPU kernel for antialiased bicubic in bf16: resize in f32 (prepared once, untimed).
    low = torch.nn.functional.interpolate(small.float(), size=[size, size], mode="bicubic", align_corners=False,
                                          antialias=True).to(dt)
    s = pipe.super_res_scheduler
    s.set_timesteps(ss)
    t = s.timesteps[0]
    xs = torch.randn(1, srf.config.in_channels // 2, size, size, dtype=dt)

    def sr_step(unet, t):
        def f():
            out = unet(sample=torch.cat([xs, low], dim=1), timestep=t).sample
            return s.step(out, t, xs, generator=gen).prev_sample
        return f

    srw = a.warmup if a.sr_warmup is None else a.sr_warmup
    res["super_res_first_step"] = timed(srw, a.reps, sr_step(srf, t))
    if a.sr_last:
        res["super_res_last_step"] = timed(srw, a.reps, sr_step(srl, s.timesteps[-1]))

    # The whole pipeline.
    def whole():
        return pipe(PROMPT, prior_num_inference_steps=ps, decoder_num_inference_steps=ds,
                    super_res_num_inference_steps=ss, prior_guidance_scale=4.0, decoder_guidance_scale=8.0,
                    generator=torch.Generator("cpu").manual_seed(0), output_type="pt").images

    # UnCLIPPipeline resizes the decoder's image in the model dtype, which fails in bf16 on the CPU
    # ("compute_index_ranges_weights" not implemented for 'BFloat16'): no whole-pipeline row then.
    if dt == torch.float32:
        res["pipeline"] = timed(0, a.pipeline_reps, whole)
    res["load_s"] = load_s
    res["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    res["threads"] = torch.get_num_threads()
    print(json.dumps(res))


if __name__ == "__main__":
    sys.exit(main())
