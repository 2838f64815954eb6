"""At which noise level the decoder of a diffusers-layout unCLIP folder (default: the embedded
model) loses or makes the corners of a small square, measured with the reference implementation
(diffusers 0.42.1, transformers 5.24.0: the pins of fixtures/requirements.txt).

The embedded model draws small squares and small circles as the same blob. This asks the decoder
for the x0 it implies from a noised true render at timestep t, for "a small red <shape> in the
bottom right on a blue background" (or --color green) conditioned on that caption and on the CLIP image embedding of
its true render, and prints how red the square's corners are in that x0 (the pixels a square
covers and its inscribed disc does not, weighted by how much of each pixel they cover; 1 = red
as the object, 0 = background):

- "square kept": x_t is the noised square, the condition says square. Low values at low t mean
  the decoder rounds corners it can still see (a precision problem).
- "circle -> square": x_t is the noised circle, the condition says square. Where this stays low,
  the shape is already fixed by x_t and the condition no longer makes corners.
- "circle kept": the reference for a blob (the disc's own anti-aliased edge gives a few tenths).

Averaged over 4 noise draws. Then, with --samples N, the same score on N decoder-only samples from
pure noise per shape (25 steps, guidance 3, diffusers' UnCLIPScheduler with its learned variance,
conditioned on the caption and the render's CLIP embedding): whether the corners survive sampling.
With --weights EMA.safetensors a `train` checkpoint is measured, as in decoder_position.py.

usage: .venv/bin/python scripts/diagnose/decoder_shape.py [--model models/shapes] [--size small|large]
       [--color red|green] [--samples 8]
"""
import argparse
import os

import numpy as np
import torch
from PIL import Image, ImageDraw

from common import ROOT, coordinate_maps, decoder_conditioning, implied_x0, load_clip, load_decoder
from diffusers import UnCLIPScheduler

BACKGROUND = (30, 60, 225)
# unclip's shapes palette; red squares are a held-out combination (never in training), green ones not.
COLORS = {"red": (225, 30, 30), "green": (30, 170, 50)}
EXTENT = {"small": 0.18, "large": 0.28}  # the side of a square, as in unclip's shapes::Size
CENTER = (0.8, 0.8)
SUPERSAMPLE = 8


def render(shape, color, extent, side):
    """A supersampled render box-filtered down, as unclip's shapes renderer anti-aliases."""
    big = side * SUPERSAMPLE
    im = Image.new("RGB", (big, big), BACKGROUND)
    h, (x, y) = extent / 2 * big, (CENTER[0] * big, CENTER[1] * big)
    box = (x - h, y - h, x + h, y + h)
    draw = ImageDraw.Draw(im)
    (draw.rectangle if shape == "square" else draw.ellipse)(box, fill=color)
    return im.resize((side, side), Image.BOX)


