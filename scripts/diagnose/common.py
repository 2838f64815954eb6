"""What the diagnostics share: loading a diffusers-layout unCLIP folder's CLIP parts with the
reference packages, and the coordinate maps of decoders with `coordinate_channels`."""
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


def coordinate_maps(side):
    """(1, 2, side, side): x then y of each pixel centre, -1 at the left / top edge to 1, as
    unclip-decoder appends them to the input of a decoder with `coordinate_channels: 2`."""
    c = (torch.arange(side) + 0.5) / side * 2 - 1
    return torch.cat([c.view(1, 1, 1, side).expand(1, 1, side, side),
                      c.view(1, 1, side, 1).expand(1, 1, side, side)], 1)
