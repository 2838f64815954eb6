"""What the diagnostics share: loading a diffusers-layout unCLIP folder's CLIP parts with the
reference packages, unit-norm CLIP embeddings, drawing the shapes, and the coordinate maps of
decoders with `coordinate_channels`."""
import argparse
import json
import os

import torch
from transformers import (CLIPImageProcessor, CLIPTextModelWithProjection, CLIPTokenizer,
                          CLIPVisionModelWithProjection)

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
F32 = dict(torch_dtype=torch.float32)


def load_clip(model_dir):
    """Tokenizer, text encoder, image encoder and image processor of a model folder (f32, eval)."""
    j = lambda n: os.path.join(model_dir, n)  # noqa: E731
    return (CLIPTokenizer.from_pretrained(j("tokenizer")),
            CLIPTextModelWithProjection.from_pretrained(j("text_encoder"), **F32).eval(),
            CLIPVisionModelWithProjection.from_pretrained(j("image_encoder"), **F32).eval(),
            CLIPImageProcessor.from_pretrained(j("feature_extractor")))


def clip_for_script(doc):
    """A diagnostic's command line (`--model`, the shipped folder by default) and that folder's
    CLIP, on one thread without gradients, as every CLIP diagnostic starts."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.path.join(ROOT, "models", "shapes"))
    a = ap.parse_args()
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    return a, load_clip(a.model)


def text_embeds(clip, captions):
    """Unit-norm CLIP text embeddings of `captions`, as the prior reads them."""
    tok, te, _, _ = clip
    ids = tok(captions, padding="max_length", max_length=tok.model_max_length, return_tensors="pt")
    e = te(ids.input_ids, attention_mask=ids.attention_mask).text_embeds
    return e / e.norm(dim=-1, keepdim=True)


def image_embeds(clip, images):
    """Unit-norm CLIP image embeddings of PIL `images`."""
    _, _, vis, proc = clip
    e = vis(**proc(images, return_tensors="pt")).image_embeds
    return e / e.norm(dim=-1, keepdim=True)


def draw_shape(d, shape, fill, x, y, r):
    """A circle, square or triangle of half-size `r` centred at (x, y) on a PIL ImageDraw."""
    if shape == "circle":
        d.ellipse((x - r, y - r, x + r, y + r), fill=fill)
    elif shape == "square":
        d.rectangle((x - r, y - r, x + r, y + r), fill=fill)
    else:
        d.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=fill)


def coordinate_maps(side):
    """(1, 2, side, side): x then y of each pixel centre, -1 at the left / top edge to 1, as
    unclip-decoder appends them to the input of a decoder with `coordinate_channels: 2`."""
    c = (torch.arange(side) + 0.5) / side * 2 - 1
    return torch.cat([c.view(1, 1, 1, side).expand(1, 1, side, side),
                      c.view(1, 1, side, 1).expand(1, 1, side, side)], 1)


def load_decoder(model_dir, weights=None):
    """The folder's text projection and decoder UNet (f32, eval), or those of a `train` checkpoint
    (`decoder.*` and `text_proj.*` names) in the folder's decoder config; also the number of
    coordinate channels the decoder takes (a checkpoint whose conv_in takes more channels than
    the folder's sample has coordinate inputs)."""
    from diffusers import UNet2DConditionModel
    from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel
    from safetensors.torch import load_file

    j = lambda n: os.path.join(model_dir, n)  # noqa: E731
    tp = UnCLIPTextProjModel.from_pretrained(j("text_proj"), **F32).eval()
    with open(j("decoder/config.json")) as f:
        config = json.load(f)
    coords = config.pop("coordinate_channels", 0)
    if weights:
        sd = load_file(weights)
        sample_channels = config["in_channels"] - coords
        config["in_channels"] = sd["decoder.conv_in.weight"].shape[1]
        coords = config["in_channels"] - sample_channels
        part = lambda p: {k[len(p):]: v for k, v in sd.items() if k.startswith(p)}  # noqa: E731
        unet = UNet2DConditionModel.from_config(config).eval()
        unet.load_state_dict(part("decoder."))
        tp.load_state_dict(part("text_proj."))
    else:
        unet = UNet2DConditionModel.from_pretrained(j("decoder"), **F32).eval()
    return tp, unet, coords


def decoder_conditioning(clip, tp, caption, image, guided=False):
    """The decoder's keyword arguments for one caption and the CLIP image embedding of `image`
    (a PIL image); with `guided`, a batch of two for classifier-free guidance, the unconditional
    half (empty caption, the learned image embedding) first, as diffusers' UnCLIPPipeline does."""
    tok, te, vis, proc = clip
    captions = ["", caption] if guided else [caption]
    ids = tok(captions, padding="max_length", max_length=tok.model_max_length, return_tensors="pt")
    text = te(ids.input_ids, attention_mask=ids.attention_mask)
    emb = vis(**proc([image], return_tensors="pt")).image_embeds
    hs, add = tp(image_embeddings=emb, prompt_embeds=text.text_embeds,
                 text_encoder_hidden_states=text.last_hidden_state, do_classifier_free_guidance=guided)
    mask = torch.nn.functional.pad(ids.attention_mask.bool(), (tp.clip_extra_context_tokens, 0), value=True)
    return dict(encoder_hidden_states=hs, class_labels=add, attention_mask=mask)


def implied_x0(prediction, out, x_t, alpha_cumprod):
    """The x0 a decoder output implies at a timestep with this alpha-bar, per prediction type."""
    at = alpha_cumprod
    if prediction == "v_prediction":
        return at.sqrt() * x_t - (1 - at).sqrt() * out
    if prediction == "sample":
        return out
    return (x_t - (1 - at).sqrt() * out) / at.sqrt()
