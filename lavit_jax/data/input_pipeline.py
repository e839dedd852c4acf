"""Grain input pipelines for training: images (stage 1, detokenizer) and image/text examples (stage 2).

Data sources: ``train.data_dir``, one spec string for every stage::

    synthetic:N                  N deterministic random-blob images (stage 2: with learnable id patterns)
    shapes:N[@heldout]           N examples of the procedural coloured-shapes dataset (``data/shapes.py``:
                                 images with a caption or a VQA pair each; ``@heldout``: the held-out seeds)
    /data/images                 an image folder, searched recursively (image stages only)
    /data/pairs.jsonl            JSONL, {"image": PATH, "text": STR} per line (image optional, paths relative
                                 to the file); also jsonl:PATH. In stage 2 any other plain path is read as JSONL
    tar:PATTERN                  webdataset tar shards (uncompressed): members grouped by key (the member path
                                 up to the first dot of its file name), KEY.jpg|jpeg|png|webp|... the image and
                                 an optional KEY.txt (UTF-8) or KEY.json ({"text" or "caption": STR}) caption
    arrayrecord:PATTERN          ArrayRecord files of msgpack records {"image": encoded JPEG/PNG bytes or nil,
                                 "text": STR or nil} (``write_array_record`` writes them)
    tfds:NAME[/CONFIG][:SPLIT][@DATA_DIR]
                                 a TFDS dataset prepared in ArrayRecord format (``tfds build NAME
                                 --file_format=array_record``), read with ``tfds.data_source`` (split default
                                 ``train``, e.g. ``train[:10%]``; DATA_DIR default $TFDS_DATA_DIR or
                                 ~/tensorflow_datasets); features ``image`` and ``text`` / ``caption`` /
                                 ``captions/text``. Needs ``pip install tensorflow-datasets`` (imported only here)

PATTERN is a file, a folder (its ``*.tar`` / ``*.array_record`` files, recursively, in path order), a glob
(``/data/shards-*.tar``) or brace ranges and lists (``/data/shards-{000..009}.tar``, ``{train,extra}``); a
plain path ending in ``.tar`` or ``.array_record`` needs no prefix. Tar shards are indexed once at startup
(member offsets, with the stdlib ``tarfile``) and read by offset, so every source is random access.

``image_batches(spec, image_size, batch_size, seed)``: a repeating, shuffled Grain dataset of
[batch_size, S, S, 3] float32 CLIP-normalised batches of the source's images (examples without one
are left out). ``diffusion_batches`` adds the same images at the VAE's resolution in [-1, 1] (the
detokenizer stage).

``lm_examples(spec, image_size, seed, examples, ...)``: a repeating, shuffled Grain dataset whose
elements are lists of ``examples`` stage-2 examples, each a dict ``kind`` (0 image->text, 1
text->image, 2 text only), ``text`` (int32 text ids), ``pixels`` [S, S, 3] float32 (zeros for
text-only examples and kinds not in ``pixels_for``) and ``index`` (the position in the global
stream, for per-example random draws). Examples without text are left out; examples without an
image are text only. A text->image example reads the source's ``generation_text(i)`` where it has one
(``shapes:N``: the scene's caption, not the example's VQA pair, as a generation corpus holds captions).
Text ids come from ``text_tokenizer`` (``synthetic:N`` has its own). With
``visual_ids`` (precomputed records, ``data/visual_records.py``, record k for source record k) each
example also has ``visual_ids`` (int32 LLM ids; empty for text-only examples).

Every iterator has ``get_state()/set_state()`` (saved with the training checkpoint), shuffling is
deterministic (``seed``), each process reads its own shard (``process_index`` of ``process_count``,
default ``jax.process_index()`` / ``jax.process_count()``) of a global stream that does not depend on
the process count, and ``workers > 0`` decodes in that many Grain worker processes with prefetch (the
sources are picklable: tar indexes and file names, files opened per read). A corrupt or unreadable
image, record, tar member or shard is logged once with its source (file and member / record index),
counted (``skipped_images()``: distinct examples, including those found by worker processes) and
skipped; it never stops the run. In a batch block it is replaced by the next readable example of the
block; a block with none borrows the following readable examples of the stream (only a source with no
readable example in a whole epoch is an error).
"""

from __future__ import annotations

import atexit
import concurrent.futures
import glob
import io
import json
import logging
import multiprocessing
import os
import posixpath
import re
import shutil
import tarfile
import tempfile

import grain
import jax
import msgpack
import numpy as np
from absl import flags
from PIL import Image, UnidentifiedImageError

from lavit_jax.data import array_records, shapes, visual_records
from lavit_jax.data.image_io import ImageInputError, load_image, preprocess

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
KIND_IMAGE_TO_TEXT, KIND_TEXT_TO_IMAGE, KIND_TEXT = 0, 1, 2
TFDS_PIP = "pip install tensorflow-datasets"
log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------ skipped examples

