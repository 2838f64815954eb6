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
import json
import os

import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file

from common import F32, ROOT, coordinate_maps, load_clip
from diffusers import UNet2DConditionModel, UnCLIPScheduler
from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel

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
    tok, te, vis, proc = load_clip(a.model)
    tp = UnCLIPTextProjModel.from_pretrained(j("text_proj"), **F32).eval()
    with open(j("decoder/config.json")) as f:
        config = json.load(f)
    coords = config.pop("coordinate_channels", 0)
    if a.weights:
        sd = load_file(a.weights)
        sample_channels = config["in_channels"] - coords
        config["in_channels"] = sd["decoder.conv_in.weight"].shape[1]
        coords = config["in_channels"] - sample_channels
        part = lambda p: {k[len(p):]: v for k, v in sd.items() if k.startswith(p)}  # noqa: E731
        unet = UNet2DConditionModel.from_config(config).eval()
        unet.load_state_dict(part("decoder."))
        tp.load_state_dict(part("text_proj."))
    else:
        unet = UNet2DConditionModel.from_pretrained(j("decoder"), **F32).eval()
    ac = UnCLIPScheduler.from_pretrained(j("decoder_scheduler")).alphas_cumprod
    side = unet.config.sample_size
    maps = coordinate_maps(side)
    red = (torch.tensor(RED).float() / 127.5 - 1)[:, None, None]
    bg = (torch.tensor(BACKGROUND).float() / 127.5 - 1)[:, None, None]
    ys, xs = torch.meshgrid(torch.arange(side).float() + 0.5, torch.arange(side).float() + 0.5, indexing="ij")

    def conditioning(place):
        ids = tok([f"a large red circle {place} on a blue background"], padding="max_length",
                  max_length=tok.model_max_length, return_tensors="pt")
        text = te(ids.input_ids, attention_mask=ids.attention_mask)
        emb = vis(**proc([render(PLACES[place])], return_tensors="pt")).image_embeds
        hs, add = tp(image_embeddings=emb, prompt_embeds=text.text_embeds,
                     text_encoder_hidden_states=text.last_hidden_state, do_classifier_free_guidance=False)
        mask = torch.nn.functional.pad(ids.attention_mask.bool(), (tp.clip_extra_context_tokens, 0), value=True)
        return dict(encoder_hidden_states=hs, class_labels=add, attention_mask=mask)

    def centroid(x0):
        """Red-weighted mean position: each pixel weighs how far it is from blue toward red."""
        d = red - bg
        w = (((x0[0] - bg) * d).sum(0) / (d * d).sum()).clamp(0, 1)
        return float((w * xs).sum() / w.sum() / side), float((w * ys).sum() / w.sum() / side)

    conds = {p: conditioning(p) for p in PLACES}
    prediction = UnCLIPScheduler.from_pretrained(j("decoder_scheduler")).config.prediction_type
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
                if prediction == "v_prediction":
                    x0 = at.sqrt() * x_t - (1 - at).sqrt() * out
                elif prediction == "sample":
                    x0 = out
                else:
                    x0 = (x_t - (1 - at).sqrt() * out) / at.sqrt()
                x, y = centroid(x0)
                cx, cy = cx + x / 3, cy + y / 3
            row.append(f"({cx:.2f}, {cy:.2f})")
        print(f"{t:>4}  " + "  ".join(f"{c:>22}" for c in row))


if __name__ == "__main__":
    main()
