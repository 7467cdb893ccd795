"""A batch's VaR reports in one device round trip equal the reports made one at a time.

``kernels.var_batch.var_reports`` (the risk stage's path) against ``var_report`` with a
generator in the same state: bit for bit on every backend, since each report draws the same
numbers in the same calls and a row-wise sort orders each row as a 1-d sort does. Runs on
numpy, torch:cpu and mlx:cpu everywhere, on torch:cuda and mlx:gpu where present. On CUDA
with Triton the bootstrap reports run in the fused kernel: those equal a NumPy Philox loop
reference (below) bit for bit, and NumPy's Monte Carlo within its error; the kernel is also
checked on the CPU through Triton's interpreter where Triton is installed.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from nautilus_pipeline.compute import unusable_reason
from nautilus_pipeline.errors import DataError
from nautilus_pipeline.kernels import var_batch
from nautilus_pipeline.kernels.risk import mc_var, new_generator, var_report
from nautilus_pipeline.kernels.var_batch import VarRequest, report_key, var_reports

_M32 = np.uint64(0xFFFFFFFF)


def ref_philox4x32(key: int, counter: np.ndarray) -> tuple[np.ndarray, ...]:
    """Philox4x32-10 (Salmon et al. 2011) as Triton's randint4x: key (lo, hi) of a 64-bit
    seed, counter (lo, hi, 0, 0) of a 64-bit offset; four uint32 words per counter."""
    k0, k1 = np.uint64(key & 0xFFFFFFFF), np.uint64(key >> 32)
    c = np.asarray(counter, dtype=np.uint64)
    c0, c1 = c & _M32, c >> np.uint64(32)
    c2 = c3 = np.zeros_like(c)
    a, b = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
    for _ in range(10):
        pa, pb = a * c0, b * c2  # < 2**64: exact
        c0, c2, c1, c3 = ((pb >> np.uint64(32)) ^ c1 ^ k0, (pa >> np.uint64(32)) ^ c3 ^ k1,
                          pb & _M32, pa & _M32)
        k0, k1 = (k0 + np.uint64(0x9E3779B9)) & _M32, (k1 + np.uint64(0xBB67AE85)) & _M32
    return c0, c1, c2, c3


def ref_fused_losses(window: np.ndarray, exposure: float, key: int, horizon: int,
                     n_paths: int) -> np.ndarray:
    """The fused kernel's losses as a loop over steps: index (u·n)>>32, float64 sums in order."""
    groups = -(-horizon // 4)
    paths = np.arange(n_paths, dtype=np.uint64)
    total = np.zeros(n_paths)
    n = np.uint64(window.shape[0])
    for h in range(horizon):
        u = ref_philox4x32(key, paths * np.uint64(groups) + np.uint64(h // 4))[h % 4]
        total = total + window[((u * n) >> np.uint64(32)).astype(np.int64)]
    return -exposure * total


def _fused_kernel_or_skip(device: str):
    pytest.importorskip("triton", reason="triton is not installed")
    var_batch._build_kernel.cache_clear()
    kernel = var_batch._build_kernel(device == "cpu")
    var_batch._build_kernel.cache_clear()
    return kernel


def _uses_fused(backend: str, device: str | None) -> bool:
    if backend != "torch" or device != "cuda":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


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

    one_gens, batch_gens, sigma_gens = gens(), gens(), gens()
    want = [var_report(e, s, w, horizon, LEVELS, n_paths=paths, backend=backend, device=device,
                       generator=one_gens[sym]) for sym, e, s, w in items]
    fused = _uses_fused(backend, device)
    if fused:  # σ reports draw from the generator, which the fused bootstrap reports leave alone
        for i, (sym, e, s, w) in enumerate(items):
            if not (~np.isnan(w)).any():
                want[i] = var_report(e, s, w, horizon, LEVELS, n_paths=paths, backend=backend,
                                     device=device, generator=sigma_gens[sym])
    got = var_reports([VarRequest(e, s, w, batch_gens[sym]) for sym, e, s, w in items],
                      horizon, LEVELS, n_paths=paths, group_bytes=group_bytes)
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert set(g) == {"parametric", "historical", "mc"}
        for method in w:
            assert g[method].dtype == np.float64 and g[method].shape == (len(LEVELS),)
            window = items[i][3][~np.isnan(items[i][3])]
            if method == "mc" and fused and window.size:
                # the fused kernel's draws: the loop reference's, keyed by the report count
                sym = items[i][0]
                count = sum(1 for it in items[:i] if it[0] == sym)
                ref = np.sort(ref_fused_losses(window, items[i][1], report_key(
                    batch_gens[sym].seed, count), horizon, paths))
                np.testing.assert_array_equal(g["mc"], ref[var_batch._quantile_index(
                    np.asarray(LEVELS), paths)])
                continue
            np.testing.assert_array_equal(g[method], w[method], err_msg=method)
    # the generators advanced as far as one at a time: the next report is the same too
    sym, e, s, w = items[-1]
    nxt = var_report(e, s, w, horizon, LEVELS, n_paths=paths, backend=backend, device=device,
                     generator=one_gens[sym])
    again = var_reports([VarRequest(e, s, w, batch_gens[sym])], horizon, LEVELS, n_paths=paths)[0]
    if not _uses_fused(backend, device):
        np.testing.assert_array_equal(again["mc"], nxt["mc"])


@pytest.mark.parametrize(("backend", "device"), BACKENDS)
def test_a_report_does_not_depend_on_the_batch_it_fell_in(backend: str, device: str | None) -> None:
    if backend != "numpy":
        pytest.importorskip(backend, reason=f"{backend} is not installed")
    items = _windows(np.random.default_rng(6))

    def reports(split: int):
        gens = {s: new_generator(backend, 4, device, stream=s) for s in range(3)}
        reqs = [VarRequest(e, s, w, gens[sym]) for sym, e, s, w in items]
        return (var_reports(reqs[:split], 10, LEVELS, n_paths=2000)
                + var_reports(reqs[split:], 10, LEVELS, n_paths=2000))

    whole = reports(len(items))
    for split in (1, 4, 9):
        for a, b in zip(reports(split), whole, strict=True):
            np.testing.assert_array_equal(a["mc"], b["mc"])


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=_on("torch:cuda"))])
def test_fused_bootstrap_kernel_is_the_philox_loop_reference(device: str) -> None:
    torch = pytest.importorskip("torch")
    pytest.importorskip("triton", reason="triton is not installed")
    if device == "cpu" and unusable_reason("torch:cuda") is None:
        pytest.skip("the kernel runs on the GPU here ([cuda]); Triton's CPU interpreter is for "
                    "machines without one (and differs between Triton versions)")
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        # Triton's interpreter (CPU tensors) must be on before triton is first imported:
        # this test again in a process of its own
        here = f"{__file__}::test_fused_bootstrap_kernel_is_the_philox_loop_reference[cpu]"
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", here],
                              env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
        assert "1 passed" in done.stdout
        return
    kernel = _fused_kernel_or_skip(device)
    rng = np.random.default_rng(2)
    windows = [rng.standard_t(4, size=n) * 1e-3 for n in (1, 13, 1000)]
    horizon, n_paths = (5, 300) if device == "cpu" else (10, 20_000)
    keys = [report_key(7, i) for i in range(3)]
    exposure = np.array([1e5, -3e4, 2.5e5])
    rows, offsets = [2, 0, 1], np.cumsum([0] + [w.size for w in windows])
    meta = np.array([[rows[i], offsets[i], windows[i].size, keys[i]] for i in range(3)], dtype=np.int64)
    out = torch.full((3, n_paths), float("nan"), dtype=torch.float64, device=device)
    var_batch.bootstrap_losses(kernel, torch.as_tensor(np.concatenate(windows), device=device),
                               meta, exposure, horizon, n_paths, out)
    got = out.cpu().numpy()
    for i in range(3):
        np.testing.assert_array_equal(
            got[rows[i]], ref_fused_losses(windows[i], exposure[i], keys[i], horizon, n_paths))


