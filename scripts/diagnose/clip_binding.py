"""Whether the CLIP of a diffusers-layout unCLIP folder (default: the embedded model) carries which
color belongs to which shape in two-object scenes, measured with the reference implementation
(transformers, the pins of fixtures/requirements.txt), not with this project's code.

Two objects of different shapes and colors, side by side, for every pair of shapes (in both
orders) and colors drawn from clip_position.py's six. It prints:
- zero-shot binding: each render scored against its caption and the caption with the two colors
  exchanged ("a red circle and a blue square" / "a blue circle and a red square"; chance 50%);
- how close the embeddings of a scene and of its color-exchanged twin are (mean cosine), for the
  captions and for the renders, next to the mean over unrelated pairs. A twin as close as the
  scene itself leaves the prior and the decoder's image embedding nothing to bind with.

usage: .venv/bin/python scripts/diagnose/clip_binding.py [--model models/shapes]
"""
import itertools

import torch
from PIL import Image, ImageDraw

from clip_position import COLORS, SHAPES
from common import clip_for_script, draw_shape, image_embeds, text_embeds

BACKGROUNDS = {"gray": (128, 128, 128), "white": COLORS["white"]}


def render(objects, bg, side=64):
    """The two objects side by side, the first on the left."""
    im = Image.new("RGB", (side, side), BACKGROUNDS[bg])
    d = ImageDraw.Draw(im)
    for k, (shape, fg) in enumerate(objects):
        draw_shape(d, shape, COLORS[fg], (0.28 + 0.44 * k) * side, 0.5 * side, 0.13 * side)
    return im


def caption(objects, bg):
    (s1, c1), (s2, c2) = objects
    return f"a {c1} {s1} and a {c2} {s2} on a {bg} background"


def main():
    _, clip = clip_for_script(__doc__)
    scenes = []
    for bg in BACKGROUNDS:
        colors = [c for c in COLORS if c != bg]
        for s1, s2 in itertools.permutations(SHAPES, 2):
            for c1, c2 in itertools.combinations(colors, 2):
                scenes.append(([(s1, c1), (s2, c2)], [(s1, c2), (s2, c1)], bg))
    t = text_embeds(clip, [caption(o, bg) for o, _, bg in scenes])
    t_swap = text_embeds(clip, [caption(s, bg) for _, s, bg in scenes])
    i = image_embeds(clip, [render(o, bg) for o, _, bg in scenes])
    i_swap = image_embeds(clip, [render(s, bg) for _, s, bg in scenes])
    right = ((i * t).sum(1) > (i * t_swap).sum(1)).float().mean()
    shifted = lambda e: torch.roll(e, 1, 0)  # noqa: E731  (an unrelated scene for each)
    print(f"zero-shot binding ({len(scenes)} renders, own caption vs colors exchanged): {100 * right:.1f}%")
    print(f"cosine of a scene and its color-exchanged twin, captions {(t * t_swap).sum(1).mean():.3f}"
          f"  (unrelated scenes {(t * shifted(t)).sum(1).mean():.3f})")
    print(f"cosine of a scene and its color-exchanged twin, renders  {(i * i_swap).sum(1).mean():.3f}"
          f"  (unrelated scenes {(i * shifted(i)).sum(1).mean():.3f})")


if __name__ == "__main__":
    main()
