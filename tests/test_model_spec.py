"""ModelSpec / MLPWeights: validation, files (.npz, safetensors, int8/fp16 storage), input names."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from model_helpers import SPEC, weights

from nautilus_pipeline.errors import ConfigError
from nautilus_pipeline.model.spec import (
    MLPWeights,
    ModelSpec,
    check_inputs,
    load_model,
    quantize_int8,
    read_input_names,
    save_model,
    with_weight_precision,
)


def _same(a: MLPWeights, b: MLPWeights) -> None:
    for x, y in zip(a.tensors().values(), b.tensors().values(), strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_save_then_load_gives_the_same_spec_weights_and_metadata(
    tmp_path: Path, suffix: str
) -> None:
    w = weights(3)
    path = save_model(tmp_path / f"m{suffix}", SPEC, w, {"seed": 7, "accuracy": 0.51})
    spec2, w2 = load_model(path)
    assert spec2 == SPEC
    _same(w, w2)
    assert w2.metadata == {"seed": 7, "accuracy": 0.51}


@pytest.mark.parametrize("storage", ["float16", "int8"])
def test_reduced_precision_npz_loads_as_the_weights_it_stands_for(
    tmp_path: Path, storage: str
) -> None:
    w = weights(4)
    _, loaded = load_model(save_model(tmp_path / "m.npz", SPEC, w, storage=storage))
    _same(loaded, with_weight_precision(w, storage))


def test_int8_storage_is_smaller_and_within_half_a_step_of_float32(tmp_path: Path) -> None:
    w = weights(5)
    big = save_model(tmp_path / "f32.npz", SPEC, w).stat().st_size
    small = save_model(tmp_path / "q8.npz", SPEC, w, storage="int8").stat().st_size
    assert small < big / 2.5
    q, scale = quantize_int8(w.weights[0])
    assert q.dtype == np.int8
    assert np.max(np.abs(q * scale[:, None] - w.weights[0]) / scale[:, None]) <= 0.5 + 1e-6


def test_safetensors_refuses_reduced_precision(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"use \.npz"):
        save_model(tmp_path / "m.safetensors", SPEC, weights(), storage="int8")


def test_a_file_without_a_spec_is_rejected_with_its_path(tmp_path: Path) -> None:
    p = tmp_path / "plain.npz"
    np.savez(p, **weights().tensors())
    with pytest.raises(ConfigError, match="no model spec inside"):
        load_model(p)


def test_weights_that_do_not_fit_the_spec_are_rejected() -> None:
    other = ModelSpec(SPEC.input_names, hidden=(16,))
    with pytest.raises(ConfigError, match="layer sizes"):
        weights().check(other)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"input_names": ()}, "empty"),
        ({"input_names": ("a", "a")}, "repeat"),
        ({"input_names": ("a",), "hidden": (0,)}, "positive"),
        ({"input_names": ("a",), "activation": "gelu"}, "activation"),
    ],
)
def test_invalid_specs_say_what_is_wrong(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ModelSpec(**kwargs)


def test_non_positive_std_is_rejected() -> None:
    w = weights()
    with pytest.raises(ConfigError, match="std"):
        MLPWeights(w.mean, np.zeros_like(w.std), w.weights, w.biases)


def test_check_inputs_accepts_the_same_names_in_the_same_order() -> None:
    check_inputs(SPEC, list(SPEC.input_names))


def test_check_inputs_lists_both_sides_and_the_difference() -> None:
    spec = ModelSpec(("a", "b", "c"), hidden=(4,))
    with pytest.raises(ConfigError) as e:
        check_inputs(spec, ("a", "b", "d", "e"))
    msg = str(e.value)
    assert "model inputs (3): ['a', 'b', 'c']" in msg
    assert "feature names (4): ['a', 'b', 'd', 'e']" in msg
    assert "missing from the features: ['c']" in msg
    assert "does not take: ['d', 'e']" in msg


def test_check_inputs_rejects_a_different_order() -> None:
    spec = ModelSpec(("a", "b"), hidden=(4,))
    with pytest.raises(ConfigError, match="different order"):
        check_inputs(spec, ("b", "a"))


def test_a_model_rewritten_in_place_loads_its_new_weights_not_the_cached_ones(tmp_path: Path) -> None:
    """The per-process cache of parsed ``.npz`` models is keyed by the file's content: the
    same path holding other bytes (a re-export between two batch jobs) gives the new
    weights, and loading the first content again still gives the first ones."""
    path = tmp_path / "m.npz"
    first, second = weights(seed=1), weights(seed=2)
    save_model(path, SPEC, first, {"seed": 1})
    _, got1 = load_model(path)
    save_model(path, SPEC, second, {"seed": 2})
    _, got2 = load_model(path)
    save_model(tmp_path / "again.npz", SPEC, first, {"seed": 1})
    _, again = load_model(tmp_path / "again.npz")
    for want, got in ((first, got1), (second, got2), (first, again)):
        for a, b in zip(want.tensors().values(), got.tensors().values(), strict=True):
            assert np.array_equal(a, b)
    assert got2.metadata["seed"] == 2 and again.metadata["seed"] == 1


def test_cached_model_weights_are_read_only_and_metadata_is_each_callers_own(tmp_path: Path) -> None:
    """Stages that load the same model share its arrays: none may write into what another
    (the next batch job's) reads, and one caller's metadata edit does not reach the next."""
    path = save_model(tmp_path / "m.npz", SPEC, weights(), {"seed": 7})
    _, a = load_model(path)
    _, b = load_model(path)
    assert b.weights[0] is a.weights[0], "the second load is the cached parse"
    with pytest.raises(ValueError, match="read-only"):
        a.weights[0][0, 0] = 1.0
    a.metadata["seed"] = 8  # type: ignore[index]
    assert load_model(path)[1].metadata["seed"] == 7


def test_input_names_follow_a_model_rewritten_in_place(tmp_path: Path) -> None:
    """``read_input_names`` keeps what it read per content too: the same path saved with
    another spec gives the new names."""
    path = tmp_path / "m.npz"
    other = ModelSpec(tuple(f"g{i}" for i in range(50)))
    save_model(path, SPEC, weights())
    assert read_input_names(path) == SPEC.input_names
    save_model(path, other, weights(spec=other))
    assert read_input_names(path) == other.input_names
