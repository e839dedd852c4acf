"""The LLM vocabulary layout: one home for every special token id.

LaVIT (48386 ids): text 0..31999, [IMG] 32000, [/IMG] 32001, visual code k -> 32002 + k (16384 codes).
Video-LaVIT (49412 ids) adds [MOV] 48386, [/MOV] 48387 and motion code k -> 48388 + k (1024 codes).
Text: BOS 1, EOS 2; LaVIT pads text with the EOS id.
"""

from __future__ import annotations

BOS_ID = 1
EOS_ID = 2
PAD_ID = EOS_ID  # the reference pads with eos
TEXT_VOCAB = 32000  # ids below are sentencepiece text tokens
IMG_START = 32000  # [IMG]
IMG_END = 32001  # [/IMG]
VISUAL_OFFSET = 32002  # visual code k -> VISUAL_OFFSET + k
NUM_VISUAL_CODES = 16384
LAVIT_VOCAB = VISUAL_OFFSET + NUM_VISUAL_CODES  # 48386
MOV_START = LAVIT_VOCAB  # [MOV] 48386
MOV_END = LAVIT_VOCAB + 1  # [/MOV] 48387
MOTION_OFFSET = LAVIT_VOCAB + 2  # motion code k -> 48388 + k
NUM_MOTION_CODES = 1024
VIDEO_LAVIT_VOCAB = MOTION_OFFSET + NUM_MOTION_CODES  # 49412
