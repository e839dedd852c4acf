"""The procedural image-text dataset of ``make demo``: coloured shapes with captions and VQA pairs.

Scene ``seed`` (any int) -> one to three shapes of one kind, colour and size on a white background at
random, non-overlapping positions, e.g. caption ``"two small red circles"``. Everything is a
deterministic function of the seed (``numpy.random.default_rng(seed)``). Train and held-out scenes
come from disjoint seed ranges: ``TRAIN_SEEDS`` and ``HELDOUT_SEEDS``.

``train.data_dir`` ``shapes:N`` (``input_pipeline.ShapesSource``) is the Grain source of N training
examples: example i shows scene ``TRAIN_SEEDS[0] + i // TEXTS_PER_SCENE`` with text ``example_text(attrs,
i % TEXTS_PER_SCENE)``, the caption after ``CAPTION_PROMPT`` (variant 0: ``"A photo of two small red circles"``)
or one ``"Question: Q Answer: A"`` pair (``defaults.VQA.prompt`` followed by the answer). The caption prompt tells
captioning apart from VQA: the demo captions with ``LaVIT.caption(prompt=CAPTION_PROMPT)``.
A text->image example of stage 2 reads the scene's caption text (variant 0) whatever its variant.
``shapes:N@heldout`` reads the held-out scenes.

``analyse(image)`` is the deterministic analyser of an image [H, W, 3] uint8 (the demo's text-to-image
metric): colour = nearest palette entry of the mean foreground colour, count = connected components
(``scipy.ndimage.label``) above a minimum area, shape = the components' fill ratio of their bounding
box (square ~1, circle ~0.79, triangle ~0.5), size = the mean component's side relative to the image.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (230, 200, 30)}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 0.12, "large": 0.2}  # half-side of the shape's box, in image widths
COUNTS = ("one", "two", "three")
ATTRIBUTES = ("count", "size", "colour", "shape")
VALUES = {"count": COUNTS, "size": tuple(SIZES), "colour": tuple(COLOURS), "shape": SHAPES}  # per attribute
QUESTIONS = {"colour": "what color are the shapes?", "shape": "what shape are they?",
             "count": "how many shapes are there?", "size": "what size are the shapes?"}
VQA_PROMPT = "Question: {} Answer:"  # = inference.defaults.VQA.prompt (the data package does not import inference)
CAPTION_PROMPT = "A photo of"
TEXTS_PER_SCENE = 1 + len(QUESTIONS)
BACKGROUND = 255
IMAGE_SIZE = 64
TRAIN_SEEDS = (0, 1_000_000)  # [start, stop)
HELDOUT_SEEDS = (1_000_000, 2_000_000)


def heldout_seed(i: int) -> int:
    return HELDOUT_SEEDS[0] + i


def attributes(seed: int) -> dict:
    """{'count', 'size', 'colour', 'shape'} words of scene ``seed``, plus 'centres' [(cx, cy)] in [0, 1]."""
    rng = np.random.default_rng(seed)
    attrs = {"count": COUNTS[int(rng.integers(3))], "size": list(SIZES)[int(rng.integers(2))],
             "colour": list(COLOURS)[int(rng.integers(len(COLOURS)))], "shape": SHAPES[int(rng.integers(3))]}
    r, n = SIZES[attrs["size"]], COUNTS.index(attrs["count"]) + 1
    cells = rng.permutation(4)[:n]  # distinct quadrants: shapes never overlap
    lo, hi = r + 0.03, 0.5 - r - 0.03
    centres = [((k % 2) * 0.5 + rng.uniform(lo, hi), (k // 2) * 0.5 + rng.uniform(lo, hi)) for k in cells]
    attrs["centres"] = [(float(cx), float(cy)) for cx, cy in centres]
    return attrs


def attribute_labels(attrs: dict) -> list[int]:
    """Class index of each attribute (``ATTRIBUTES`` order) in ``VALUES``."""
    return [VALUES[a].index(attrs[a]) for a in ATTRIBUTES]


def caption(attrs: dict) -> str:
    plural = "s" if attrs["count"] != "one" else ""
    return f"{attrs['count']} {attrs['size']} {attrs['colour']} {attrs['shape']}{plural}"


def vqa_pairs(attrs: dict) -> list[tuple[str, str]]:
    """[(question, answer)] for every attribute, in ``QUESTIONS`` order."""
    return [(q, attrs[a]) for a, q in QUESTIONS.items()]


def render(attrs: dict, size: int = IMAGE_SIZE) -> np.ndarray:
    """The scene's image [size, size, 3] uint8 (exact masks, no anti-aliasing)."""
    y, x = (np.mgrid[0:size, 0:size] + 0.5) / size
    img = np.full((size, size, 3), BACKGROUND, np.uint8)
    r = SIZES[attrs["size"]]
    for cx, cy in attrs["centres"]:
        dx, dy = x - cx, y - cy
        if attrs["shape"] == "circle":
            mask = dx * dx + dy * dy <= r * r
        elif attrs["shape"] == "square":
            mask = (abs(dx) <= r) & (abs(dy) <= r)
        else:  # apex up, base at the box's bottom
            mask = (dy <= r) & (dy >= -r) & (abs(dx) <= (dy + r) / 2)
        img[mask] = COLOURS[attrs["colour"]]
    return img


