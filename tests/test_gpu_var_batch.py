"""A batch's VaR reports in one device round trip equal the reports made one at a time.

``kernels.var_batch.var_reports`` (the risk stage's path) against ``var_report`` with a
generator in the same state: bit for bit on every backend, since each report draws the same
numbers in the same calls and a row-wise sort orders each row as a 1-d sort does. Runs on
numpy, torch:cpu and mlx:cpu everywhere, on torch:cuda and mlx:gpu where present.
"""

from __future__ import annotations

import numpy as np
import pytest

from nautilus_pipeline.compute import unusable_reason
from nautilus_pipeline.errors import DataError
from nautilus_pipeline.kernels.risk import mc_var, new_generator, var_report
from nautilus_pipeline.kernels.var_batch import VarRequest, var_reports


def _on(stream: str) -> list:
    why = unusable_reason(stream)
    return [pytest.mark.gpu, pytest.mark.skipif(why is not None, reason=f"{stream}: {why}")]


BACKENDS = [
    ("numpy", None),
    ("torch", "cpu"),
    ("mlx", "cpu"),
    pytest.param("torch", "cuda", marks=_on("torch:cuda")),
    pytest.param("mlx", "gpu", marks=_on("mlx:gpu")),
]
LEVELS = (0.9, 0.95, 0.99)


def _windows(rng: np.random.Generator) -> list[tuple[int, float, float, np.ndarray]]:
    """(symbol, exposure, sigma, window): empty windows (σ paths), short ones, NaNs, a zero σ."""
    out = []
    for i in range(11):
        n = (0, 1, 7, 300, 1000)[i % 5]
        w = rng.standard_t(4, size=n) * 1e-3
        if n > 5:
            w[rng.random(n) < 0.05] = np.nan
        sigma = 0.0 if i == 3 else float(rng.uniform(1e-4, 3e-3))
        out.append((i % 3, float(rng.normal(0, 1e5)), sigma, w))
    return out


@pytest.mark.parametrize(("backend", "device"), BACKENDS)
@pytest.mark.parametrize("group_bytes", [1 << 28, 8 * 3000 * 2])
def test_batched_reports_equal_one_at_a_time(backend: str, device: str | None, group_bytes: int) -> None:
    if backend != "numpy":
        pytest.importorskip(backend, reason=f"{backend} is not installed")
    items = _windows(np.random.default_rng(5))
    horizon, paths = 10, 3000

    def gens():
        return {s: new_generator(backend, 9, device, stream=s) for s in range(3)}

    one_gens, batch_gens = gens(), gens()
    want = [var_report(e, s, w, horizon, LEVELS, n_paths=paths, backend=backend, device=device,
                       generator=one_gens[sym]) for sym, e, s, w in items]
    got = var_reports([VarRequest(e, s, w, batch_gens[sym]) for sym, e, s, w in items],
                      horizon, LEVELS, n_paths=paths, group_bytes=group_bytes)
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert set(g) == {"parametric", "historical", "mc"}
        for method in w:
            np.testing.assert_array_equal(g[method], w[method], err_msg=method)
            assert g[method].dtype == np.float64 and g[method].shape == (len(LEVELS),)
    # the generators advanced as far as one at a time: the next report is the same too
    sym, e, s, w = items[-1]
    nxt = var_report(e, s, w, horizon, LEVELS, n_paths=paths, backend=backend, device=device,
                     generator=one_gens[sym])
    again = var_reports([VarRequest(e, s, w, batch_gens[sym])], horizon, LEVELS, n_paths=paths)[0]
    np.testing.assert_array_equal(again["mc"], nxt["mc"])


@pytest.mark.parametrize(("backend", "device"), BACKENDS)
def test_chunked_paths_and_a_bad_sigma(backend: str, device: str | None) -> None:
    if backend != "numpy":
        pytest.importorskip(backend, reason=f"{backend} is not installed")
    w = np.random.default_rng(1).standard_normal(500) * 1e-3
    # paths in chunks of 999 (as mc_var cuts them): the same numbers as mc_var's
    a = mc_var(w, 1e5, 5, 2000, LEVELS, backend=backend, device=device, chunk_elements=5 * 999,
               generator=new_generator(backend, 2, device))
    b = var_reports([VarRequest(1e5, 1e-3, w, new_generator(backend, 2, device))], 5, LEVELS,
                    n_paths=2000, chunk_elements=5 * 999)[0]
    np.testing.assert_array_equal(b["mc"], a)
    with pytest.raises(DataError, match="sigma"):
        var_reports([VarRequest(1e5, float("nan"), np.zeros(0), new_generator(backend, 2, device))],
                    5, LEVELS, n_paths=2000)


def test_no_requests_no_reports() -> None:
    assert var_reports([], 10, LEVELS) == []
