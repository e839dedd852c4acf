"""The demo's procedural dataset (``lavit_jax/data/shapes.py``), its analyser and the demo's run-directory rules.

The end-to-end demo run (``make demo``'s commands with tiny step counts, report.json fields and PNGs) is
``tests/test_docs_commands.py::test_make_commands[make demo]``: it runs once in the suite.
"""

import json

import numpy as np
import pytest
from PIL import Image

from lavit_jax import demo
from lavit_jax.data import input_pipeline, shapes
from tests.conftest import REPO


def test_scenes_are_deterministic_by_seed():
    for seed in (0, 7, shapes.heldout_seed(3)):
        a, b = shapes.scene(seed), shapes.scene(seed)
        np.testing.assert_array_equal(a[0], b[0])
        assert a[1] == b[1]
    assert not np.array_equal(shapes.scene(1)[0], shapes.scene(2)[0])


def test_scenes_cover_every_attribute_value():
    seen = {a: set() for a in shapes.ATTRIBUTES}
    for seed in range(200):
        for a in shapes.ATTRIBUTES:
            seen[a].add(shapes.attributes(seed)[a])
    assert seen == {"count": set(shapes.COUNTS), "size": set(shapes.SIZES), "colour": set(shapes.COLOURS),
                    "shape": set(shapes.SHAPES)}


def test_train_and_heldout_seeds_are_disjoint():
    tr, ho = shapes.TRAIN_SEEDS, shapes.HELDOUT_SEEDS
    assert tr[0] < tr[1] <= ho[0] < ho[1]
    train = input_pipeline.open_source("shapes:50", text=True)
    held = input_pipeline.open_source("shapes:50@heldout", text=True)
    assert train.first + 50 // shapes.TEXTS_PER_SCENE < ho[0] <= held.first
    # the same example index shows a different scene in the two splits
    assert not np.array_equal(train.read(0)[0], held.read(0)[0])
    with pytest.raises(ValueError, match="shapes:N"):
        input_pipeline.open_source("shapes:x")
    with pytest.raises(ValueError, match="seed range"):
        input_pipeline.open_source(f"shapes:{10 * shapes.TRAIN_SEEDS[1]}")


def test_source_texts_are_the_caption_and_the_vqa_pairs():
    src = input_pipeline.open_source("shapes:10", text=True)
    img, cap = src.read(0)
    attrs = shapes.attributes(shapes.TRAIN_SEEDS[0])
    np.testing.assert_array_equal(img, shapes.render(attrs))
    assert cap.startswith(shapes.CAPTION_PROMPT + " ")  # captioning is told apart from VQA by its prompt
    words = cap[len(shapes.CAPTION_PROMPT):].split()
    assert len(words) == 4 and words[0] == attrs["count"] and words[2] == attrs["colour"]
    assert words[3].startswith(attrs["shape"]) and words[1] == attrs["size"]
    for v in range(1, shapes.TEXTS_PER_SCENE):
        text = src.read(v)[1]
        assert text.startswith("Question: ") and " Answer: " in text
        assert text.rsplit(" ", 1)[1] == attrs[list(shapes.QUESTIONS)[v - 1]]
    batch = next(iter(input_pipeline.image_batches("shapes:10", 28, 2)))
    assert batch.shape == (2, 28, 28, 3)


class _Words:
    """A stand-in text tokenizer: one id per word (ids of the words seen so far)."""

    def __init__(self):
        self.ids = {}

    def encode(self, text):
        return [self.ids.setdefault(w, len(self.ids) + 3) for w in text.split()]

    def decode(self, ids):
        words = {i: w for w, i in self.ids.items()}
        return " ".join(words[int(i)] for i in ids)


def test_text_to_image_examples_read_the_caption():
    """Stage 2's text->image examples are conditioned on the scene's caption, not on a VQA pair of the scene;
    image->text examples keep their own text (captions and VQA pairs)."""
    tok = _Words()
    data = input_pipeline.lm_examples("shapes:50", 28, 0, 10, mix=(0.5, 0.5, 0.0), text_tokenizer=tok)
    kinds, questions = set(), 0
    for _, batch in zip(range(4), data, strict=False):
        for e in batch:
            text = tok.decode(e["text"])
            kinds.add(e["kind"])
            if e["kind"] == input_pipeline.KIND_TEXT_TO_IMAGE:
                assert text.startswith(shapes.CAPTION_PROMPT + " ") and "Question:" not in text, text
            else:
                questions += text.startswith("Question:")
    assert kinds == {input_pipeline.KIND_IMAGE_TO_TEXT, input_pipeline.KIND_TEXT_TO_IMAGE}
    assert questions > 0