def scene(seed: int, size: int = IMAGE_SIZE) -> tuple[np.ndarray, dict]:
    attrs = attributes(seed)
    return render(attrs, size), attrs


def example_text(attrs: dict, variant: int) -> str:
    """Variant 0: the caption after ``CAPTION_PROMPT``; variant k >= 1: the k-th VQA pair as the model reads it."""
    if variant == 0:
        return f"{CAPTION_PROMPT} {caption(attrs)}"
    q, a = vqa_pairs(attrs)[variant - 1]
    return f"{VQA_PROMPT.format(q)} {a}"


def all_texts() -> list[str]:
    """Every text the dataset can produce (the closed vocabulary's corpus, for the demo's text tokenizer)."""
    out = []
    for n in COUNTS:
        for s in SIZES:
            for c in COLOURS:
                for sh in SHAPES:
                    attrs = {"count": n, "size": s, "colour": c, "shape": sh}
                    out += [example_text(attrs, v) for v in range(TEXTS_PER_SCENE)]
    return out


# ------------------------------------------------------------------------------------------ analyser


def parse_caption(text: str) -> dict:
    """The attribute words found in a caption (missing ones are None): {'count', 'size', 'colour', 'shape'}."""
    words = text.lower().replace(".", " ").split()
    out = {a: None for a in ATTRIBUTES}
    for w in words:
        if w in COUNTS and out["count"] is None:
            out["count"] = w
        elif w in SIZES and out["size"] is None:
            out["size"] = w
        elif w in COLOURS and out["colour"] is None:
            out["colour"] = w
        elif w.rstrip("s") in SHAPES and out["shape"] is None:
            out["shape"] = w.rstrip("s")
    return out


def foreground(image) -> np.ndarray:
    """[H, W] bool: pixels of an image [H, W, 3] uint8 more than 60 levels from the background in a channel."""
    return np.abs(np.asarray(image, np.float32) - BACKGROUND).max(-1) > 60


def analyse(image) -> dict:
    """Attributes of an image [H, W, 3] uint8 (see the module docstring); None where nothing is found."""
    img = np.asarray(image)
    if img.dtype != np.uint8:
        img = (np.clip(img, 0, 1) * 255).astype(np.uint8) if img.max() <= 1.0 else np.clip(img, 0, 255).astype(
            np.uint8)
    h, w = img.shape[:2]
    f = img.astype(np.float32)
    fg = foreground(img)
    out = {a: None for a in ATTRIBUTES}
    labels, n = ndimage.label(fg)
    if n == 0:
        return out
    areas = ndimage.sum(fg, labels, index=np.arange(1, n + 1))
    min_area = max(4.0, 0.1 * (SIZES["small"] * 2 * w) ** 2)
    keep = [k + 1 for k in range(n) if areas[k] >= min_area]
    if not keep:
        return out
    palette = np.asarray(list(COLOURS.values()), np.float32)
    mean = f[np.isin(labels, keep)].mean(0)
    out["colour"] = list(COLOURS)[int(np.argmin(((palette - mean) ** 2).sum(-1)))]
    if len(keep) <= len(COUNTS):
        out["count"] = COUNTS[len(keep) - 1]
    boxes = ndimage.find_objects(labels)
    fills, tapers, sides = [], [], []
    for k in keep:
        sl = boxes[k - 1]
        m = labels[sl] == k
        bh, bw = m.shape
        fills.append(m.mean())
        q = max(bh // 4, 1)
        tapers.append(m[:q].sum() / max(m[-q:].sum(), 1))  # top quarter's area over the bottom quarter's
        sides.append((bh + bw) / 2 / w)
    fill, taper = float(np.median(fills)), float(np.median(tapers))
    out["shape"] = "square" if fill > 0.88 else "triangle" if taper < 0.6 else "circle"
    side = float(np.mean(sides))
    out["size"] = "small" if side < SIZES["small"] + SIZES["large"] else "large"  # boxes: 2r, threshold midway
    return out


def attribute_matches(pred: dict, truth: dict) -> list[bool]:
    """Per attribute (``ATTRIBUTES`` order): the prediction equals the truth."""
    return [pred.get(a) == truth[a] for a in ATTRIBUTES]
