"""Checkpoints by Hugging Face Hub repo id: the released PyTorch layout, downloaded and converted once.

    LaVIT.from_pretrained("rain1011/LaVIT-7B-v2")                       # download (or HF's cache), convert, load
    LaVIT.from_pretrained("rain1011/LaVIT-7B-v2", revision="COMMIT", conversion_dtype="float32")
    python -m lavit_jax caption cat.jpg --checkpoint rain1011/LaVIT-7B-v2 [--revision REV]

``resolve(name)`` returns a converted checkpoint directory: ``name`` itself when it is a directory
(converted by ``tools/convert_torch_weights.py``), else, for a repo id ``owner/name``:

1. ``huggingface_hub.snapshot_download`` fetches the release's parts (``visual_tokenizer/``,
   ``language_model/``, ``pixel_decoding/``, ``highres_pixel_decoding/``) into Hugging Face's own
   cache, so ``HF_HOME`` / ``HF_HUB_CACHE``, ``HF_HUB_OFFLINE=1`` (use the cache only), ``HF_TOKEN``
   and ``revision`` (branch, tag or commit) behave as in every Hugging Face library;
2. the snapshot is converted once into ``cache_home()/converted/OWNER--NAME/COMMIT/DTYPE``
   (``$LAVIT_CACHE``, else ``$XDG_CACHE_HOME/lavit-jax``, else ``~/.cache/lavit-jax``), keyed by
   repo, resolved commit and stored dtype, written atomically by the converter; later calls with the
   same key load it without converting. The cache is safe to delete.

Converting reads PyTorch files, so the first load of a repo needs torch (``requirements-test.txt``);
loading an already converted repo does not import it. The visual tokenizer's head counts are not in
the weights: they come from ``config`` (a config file or ``get_config()`` result; default the
release's ``configs/lavit_7b.py`` of this source tree; ``configs/video_lavit.py`` for
``VideoLaVIT.from_pretrained`` and the video commands, whose release also has ``language_model_sft/``,
``image_detokenizer/``, ``video_detokenizer/``, ``motion_tokenizer.bin`` and ``video_3d_unet.bin``).
"""

from __future__ import annotations

import importlib.util
import os
import re

from lavit_jax import checkpoint
from lavit_jax.fsutil import cache_home

# The folders of the released layout that the converter reads (``convert/converter.py`` PARTS).
RELEASE_PATTERNS = ("visual_tokenizer/*", "language_model/*", "pixel_decoding/*", "highres_pixel_decoding/*",
                    # Video-LaVIT's (``convert/video_release.py``)
                    "language_model_sft/*", "image_detokenizer/*", "video_detokenizer/*", "motion_tokenizer.bin",
                    "video_3d_unet.bin")
CONVERSION_DTYPES = ("bfloat16", "float32")
DEFAULT_CONVERSION_DTYPE = "bfloat16"  # the release's precision
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+$")
_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
_RELEASE_CONFIG = os.path.join(_CONFIGS, "lavit_7b.py")
VIDEO_RELEASE_CONFIG = os.path.join(_CONFIGS, "video_lavit.py")  # VideoLaVIT.from_pretrained's default


def is_repo_id(name) -> bool:
    """``owner/name`` that is not an existing path."""
    return isinstance(name, str) and bool(_REPO_ID.match(name)) and not os.path.exists(name)


def converted_dir(repo_id: str, commit: str, dtype: str) -> str:
    """Where ``repo_id`` at ``commit`` converted to ``dtype`` is cached."""
    return os.path.join(cache_home(), "converted", repo_id.replace("/", "--"), commit, dtype)


def _tokenizer_config(config):
    if config is None:
        config = _RELEASE_CONFIG
        if not os.path.isfile(config):
            raise FileNotFoundError("converting a hub checkpoint needs the release config (configs/lavit_7b.py, not "
                                    "found next to this package): pass config=PATH to a config file")
    if isinstance(config, str | os.PathLike):
        from lavit_jax.convert.converter import load_config_file

        full = load_config_file(os.fspath(config))
        return full.tokenizer, os.fspath(config), full
    if "tokenizer" in config:
        return config.tokenizer, "the given config", config
    return config, "the given config", None


def download(repo_id: str, revision: str | None = None) -> str:
    """The release's parts of ``repo_id`` at ``revision`` in Hugging Face's cache -> the snapshot directory."""
    try:
        import huggingface_hub
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError as e:  # pragma: no cover - a dependency of transformers
        raise ImportError("loading a checkpoint by repo id needs huggingface_hub "
                          "(pip install -r requirements.txt)") from e
    where = f"{repo_id}" + (f" at revision {revision}" if revision else "") + " (no local directory of that name)"
    try:
        return huggingface_hub.snapshot_download(repo_id, revision=revision, allow_patterns=list(RELEASE_PATTERNS))
    except LocalEntryNotFoundError as e:
        raise FileNotFoundError(f"hub checkpoint {where} is not in the Hugging Face cache "
                                f"({huggingface_hub.constants.HF_HUB_CACHE}) and cannot be downloaded "
                                f"(offline: HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '')!r})") from e
    except HfHubHTTPError as e:
        raise FileNotFoundError(f"hub checkpoint {where}: {str(e).splitlines()[0]}") from e


def resolve(name, *, revision: str | None = None, conversion_dtype: str = DEFAULT_CONVERSION_DTYPE, config=None,
            log=print) -> str:
    """A converted checkpoint directory for ``name`` (a directory, or a hub repo id: see the module)."""
    name = os.fspath(name)
    if os.path.isdir(name):
        if revision is not None:
            raise ValueError(f"revision={revision!r} applies to a hub repo id, not to the directory {name}")
        return name
    if not is_repo_id(name):
        raise FileNotFoundError(f"checkpoint directory not found: {name} (nor a Hugging Face repo id owner/name)")
    if conversion_dtype not in CONVERSION_DTYPES:
        raise ValueError(f"conversion_dtype={conversion_dtype!r}: expected one of {', '.join(CONVERSION_DTYPES)}")
    snapshot = download(name, revision)
    commit = os.path.basename(os.path.normpath(snapshot))
    out = converted_dir(name, commit, conversion_dtype)
    if os.path.isfile(os.path.join(out, checkpoint.MANIFEST)):  # the converter renames complete outputs into place
        return out
    tokenizer_config, config_name, full_config = _tokenizer_config(config)
    if importlib.util.find_spec("torch") is None:
        raise ImportError(f"converting {name} needs torch (pip install -r requirements-test.txt); or convert it "
                          "elsewhere with tools/convert_torch_weights.py and pass the directory")
    from lavit_jax.convert import converter

    log(f"converting {name}@{commit[:12]} ({conversion_dtype}) into {out}")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    try:
        converter.convert(snapshot, out, tokenizer_config, dtype=conversion_dtype, log=log, config_name=config_name,
                          video_config=full_config)
    except FileExistsError:
        if not os.path.isfile(os.path.join(out, checkpoint.MANIFEST)):  # not another process's finished copy
            raise
    return out
