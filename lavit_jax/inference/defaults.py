"""Task defaults of the released LaVIT inference code: one home for every generation setting.

Captioning and VQA follow ``lavit_for_understanding.py``; text-to-image and multimodal ("edit")
generation follow ``lavit_for_generation.py``; reconstruction follows ``image_detokenize.py``. The API
(``LaVIT``), the CLI and ``llm_tasks`` all read these.
"""

from __future__ import annotations

import dataclasses


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


@dataclasses.dataclass(frozen=True)
class DecodingDefaults:
    steps: int
    guidance: float


CAPTION = UnderstandingDefaults(num_beams=2, max_new_tokens=36, min_new_tokens=8, length_penalty=1.0)
VQA = UnderstandingDefaults(num_beams=5, max_new_tokens=10, min_new_tokens=2, length_penalty=0.0,
                            prompt="Question: {} Answer:")
TEXT2IMAGE = GenerationDefaults(llm_guidance=4.0)
EDIT = GenerationDefaults(llm_guidance=5.0)
RECONSTRUCT = DecodingDefaults(steps=50, guidance=5.0)

# Keep decisions of the token selector: the release draws a hard Gumbel sample on every call
# ("sample", seeded); "argmax" is the deterministic opt-in.
KEEP = "sample"
