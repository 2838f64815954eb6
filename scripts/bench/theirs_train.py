"""The PyTorch side of the training benchmark: one training step of the decoder and of the prior
of a diffusers-layout unCLIP folder, written as a plain PyTorch loop over diffusers' models
(UNet2DConditionModel + UnCLIPTextProjModel, PriorTransformer), timing exactly what
benches/train_side_by_side.rs times for ours: the same folder and weights (f32, CPU), threads,
batch, loss and update, printing one JSON line.

A step: the loss on a random batch of the stage's shapes (made before the clock starts), zero the
gradients, backward, clip the gradient norm to 1, torch.optim.AdamW (lr 1e-4, weight decay 0.01
off biases, norms and embeddings), then an EMA update (decay 0.999 with diffusers' EMAModel warmup).
Decoder loss (GLIDE / Karlo, as unclip_decoder::train): the caption replaced by the empty one for
half the rows, the image embedding by the learned null embedding for 10%, the text projection,
noising at uniform timesteps of the squaredcos_cap_v2 schedule, the UNet (with the coordinate maps
appended for a decoder with `coordinate_channels`), MSE of the prediction (epsilon or v, as the
folder's decoder scheduler says) plus the learned-variance VLB term (weight 0.001 x T, improved
DDPM). Prior loss (as unclip_prior::train): normalized embedding noised, the text of 10% of rows
replaced by the empty prompt's, x0 MSE.
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

from theirs import coordinate_maps

LR, WEIGHT_DECAY, GRAD_CLIP, EMA_DECAY = 1e-4, 0.01, 1.0, 0.999
T = 1000


def timed(warmup, reps, f):
    for _ in range(warmup):
        f()
    v = []
    for _ in range(reps):
        t0 = time.perf_counter()
        f()
        v.append(time.perf_counter() - t0)
    return statistics.median_low(v)


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


def update(loss, params, opt, ema):
    opt.zero_grad()
    value = loss.item()
    if not math.isfinite(value):
        return
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
    if torch.isfinite(norm):
        opt.step()
        ema.step(params)


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


def decoder_step(d, b, warmup, reps):
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
    named = [("decoder." + n, p) for n, p in unet.named_parameters()] + \
            [("text_proj." + n, p) for n, p in tp.named_parameters()]
    params, opt, ema = optimizer(named)

    def step():
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
        update(mse + vb * (0.001 * T), params, opt, ema)

    return timed(warmup, reps, step)


def prior_step(d, b, warmup, reps):
    prior = PriorTransformer.from_pretrained(os.path.join(d, "prior")).train()
    cfg = prior.config
    e, n = cfg.embedding_dim, cfg.num_embeddings
    proj = cfg.embedding_proj_dim or e
    sched = DDPMScheduler(num_train_timesteps=T, beta_schedule="squaredcos_cap_v2")
    image = torch.randn(b, cfg.clip_embed_dim or e)
    text, hidden, mask = torch.randn(b, proj), torch.randn(b, n, e), torch.ones(b, n, dtype=torch.bool)
    u_text, u_hidden, u_mask = torch.randn(1, proj), torch.randn(1, n, e), torch.ones(1, n, dtype=torch.bool)
    params, opt, ema = optimizer(list(prior.named_parameters()))

    def step():
        x0 = (image - prior.clip_mean) / prior.clip_std
        t = torch.randint(0, T, (b,))
        x_t = sched.add_noise(x0, torch.randn_like(x0), t)
        drop = torch.rand(b) < 0.1
        te = torch.where(drop[:, None], u_text, text)
        h = torch.where(drop[:, None, None], u_hidden, hidden)
        m = torch.where(drop[:, None], u_mask, mask)
        pred = prior(x_t, timestep=t, proj_embedding=te, encoder_hidden_states=h,
                     attention_mask=m).predicted_image_embedding
        update(F.mse_loss(pred, x0), params, opt, ema)

    return timed(warmup, reps, step)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", default="4,4", help="decoder,prior")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    bd, bp = (int(x) for x in a.batch.split(","))
    res = {"decoder_train_step": decoder_step(a.model, bd, a.warmup, a.reps),
           "prior_train_step": prior_step(a.model, bp, a.warmup, a.reps),
           "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
           "threads": torch.get_num_threads()}
    print(json.dumps(res))


if __name__ == "__main__":
    sys.exit(main())
