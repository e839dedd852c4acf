"""Sequence packing on hand-made sequences, expected rows written out by hand."""

import numpy as np
import pytest

from lavit_jax.data.packing import PACKED_KEYS, pack_sequences

A = [10, 11, 12, 13]  # 3 slots
B = [20, 21, 22, 23, 24, 25]  # 5 slots
C = [30, 31]  # 1 slot
D = [40, 41, 42]  # 2 slots
E = [50, 51, 52, 53, 54, 55, 56, 57, 58]  # 8 slots > 6: truncated to its first 7 tokens


def test_first_fit_rows():
    # A -> row 0 (3 left); B needs 5 -> row 1; C fits row 0 (2 left); D fits row 0 (full); E -> row 2.
    out = pack_sequences([A, B, C, D, E], 6)
    assert set(out) == set(PACKED_KEYS)
    np.testing.assert_array_equal(out["tokens"], [
        [10, 11, 12, 30, 40, 41],
        [20, 21, 22, 23, 24, 0],
        [50, 51, 52, 53, 54, 55],
    ])
    np.testing.assert_array_equal(out["targets"], [
        [11, 12, 13, 31, 41, 42],
        [21, 22, 23, 24, 25, 0],
        [51, 52, 53, 54, 55, 56],
    ])
    np.testing.assert_array_equal(out["segment_ids"], [
        [1, 1, 1, 2, 3, 3],
        [1, 1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1, 1],
    ])
    np.testing.assert_array_equal(out["positions"], [
        [0, 1, 2, 0, 0, 1],
        [0, 1, 2, 3, 4, 0],
        [0, 1, 2, 3, 4, 5],
    ])
    np.testing.assert_array_equal(out["loss_weights"], [
        [1, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1, 1],
    ])
    assert out["tokens"].dtype == out["targets"].dtype == out["segment_ids"].dtype == np.int32
    assert out["positions"].dtype == np.int32 and out["loss_weights"].dtype == np.float32


def test_loss_weights_follow_targets_and_pad_id():
    # The weight of target s[j] is w[j]; padding gets pad_id and weight 0.
    out = pack_sequences([np.array(A), np.array(C)], 5, loss_weights=[[9, 0, 1, 0.5], [9, 2]], pad_id=-1)
    np.testing.assert_array_equal(out["tokens"], [[10, 11, 12, 30, -1]])
    np.testing.assert_array_equal(out["targets"], [[11, 12, 13, 31, -1]])
    np.testing.assert_array_equal(out["loss_weights"], [[0, 1, 0.5, 2, 0]])
    np.testing.assert_array_equal(out["segment_ids"], [[1, 1, 1, 2, 0]])


def test_exact_fit_and_num_rows():
    seq = list(range(1, 8))  # 7 tokens = length + 1: fills a row without truncation
    out = pack_sequences([seq], 6, num_rows=3)
    np.testing.assert_array_equal(out["tokens"], [[1, 2, 3, 4, 5, 6], [0] * 6, [0] * 6])
    np.testing.assert_array_equal(out["targets"][0], [2, 3, 4, 5, 6, 7])
    np.testing.assert_array_equal(out["segment_ids"], [[1] * 6, [0] * 6, [0] * 6])
    np.testing.assert_array_equal(out["loss_weights"][1:], 0)
    with pytest.raises(ValueError, match="num_rows=2: the sequences need 3 rows"):
        pack_sequences([A, B, C, D, E], 6, num_rows=2)
    empty = pack_sequences([], 4)
    assert all(empty[k].shape == (0, 4) for k in PACKED_KEYS)


def test_later_short_sequences_fill_earlier_rows():
    # First fit, not next fit: after row 1 is opened, a short sequence still goes back to row 0.
    out = pack_sequences([[1, 2, 3], [4, 5, 6, 7], [8, 9]], 4)
    np.testing.assert_array_equal(out["tokens"], [[1, 2, 8, 0], [4, 5, 6, 0]])
    np.testing.assert_array_equal(out["segment_ids"], [[1, 1, 2, 0], [1, 1, 1, 0]])
    np.testing.assert_array_equal(out["positions"], [[0, 1, 0, 0], [0, 1, 2, 0]])


def test_rejections_name_the_input():
    with pytest.raises(ValueError, match=r"sequences\[4\] has 9 tokens, more than length \+ 1 = 7"):
        pack_sequences([A, B, C, D, E], 6, truncate=False)
    with pytest.raises(ValueError, match=r"sequences\[1\] has 1 token"):
        pack_sequences([A, [5]], 6)
    with pytest.raises(ValueError, match=r"sequences\[0\]: expected a 1-D array of integer"):
        pack_sequences([np.zeros((2, 3), np.int32)], 6)
    with pytest.raises(ValueError, match=r"sequences\[0\]: expected a 1-D array of integer"):
        pack_sequences([np.array([1.0, 2.0])], 6)
    with pytest.raises(ValueError, match=r"loss_weights\[1\] has shape"):
        pack_sequences([A, C], 6, loss_weights=[[1, 1, 1, 1], [1, 1, 1]])
    with pytest.raises(ValueError, match="loss_weights: 1 arrays for 2 sequences"):
        pack_sequences([A, C], 6, loss_weights=[[1, 1, 1, 1]])


def test_item_cap_per_row():
    # C and D fit row 0's slots, but each counts one item and every row holds at most one: C opens row 1, D row 2.
    out = pack_sequences([A, C, D], 6, items=[1, 1, 1], max_items=1)
    np.testing.assert_array_equal(out["tokens"], [[10, 11, 12, 0, 0, 0], [30, 0, 0, 0, 0, 0], [40, 41, 0, 0, 0, 0]])
    # Sequences counting no item still fill the free slots.
    out = pack_sequences([A, C, D], 6, items=[1, 0, 1], max_items=1)
    np.testing.assert_array_equal(out["tokens"], [[10, 11, 12, 30, 0, 0], [40, 41, 0, 0, 0, 0]])
    with pytest.raises(ValueError, match="items: 1 counts for 2 sequences"):
        pack_sequences([A, C], 6, items=[1])
