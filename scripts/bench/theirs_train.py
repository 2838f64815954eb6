"""The PyTorch side of the training benchmark: one training step of the decoder and of the prior
of a diffusers-layout unCLIP folder, and of a two-tower CLIP, written as a plain PyTorch loop over
diffusers' models (UNet2DConditionModel + UnCLIPTextProjModel, PriorTransformer) and transformers'
CLIPModel, timing exactly what benches/train_side_by_side.rs times for ours: the same folders and
weights (f32, CPU), threads, batch, loss and update, printing one JSON line. Each timing is the
median wall-clock time of the steps, with the median CPU time of the process beside it
(time.process_time); --phases times forward, backward, clipping + AdamW and EMA apart (CPU time).

A step: the loss on a random batch of the stage's shapes (made before the clock starts), zero the
gradients, backward, clip the gradient norm to 1, torch.optim.AdamW (lr 1e-4, weight decay 0.01
off biases, norms and embeddings), then an EMA update (decay 0.999 with diffusers' EMAModel warmup).
Decoder loss (GLIDE / Karlo, as unclip_decoder::train): the caption replaced by the empty one for
half the rows, the image embedding by the learned null embedding for 10%, the text projection,
noising at uniform timesteps of the squaredcos_cap_v2 schedule, the UNet (with the coordinate maps
appended for a decoder with `coordinate_channels`), MSE of the prediction (epsilon or v, as the
folder's decoder scheduler says) plus the learned-variance VLB term (weight 0.001 x T, improved
DDPM). Prior loss (as unclip_prior::train): normalized embedding noised, the text of 10% of rows
replaced by the empty prompt's, x0 MSE. CLIP loss (as the CLIP stage): CLIPModel's scaled cosine
logits of random full-length captions (ids below the end-of-text id, which closes each one) against
random pixels, symmetric cross-entropy with the pairs on the diagonal; after the update the
temperature is clamped to [0, ln 100].
"""
import argparse
import json
import math
import os
import resource
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from diffusers import DDPMScheduler, PriorTransformer, UNet2DConditionModel
from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file
from transformers import CLIPConfig, CLIPModel

from theirs import coordinate_maps

LR, WEIGHT_DECAY, GRAD_CLIP, EMA_DECAY = 1e-4, 0.01, 1.0, 0.999
LOGIT_SCALE_INIT, MAX_LOGIT_SCALE = 2.6592, math.log(100)
T = 1000


class Laps:
    """The clock of one step: with phases on, the CPU time of each part."""

    def __init__(self, on):
        self.on, self.parts = on, []
        self.last = time.process_time() if on else 0.0

    def lap(self, name):
        if self.on:
            now = time.process_time()
            self.parts.append((name, now - self.last))
            self.last = now


def timed(warmup, reps, phases, f):
    """Medians over `reps` steps after `warmup`: wall clock, CPU time, parts' CPU times."""
    for _ in range(warmup):
        f(Laps(False))
    wall, cpu, parts = [], [], []
    for _ in range(reps):
        laps = Laps(phases)
        t0, c0 = time.perf_counter(), time.process_time()
        f(laps)
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - t0)
        parts.append(laps.parts)
    names = [n for n, _ in parts[0]]
    med = {n: statistics.median_low([p[i][1] for p in parts]) for i, n in enumerate(names)}
    return statistics.median_low(wall), statistics.median_low(cpu), med


def no_decay(name):
    """Biases, norm layers and embeddings: no weight decay (as the usual AdamW recipes)."""
    parts = name.split(".")
    return (parts[-1] == "bias" or any("norm" in p or p.startswith("ln_") or p == "ln" for p in parts)
            or parts[-1].endswith(("embedding", "embeddings"))
            or (parts[-1] == "weight" and len(parts) > 1 and parts[-2].endswith(("embedding", "embeddings"))))


def optimizer(named):
    named = [(n, p) for n, p in named if p.requires_grad]
    groups = [{"params": [p for n, p in named if not no_decay(n)], "weight_decay": WEIGHT_DECAY},
              {"params": [p for n, p in named if no_decay(n)], "weight_decay": 0.0}]
    params = [p for _, p in named]
    ema = EMAModel(params, decay=EMA_DECAY, use_ema_warmup=True, inv_gamma=1.0, power=1.0)
    return params, torch.optim.AdamW(groups, lr=LR), ema


def update(loss, params, opt, ema, laps):
    laps.lap("forward")
    opt.zero_grad()
    value = loss.item()
    if not math.isfinite(value):
        return
    loss.backward()
    laps.lap("backward")
    norm = torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
    finite = torch.isfinite(norm)
    if finite:
        opt.step()
    laps.lap("optimizer")
    if finite:
        ema.step(params)
    laps.lap("ema")