_SEEN: set[str] = set()  # sources of the examples skipped in this process
_SKIPS_ENV = "LAVIT_DATA_SKIPS"  # "PID:DIR": worker processes of PID append their skipped sources to DIR/WORKER


def skipped_images() -> int:
    """Distinct examples skipped as unusable so far (corrupt image, record, tar member or shard; missing image
    or text), in this process and the Grain worker processes it started."""
    seen = set(_SEEN)
    env = os.environ.get(_SKIPS_ENV, "")
    pid, _, folder = env.partition(":")
    if pid == str(os.getpid()) and os.path.isdir(folder):
        for name in os.listdir(folder):
            try:
                with open(os.path.join(folder, name), encoding="utf-8", errors="replace") as f:
                    text = f.read()
            except OSError:
                continue
            seen.update(line for line in text.split("\n")[:-1] if line)  # a partly written last line waits
    return len(seen)


def _skip(where: str, reason) -> None:
    """Logs (once per source and process) and counts an unusable example."""
    if where in _SEEN:
        return
    _SEEN.add(where)
    log.warning("config train.data_dir: skipping %s: %s", where, reason)
    pid, _, folder = os.environ.get(_SKIPS_ENV, "").partition(":")
    parent = multiprocessing.parent_process()
    if parent is not None and str(parent.pid) == pid and os.path.isdir(folder):  # a worker: tell the main process
        try:
            fd = os.open(os.path.join(folder, str(os.getpid())), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            try:
                os.write(fd, (where.replace("\n", " ") + "\n").encode("utf-8", "replace"))
            finally:
                os.close(fd)
        except OSError:
            pass


def _share_skips_with_workers() -> None:
    pid, _, folder = os.environ.get(_SKIPS_ENV, "").partition(":")
    if pid == str(os.getpid()) and os.path.isdir(folder):
        return
    folder = tempfile.mkdtemp(prefix="lavit-data-skips-")
    atexit.register(shutil.rmtree, folder, True)
    os.environ[_SKIPS_ENV] = f"{os.getpid()}:{folder}"  # spawned workers inherit it


# ------------------------------------------------------------------------------------------ decoding


def list_images(data_dir: str) -> list[str]:
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"config train.data_dir: image folder not found: {data_dir}")
    files = sorted(
        os.path.join(root, f) for root, _, names in os.walk(data_dir) for f in names
        if f.lower().endswith(IMAGE_EXTENSIONS)
    )
    if not files:
        raise FileNotFoundError(f"config train.data_dir: no images ({', '.join(IMAGE_EXTENSIONS)}) in {data_dir}")
    return files


def synthetic_image(index: int, size: int = 64) -> np.ndarray:
    """A deterministic random-blob image [size, size, 3] uint8 for smoke runs."""
    rng = np.random.default_rng(index)
    y, x = np.mgrid[0:size, 0:size] / size
    img = np.zeros((size, size, 3), np.float32)
    for _ in range(4):
        cx, cy, r = rng.random(3) * [1, 1, 0.4] + [0, 0, 0.1]
        img += rng.random(3) * (((x - cx) ** 2 + (y - cy) ** 2) < r * r)[..., None]
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def decode_image(raw) -> Image.Image:
    """An RGB PIL image of a source's raw image: synthetic index, path, encoded bytes or array."""
    if isinstance(raw, int | np.integer):
        return load_image(synthetic_image(int(raw)))
    if isinstance(raw, bytes | bytearray | memoryview):
        if len(raw) == 0:
            raise ImageInputError("empty image (0 bytes)")
        try:
            with Image.open(io.BytesIO(raw)) as im:
                im.load()
                img = im.copy()
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            msg = str(e).split(" <_io.")[0]  # PIL names the BytesIO object
            raise ImageInputError(f"not a readable image ({type(e).__name__}: {msg})") from e
        return load_image(img)
    return load_image(raw)


def _text_of(value) -> str | None:
    """A caption string of a text feature (str, bytes, a sequence of them, or a dict with 'text')."""
    if isinstance(value, dict):
        value = value.get("text")
    if isinstance(value, np.ndarray | list | tuple) and not isinstance(value, str | bytes):
        value = value[0] if len(value) else None
    if isinstance(value, bytes | np.bytes_):
        value = bytes(value).decode("utf-8")
    return value if isinstance(value, str) else None


# ------------------------------------------------------------------------------------------ sources


class Source:
    """Random access to a data source's raw examples.

    ``read(i, text)`` returns (image, text): the image raw (anything ``decode_image`` takes) or None, the text
    a string, int ids (synthetic) or None (not read unless ``text``); it may raise for a corrupt example.
    ``where(i)`` names example i in logs. ``has_image`` / ``has_text``: boolean masks when known without
    reading, else None. Sources hold no open files (they are pickled into Grain worker processes).
    """

    spec = ""  # the train.data_dir string (set by open_source)
    has_image: np.ndarray | None = None
    has_text: np.ndarray | None = None

    def __len__(self) -> int:
        raise NotImplementedError

    def read(self, i: int, text: bool = True):
        raise NotImplementedError

    def where(self, i: int) -> str:
        raise NotImplementedError

    def generation_text(self, i: int) -> str | None:
        """The text of example i as a text->image prompt, where it differs from ``read``'s (else None)."""
        return None


