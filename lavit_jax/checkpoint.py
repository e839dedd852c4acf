"""Converted checkpoints: Orbax param trees plus config files, written atomically.

Layout of a converted directory (``tools/convert_torch_weights.py`` writes it, ``LaVIT.from_pretrained``
and the loaders here read it)::

    OUT/lavit.json                       parts present, dtype, tokenizer config
    OUT/visual_tokenizer/{tokenizer,lowres_decoder,highres_decoder}/   Orbax trees
    OUT/language_model/{params/, config.json, tokenizer.model}
    OUT/pixel_decoding/{unet/, vae/, *config.json, scheduler_config.json, uncond_embeddings.npy}
    OUT/highres_pixel_decoding/{unet/, vae/, *config.json, scheduler_config.json}

A directory is complete only when ``lavit.json`` exists: it is written last, into a temporary
sibling directory that is renamed into place, so a failed run never leaves an output that looks
complete, and an existing output is replaced only after the new one is whole.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile

MANIFEST = "lavit.json"


def save_tree(path: str, tree) -> None:
    """Saves a pytree of arrays with Orbax (synchronously)."""
    import orbax.checkpoint as ocp

    ckptr = ocp.StandardCheckpointer()
    ckptr.save(os.path.abspath(path), tree)
    ckptr.wait_until_finished()


def load_tree(path: str):
    """Restores a pytree saved by ``save_tree`` (numpy arrays on the host)."""
    import orbax.checkpoint as ocp

    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"converted checkpoint part not found: {path}")
    return ocp.StandardCheckpointer().restore(path)


def read_manifest(ckpt_dir: str) -> dict:
    path = os.path.join(ckpt_dir, MANIFEST)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{ckpt_dir} is not a converted lavit-jax checkpoint (no {MANIFEST}); "
            "convert the released weights with tools/convert_torch_weights.py")
    with open(path) as f:
        return json.load(f)


@contextlib.contextmanager
def atomic_output_dir(out_dir: str, overwrite: bool = False):
    """Yields a temporary directory that becomes ``out_dir`` only if the block succeeds."""
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not overwrite:
        raise FileExistsError(f"output directory exists: {out_dir} (pass --overwrite to replace it)")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.partial-", dir=parent)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if os.path.exists(out_dir):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=parent)
        os.rename(out_dir, os.path.join(old, "x"))
    os.rename(tmp, out_dir)
    if old:
        shutil.rmtree(old, ignore_errors=True)
