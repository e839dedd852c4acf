"""Training data sources behind train.data_dir: tar shards, ArrayRecord files, TFDS (dispatch and a stand-in
module), image folders / JSONL; deterministic shuffling, per-process sharding, resumable state, corrupt
examples skipped, counted and logged with their source, Grain worker processes."""

import io
import json
import logging
import os
import sys
import tarfile
import types

import numpy as np
import pytest
from PIL import Image

from lavit_jax.data import input_pipeline as ip

S = 14  # tokenizer input size of these tests (tiny: decoding is the point)
N = 10  # images per fixture


def _png(i: int) -> bytes:
    rng = np.random.default_rng(i)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (12 + i % 3, 16, 3), np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _caption(i: int) -> str:
    return f"picture number {i}"


def _add(tf, name, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def _write_tar(path, keys, corrupt=(), caption_json=()):
    with tarfile.open(path, "w") as tf:
        for i in keys:
            key = f"sample{i:03d}"
            _add(tf, f"{key}.png", b"\x89PNG not really" if i in corrupt else _png(i))
            if i in caption_json:
                _add(tf, f"{key}.json", json.dumps({"caption": _caption(i), "id": i}).encode())
            else:
                _add(tf, f"{key}.txt", _caption(i).encode())
    return str(path)


@pytest.fixture
def shards(tmp_path):
    """Two clean shards (5 + 5 examples, captions .txt and .json) and the same images as a folder."""
    d = tmp_path / "shards"
    d.mkdir()
    _write_tar(d / "part-000.tar", range(5), caption_json={1, 3})
    _write_tar(d / "part-001.tar", range(5, N))
    folder = tmp_path / "folder"
    folder.mkdir()
    for i in range(N):
        (folder / f"sample{i:03d}.png").write_bytes(_png(i))
    return d, folder


class _Tok:
    """A stand-in text tokenizer: one id per character."""

    def encode(self, s):
        return [3 + ord(c) % 61 for c in s]


def _take(ds, n, state=None):
    it = iter(ds)
    if state is not None:
        it.set_state(state)
    out = [next(it) for _ in range(n)]
    return out, it


# ------------------------------------------------------------------------------------------ spec syntax


def test_patterns_and_errors_name_the_field(tmp_path, shards):
    d, folder = shards
    assert ip._expand_braces("a-{000..002}.tar") == ["a-000.tar", "a-001.tar", "a-002.tar"]
    assert ip._expand_braces("{x,y}-{8..10}") == ["x-8", "x-9", "x-10", "y-8", "y-9", "y-10"]
    for spec in (f"tar:{d}/part-{{000..001}}.tar", f"tar:{d}/part-*.tar", f"tar:{d}", f"{d}/part-000.tar"):
        src = ip.open_source(spec)
        assert isinstance(src, ip.TarSource) and len(src) == (5 if spec.endswith("000.tar") else N), spec
    bad = [
        (f"tar:{d}/part-{{000..002}}.tar", FileNotFoundError, r"train\.data_dir=tar:.*part-002\.tar not found"),
        (f"tar:{d}/none-*.tar", FileNotFoundError, r"train\.data_dir=.*no \.tar files match"),
        (f"arrayrecord:{tmp_path}/nothing", FileNotFoundError, r"train\.data_dir=arrayrecord:"),
        ("", ValueError, r"config train\.data_dir is empty"),
        ("synthetic:zero", ValueError, r"train\.data_dir=synthetic:zero: expected synthetic:N"),
        ("tfds:bad name", ValueError, r"train\.data_dir=tfds:bad name: expected tfds:NAME"),
    ]
    for spec, kind, match in bad:
        with pytest.raises(kind, match=match) as e:
            ip.open_source(spec)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"train\.data_dir=.*folder: an image folder has no text"):
        ip.lm_examples(str(folder), S, 0, 2, text_tokenizer=_Tok())
    with pytest.raises(ValueError, match=r"config train\.text_tokenizer: the source train\.data_dir=tar:"):
        ip.lm_examples(f"tar:{d}", S, 0, 2)
    image_only = _write_tar(tmp_path / "img.tar", [])
    with tarfile.open(image_only, "w") as tf:
        _add(tf, "a.png", _png(0))
    with pytest.raises(ValueError, match=r"train\.data_dir=.*img\.tar: none of its 1 examples has text"):
        ip.lm_examples(image_only, S, 0, 1, text_tokenizer=_Tok())