def vb_bits(out, pred_type, x0, x_t, t, ac):
    """Improved DDPM's VLB term per row in bits per dimension (model mean with stopped gradient)."""
    c = x_t.shape[1]
    pred, v = out[:, :c].detach().double(), out[:, c:].double()
    x0, x_t = x0.double(), x_t.double()
    ac = ac.double()
    ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
    betas = 1 - ac / ac_prev
    post_var = betas * (1 - ac_prev) / (1 - ac)
    log_min = torch.log(torch.cat([post_var[1:2], post_var[1:]]).clamp_min(1e-20))
    shape = (-1,) + (1,) * (x_t.dim() - 1)
    g = lambda tab: tab[t].view(shape)  # noqa: E731
    a = g(ac)
    if pred_type == "epsilon":
        px0 = (1 / a).sqrt() * x_t - (1 / a - 1).sqrt() * pred
    elif pred_type == "v_prediction":
        px0 = a.sqrt() * x_t - (1 - a).sqrt() * pred
    else:
        px0 = pred
    c0 = g(betas * ac_prev.sqrt() / (1 - ac))
    ct = g((1 - ac_prev) * (1 - betas).sqrt() / (1 - ac))
    true_mean, model_mean = c0 * x0 + ct * x_t, c0 * px0 + ct * x_t
    lmin, lmax = g(log_min), g(torch.log(betas))
    frac = (v + 1) / 2
    log_var = frac * lmax + (1 - frac) * lmin
    kl = 0.5 * (log_var - lmin + torch.exp(lmin - log_var) + (true_mean - model_mean) ** 2 * torch.exp(-log_var) - 1)
    dims = list(range(1, x_t.dim()))
    kl = kl.mean(dims) / math.log(2)
    cdf = lambda x: 0.5 * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))  # noqa: E731
    centered, inv_std = x0 - model_mean, torch.exp(-0.5 * log_var)
    cp, cm = cdf(inv_std * (centered + 1 / 255)), cdf(inv_std * (centered - 1 / 255))
    log_delta = (cp - cm).clamp_min(1e-12).log()
    ll = torch.where(x0 < -0.999, cp.clamp_min(1e-12).log(),
                     torch.where(x0 > 0.999, (1 - cm).clamp_min(1e-12).log(), log_delta))
    nll = -ll.mean(dims) / math.log(2)
    return torch.where(t == 0, nll, kl).to(out.dtype)


def decoder_step(d, b, warmup, reps, phases, channels_last=False):
    unet = UNet2DConditionModel.from_pretrained(os.path.join(d, "decoder")).train()
    tp = UnCLIPTextProjModel.from_pretrained(os.path.join(d, "text_proj")).train()
    raw = UNet2DConditionModel.load_config(os.path.join(d, "decoder"))
    coords = raw.get("coordinate_channels", 0)
    side, c = raw["sample_size"], raw["in_channels"] - coords
    maps = coordinate_maps(side, torch.float32).expand(b, -1, -1, -1) if coords else None
    with open(os.path.join(d, "decoder_scheduler", "scheduler_config.json")) as f:
        pred_type = json.load(f)["prediction_type"]
    sched = DDPMScheduler(num_train_timesteps=T, beta_schedule="squaredcos_cap_v2", prediction_type=pred_type)
    ac = sched.alphas_cumprod
    dim = tp.config.clip_embeddings_dim
    with open(os.path.join(d, "text_encoder", "config.json")) as f:
        length = json.load(f)["max_position_embeddings"]
    images = torch.randn(b, c, side, side).clamp(-1, 1)
    image_emb, prompt, hidden = torch.randn(b, dim), torch.randn(b, dim), torch.randn(b, length, dim)
    mask = torch.ones(b, length, dtype=torch.bool)
    e_prompt, e_hidden, e_mask = torch.randn(1, dim), torch.randn(1, length, dim), torch.ones(1, length, dtype=torch.bool)
    if channels_last:
        unet.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
        if maps is not None:
            maps = maps.contiguous(memory_format=torch.channels_last)
    named = [("decoder." + n, p) for n, p in unet.named_parameters()] + \
            [("text_proj." + n, p) for n, p in tp.named_parameters()]
    params, opt, ema = optimizer(named)

    def step(laps):
        drop_text = torch.rand(b) < 0.5
        p = torch.where(drop_text[:, None], e_prompt, prompt)
        h = torch.where(drop_text[:, None, None], e_hidden, hidden)
        m = torch.where(drop_text[:, None], e_mask, mask)
        drop_image = torch.rand(b) < 0.1
        img = torch.where(drop_image[:, None], tp.learned_classifier_free_guidance_embeddings[None], image_emb)
        hs, add = tp(image_embeddings=img, prompt_embeds=p, text_encoder_hidden_states=h,
                     do_classifier_free_guidance=False)
        dmask = F.pad(m, (tp.clip_extra_context_tokens, 0), value=True)
        t = torch.randint(0, T, (b,))
        noise = torch.randn_like(images)
        x_t = sched.add_noise(images, noise, t)
        target = sched.get_velocity(images, noise, t) if pred_type == "v_prediction" else noise
        inp = torch.cat([x_t, maps], 1) if coords else x_t
        out = unet(inp, t, encoder_hidden_states=hs, class_labels=add, attention_mask=dmask).sample
        mse = F.mse_loss(out[:, :c], target)
        vb = vb_bits(out, pred_type, images, x_t, t, ac).mean()
        update(mse + vb * (0.001 * T), params, opt, ema, laps)

    return timed(warmup, reps, phases, step)