def corner_weights(extent, side):
    """How much of each pixel the square covers and its inscribed disc does not (supersampled)."""
    big = side * SUPERSAMPLE
    c = (torch.arange(big) + 0.5) / big
    ys, xs = torch.meshgrid(c, c, indexing="ij")
    dx, dy = (xs - CENTER[0]).abs(), (ys - CENTER[1]).abs()
    inside = (dx < extent / 2) & (dy < extent / 2) & ((dx * dx + dy * dy).sqrt() > extent / 2)
    return torch.nn.functional.avg_pool2d(inside.float()[None, None], SUPERSAMPLE)[0, 0]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.path.join(ROOT, "models", "shapes"))
    ap.add_argument("--weights", default=None)
    ap.add_argument("--size", default="small", choices=sorted(EXTENT))
    ap.add_argument("--color", default="red", choices=sorted(COLORS))
    ap.add_argument("--samples", type=int, default=0)
    a = ap.parse_args()
    color = COLORS[a.color]
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    j = lambda n: os.path.join(a.model, n)  # noqa: E731
    clip = load_clip(a.model)
    tp, unet, coords = load_decoder(a.model, a.weights)
    sched = UnCLIPScheduler.from_pretrained(j("decoder_scheduler"))
    ac, prediction = sched.alphas_cumprod, sched.config.prediction_type
    side = unet.config.sample_size
    maps = coordinate_maps(side)
    extent = EXTENT[a.size]
    fg = (torch.tensor(color).float() / 127.5 - 1)[:, None, None]
    bg = (torch.tensor(BACKGROUND).float() / 127.5 - 1)[:, None, None]
    corners = corner_weights(extent, side)
    shapes = ("square", "circle")
    # Renders as (1, 3, side, side) in [-1, 1]; the CLIP image embedding is taken at CLIP's input
    # size, from a render at that size.
    renders = {s: torch.from_numpy(np.asarray(render(s, color, extent, side), dtype=np.float32))
               .permute(2, 0, 1)[None] / 127.5 - 1 for s in shapes}
    clip_renders = {s: render(s, color, extent, 224) for s in shapes}
    captions = {s: f"a {a.size} {a.color} {s} in the bottom right on a blue background" for s in shapes}

    def corner_score(x0):
        """Mean over the corner area of how far each pixel is from the background toward the
        object's color (0..1), per image of the batch."""
        d = fg - bg
        w = (((x0 - bg) * d).sum(1) / (d * d).sum()).clamp(0, 1)
        return (w * corners).sum((1, 2)) / corners.sum()

    conds = {s: decoder_conditioning(clip, tp, captions[s], clip_renders[s]) for s in shapes}
    truth = {s: float(corner_score(renders[s])) for s in shapes}
    cases = [("square kept", "square", "square"), ("circle -> square", "circle", "square"),
             ("circle kept", "circle", "circle")]
    print(f"decoder {a.weights or j('decoder')} ({prediction}, {side} px), {a.size} objects "
          f"({extent * side:.1f} px): how {a.color} the square's corners are in the implied x0")
    print(f"true renders: square {truth['square']:.2f}, circle {truth['circle']:.2f}")
    print(f"{'t':>4}  " + "  ".join(f"{name:>16}" for name, _, _ in cases))
    for t in [25, 100, 200, 300, 400, 500, 600, 700, 850]:
        at = ac[t]
        row = []
        for _, start, cond in cases:
            x = renders[start]
            score = 0.0
            for seed in range(4):
                noise = torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(seed))
                x_t = at.sqrt() * x + (1 - at).sqrt() * noise
                inp = torch.cat([x_t, maps], 1) if coords else x_t
                out = unet(inp, t, **conds[cond]).sample[:, :3]
                x0 = implied_x0(prediction, out, x_t, at)
                score += float(corner_score(x0)) / 4
            row.append(f"{score:.2f}")
        print(f"{t:>4}  " + "  ".join(f"{v:>16}" for v in row))
    for s in shapes if a.samples else ():
        cond = decoder_conditioning(clip, tp, captions[s], clip_renders[s], guided=True)
        x0 = sample(unet, cond, maps if coords else None, a.model, a.samples)
        scores = corner_score(x0)
        print(f"{a.samples} samples of \"{captions[s]}\": corners {float(scores.mean()):.2f} "
              f"({' '.join(f'{float(v):.2f}' for v in scores)})")


def sample(unet, cond, maps, model_dir, n, steps=25, guidance=3.0, seed=0):
    """n decoder samples from pure noise, stepped by diffusers' UnCLIPScheduler (learned variance).
    That scheduler takes epsilon, so a v-prediction output is turned into the epsilon it implies,
    and the step runs in f64 (at t = 999 the x0 divides by sqrt(alpha-bar) ~ 1e-4)."""
    sched = UnCLIPScheduler.from_pretrained(os.path.join(model_dir, "decoder_scheduler"))
    v_prediction = sched.config.prediction_type == "v_prediction"
    sched = UnCLIPScheduler.from_config({**sched.config, "prediction_type": "epsilon"})
    sched.set_timesteps(steps)
    cond = {k: v.repeat_interleave(n, 0) for k, v in cond.items()}  # (uncond x n, cond x n)
    g = torch.Generator().manual_seed(seed)
    side = unet.config.sample_size
    x = torch.randn(n, 3, side, side, generator=g)
    ts = sched.timesteps
    for i, t in enumerate(ts):
        inp = torch.cat([x, maps.expand(n, -1, -1, -1)], 1) if maps is not None else x
        out = unet(torch.cat([inp, inp]), t, **cond).sample
        uncond, text = out[:n], out[n:]
        pred = uncond[:, :3] + guidance * (text[:, :3] - uncond[:, :3])
        if v_prediction:
            at = sched.alphas_cumprod[t].double()
            pred = at.sqrt() * pred.double() + (1 - at).sqrt() * x.double()
        model_output = torch.cat([pred.double(), text[:, 3:].double()], 1)
        prev = ts[i + 1] if i + 1 < len(ts) else None
        x = sched.step(model_output, t, x.double(), prev_timestep=prev, generator=g).prev_sample.float()
    return x


if __name__ == "__main__":
    main()