# ------------------------------------------------------------------------------------------ tar shards


def test_tar_index_groups_members_and_reads_by_offset(shards):
    d, folder = shards
    src = ip.open_source(f"tar:{d}")
    assert len(src) == N and src.has_image.all() and src.has_text.all()
    for i in range(N):
        image, text = src.read(i)
        assert image == _png(i) and text == _caption(i)
    assert src.where(6).endswith("part-001.tar member 2 (sample006.png)")
    # The same images as a folder give the same pixels, batch for batch.
    a, _ = _take(ip.image_batches(f"tar:{d}", S, 4, seed=3), 4)
    b, _ = _take(ip.image_batches(str(folder), S, 4, seed=3), 4)
    for x, y in zip(a, b):
        assert x.shape == (4, S, S, 3) and x.dtype == np.float32
        np.testing.assert_array_equal(x, y)


def test_shuffle_is_deterministic_per_seed_and_covers_each_epoch(shards):
    d, _ = shards
    spec = f"tar:{d}"
    src = ip.open_source(spec)
    ref = np.stack([ip.preprocess(ip.decode_image(src.read(i)[0]), S)[0] for i in range(N)])

    def order(seed):  # the example index of each position in the stream, for 2 epochs
        batches, _ = _take(ip.image_batches(spec, S, 5, seed=seed), 4)
        flat = np.concatenate(batches)
        return [int(np.argmin(np.abs(ref - x).reshape(N, -1).max(1))) for x in flat]

    o0 = order(0)
    assert o0 == order(0) and o0 != order(1)
    assert sorted(o0[:N]) == sorted(o0[N:]) == list(range(N))  # each epoch is a permutation
    assert o0[:N] != list(range(N))


def test_process_shards_are_disjoint_and_make_the_global_batch(shards):
    d, _ = shards
    spec = f"tar:{d}"
    one, _ = _take(ip.image_batches(spec, S, 6, seed=1, process_index=0, process_count=1), 3)
    parts = [_take(ip.image_batches(spec, S, 2, seed=1, process_index=p, process_count=3), 3)[0] for p in range(3)]
    for g in range(3):
        np.testing.assert_array_equal(np.concatenate([parts[p][g] for p in range(3)]), one[g])
    # stage 2: the same examples, kinds and texts, split over processes.
    kw = dict(text_tokenizer=_Tok(), mix=(0.5, 0.3, 0.2))
    ex_one, _ = _take(ip.lm_examples(spec, S, 7, 4, process_index=0, process_count=1, **kw), 2)
    ex_parts = [_take(ip.lm_examples(spec, S, 7, 2, process_index=p, process_count=2, **kw), 2)[0] for p in (0, 1)]
    for g in range(2):
        merged = ex_parts[0][g] + ex_parts[1][g]
        assert [e["kind"] for e in merged] == [e["kind"] for e in ex_one[g]]
        for a, b in zip(merged, ex_one[g]):
            np.testing.assert_array_equal(a["text"], b["text"])
            np.testing.assert_array_equal(a["pixels"], b["pixels"])
    texts = {tuple(e["text"]) for batch in ex_one for e in batch}
    assert texts <= {tuple(_Tok().encode(_caption(i))) for i in range(N)}


def test_state_resumes_the_exact_next_batch(shards):
    d, _ = shards
    ds = ip.image_batches(f"tar:{d}", S, 3, seed=5)
    first, it = _take(ds, 3)
    state = it.get_state()
    want = [next(it) for _ in range(2)]
    got, _ = _take(ip.image_batches(f"tar:{d}", S, 3, seed=5), 2, state=state)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first[-1], want[0])