def prior_step(d, b, warmup, reps, phases):
    prior = PriorTransformer.from_pretrained(os.path.join(d, "prior")).train()
    cfg = prior.config
    e, n = cfg.embedding_dim, cfg.num_embeddings
    proj = cfg.embedding_proj_dim or e
    sched = DDPMScheduler(num_train_timesteps=T, beta_schedule="squaredcos_cap_v2")
    image = torch.randn(b, cfg.clip_embed_dim or e)
    text, hidden, mask = torch.randn(b, proj), torch.randn(b, n, e), torch.ones(b, n, dtype=torch.bool)
    u_text, u_hidden, u_mask = torch.randn(1, proj), torch.randn(1, n, e), torch.ones(1, n, dtype=torch.bool)
    params, opt, ema = optimizer(list(prior.named_parameters()))

    def step(laps):
        x0 = (image - prior.clip_mean) / prior.clip_std
        t = torch.randint(0, T, (b,))
        x_t = sched.add_noise(x0, torch.randn_like(x0), t)
        drop = torch.rand(b) < 0.1
        te = torch.where(drop[:, None], u_text, text)
        h = torch.where(drop[:, None, None], u_hidden, hidden)
        m = torch.where(drop[:, None], u_mask, mask)
        pred = prior(x_t, timestep=t, proj_embedding=te, encoder_hidden_states=h,
                     attention_mask=m).predicted_image_embedding
        update(F.mse_loss(pred, x0), params, opt, ema, laps)

    return timed(warmup, reps, phases, step)


def clip_model(d):
    """Both towers: a CLIPModel folder, or a pipeline folder's text_encoder and image_encoder joined
    as the CLIP stage joins them (the temperature at its initial value)."""
    if os.path.isfile(os.path.join(d, "config.json")):
        return CLIPModel.from_pretrained(d)
    dirs = [os.path.join(d, "text_encoder"), os.path.join(d, "image_encoder")]
    text, vision = (json.load(open(os.path.join(x, "config.json"))) for x in dirs)
    cfg = CLIPConfig(text_config=text, vision_config=vision, projection_dim=text["projection_dim"],
                     logit_scale_init_value=LOGIT_SCALE_INIT)
    model = CLIPModel(cfg)
    state = {}
    for x in dirs:
        state.update(load_file(os.path.join(x, "model.safetensors")))
    missing, unexpected = model.load_state_dict(state, strict=False)
    bad = [k for k in missing if k != "logit_scale" and not k.endswith("position_ids")] + list(unexpected)
    if bad:
        sys.exit(f"{d}: the encoders' weights do not fit CLIPModel: {bad}")
    return model


def clip_step(d, b, warmup, reps, phases):
    model = clip_model(d).train()
    tc, vc = model.config.text_config, model.config.vision_config
    length = tc.max_position_embeddings
    eos = tc.eos_token_id if tc.eos_token_id != 2 else tc.vocab_size - 1
    ids = torch.randint(0, eos, (b, length))
    ids[:, -1] = eos
    pixels = torch.randn(b, 3, vc.image_size, vc.image_size)
    targets = torch.arange(b)
    params, opt, ema = optimizer(list(model.named_parameters()))

    def step(laps):
        logits = model(input_ids=ids, pixel_values=pixels).logits_per_text
        loss = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets)) / 2
        update(loss, params, opt, ema, laps)
        with torch.no_grad():
            model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)

    return timed(warmup, reps, phases, step)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", default="4,4", help="decoder,prior")
    ap.add_argument("--clip", default=None, help="a CLIPModel folder, or a pipeline folder with both encoders")
    ap.add_argument("--clip-batch", type=int, default=8)
    ap.add_argument("--phases", action="store_true")
    # Alternatives for the convolutions, to see whether PyTorch has a faster path than its default
    # one (README, "Training benchmark"): NHWC activations and weights (the decoder), or im2col +
    # GEMM instead of oneDNN (every row).
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--no-mkldnn", action="store_true")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.backends.mkldnn.enabled = not a.no_mkldnn
    torch.manual_seed(0)
    bd, bp = (int(x) for x in a.batch.split(","))
    rows = [("decoder", decoder_step(a.model, bd, a.warmup, a.reps, a.phases, a.channels_last)),
            ("prior", prior_step(a.model, bp, a.warmup, a.reps, a.phases))]
    if a.clip:
        rows.append(("clip", clip_step(a.clip, a.clip_batch, a.warmup, a.reps, a.phases)))
    res = {}
    for name, (wall, cpu, parts) in rows:
        res[f"{name}_train_step"], res[f"{name}_train_step_cpu"] = wall, cpu
        if a.phases:
            res[f"{name}_phases_cpu"] = parts
    res["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    res["threads"] = torch.get_num_threads()
    print(json.dumps(res))


if __name__ == "__main__":
    sys.exit(main())
