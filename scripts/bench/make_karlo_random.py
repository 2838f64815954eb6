"""Writes a Karlo-sized UnCLIPPipeline folder with random weights (diffusers 0.42.1 default
initialization, seed 0) for the side-by-side benchmark: the real Karlo configs (prior:
PriorTransformer's defaults, which are Karlo's; decoder/text_proj/super-res: the configs in
fixtures/data/decoder/karlo/, super_res_last = super_res_first's config; text encoder: CLIP ViT-L/14's
text tower), stored as f16 like the published checkpoints. The tokenizer and scheduler configs are
the tiny pipeline fixture's (Karlo's scheduler settings; the tokenizer only turns the prompt into ids).
Nothing here is committed: the folder is about 6.5 GB.

usage: .venv/bin/python scripts/bench/make_karlo_random.py OUT_DIR
"""
import json
import os
import shutil
import sys

import torch
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

from diffusers import PriorTransformer, UNet2DConditionModel, UNet2DModel
from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
TINY = os.path.join(ROOT, "fixtures", "data", "pipeline", "text2img")
KARLO = os.path.join(ROOT, "fixtures", "data", "decoder", "karlo")


def config(name):
    with open(os.path.join(KARLO, name, "config.json")) as f:
        c = json.load(f)
    return {k: v for k, v in c.items() if not k.startswith("_")}


def main(out):
    tmp = out + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    torch.set_grad_enabled(False)
    for n in ("tokenizer", "prior_scheduler", "decoder_scheduler", "super_res_scheduler"):
        shutil.copytree(os.path.join(TINY, n), os.path.join(tmp, n))
    shutil.copy(os.path.join(TINY, "model_index.json"), tmp)
    torch.manual_seed(0)
    comps = {
        "text_encoder": lambda: CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=49408, hidden_size=768, intermediate_size=3072, projection_dim=768,
            num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
            bos_token_id=0, eos_token_id=2, pad_token_id=1)),
        "prior": lambda: PriorTransformer(),
        "text_proj": lambda: UnCLIPTextProjModel(**config("text_proj")),
        "decoder": lambda: UNet2DConditionModel(**config("decoder")),
        "super_res_first": lambda: UNet2DModel(**config("super_res_first")),
        "super_res_last": lambda: UNet2DModel(**config("super_res_first")),
    }
    for name, make in comps.items():
        m = make().eval().half()
        m.save_pretrained(os.path.join(tmp, name))
        print(name, sum(p.numel() for p in m.parameters()) / 1e6, "M parameters", flush=True)
        del m
    shutil.rmtree(out, ignore_errors=True)
    os.rename(tmp, out)
    print("wrote", out)


if __name__ == "__main__":
    main(sys.argv[1])
