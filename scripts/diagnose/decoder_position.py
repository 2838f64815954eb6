"""Whether the decoder of a diffusers-layout unCLIP folder (default: the embedded model) places an
object where its caption says, measured with the reference implementation (diffusers 0.42.1,
transformers 5.24.0: the pins of fixtures/requirements.txt), independently of this project's code.

For "a large red circle <place> on a blue background" at four places, conditioned on the caption
and on the CLIP image embedding of its true render, it prints per timestep t the centroid (x, y
as fractions of the side, 0 = left / top) of the red in the x0 the decoder implies from pure noise
(no signal in x_t), averaged over 3 noise draws. A decoder that uses the place moves the centroid
toward it (top left: both below 0.5); one that does not gives the same centroid for every place.
A decoder whose config has `coordinate_channels` (this project's extension) gets the coordinate
maps appended to its input, as unclip-decoder does.

With --weights EMA.safetensors (a decoder checkpoint of `train`, `<run>/decoder/step-*/ema.safetensors`:
`decoder.*` and `text_proj.*` names) those weights are measured instead of the folder's, in the
folder's decoder config; a checkpoint whose conv_in takes more channels than the folder's sample
has coordinate inputs.

usage: .venv/bin/python scripts/diagnose/decoder_position.py [--model models/shapes]
"""
import argparse
import os

import torch
from PIL import Image, ImageDraw

from common import ROOT, coordinate_maps, decoder_conditioning, implied_x0, load_clip, load_decoder
from diffusers import UnCLIPScheduler

BACKGROUND, RED = (30, 60, 225), (225, 30, 30)
PLACES = {"in the top left": (0.2, 0.2), "in the bottom right": (0.8, 0.8),
          "on the left": (0.2, 0.5), "at the top": (0.5, 0.2)}


def render(center, side=64):
    im = Image.new("RGB", (side, side), BACKGROUND)
    r, (x, y) = 0.14 * side, (center[0] * side, center[1] * side)
    ImageDraw.Draw(im).ellipse((x - r, y - r, x + r, y + r), fill=RED)
    return im


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.path.join(ROOT, "models", "shapes"))
    ap.add_argument("--weights", default=None)
    a = ap.parse_args()
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    j = lambda n: os.path.join(a.model, n)  # noqa: E731
    clip = load_clip(a.model)
    tp, unet, coords = load_decoder(a.model, a.weights)
    sched = UnCLIPScheduler.from_pretrained(j("decoder_scheduler"))
    ac, prediction = sched.alphas_cumprod, sched.config.prediction_type
    side = unet.config.sample_size
    maps = coordinate_maps(side)
    red = (torch.tensor(RED).float() / 127.5 - 1)[:, None, None]
    bg = (torch.tensor(BACKGROUND).float() / 127.5 - 1)[:, None, None]
    ys, xs = torch.meshgrid(torch.arange(side).float() + 0.5, torch.arange(side).float() + 0.5, indexing="ij")

    def conditioning(place):
        return decoder_conditioning(clip, tp, f"a large red circle {place} on a blue background",
                                    render(PLACES[place]))

    def centroid(x0):
        """Red-weighted mean position: each pixel weighs how far it is from blue toward red."""
        d = red - bg
        w = (((x0[0] - bg) * d).sum(0) / (d * d).sum()).clamp(0, 1)
        return float((w * xs).sum() / w.sum() / side), float((w * ys).sum() / w.sum() / side)

    conds = {p: conditioning(p) for p in PLACES}
    print(f"decoder {a.weights or j('decoder')} ({prediction}, coordinate channels: {coords}): "
          "centroid (x, y) of the red in the implied x0 from pure noise")
    print(f"{'t':>4}  " + "  ".join(f"{p:>22}" for p in PLACES))
    for t in [950, 850, 700]:
        at = ac[t]
        row = []
        for place in PLACES:
            cx = cy = 0.0
            for seed in range(3):
                x_t = (1 - at).sqrt() * torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(seed))
                inp = torch.cat([x_t, maps], 1) if coords else x_t
                out = unet(inp, t, **conds[place]).sample[:, :3]
                x0 = implied_x0(prediction, out, x_t, at)
                x, y = centroid(x0)
                cx, cy = cx + x / 3, cy + y / 3
            row.append(f"({cx:.2f}, {cy:.2f})")
        print(f"{t:>4}  " + "  ".join(f"{c:>22}" for c in row))


if __name__ == "__main__":
    main()