class SyntheticSource(Source):
    def __init__(self, n: int):
        self.n = n
        self.has_image = self.has_text = np.ones(n, bool)

    def __len__(self):
        return self.n

    def read(self, i, text=True):
        return i, synthetic_text(i) if text else None

    def where(self, i):
        return f"synthetic:{self.n} example {i}"


class ShapesSource(Source):
    """``shapes:N[@heldout]``: example i is scene ``i // shapes.TEXTS_PER_SCENE`` of the split with text variant
    ``i % shapes.TEXTS_PER_SCENE`` (``data/shapes.py``); images [64, 64, 3] uint8."""

    def __init__(self, n: int, heldout: bool = False):
        self.n, self.heldout = n, heldout
        lo, hi = shapes.HELDOUT_SEEDS if heldout else shapes.TRAIN_SEEDS
        if lo + n // shapes.TEXTS_PER_SCENE >= hi:
            raise ValueError(f"config train.data_dir=shapes:{n}: more scenes than the seed range [{lo}, {hi}) holds")
        self.first = lo
        self.has_image = self.has_text = np.ones(n, bool)

    def __len__(self):
        return self.n

    def read(self, i, text=True):
        image, attrs = shapes.scene(self.first + i // shapes.TEXTS_PER_SCENE)
        return image, shapes.example_text(attrs, i % shapes.TEXTS_PER_SCENE) if text else None

    def where(self, i):
        return f"shapes:{self.n}{'@heldout' if self.heldout else ''} example {i}"

    def generation_text(self, i):
        return shapes.example_text(shapes.attributes(self.first + i // shapes.TEXTS_PER_SCENE), 0)


class FolderSource(Source):
    def __init__(self, folder: str):
        self.files = list_images(folder)
        self.has_image, self.has_text = np.ones(len(self.files), bool), np.zeros(len(self.files), bool)

    def __len__(self):
        return len(self.files)

    def read(self, i, text=True):
        return self.files[i], None

    def where(self, i):
        return self.files[i]


class JsonlSource(Source):
    def __init__(self, path: str):
        self.path, self.records = path, read_jsonl(path)
        self.has_image = np.array([r["image"] is not None for r in self.records], bool)
        self.has_text = np.ones(len(self.records), bool)

    def __len__(self):
        return len(self.records)

    def read(self, i, text=True):
        rec = self.records[i]
        return rec["image"], rec["text"] if text else None

    def where(self, i):
        rec = self.records[i]
        return rec["image"] or f"{self.path} record {i}"


class TarSource(Source):
    """Webdataset tar shards, indexed once (member offsets and sizes as numpy arrays) and read by offset."""

    TEXT_EXT = ("txt", "json")

    def __init__(self, spec: str, paths: list[str]):
        self.spec, self.paths = spec, paths
        names = ("shard", "member", "img_off", "img_size", "txt_off", "txt_size", "txt_fmt")
        with concurrent.futures.ThreadPoolExecutor(min(16, len(paths))) as pool:  # header reads: I/O bound
            shards = list(pool.map(self._index, range(len(paths)), paths))
        cols = {k: [v for c in shards for v in c[k]] for k in names}
        if not cols["shard"]:
            raise ValueError(f"config train.data_dir={spec}: no examples (KEY.jpg|png|... or KEY.txt|json members) "
                             f"in its {len(paths)} tar file(s); see the warnings above")
        self.shard = np.asarray(cols["shard"], np.int32)
        self.member = np.asarray(cols["member"], np.int32)
        self.img_off, self.img_size = np.asarray(cols["img_off"], np.int64), np.asarray(cols["img_size"], np.int64)
        self.txt_off, self.txt_size = np.asarray(cols["txt_off"], np.int64), np.asarray(cols["txt_size"], np.int64)
        self.txt_fmt = np.asarray(cols["txt_fmt"], np.int8)
        self.has_image, self.has_text = self.img_off >= 0, self.txt_off >= 0

    @staticmethod
    def _index(s, path) -> dict:
        """Shard ``s``'s examples: columns shard, member (index of the image or caption member), img_off,
        img_size, txt_off, txt_size (offsets of the data in the file, -1: none), txt_fmt (0 .txt, 1 .json)."""
        cols = {k: [] for k in ("shard", "member", "img_off", "img_size", "txt_off", "txt_size", "txt_fmt")}
        group = None  # [key, member, img_off, img_size, txt_off, txt_size, txt_fmt]

        def flush():
            if group is not None and (group[2] >= 0 or group[4] >= 0):
                for k, v in zip(("member", "img_off", "img_size", "txt_off", "txt_size", "txt_fmt"), group[1:]):
                    cols[k].append(v)
                cols["shard"].append(s)

        n = -1
        try:
            with tarfile.open(path, mode="r:") as tf:
                for n, m in enumerate(tf):  # reads the headers only (seeks over the data)
                    if not m.isfile():
                        continue
                    folder, base = posixpath.split(m.name)
                    if base.startswith(".") or "." not in base:  # webdataset keys: a non-empty stem
                        continue
                    stem, ext = base.split(".", 1)
                    key, ext = posixpath.join(folder, stem), ext.lower()
                    if group is None or group[0] != key:
                        flush()
                        group = [key, n, -1, 0, -1, 0, 0]
                    if "." + ext.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS and group[2] < 0:
                        group[1:4] = [n, m.offset_data, m.size]
                    elif ext in TarSource.TEXT_EXT and group[4] < 0:
                        group[4:7] = [m.offset_data, m.size, TarSource.TEXT_EXT.index(ext)]
                        if group[2] < 0:
                            group[1] = n
                end = tf.offset  # a truncated or corrupt header ends the iteration silently: look at the rest
            with open(path, "rb") as f:
                f.seek(end)
                if f.read(20 * tarfile.BLOCKSIZE).strip(b"\0"):
                    _skip(f"{path} after member {n}", "a truncated or corrupt tar header; its earlier members "
                                                      "are used")
        except (tarfile.TarError, OSError, EOFError) as e:
            what = f"{path} after member {n}" if n >= 0 else path
            _skip(what, f"not a readable uncompressed tar ({type(e).__name__}: {e}); "
                        f"{'its earlier members are used' if n >= 0 else 'the shard is left out'}")
        flush()
        return cols

    def __len__(self):
        return len(self.shard)

    @staticmethod
    def _pread(f, off, size):
        f.seek(int(off))
        data = f.read(int(size))
        if len(data) != size:
            raise ValueError(f"truncated member ({len(data)} of {size} bytes)")
        return data

    def read(self, i, text=True):
        image = caption = None
        with open(self.paths[self.shard[i]], "rb") as f:
            if self.img_off[i] >= 0:
                image = self._pread(f, self.img_off[i], self.img_size[i])
            if text and self.txt_off[i] >= 0:
                raw = self._pread(f, self.txt_off[i], self.txt_size[i]).decode("utf-8")
                if self.TEXT_EXT[self.txt_fmt[i]] == "json":
                    rec = json.loads(raw)
                    caption = _text_of(rec.get("text", rec.get("caption"))) if isinstance(rec, dict) else None
                    if caption is None:
                        raise ValueError("caption JSON has no \"text\" or \"caption\" string")
                else:
                    caption = raw.strip()
        return image, caption

    def where(self, i):
        path, member = self.paths[self.shard[i]], int(self.member[i])
        off = self.img_off[i] if self.img_off[i] >= 0 else self.txt_off[i]
        try:  # the member's name, from its header block (best effort: long names have their own headers)
            with open(path, "rb") as f:
                f.seek(int(off) - tarfile.BLOCKSIZE)
                name = tarfile.TarInfo.frombuf(f.read(tarfile.BLOCKSIZE), tarfile.ENCODING, "surrogateescape").name
            return f"{path} member {member} ({name})"
        except (tarfile.TarError, OSError, ValueError):
            return f"{path} member {member}"


class ArrayRecordSource(Source):
    """ArrayRecord files of msgpack records (see ``encode_record``), one Grain ArrayRecordDataSource per file."""

    def __init__(self, spec: str, paths: list[str]):
        self.spec, self.paths, self.sources = spec, [], []
        for p in paths:
            try:
                src = grain.sources.ArrayRecordDataSource([p])
            except Exception as e:  # noqa: BLE001 -- the C++ reader raises RuntimeError and others
                _skip(p, f"not a readable ArrayRecord file ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                         "the file is left out")
                continue
            if len(src):
                self.paths.append(p)
                self.sources.append(src)
        if not self.sources:
            raise ValueError(f"config train.data_dir={spec}: no records in its {len(paths)} ArrayRecord file(s); "
                             "see the warnings above")
        self.starts = np.cumsum([0] + [len(s) for s in self.sources])

    def __len__(self):
        return int(self.starts[-1])

    def _locate(self, i):
        f = int(np.searchsorted(self.starts, i, side="right")) - 1
        return f, int(i - self.starts[f])

    def read(self, i, text=True):
        f, j = self._locate(i)
        rec = decode_record(self.sources[f][j])
        return rec["image"], rec["text"] if text else None

    def where(self, i):
        f, j = self._locate(i)
        return f"{self.paths[f]} record {j}"


def _import_tfds(spec):
    try:
        import tensorflow_datasets as tfds  # noqa: PLC0415 -- optional, only for tfds: sources
    except ImportError:
        raise ImportError(f"config train.data_dir={spec}: tfds: sources need tensorflow_datasets, which is not "
                          f"installed ({TFDS_PIP})") from None
    return tfds


def parse_tfds_spec(spec: str) -> tuple[str, str, str | None]:
    """'tfds:NAME[/CONFIG][:SPLIT][@DATA_DIR]' -> (name, split, data_dir or None)."""
    body = spec[len("tfds:"):]
    body, _, data_dir = body.partition("@")
    name, _, split = body.partition(":")
    if not re.fullmatch(r"[A-Za-z0-9_]+(/[A-Za-z0-9_.\-=,]+)?", name):
        raise ValueError(f"config train.data_dir={spec}: expected tfds:NAME[/CONFIG][:SPLIT][@DATA_DIR]")
    return name, split or "train", data_dir or None


class TfdsSource(Source):
    """A TFDS dataset through ``tfds.data_source`` (ArrayRecord-backed, random access), opened per process."""

    TEXT_FEATURES = ("text", "caption", "captions")

    def __init__(self, spec: str):
        self.spec = spec
        self.name, self.split, self.data_dir = parse_tfds_spec(spec)
        self._ds = None
        self.n = len(self._open())
        first = self._open()[0] if self.n else {}  # the features: a dataset without images / text fails here
        if "image" not in first:
            self.has_image = np.zeros(self.n, bool)
        if not any(k in first for k in self.TEXT_FEATURES):
            self.has_text = np.zeros(self.n, bool)

    def _open(self):
        if self._ds is None:
            tfds = _import_tfds(self.spec)
            try:
                self._ds = tfds.data_source(self.name, split=self.split, data_dir=self.data_dir, download=False)
            except Exception as e:  # noqa: BLE001 -- tfds raises many kinds for a missing / unprepared dataset
                msg = (str(e).splitlines() or [""])[0][:200]
                raise ValueError(
                    f"config train.data_dir={self.spec}: tfds.data_source({self.name!r}, split={self.split!r}, "
                    f"data_dir={self.data_dir!r}) failed ({type(e).__name__}: {msg}); "
                    f"prepare it with `tfds build {self.name} --file_format=array_record`") from None
        return self._ds

    def __getstate__(self):
        return dict(self.__dict__, _ds=None)

    def __len__(self):
        return self.n

    def read(self, i, text=True):
        ex = self._open()[i]
        image = ex.get("image")
        caption = None
        if text:
            for k in self.TEXT_FEATURES:
                if k in ex and (caption := _text_of(ex[k])) is not None:
                    break
        return image, caption

    def where(self, i):
        return f"tfds:{self.name}:{self.split} record {i}"


def _expand_braces(pattern: str) -> list[str]:
    """Shell-style brace expansion: {000..009} (zero padded as written) and {a,b}."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if not m:
        return [pattern]
    head, body, tail = pattern[:m.start()], m.group(1), pattern[m.end():]
    r = re.fullmatch(r"(-?\d+)\.\.(-?\d+)", body)
    if r:
        a, b = r.groups()
        padded = any(len(x.lstrip("-")) > 1 and x.lstrip("-").startswith("0") for x in (a, b))
        width = max(len(a), len(b)) if padded else 0
        step = 1 if int(b) >= int(a) else -1
        alts = [str(v).zfill(width) for v in range(int(a), int(b) + step, step)]
    elif "," in body:
        alts = body.split(",")
    else:
        return [head + "{" + body + "}" + p for p in _expand_braces(tail)]
    return [p for alt in alts for p in _expand_braces(head + alt + tail)]


def _files(spec: str, pattern: str, ext: str) -> list[str]:
    out = []
    for p in _expand_braces(os.path.expanduser(pattern)):
        if os.path.isdir(p):
            out += sorted(os.path.join(root, f) for root, _, names in os.walk(p) for f in names if f.endswith(ext))
        elif any(c in p for c in "*?["):
            out += sorted(glob.glob(p))
        elif os.path.isfile(p):
            out.append(p)
        else:
            raise FileNotFoundError(f"config train.data_dir={spec}: {p} not found")
    if not out:
        raise FileNotFoundError(f"config train.data_dir={spec}: no {ext} files match {pattern}")
    return out


def open_source(spec: str, *, text: bool = False) -> Source:
    """The Source of a ``train.data_dir`` spec (see the module docstring); ``text``: for stage 2."""
    src = _open_source(spec, text)
    src.spec = spec
    return src


def _open_source(spec: str, text: bool) -> Source:
    if not spec:
        raise ValueError("config train.data_dir is empty: expected synthetic:N, shapes:N, an image folder, a JSONL "
                         "file, tar:PATTERN, arrayrecord:PATTERN or tfds:NAME[/CONFIG][:SPLIT][@DATA_DIR]")
    if spec.startswith("synthetic:"):
        n = spec.split(":", 1)[1]
        if not n.isdigit() or int(n) < 1:
            raise ValueError(f"config train.data_dir={spec}: expected synthetic:N with N >= 1")
        return SyntheticSource(int(n))
    if spec.startswith("shapes:"):
        m = re.fullmatch(r"shapes:(\d+)(@heldout)?", spec)
        if not m or int(m.group(1)) < 1:
            raise ValueError(f"config train.data_dir={spec}: expected shapes:N or shapes:N@heldout with N >= 1")
        return ShapesSource(int(m.group(1)), heldout=bool(m.group(2)))
    if spec.startswith("tfds:"):
        return TfdsSource(spec)
    if spec.startswith("tar:"):
        return TarSource(spec, _files(spec, spec[4:], ".tar"))
    if spec.startswith("arrayrecord:"):
        return ArrayRecordSource(spec, _files(spec, spec[len("arrayrecord:"):], ".array_record"))
    if spec.startswith("jsonl:"):
        return JsonlSource(spec[len("jsonl:"):])
    if spec.endswith(".tar") and not os.path.isdir(spec):
        return TarSource(spec, _files(spec, spec, ".tar"))
    if spec.endswith(".array_record") and not os.path.isdir(spec):
        return ArrayRecordSource(spec, _files(spec, spec, ".array_record"))
    if text:
        if os.path.isdir(spec):
            raise ValueError(f"config train.data_dir={spec}: an image folder has no text; stage 2 reads a JSONL "
                             "file, tar:, arrayrecord: or tfds: (or synthetic:N)")
        return JsonlSource(spec)
    if spec.endswith(".jsonl") and os.path.isfile(spec):
        return JsonlSource(spec)
    return FolderSource(spec)


def _indices(src: Source, mask, what: str) -> np.ndarray:
    if mask is None:
        return np.arange(len(src), dtype=np.int64)
    idx = np.flatnonzero(mask)
    if len(idx) == 0:
        raise ValueError(f"config train.data_dir={src.spec}: none of its {len(src)} examples "
                         f"has {what}")
    return idx


def _fetch(src: Source, i, text: bool):
    """(image raw, text raw) of example i, or None (logged, counted) if it cannot be read."""
    try:
        return src.read(int(i), text)
    except Exception as e:  # noqa: BLE001 -- a corrupt example never stops the run
        _skip(src.where(int(i)), f"{type(e).__name__}: {e}")
        return None


def _pixels(src: Source, i, raw, image_size: int, resolution: int = 0):
    """CLIP-normalised [S, S, 3] (with ``resolution``: and the [-1, 1] [R, R, 3] image); None if unreadable."""
    if raw is None:
        _skip(src.where(int(i)), "no image")
        return None
    try:
        img = decode_image(raw)
    except Exception as e:  # noqa: BLE001
        _skip(src.where(int(i)), e)
        return None
    pixels = preprocess(img, image_size)[0]
    if not resolution:
        return pixels
    images = np.asarray(img.resize((resolution, resolution), Image.BICUBIC), np.float32) / 127.5 - 1.0
    return {"pixels": pixels, "images": images}


# ------------------------------------------------------------------------------------------ batching


def _process(process_index, process_count) -> tuple[int, int]:
    return (jax.process_index() if process_index is None else process_index,
            jax.process_count() if process_count is None else process_count)


def _load_block(items, load, borrow=None, what="images"):
    """Decodes a block of items; an unreadable one is replaced by the next readable one of the block. A block
    with none readable takes ``borrow()`` (readable examples that follow it in the stream)."""
    out = [load(x) for x in items]
    n = len(out)
    if all(o is None for o in out):
        got = borrow() if borrow is not None else []
        if not got:
            raise ValueError(f"config train.data_dir: none of the {n} {what} of a batch block is readable "
                             f"(e.g. {items[0]}); see the warnings above")
        return [got[i % len(got)] for i in range(n)]
    return [o if o is not None else next(out[(i + j) % n] for j in range(1, n) if out[(i + j) % n] is not None)
            for i, o in enumerate(out)]


def _stack(examples):
    if isinstance(examples[0], dict):
        return {k: np.stack([e[k] for e in examples]) for k in examples[0]}
    return np.stack(examples)


def sharded_batches(source, load, local_batch: int, seed: int = 0, *, process_index=None, process_count=None,
                    workers: int = 0, collate=_stack, what: str = "images", field: str = "train.batch_size",
                    indexed: bool = False):
    """This process's part of a global batch stream, as a Grain dataset of ``collate``d blocks.

    The stream is ``source`` (a sequence) shuffled (``seed``) and repeated; global batch g is its
    elements [g B, (g+1) B) with B = local_batch x process_count, and process p decodes and yields block
    [p b, (p+1) b) of each (b = local_batch). So the global batches do not depend on the number of
    processes. ``load(item)`` returns an example or None for an unreadable item (replaced by the next
    readable one of its block; a block with none takes the next readable examples of the stream, probing
    at most 2 len(source) of them: a whole epoch); with ``indexed`` it gets (position in the stream, item).
    """
    pi, pc = _process(process_index, process_count)
    n = len(source)
    if n < local_batch * pc:
        raise ValueError(f"config train.data_dir: {n} {what}, fewer than {field}={local_batch * pc}")
    stream = grain.MapDataset.source(source).shuffle(seed=seed).repeat()
    if indexed:
        stream = stream.map_with_index(lambda i, item: (i, item))
    ds = stream.batch(local_batch, drop_remainder=True, batch_fn=list)
    if pc > 1:
        ds = ds[pi::pc]

    def block(k, items):
        end = ((k * pc + pi) + 1) * local_batch  # this block's end in the stream

        def borrow():
            got = []
            for p in range(end, end + 2 * n):  # spans a whole epoch (every example once)
                if (o := load(stream[p])) is not None:
                    got.append(o)
                    if len(got) == local_batch:
                        break
            if not got:
                raise ValueError(f"config train.data_dir: no readable {what} in a whole epoch ({n} examples); "
                                 "see the warnings above")
            return got

        return collate(_load_block(items, load, borrow, what))

    ds = ds.map_with_index(block)
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=1 if workers else 2, prefetch_buffer_size=8))
    if workers > 0:
        if not flags.FLAGS.is_parsed():  # outside an absl app (tests, notebooks): Grain reads its flags here
            flags.FLAGS.mark_as_parsed()
        _share_skips_with_workers()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    return ds


def image_batches(spec: str, image_size: int, batch_size: int, seed: int = 0, *, process_index=None,
                  process_count=None, workers: int = 0):
    """A repeating, shuffled Grain dataset of [batch_size, S, S, 3] float32 batches (batch_size per process)."""
    src = open_source(spec)

    def load(i):
        raw = _fetch(src, i, text=False)
        return None if raw is None else _pixels(src, i, raw[0], image_size)

    return sharded_batches(_indices(src, src.has_image, "an image"), load, batch_size, seed,
                           process_index=process_index, process_count=process_count, workers=workers)


def diffusion_batches(spec: str, tokenizer_size: int, resolution: int, batch_size: int, seed: int = 0, *,
                      process_index=None, process_count=None, workers: int = 0):
    """Batches {'pixels' [B, S, S, 3] (tokenizer input), 'images' [B, R, R, 3] in [-1, 1] (VAE input)}."""
    src = open_source(spec)

    def load(i):
        raw = _fetch(src, i, text=False)
        return None if raw is None else _pixels(src, i, raw[0], tokenizer_size, resolution)

    return sharded_batches(_indices(src, src.has_image, "an image"), load, batch_size, seed,
                           process_index=process_index, process_count=process_count, workers=workers)


# ------------------------------------------------------------------------------------------ stage 2


def synthetic_text(index: int, text_vocab: int = 256, first_id: int = 3) -> np.ndarray:
    """Deterministic learnable text ids for example ``index``: an arithmetic progression mod ``text_vocab``."""
    rng = np.random.default_rng(10_000 + index)
    n = int(rng.integers(8, 25))
    start, step = int(rng.integers(0, text_vocab)), int(rng.integers(1, 4))
    return (first_id + (start + step * np.arange(n)) % text_vocab).astype(np.int32)


def read_jsonl(path: str) -> list[dict]:
    """Records {image: abs path or None, text: str} of a JSONL file (one-line errors naming the file and line)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config train.data_dir: JSONL file not found: {path}")
    root = os.path.dirname(os.path.abspath(path))
    out = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError as e:
                raise ValueError(f"config train.data_dir: {path} line {n} is not JSON ({e})") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                raise ValueError(f"config train.data_dir: {path} line {n} has no \"text\" string")
            image = rec.get("image")
            out.append({"image": os.path.join(root, image) if image else None, "text": rec["text"]})
    if not out:
        raise ValueError(f"config train.data_dir: {path} has no records")
    return out


def lm_examples(spec: str, image_size: int, seed: int, examples: int, *, mix=(0.4, 0.4, 0.2), text_tokenizer=None,
                max_text_tokens: int = 512, process_index=None, process_count=None, workers: int = 0,
                visual_ids=None, visual_ids_name: str = "", pixels_for=(KIND_IMAGE_TO_TEXT, KIND_TEXT_TO_IMAGE)):
    """Lists of ``examples`` stage-2 examples (see the module docstring); kinds drawn with probabilities ``mix``.

    visual_ids: a random-access source of precomputed records aligned with the data's records (its name
    ``visual_ids_name`` in errors); pixels_for: the kinds whose images are decoded.
    """
    mix = np.asarray(mix, np.float64)
    if mix.shape != (3,) or (mix < 0).any() or mix.sum() <= 0:
        raise ValueError(f"config train.mix={tuple(mix)}: expected 3 non-negative fractions "
                         "(image->text, text->image, text only)")
    cum = np.cumsum(mix / mix.sum())
    src = open_source(spec, text=True)
    if text_tokenizer is None and not isinstance(src, SyntheticSource):
        raise ValueError(f"config train.text_tokenizer: the source train.data_dir={spec} needs the text tokenizer "
                         "(a converted checkpoint directory)")
    field = f"config train.visual_ids_from={visual_ids_name!r}"
    if visual_ids is not None and len(visual_ids) != len(src):
        raise ValueError(f"{field} has {len(visual_ids)} records, train.data_dir={spec!r} has {len(src)} "
                         "(precompute it from the same data)")
    pixels_for = tuple(pixels_for)

    def load(i_rec):
        pos, i = i_rec
        raw = _fetch(src, i, text=True)
        if raw is None:
            return None
        image, text = raw
        if text is None:
            _skip(src.where(int(i)), "no text")
            return None
        u = np.random.default_rng([seed, pos]).random()
        kind = min(int(np.searchsorted(cum, u, side="right")), KIND_TEXT) if image is not None else KIND_TEXT
        if kind == KIND_TEXT_TO_IMAGE:
            text = src.generation_text(int(i)) or text
        if isinstance(text, str):
            text = np.asarray(text_tokenizer.encode(text)[:max_text_tokens], np.int32)
        if len(text) == 0:
            _skip(src.where(int(i)), "empty text")
            return None
        out = {"kind": kind, "text": text, "index": pos}
        if visual_ids is not None:
            vis = visual_records.decode_record(visual_ids[int(i)])
            if isinstance(image, str | int) and vis.get("image") != image:
                raise ValueError(f"{field}: record {int(i)} is for image {vis.get('image')!r}, train.data_dir "
                                 f"record {int(i)} is {image!r} (precompute it from the same data)")
            if kind != KIND_TEXT and vis["visual_ids"] is None:
                _skip(src.where(int(i)), "no precomputed visual ids (unreadable when precomputed)")
                return None
            out["visual_ids"] = vis["visual_ids"] if kind != KIND_TEXT else np.zeros((0,), np.int32)
        if kind == KIND_TEXT or kind not in pixels_for:
            out["pixels"] = np.zeros((image_size, image_size, 3), np.float32)
        else:
            out["pixels"] = _pixels(src, i, image, image_size)
            if out["pixels"] is None:
                return None
        return out

    # The kind is drawn per position in the global stream: independent of the process count.
    return sharded_batches(_indices(src, src.has_text, "text"), load, examples, seed, process_index=process_index,
                           process_count=process_count, workers=workers, collate=list, what="examples",
                           field="train.examples_per_batch", indexed=True)


# ------------------------------------------------------------------------------------------ ArrayRecord format


def encode_record(image=None, text: str | None = None) -> bytes:
    """Our ArrayRecord record: msgpack {"image": encoded image bytes or nil, "text": str or nil}. ``image``:
    encoded bytes (kept as is), a path (its bytes), a PIL image or a uint8 array (encoded as PNG)."""
    if isinstance(image, str | os.PathLike):
        with open(image, "rb") as f:
            image = f.read()
    elif isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    if isinstance(image, Image.Image):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        image = buf.getvalue()
    if image is not None and not isinstance(image, bytes | bytearray):
        raise TypeError(f"record image: expected bytes, a path, a PIL image or an array, got {type(image).__name__}")
    if text is not None and not isinstance(text, str):
        raise TypeError(f"record text: expected a string, got {type(text).__name__}")
    return msgpack.packb({"image": None if image is None else bytes(image), "text": text}, use_bin_type=True)


def decode_record(data: bytes) -> dict:
    """{"image": bytes or None, "text": str or None} of an ``encode_record`` record (ValueError if it is not one)."""
    try:
        rec = msgpack.unpackb(data, raw=False)
    except Exception as e:  # noqa: BLE001 -- msgpack raises several kinds for garbage
        raise ValueError(f"not a msgpack record ({type(e).__name__}: {e})") from None
    if (not isinstance(rec, dict) or not isinstance(rec.get("image"), bytes | None)
            or not isinstance(rec.get("text"), str | None) or rec.get("image") is rec.get("text") is None):
        raise ValueError("not a lavit-jax record (a msgpack map with \"image\" bytes and/or \"text\")")
    return {"image": rec.get("image"), "text": rec.get("text")}


def write_array_record(path, examples) -> int:
    """Writes ``examples`` (dicts {"image": ..., "text": ...} for ``encode_record``, or bytes written as is) to
    the ArrayRecord file ``path`` atomically (``array_records.write_atomic``); returns the record count."""
    return array_records.write_atomic(
        path, (ex if isinstance(ex, bytes) else encode_record(ex.get("image"), ex.get("text")) for ex in examples))