def test_corrupt_tar_member_and_shard_are_skipped_counted_and_logged_once(tmp_path, caplog):
    d = tmp_path / "bad"
    d.mkdir()
    _write_tar(d / "a.tar", range(6), corrupt={2})
    (d / "b.tar").write_bytes(b"this is not a tar file" * 40)
    (d / "c.tar").write_bytes(open(_write_tar(tmp_path / "full.tar", range(6, 9)), "rb").read()[:1800])  # cut
    spec = f"tar:{d}"
    before = ip.skipped_images()
    with caplog.at_level(logging.WARNING, logger=ip.__name__):
        src = ip.open_source(spec)
        assert len(src) >= 6
        batches, _ = _take(ip.image_batches(spec, S, 4, seed=0), 3 * len(src) // 4 + 2)  # > 2 epochs
    assert all(b.shape == (4, S, S, 3) and np.isfinite(b).all() for b in batches)
    msgs = [r.getMessage() for r in caplog.records]
    member = [m for m in msgs if "a.tar member 4 (sample002.png)" in m]
    assert len(member) == 1 and "not a readable image" in member[0], msgs  # logged once, with its source
    assert sum("b.tar" in m and "not a readable uncompressed tar" in m for m in msgs) == 1, msgs
    assert any("c.tar" in m for m in msgs), msgs  # the cut shard: a truncated member or header
    assert ip.skipped_images() - before == sum(("a.tar" in m or "b.tar" in m or "c.tar" in m) for m in msgs) >= 3


def test_all_corrupt_blocks_borrow_and_an_unreadable_source_fails_fast():
    ok = {5}
    ds = ip.sharded_batches(list(range(8)), lambda i: i if i in ok else None, 2, seed=0)
    batches, _ = _take(ds, 6)  # most blocks have no readable item: they borrow the next readable one
    assert all(b.tolist() == [5, 5] for b in batches)
    ds = ip.sharded_batches(list(range(8)), lambda i: None, 2, seed=0)
    with pytest.raises(ValueError, match=r"config train\.data_dir: no readable images in a whole epoch \(8 examples\)"):
        next(iter(ds))


# ------------------------------------------------------------------------------------------ ArrayRecord


def test_array_record_writer_source_and_corrupt_record(tmp_path, caplog):
    path = tmp_path / "train-0.array_record"
    examples = [{"image": _png(i), "text": _caption(i)} for i in range(6)]
    examples.insert(3, b"\x00garbage record")  # a corrupt record (index 3)
    examples.append({"text": "text only"})  # index 7: no image
    examples.append({"image": np.full((8, 8, 3), 200, np.uint8), "text": "an array"})  # index 8: encoded as PNG
    assert ip.write_array_record(path, examples) == 9
    assert sorted(os.listdir(tmp_path)) == ["train-0.array_record"]  # no temporary file left

    def failing():
        yield {"image": _png(0)}
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        ip.write_array_record(tmp_path / "x.array_record", failing())
    assert sorted(os.listdir(tmp_path)) == ["train-0.array_record"]  # atomic: nothing half written
    assert ip.write_array_record(tmp_path / "train-1.array_record", [{"image": _png(9), "text": "nine"}]) == 1

    spec = f"arrayrecord:{tmp_path}/train-*.array_record"
    src = ip.open_source(spec)
    assert isinstance(src, ip.ArrayRecordSource) and len(src) == 10
    assert src.read(9) == (_png(9), "nine") and src.where(9).endswith("train-1.array_record record 0")
    before = ip.skipped_images()
    with caplog.at_level(logging.WARNING, logger=ip.__name__):
        imgs, _ = _take(ip.image_batches(spec, S, 4, seed=0), 6)
        exs, _ = _take(ip.lm_examples(spec, S, 0, 5, text_tokenizer=_Tok()), 4)
    msgs = [r.getMessage() for r in caplog.records]
    assert sum("train-0.array_record record 3" in m and "not a msgpack record" in m for m in msgs) == 1, msgs
    assert sum("train-0.array_record record 7: no image" in m for m in msgs) == 1, msgs
    assert ip.skipped_images() - before == 2
    assert all(b.shape == (4, S, S, 3) for b in imgs)
    kinds = {e["kind"] for batch in exs for e in batch}
    assert kinds <= {0, 1, 2} and ip.KIND_TEXT in kinds
    for e in (e for batch in exs for e in batch):
        if e["kind"] == ip.KIND_TEXT:
            assert not e["pixels"].any()
    # plain path and the same pixels as the folder source of the same image
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "a.png").write_bytes(_png(9))
    a = next(iter(ip.image_batches(str(tmp_path / "train-1.array_record"), S, 1)))
    np.testing.assert_array_equal(a, next(iter(ip.image_batches(str(folder), S, 1))))


