"""Task defaults of the released LaVIT inference code: one home for every generation setting.

Captioning and VQA follow ``lavit_for_understanding.py``; text-to-image and multimodal ("edit")
generation follow ``lavit_for_generation.py``; reconstruction follows ``image_detokenize.py``. The API
(``LaVIT``), the CLI and ``llm_tasks`` all read these.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class UnderstandingDefaults:
    num_beams: int
    max_new_tokens: int
    min_new_tokens: int
    length_penalty: float
    prompt: str | None = None
    # sampling (``do_sample``; the release's ``use_nucleus_sampling``): its top_p / temperature /
    # repetition_penalty defaults, top_k HF's generation-config default (the release passes none)
    top_p: float = 0.9
    top_k: int = 50
    temperature: float = 1.0
    repetition_penalty: float = 1.0


@dataclasses.dataclass(frozen=True)
class GenerationDefaults:
    llm_guidance: float  # LLM classifier-free guidance on log-probs
    top_k: int = 50
    top_p: float = 1.0
    temperature: float = 1.0
    min_new_tokens: int = 20
    max_new_tokens: int = 200
    steps: int = 25  # DDIM steps of the diffusion detokenizer
    guidance: float = 7.0  # diffusion classifier-free guidance
    # The release's generate_image decodes with the VAE in the model precision (bf16 for its bf16 model).
    vae_dtype: str = "model"


@dataclasses.dataclass(frozen=True)
class DecodingDefaults:
    steps: int
    guidance: float
    vae_dtype: str = "float32"  # image_detokenize.py loads the VAE without a dtype: float32


CAPTION = UnderstandingDefaults(num_beams=2, max_new_tokens=36, min_new_tokens=8, length_penalty=1.0)
VQA = UnderstandingDefaults(num_beams=5, max_new_tokens=10, min_new_tokens=2, length_penalty=0.0,
                            prompt="Question: {} Answer:")
TEXT2IMAGE = GenerationDefaults(llm_guidance=4.0)
EDIT = GenerationDefaults(llm_guidance=5.0)
RECONSTRUCT = DecodingDefaults(steps=50, guidance=5.0)
VAE_DTYPES = ("model", "float32", "bfloat16", "float16")  # "model": the LLM/UNet dtype of the loaded checkpoint

# Keep decisions of the token selector: the release draws a hard Gumbel sample on every call
# ("sample", seeded); "argmax" is the deterministic opt-in.
KEEP = "sample"

# ------------------------------------------------------------------------------------------ output sizes

# The release's aspect-ratio table (LaVIT README, text-to-image: ``ratio_dict``): (height, width) at the
# highres SDXL decoder's 1024-px area. "9:16" is not in the release's table: it is its "16:9" transposed, as
# SDXL's standard table has it. Ratios read width:height ("4:3" is landscape).
ASPECT_RATIOS = {
    "1:1": (1024, 1024),
    "4:3": (896, 1152),
    "3:4": (1152, 896),
    "3:2": (832, 1216),
    "2:3": (1216, 832),
    "16:9": (768, 1344),
    "9:16": (1344, 768),
}
RATIO_BASE = 1024  # the side of the square the table is given at (the highres decoder's native size)

# Argument names in messages: the API's keywords (the CLI passes its flags).
API_NAMES = {"size": "size", "width": "width", "height": "height", "ratio": "ratio",
             "original_size": "original_size", "crops_coords_top_left": "crops_coords_top_left",
             "target_size": "target_size"}


def ratio_size(ratio: str, native: int, factor: int, name: str = "ratio") -> tuple[int, int]:
    """(height, width) of ``ratio`` for a decoder of native side ``native`` px whose sides are multiples of
    ``factor`` (VAE x UNet downsampling).

    At native 1024 (the highres SDXL decoder) this is ``ASPECT_RATIOS`` itself. Other decoders (the lowres
    SD-1.5 one: 512 px) scale the table by ``native / 1024`` and round each side down or up to a multiple of
    ``factor``, picking the pair nearest the table's aspect ratio (ties: the area nearest ``native ** 2``).
    At 512 px and factor 64 that gives 1:1 512x512, 4:3 448x576, 3:2 448x640, 16:9 384x704 (height x width;
    the portrait ratios transposed).
    """
    if ratio not in ASPECT_RATIOS:
        raise ValueError(f"{name} {ratio!r} is not one of {', '.join(ASPECT_RATIOS)}")
    th, tw = ASPECT_RATIOS[ratio]
    scale = native / RATIO_BASE
    if th * scale % factor == 0 and tw * scale % factor == 0:
        return int(th * scale), int(tw * scale)

    def sides(v):
        lo = max(factor, int(v * scale // factor) * factor)
        return sorted({lo, lo + factor})

    target = tw / th
    pairs = [(h, w) for h in sides(th) for w in sides(tw)]
    return min(pairs, key=lambda p: (round(abs(p[1] / p[0] - target), 9), abs(p[0] * p[1] - native ** 2)))


def _check_multiple(value: int, name: str, factor: int, decoder: str) -> None:
    if value % factor:
        lo = max(factor, value // factor * factor)
        raise ValueError(f"{name} {value}: must be a multiple of {factor} for the {decoder} decoder "
                         f"(its VAE and UNet downsampling), e.g. {lo} or {lo + factor}")


def _positive(value, name):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} {value!r}: must be a positive number of pixels")


def image_size(*, native: int, factor: int, decoder: str, size=None, width: int | None = None,
               height: int | None = None, ratio: str | None = None, names: dict = API_NAMES) -> tuple[int, int]:
    """The output (height, width) from the size arguments, checked.

    ``size``: one side for both (int) or (height, width); ``width`` / ``height``: one side each (the other side
    from ``size``, else the decoder's native size); ``ratio``: a key of ``ASPECT_RATIOS`` (see ``ratio_size``),
    alone. Unset: the decoder's native square. Sides must be multiples of ``factor``.
    """
    if ratio is not None:
        given = [names[k] for k, v in (("size", size), ("width", width), ("height", height)) if v is not None]
        if given:
            raise ValueError(f"{names['ratio']} {ratio} sets both sides; drop {' and '.join(given)} "
                             "(or drop the ratio)")
        return ratio_size(ratio, native, factor, names["ratio"])
    if size is None:
        base = (native, native)
    elif isinstance(size, int | np.integer) and not isinstance(size, bool):
        size = int(size)
        _positive(size, names["size"])
        base = (size, size)
    else:
        base = tuple(int(s) for s in size)
        if len(base) != 2:
            raise ValueError(f"{names['size']} {size!r}: an int or (height, width)")
        for s in base:
            _positive(s, names["size"])
    out = list(base)
    for i, (key, value) in enumerate((("height", height), ("width", width))):
        if value is None:
            continue
        _positive(value, names[key])
        if size is not None and value != base[i]:
            raise ValueError(f"{names['size']} {size} and {names[key]} {value} disagree; give one of them")
        out[i] = value
    for key, value, explicit in (("height", out[0], height), ("width", out[1], width)):
        _check_multiple(value, names[key] if explicit is not None or size is None else names["size"], factor,
                        decoder)
    return out[0], out[1]


def micro_conditioning(decoder: str, original_size=None, crops_coords_top_left=None, target_size=None,
                       names: dict = API_NAMES) -> dict:
    """Checked SDXL micro-conditioning arguments (highres decoder only) -> keyword arguments (unset: None)."""
    given = dict(original_size=original_size, crops_coords_top_left=crops_coords_top_left, target_size=target_size)
    out = {}
    for key, value in given.items():
        if value is None:
            continue
        if decoder != "highres":
            raise ValueError(f"{names[key]} applies only to the highres (SDXL) decoder: the {decoder} decoder "
                             "has no micro-conditioning")
        try:
            pair = tuple(int(v) for v in value)
        except (TypeError, ValueError):
            pair = ()
        if len(pair) != 2 or any(isinstance(v, bool) for v in value):
            raise ValueError(f"{names[key]} {value!r}: expected two integers "
                             f"({'top, left' if key == 'crops_coords_top_left' else 'height, width'})")
        if key == "crops_coords_top_left" and min(pair) < 0:
            raise ValueError(f"{names[key]} {value!r}: must be >= 0")
        if key != "crops_coords_top_left" and min(pair) < 1:
            raise ValueError(f"{names[key]} {value!r}: must be positive")
        out[key] = pair
    return out
