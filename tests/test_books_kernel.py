"""The L2 book kernel against a plain float64 loop that rebuilds the book from the deltas."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
from book_reference import reference
from hypothesis import given, settings
from hypothesis import strategies as st

from nautilus_pipeline.errors import ConfigError
from nautilus_pipeline.kernels.book import (
    ACTION_CLEAR,
    BOOK_FEATURE_NAMES,
    book_update,
    new_book_state,
)

MBO = Path(__file__).parent / "data" / "databento-glbx-esh4-mbo-20231225-head.dbn.zst"


def run_split(cols, cuts, capacity=64):
    state = new_book_state(capacity)
    parts = []
    edges = [0, *sorted(cuts), len(cols[0])]
    for lo, hi in itertools.pairwise(edges):
        state, out = book_update(state, *(c[lo:hi] for c in cols))
        parts.append(out)
    return np.concatenate(parts)


def same(a, b):
    return a.shape == b.shape and bool(((a == b) | (np.isnan(a) & np.isnan(b))).all())


deltas = st.lists(
    st.tuples(st.sampled_from([1, -1]), st.integers(90, 110), st.sampled_from([0, 0, 1, 2, 3.5, 7]),
              st.sampled_from([0] * 30 + [1])),
    min_size=1, max_size=200,
)


def columns(rows):
    side = np.array([r[0] for r in rows], dtype=np.int8)
    price = np.array([r[1] / 4 for r in rows], dtype=np.float64)  # quarter ticks
    size = np.array([r[2] for r in rows], dtype=np.float64)
    action = np.array([r[3] for r in rows], dtype=np.uint8)
    return side, price, size, action


@settings(deadline=None, max_examples=150)
@given(deltas, st.lists(st.integers(0, 200), max_size=6))
def test_kernel_equals_the_loop_for_any_batch_split(rows, cuts) -> None:
    cols = columns(rows)
    cuts = [c for c in cuts if c <= len(rows)]
    assert same(run_split(cols, cuts), reference(*cols))


@settings(deadline=None, max_examples=60)
@given(deltas)
def test_a_full_side_drops_its_worst_level_like_the_loop(rows) -> None:
    cols = columns(rows)
    assert same(run_split(cols, [], capacity=10), reference(*cols, capacity=10))


@pytest.mark.parametrize("batch", [1, 7, 4096])
def test_real_mbo_book_levels_agree_in_batches(batch) -> None:
    from nautilus_pipeline.io.mbo import mbo_level_deltas

    deltas_ = mbo_level_deltas(MBO)
    cols = (deltas_["side"], deltas_["price"], deltas_["size"], deltas_["action"])
    n = len(cols[0])
    assert n > 0
    cuts = list(range(batch, n, batch))
    assert same(run_split(cols, cuts), reference(*cols))


def test_features_of_a_known_book() -> None:
    side = np.array([1, 1, -1, -1], dtype=np.int8)
    price = np.array([100.0, 99.5, 100.5, 101.0])
    size = np.array([3.0, 1.0, 1.0, 5.0])
    _, out = book_update(new_book_state(), side, price, size, np.zeros(4, dtype=np.uint8))
    last = dict(zip(BOOK_FEATURE_NAMES, out[-1].tolist(), strict=True))
    assert last["spread"] == 0.5 and last["mid"] == 100.25
    assert last["microprice"] == (100.0 * 1.0 + 100.5 * 3.0) / 4.0
    assert last["imbalance_1"] == (3.0 - 1.0) / 4.0
    assert last["imbalance_5"] == (4.0 - 6.0) / 10.0
    assert math.isnan(out[0, 0]) and out[0, 3] == 1.0  # one-sided: no spread, imbalance +1


def test_capacity_below_depth_10_is_refused() -> None:
    with pytest.raises(ConfigError, match="capacity"):
        new_book_state(5)


def test_clear_empties_both_sides() -> None:
    side = np.array([1, -1, 1], dtype=np.int8)
    price = np.array([10.0, 11.0, math.nan])
    _, out = book_update(new_book_state(), side, price, np.ones(3), np.array([0, 0, ACTION_CLEAR], dtype=np.uint8))
    assert out[1, 0] == 1.0 and math.isnan(out[2, 0]) and math.isnan(out[2, 3])


def test_full_real_mbo_day_rebuilds_a_book_with_every_level(shared_data: Path) -> None:
    from nautilus_pipeline.io.mbo import mbo_level_deltas

    d = mbo_level_deltas(shared_data / "databento-glbx-esh4-mbo-20231225.dbn.zst")
    assert len(d["side"]) == 69_346 and int(d["unknown_orders"]) == 0
    state, out = book_update(new_book_state(2048), d["side"], d["price"], d["size"], d["action"])
    assert state.n.tolist() == [922, 565]  # levels left at the end of the day, none truncated
    last = out[-1]
    assert last[0] == 0.25 and last[1] == 4810.125  # one tick wide at the close of the file


@settings(deadline=None, max_examples=60)
@given(deltas, st.lists(st.integers(0, 200), max_size=4), st.integers(1, 12))
def test_levels_out_are_the_loop_books_best_levels(rows, cuts, levels) -> None:
    cols = columns(rows)
    _, want_lv = reference(*cols, levels=levels)
    state = new_book_state()
    edges = [0, *sorted(c for c in cuts if c <= len(rows)), len(rows)]
    got = []
    for lo, hi in itertools.pairwise(edges):
        lv = np.empty((hi - lo, 4, levels))
        state, _ = book_update(state, *(c[lo:hi] for c in cols), levels_out=lv)
        got.append(lv)
    got_lv = np.concatenate(got)
    assert same(got_lv.reshape(len(rows), -1), want_lv.reshape(len(rows), -1))


def test_a_row_with_side_zero_and_no_clear_leaves_the_book_as_it_is() -> None:
    side = np.array([1, -1, 0], dtype=np.int8)
    price = np.array([100.0, 101.0, np.nan])
    size = np.array([2.0, 3.0, np.nan])
    _, out = book_update(new_book_state(), side, price, size, np.zeros(3, dtype=np.uint8))
    assert same(out[2, :6], out[1, :6]) and out[2, 6] == 0.0