# ------------------------------------------------------------------------------------------ TFDS


def test_tfds_missing_package_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # as if not installed
    with pytest.raises(ImportError, match=r"^config train\.data_dir=tfds:mnist: .*pip install tensorflow-datasets"):
        ip.image_batches("tfds:mnist", S, 2)


def test_tfds_source_through_a_stand_in_module(monkeypatch):
    """tensorflow_datasets is not installed here (and tfds.data_source would need a prepared dataset): a
    stand-in module checks the spec parsing, the call and the feature mapping (images decoded as arrays)."""
    calls = []
    rows = [{"image": np.asarray(Image.open(io.BytesIO(_png(i))).convert("RGB")),
             "captions": {"text": np.array([_caption(i).encode(), b"other"], object)}} for i in range(6)]

    def data_source(name, *, split, data_dir, download):
        calls.append((name, split, data_dir, download))
        if name == "missing":
            raise AssertionError("Dataset missing not found in /nowhere")
        return [{"image": r["image"], "label": 1} for r in rows] if name == "labels_only" else rows

    monkeypatch.setitem(sys.modules, "tensorflow_datasets", types.SimpleNamespace(data_source=data_source))
    assert ip.parse_tfds_spec("tfds:coco_captions/2017:train[:10%]@/data/tfds") == (
        "coco_captions/2017", "train[:10%]", "/data/tfds")
    assert ip.parse_tfds_spec("tfds:mnist") == ("mnist", "train", None)
    batches, _ = _take(ip.image_batches("tfds:coco_captions/2017:train@/data/tfds", S, 3, seed=2), 2)
    assert calls[0] == ("coco_captions/2017", "train", "/data/tfds", False)
    folder_like = np.stack([ip.preprocess(r["image"], S)[0] for r in rows])
    for x in np.concatenate(batches):
        assert np.abs(folder_like - x).reshape(6, -1).max(1).min() == 0
    exs, _ = _take(ip.lm_examples("tfds:coco_captions/2017", S, 0, 3, text_tokenizer=_Tok()), 2)
    assert {tuple(e["text"]) for b in exs for e in b} <= {tuple(_Tok().encode(_caption(i))) for i in range(6)}
    with pytest.raises(ValueError, match=r"^config train\.data_dir=tfds:missing: tfds\.data_source\('missing'.*"
                                         r"AssertionError.*tfds build missing --file_format=array_record"):
        ip.open_source("tfds:missing")
    with pytest.raises(ValueError, match=r"train\.data_dir=tfds:labels_only: none of its 6 examples has text"):
        ip.lm_examples("tfds:labels_only", S, 0, 3, text_tokenizer=_Tok())
    src = ip.open_source("tfds:coco_captions/2017")
    assert src.__getstate__()["_ds"] is None  # pickled without the open source


# ------------------------------------------------------------------------------------------ workers, training


