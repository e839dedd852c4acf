"""``make demo``: tokenize an image with the tiny converted fixture checkpoint and decode its condition.

    python -m lavit_jax.demo --checkpoint out/tiny_converted [--image PATH] [--seed S]

(``make demo`` first converts the tiny parity fixture with ``tools/convert_torch_weights.py``.)

Prints the LLM ids of the image ([IMG] codes [/IMG]) and the shapes/statistics of the low-res and
high-res diffusion conditions decoded back from those ids (image -> ids -> condition).
"""

from __future__ import annotations

import os
import sys

import numpy as np
from absl import app, flags

from lavit_jax import checkpoint

_CHECKPOINT = flags.DEFINE_string("checkpoint", "out/tiny_converted", "Converted checkpoint directory.")
_IMAGE = flags.DEFINE_string("image", None, "Image to tokenize (default: a synthetic test pattern).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed for the gumbel keep mode.")


def test_pattern(size: int = 256) -> np.ndarray:
    """A deterministic colourful image [size, size, 3] uint8."""
    y, x = np.mgrid[0:size, 0:size] / size
    img = np.stack([np.sin(6 * x) * 0.5 + 0.5, np.cos(5 * y) * 0.5 + 0.5, (x * y) ** 0.5], -1)
    img[size // 4: size // 2, size // 4: size // 2] = (1.0, 0.2, 0.1)
    return (img * 255).astype(np.uint8)


def main(argv):
    del argv
    ckpt = os.path.abspath(_CHECKPOINT.value)
    if not os.path.isdir(ckpt):
        sys.exit(f"checkpoint directory not found: {ckpt} (pass --checkpoint)")
    image = _IMAGE.value if _IMAGE.value else test_pattern()
    vt = checkpoint.load_visual_tokenizer(ckpt)
    config = vt.config
    ids, lengths = vt.tokenize(image, add_special=True, seed=_SEED.value)
    n = int(lengths[0])
    row = np.asarray(ids[0, :n])
    print(f"image: {_IMAGE.value or 'synthetic test pattern'}")
    print(f"checkpoint: {ckpt}")
    print(f"kept {n - 2} of {(config.image_size // config.patch_size) ** 2} patches")
    print("ids:", " ".join(str(int(i)) for i in row))
    codes, code_lengths = ids[:, 1:-1], lengths - 2
    for highres in (False, True):
        out = vt.decode_condition(codes, code_lengths, highres=highres)
        if highres:
            prompt, pooled = (np.asarray(o) for o in out)
            print(f"high-res condition: prompt_embeds {prompt.shape} "
                  f"(mean {prompt.mean():+.4f}, std {prompt.std():.4f}), pooled {pooled.shape}")
        else:
            cond = np.asarray(out)
            print(f"low-res condition: {cond.shape} (mean {cond.mean():+.4f}, std {cond.std():.4f})")


if __name__ == "__main__":
    app.run(main)