@pytest.mark.parametrize("side", [64, 32])
def test_analyser_recovers_rendered_attributes(side):
    """On the dataset's own images, at its size and at the detokenizer's 32 px (bicubic, as the data pipeline)."""
    wrong = []
    for i in range(120):
        img, attrs = shapes.scene(shapes.heldout_seed(i))
        if side != img.shape[0]:
            img = np.asarray(Image.fromarray(img).resize((side, side), Image.BICUBIC))
        got = shapes.analyse(img)
        if not all(shapes.attribute_matches(got, attrs)):
            wrong.append((i, got, shapes.caption(attrs)))
    assert not wrong, wrong[:3]


def test_analyser_sees_nothing_in_a_blank_image():
    assert shapes.analyse(np.full((32, 32, 3), 255, np.uint8)) == {a: None for a in shapes.ATTRIBUTES}


def test_parse_caption():
    assert shapes.parse_caption("three large blue triangles") == {"count": "three", "size": "large",
                                                                  "colour": "blue", "shape": "triangle"}
    assert shapes.parse_caption("a red thing") == {"count": None, "size": None, "colour": "red", "shape": None}


def test_demo_refuses_an_existing_workdir(tmp_path):
    """Checked before any work: a user's directory is never replaced; --overwrite replaces only a demo run."""
    config = str(REPO / "configs" / "demo.py")
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="--overwrite"):
        demo.run(config, str(user), False, 1.0)
    with pytest.raises(FileExistsError, match="demo run"):
        demo.run(config, str(user), True, 1.0)
    assert (user / "notes.txt").read_text() == "keep"
    run = tmp_path / "run"
    run.mkdir()
    (run / demo.MARKER).write_text(json.dumps({}))
    with pytest.raises(FileExistsError, match="--overwrite"):
        demo.run(config, str(run), False, 1.0)
    with pytest.raises(ValueError, match="--steps_scale"):
        demo.run(config, str(tmp_path / "new"), False, 0.0)


def test_write_checkpoint_never_replaces_another_directory(tmp_path):
    from lavit_jax import checkpoint

    other = tmp_path / "other"
    other.mkdir()
    (other / "data.bin").write_bytes(b"x")
    with pytest.raises(FileExistsError, match="not a lavit-jax checkpoint"):
        checkpoint.write_checkpoint(str(other), tokenizer_config={}, tokenizer={"w": np.zeros(2)}, overwrite=True)
    assert (other / "data.bin").read_bytes() == b"x"


def test_encoder_pretraining_patch_labels_name_the_colour_under_each_patch():
    """The dense labels of ``pretrain_encoder``: a patch inside a shape has the shape's colour (1 + index), a
    patch of pure background 0; the image-level labels are the scene's attribute indices."""
    size, patch = 56, 14
    x, labels, dense = demo._train_scenes(0, 6, size, normalise=True, patch=patch)
    assert x.shape == (6, size, size, 3) and labels.shape == (6, 4) and dense.shape == (6, (size // patch) ** 2)
    g = size // patch
    for j in range(6):
        img, attrs = shapes.scene(shapes.TRAIN_SEEDS[0] + j)
        assert labels[j].tolist() == [shapes.VALUES[a].index(attrs[a]) for a in shapes.ATTRIBUTES]
        colour = 1 + list(shapes.COLOURS).index(attrs["colour"])
        fg = shapes.foreground(np.asarray(Image.fromarray(img).resize((size, size), Image.BICUBIC)))
        cover = fg.reshape(g, patch, g, patch).mean((1, 3)).reshape(-1)
        assert set(dense[j][cover == 0].tolist()) <= {0}
        assert set(dense[j][cover > 0.5].tolist()) <= {colour}
        assert (dense[j] == colour).any()