def test_worker_processes_give_the_same_batches_and_report_skips(tmp_path):
    d = tmp_path / "w"
    d.mkdir()
    _write_tar(d / "a.tar", range(8), corrupt={6})
    spec = f"tar:{d}"
    want, _ = _take(ip.image_batches(spec, S, 4, seed=4), 4)
    where = ip.open_source(spec).where(6)
    assert where in ip._SEEN
    ip._SEEN.discard(where)  # forget it here: now only the worker process finds it
    before = ip.skipped_images()
    got, it = _take(ip.image_batches(spec, S, 4, seed=4, workers=1), 4)
    state = it.get_state()
    it.close()
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)
    assert ip.skipped_images() - before == 1
    got2, it = _take(ip.image_batches(spec, S, 4, seed=4, workers=1), 1, state=state)
    it.close()
    want2, _ = _take(ip.image_batches(spec, S, 4, seed=4), 5)
    np.testing.assert_array_equal(got2[0], want2[4])


def test_stage2_examples_in_a_worker_with_the_real_text_tokenizer(tmp_path):
    """ArrayRecord + a sentencepiece text tokenizer, pickled into a Grain worker process: the same examples."""
    import sentencepiece as spm

    from lavit_jax.data.text_tokenizer import load_text_tokenizer

    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([_caption(i) + " of a test set" for i in range(N)] * 10),
        model_prefix=str(tmp_path / "tokenizer"), vocab_size=300, model_type="bpe", bos_id=1, eos_id=2, unk_id=0,
        pad_id=-1, byte_fallback=True, character_coverage=1.0, minloglevel=2)
    tok = load_text_tokenizer(tmp_path)
    path = tmp_path / "pairs.array_record"
    ip.write_array_record(path, [{"image": _png(i) if i % 4 else None, "text": _caption(i)} for i in range(N)])
    spec = f"arrayrecord:{path}"
    want, _ = _take(ip.lm_examples(spec, S, 3, 4, text_tokenizer=tok), 3)
    got, it = _take(ip.lm_examples(spec, S, 3, 4, text_tokenizer=tok, workers=1), 3)
    it.close()
    for a, b in zip((e for batch in got for e in batch), (e for batch in want for e in batch)):
        assert a["kind"] == b["kind"]
        np.testing.assert_array_equal(a["text"], b["text"])
        np.testing.assert_array_equal(a["pixels"], b["pixels"])
    assert {tuple(e["text"]) for batch in want for e in batch} <= {tuple(tok.encode(_caption(i))) for i in range(N)}


def _shards_for_training(tmp_path):
    d = tmp_path / "shards"
    d.mkdir()
    _write_tar(d / "s-000.tar", range(6))
    _write_tar(d / "s-001.tar", range(6, 12), corrupt={9})
    return f"tar:{d}/s-{{000..001}}.tar"


def test_stage_datasets_read_tar_shards(tmp_path):
    """What trainer.train asks of the tokenizer and detokenizer stages (the 2-step run: the slow test below)."""
    from lavit_jax.train import trainer
    from tests.train_configs import small_config

    spec = _shards_for_training(tmp_path)
    task = trainer.program(small_config("tokenizer", tmp_path / "w", data_dir=spec)).task
    it = iter(task.dataset(0, 1, 8))
    batches = [task.prepare(next(it)) for _ in range(3)]
    assert all(b["pixels"].shape == (8, 42, 42, 3) for b in batches)
    assert task.host_metrics()["skipped_images"] >= 1  # s-001.tar member 6 (sample009.png)
    det = trainer.STAGES["detokenizer"]
    config = small_config("detokenizer", tmp_path / "d", data_dir=spec)
    batch = next(iter(det(config, None, None).dataset(0, 2, 4)))
    assert batch["pixels"].shape == (4, 42, 42, 3) and batch["images"].shape[1:] == (config.detokenizer.resolution,
                                                                                        ) * 2 + (3,)
    assert -1.0 <= batch["images"].min() and batch["images"].max() <= 1.0