@pytest.mark.gpu
def test_fused_reports_match_numpy_within_monte_carlo_error() -> None:
    if unusable_reason("torch:cuda") is not None or not _uses_fused("torch", "cuda"):
        pytest.skip("needs torch:cuda and triton")
    r = np.random.default_rng(11).standard_t(4, size=1000) * 1e-3
    want = var_report(1e6, 1e-3, r, 10, LEVELS, n_paths=400_000)["mc"]
    got = var_reports([VarRequest(1e6, 1e-3, r, new_generator("torch", 1, "cuda"))], 10, LEVELS,
                      n_paths=400_000)[0]["mc"]
    assert got == pytest.approx(want, rel=0.02), "quantile error at 400k paths is <0.5%"


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
    if _uses_fused(backend, device):  # one kernel, no chunks: chunk_elements changes nothing
        a = var_reports([VarRequest(1e5, 1e-3, w, new_generator(backend, 2, device))], 5, LEVELS,
                        n_paths=2000)[0]["mc"]
    np.testing.assert_array_equal(b["mc"], a)
    with pytest.raises(DataError, match="sigma"):
        var_reports([VarRequest(1e5, float("nan"), np.zeros(0), new_generator(backend, 2, device))],
                    5, LEVELS, n_paths=2000)


def test_no_requests_no_reports() -> None:
    assert var_reports([], 10, LEVELS) == []


@pytest.mark.parametrize(("backend", "device"), BACKENDS)
def test_copies_are_counted_on_a_gpu_only(backend: str, device: str | None) -> None:
    if backend != "numpy":
        pytest.importorskip(backend, reason=f"{backend} is not installed")
    items = _windows(np.random.default_rng(3))
    gens = {s: new_generator(backend, 4, device, stream=s) for s in range(3)}
    copies: list[tuple[str, int]] = []
    var_reports([VarRequest(e, s, w, gens[sym]) for sym, e, s, w in items], 10, LEVELS,
                n_paths=1000, count_copy=lambda d, n: copies.append((d, n)))
    if device in ("cuda", "gpu"):
        item = 4 if backend == "mlx" else 8
        windows = [int((~np.isnan(w)).sum()) for *_, w in items if (~np.isnan(w)).sum()]
        meta = 5 * 8 * len(windows) if _uses_fused(backend, device) else 0
        assert copies == [("h2d", sum(windows) * item + meta), ("d2h", len(items) * len(LEVELS) * item)]
    else:
        assert copies == []
