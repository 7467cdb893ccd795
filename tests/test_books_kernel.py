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
    COUNT_NAMES,
    DEFAULT_CAPACITY,
    book_update,
    new_book_state,
)

MBO = Path(__file__).parent / "data" / "databento-glbx-esh4-mbo-20231225-head.dbn.zst"


def run_split(cols, cuts, capacity=DEFAULT_CAPACITY, levels=0, with_state=False):
    state = new_book_state(capacity)
    parts, lvs = [], []
    edges = [0, *sorted(cuts), len(cols[0])]
    for lo, hi in itertools.pairwise(edges):
        lv = np.empty((hi - lo, 4, levels))
        state, out = book_update(state, *(c[lo:hi] for c in cols), levels_out=lv)
        parts.append(out)
        lvs.append(lv)
    if with_state:
        return np.concatenate(parts), np.concatenate(lvs), state
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


deep = st.lists(  # up to 40 price levels per side, so that a capacity of 10-12 truncates
    st.tuples(st.sampled_from([1, -1]), st.integers(0, 40), st.sampled_from([0, 0, 1, 2, 3.5, 7]),
              st.sampled_from([0] * 60 + [1])),
    min_size=1, max_size=300,
)


def deep_columns(rows):
    side = np.array([r[0] for r in rows], dtype=np.int8)
    price = np.array([100 + r[0] * -(r[1] + 1) / 4 for r in rows])  # bids below 100, asks above: never crossed
    size = np.array([r[2] for r in rows], dtype=np.float64)
    action = np.array([r[3] for r in rows], dtype=np.uint8)
    return side, price, size, action


@settings(deadline=None, max_examples=150)
@given(deep, st.lists(st.integers(0, 300), max_size=5), st.sampled_from([10, 11, 12]))
def test_beyond_capacity_every_published_number_is_the_full_books(rows, cuts, capacity) -> None:
    """Levels pushed out of a full side are forgotten, and the kernel knows what it forgot:
    every feature and level it publishes equals the full (uncapped) loop book's; a feature that
    would need a forgotten level is NaN, and each such row is counted as ``inexact``."""
    cols = deep_columns(rows)
    cuts = [c for c in cuts if c <= len(rows)]
    got, got_lv, state = run_split(cols, cuts, capacity=capacity, levels=capacity, with_state=True)
    want, want_lv = reference(*cols, levels=capacity)
    known = ~np.isnan(got)
    assert np.array_equal(got[known], want[known])
    assert (np.isnan(want) <= np.isnan(got)).all()  # NaN where the full book has NaN, too
    inexact = (np.isnan(got) & ~np.isnan(want)).any(axis=1)
    counts = dict(zip(COUNT_NAMES, state.counts.tolist(), strict=True))
    assert counts["inexact"] == int(inexact.sum())  # a forgotten level: the full book has a number there
    if counts["evicted"] == 0:
        assert counts["inexact"] == counts["beyond"] == 0 and same(got, want)
    known_lv = ~np.isnan(got_lv)
    assert np.array_equal(got_lv[known_lv], want_lv[known_lv])
    for r in range(len(rows)):  # levels are a prefix of the full book's, never a gap in it
        for a in (0, 2):
            k = int(known_lv[r, a].sum())
            assert known_lv[r, a, :k].all()


def test_a_truncated_side_keeps_the_top_exact_as_it_is_eaten_away() -> None:
    """20 bids into a capacity-10 side (10 pushed out); then the best bids leave one by one:
    imbalance_10 is NaN as soon as fewer than 10 are kept, imbalance_1 stays exact until the
    last kept bid leaves; a bid below every kept one is ignored (it is in the forgotten region)."""
    bids = np.arange(80.0, 100.0)
    side = np.r_[np.ones(20), -1, np.ones(10), 1].astype(np.int8)
    price = np.r_[bids, 101.0, bids[::-1][:10], 70.0]
    size = np.r_[np.ones(20), 2.0, np.zeros(10), 5.0]
    state, out = book_update(new_book_state(10), side, price, size, np.zeros(32, np.uint8))
    counts = dict(zip(COUNT_NAMES, state.counts.tolist(), strict=True))
    assert counts["evicted"] == 10 and counts["beyond"] == 1
    assert out[20, 5] == (10 - 2) / 12 and np.isnan(out[21, 5])  # 9 bids kept: depth 10 unknown
    assert out[29, 3] == (1 - 2) / 3 and out[29, 0] == 101.0 - 90.0  # one bid kept: top exact
    assert np.isnan(out[30, 0]) and np.isnan(out[30, 3]) and np.isnan(out[31, 3])
    assert counts["inexact"] == 11 and state.n.tolist() == [0, 1]


def test_deep_books_grow_their_arrays_and_keep_every_level() -> None:
    side = np.ones(3000, np.int8)
    price = np.arange(3000.0) + 1.0
    state, out = book_update(new_book_state(), side, price, np.ones(3000), np.zeros(3000, np.uint8))
    assert state.n[0] == 3000 and state.key.shape[1] == 4096 and state.counts.tolist() == [0, 0, 0]
    px, _ = state.levels(1)
    assert px[0] == 3000.0 and px[-1] == 1.0 and out[-1, 5] == 1.0


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
    state, out = book_update(new_book_state(), d["side"], d["price"], d["size"], d["action"])
    assert state.n.tolist() == [922, 565]  # levels left at the end of the day, none truncated
    assert state.counts.tolist() == [0, 0, 0]
    cols = (d["side"], d["price"], d["size"], d["action"])
    want = reference(*cols)
    assert same(out, want)
    capped, _, st64 = run_split(cols, [], capacity=64, with_state=True)  # the old default: levels evicted
    known = ~np.isnan(capped)
    assert st64.counts[0] > 0 and np.array_equal(capped[known], want[known])
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
