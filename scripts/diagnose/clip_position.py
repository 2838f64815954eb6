"""Whether the CLIP of a diffusers-layout unCLIP folder (default: the embedded model) tells the nine
places of the shapes captions apart, left from right above all, measured with the reference
implementation (transformers, the pins of fixtures/requirements.txt), not with this project's code.

One object (3 shapes x 6 color pairs) is drawn in each cell of the 3x3 grid. It prints:
- zero-shot place accuracy: each render scored against the nine captions that differ only in the
  place; the errors split into the horizontal mirror (left <-> right), the vertical mirror, and
  other cells;
- how close the embeddings of a place and of its horizontal mirror are (mean cosine), for the
  captions and for the renders, next to the mean over other pairs of places. Close mirrors in the
  image embedding leave the decoder only the caption to tell left from right.

usage: .venv/bin/python scripts/diagnose/clip_position.py [--model models/shapes]
"""
import itertools

from PIL import Image, ImageDraw

from common import clip_for_script, draw_shape, image_embeds, text_embeds

PLACES = [["in the top left", "at the top", "in the top right"],
          ["on the left", "in the center", "on the right"],
          ["in the bottom left", "at the bottom", "in the bottom right"]]
COLORS = {"red": (220, 30, 30), "blue": (30, 60, 225), "yellow": (240, 210, 0),
          "green": (0, 90, 0), "white": (240, 240, 240), "black": (0, 0, 0)}
PAIRS = [("red", "blue"), ("yellow", "black"), ("white", "green"), ("blue", "yellow"),
         ("green", "white"), ("black", "red")]
SHAPES = ["circle", "square", "triangle"]


def render(shape, fg, bg, row, col, side=64):
    im = Image.new("RGB", (side, side), COLORS[bg])
    draw_shape(ImageDraw.Draw(im), shape, COLORS[fg], (col + 0.5) / 3 * side, (row + 0.5) / 3 * side, 0.11 * side)
    return im


def main():
    a, clip = clip_for_script(__doc__)
    cells = list(itertools.product(range(3), range(3)))
    hits = h_mirror = v_mirror = other = 0
    text_mirror, text_other, img_mirror, img_other = [], [], [], []
    for shape, (fg, bg) in itertools.product(SHAPES, PAIRS):
        captions = [f"a {fg} {shape} {PLACES[r][c]} on a {bg} background" for r, c in cells]
        t = text_embeds(clip, captions)
        i = image_embeds(clip, [render(shape, fg, bg, r, c) for r, c in cells])
        guess = (i @ t.T).argmax(1)
        for k, (r, c) in enumerate(cells):
            gr, gc = divmod(int(guess[k]), 3)
            if (gr, gc) == (r, c):
                hits += 1
            elif (gr, gc) == (r, 2 - c):
                h_mirror += 1
            elif (gr, gc) == (2 - r, c):
                v_mirror += 1
            else:
                other += 1
        for k, (r, c) in enumerate(cells):
            m = cells.index((r, 2 - c))
            if m == k:
                continue
            text_mirror.append(float(t[k] @ t[m]))
            img_mirror.append(float(i[k] @ i[m]))
            for o in range(len(cells)):
                if o not in (k, m):
                    text_other.append(float(t[k] @ t[o]))
                    img_other.append(float(i[k] @ i[o]))
    n = hits + h_mirror + v_mirror + other
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    print(f"CLIP of {a.model}: {n} renders (3 shapes x {len(PAIRS)} color pairs x 9 places)")
    print(f"zero-shot place accuracy {hits / n:.1%}; errors: left<->right mirror {h_mirror}, "
          f"top<->bottom mirror {v_mirror}, other {other}")
    print("mean cosine between a place and its left-right mirror / other places:")
    print(f"  captions {mean(text_mirror):.3f} / {mean(text_other):.3f}")
    print(f"  renders  {mean(img_mirror):.3f} / {mean(img_other):.3f}")


if __name__ == "__main__":
    main()
