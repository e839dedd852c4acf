"""A tiny Video-LaVIT with the shapes of the parity fixtures (``shared/fixtures/video/tiny`` for the motion
tokenizer, motion condition encoder and video detokenizer; ``configs/tiny.py``'s keyframe tokenizer), for the
tests' tiny release (``tests/video_release_fixture.py``) and the documented commands: the converter's
``--config configs/video_tiny.py`` for such a release.
"""

from configs import tiny, video_lavit


def get_config():
    config = video_lavit.get_config()
    config.name = "video_tiny"
    config.tokenizer = tiny.get_config().tokenizer
    mt = config.motion_tokenizer
    mt.width, mt.heads, mt.blocks_per_stage, mt.n_code, mt.code_dim = 48, 4, 1, 64, 8
    me = config.detokenizer.motion_encoder
    me.width, me.heads, me.depth, me.out_dim = 32, 4, 2, 48
    return config
