"""Benchmark: the analytics kernels against their loop references and a plain numpy formulation.

For each kernel, ticks per second, measured in one run on one synthetic stream (prices on a
0.1 tick grid, sweeps with equal timestamps, as in the real BTCUSDT file):

- ``kernel``: the pipeline's kernel on the whole array (one call, as ``analytics``);
- ``kernel/4096``: the same fed in batches of 4096 ticks with the state carried (streaming);
- ``loop ref``: the plain loop reference from ``tests/reference_analytics.py`` (on a prefix);
- ``vpin bar_ns=0 (BTCUSDT)``: the real USD-M trades of ``../shared/data`` repeated to
  the stream's length (their price changes, gaps and sizes), where present;
- ``numpy``: the quantity written the plain numpy/scipy way (no carried state, no loop
  per tick): EWMAs by block closed form, rolling std over a sliding window, buckets by
  interpolating cumulative buy volume, the account without limits. They are there to
  show what the kernel's formulation costs or saves, not as equivalents: they are not
  exact to 1e-12 (the bucket interpolation loses eps·C/V) nor split-independent.

Then Monte Carlo VaR of 1,000,000 paths (horizon 10 steps, normal) on numpy, torch CPU and
MLX CPU (where installed), and on ``--backend/--device`` (e.g. ``--backend torch --device cuda``; ``--gpu`` is short
for that). With ``--vpin-device cuda`` (also part of ``--gpu``), a table of VPIN throughput
by batch size, CPU kernel against ``vpin_update_torch`` on that device: where the GPU starts
to pay off. Timings are the best of ``--repeat`` runs, after one warm-up call (numba loads
its cache, torch initialises). Run:
``.venv/bin/python scripts/bench_kernels.py [--n 4000000] [--repeat 3] [--gpu]``.

The portfolio kernel (issue 17) gets its own table: output bars per second for 10, 100 and
500 symbols with a window of 500 returns, the heavy part (covariance and ``eigh`` of every
window) on numpy, torch CPU and MLX CPU, and on ``--portfolio-device`` (``--gpu``: cuda),
each with ``--portfolio-threads`` BLAS/torch threads (default 1, as the pipeline runs).
``--portfolio-only`` prints just that table.
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

try:  # the plain baseline's normal CDF (the `baselines` extra); math.erf where scipy is absent
    import scipy
    from scipy.special import ndtr
except ImportError:
    scipy = None

    def ndtr(x):
        """The standard normal CDF, elementwise, without scipy (same values to ~1 ulp)."""
        return 0.5 * (1.0 + np.vectorize(math.erf, otypes=[np.float64])(np.asarray(x) / math.sqrt(2.0)))

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import numba
from reference_analytics import (
    generated_trades,
    load_binance_um_trades,
    ref_features,
    ref_risk,
    ref_signal,
    ref_vpin,
)

from nautilus_pipeline.kernels.features import features_update, new_feature_state
from nautilus_pipeline.kernels.risk import (
    RiskParams,
    mc_var,
    new_risk_state,
    risk_update,
)
from nautilus_pipeline.kernels.signal import new_signal_state, signal_update
from nautilus_pipeline.kernels.vpin import (
    new_vpin_state,
    vpin_flush,
    vpin_update,
    vpin_update_torch,
)
from nautilus_pipeline.machine import describe

BATCH = 4096
REAL = (
    Path(__file__).resolve().parents[2]
    / "shared"
    / "data"
    / "binance-um-btcusdt-trades-20240808.csv"
)



def best(fn: Callable[[], object], repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def batched(update: Callable, state: object, arrays: tuple[np.ndarray, ...]) -> None:
    n = arrays[0].shape[0]
    for lo in range(0, n, BATCH):
        state, _ = update(state, *(a[lo : lo + BATCH] for a in arrays))


# ---------------------------------------------------------------- plain numpy formulations


def np_ewma(x: np.ndarray, half_life: float, block: int = 64) -> np.ndarray:
    """EWMA by the closed form inside blocks, y_t = a^(t+1)·(y0 + (1−a)·Σ a^(−s−1)·x_s)."""
    a = 0.5 ** (1.0 / half_life)
    n = x.shape[0]
    pad = (-n) % block
    xb = np.concatenate((x, np.zeros(pad))).reshape(-1, block)
    pw = a ** np.arange(1, block + 1)
    inner = (1.0 - a) * np.cumsum(xb / pw, axis=1) * pw
    # carry across blocks: y_end[b] = a^block·y_end[b−1] + inner[b, −1], a short loop over blocks
    ends = inner[:, -1].copy()
    decay = a**block
    for b in range(1, ends.shape[0]):
        ends[b] += decay * ends[b - 1]
    y0 = np.concatenate(([0.0], ends[:-1]))
    return (inner + y0[:, None] * pw).reshape(-1)[:n]


def np_features(
    ts: np.ndarray, price: np.ndarray, size: np.ndarray, side: np.ndarray
) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return _np_features(ts, price, size, side)


def _np_features(
    ts: np.ndarray, price: np.ndarray, size: np.ndarray, side: np.ndarray
) -> np.ndarray:
    r = np.concatenate(([0.0], np.diff(np.log(price))))
    dt = np.concatenate(([0.0], np.diff(ts) / 1e9))
    d = np.concatenate(([0.0], np.diff(price)))
    cols = [r]
    sv = side * size
    for h in (10, 100, 1000):
        cols += [np_ewma(r, h), np.sqrt(np_ewma(r * r, h)), np_ewma(sv, h) / np_ewma(size, h)]
    cols.append(np_ewma(dt, 100))
    g, lo = np_ewma(np.maximum(d, 0.0), 13.0), np_ewma(np.maximum(-d, 0.0), 13.0)
    cols.append(100.0 * g / (g + lo))
    cols.append(np.log(price / (np_ewma(price * size, 100) / np_ewma(size, 100))))
    return np.stack(cols, axis=1)


def np_vpin(
    price: np.ndarray, size: np.ndarray, bucket_volume: float, window: int, sigma_window: int
) -> np.ndarray:
    """bar_ns = 0: rolling std on a sliding window, cumulative buy volume interpolated at buckets."""
    dp = np.diff(price)
    sig = np.full(price.shape[0], np.nan)
    win = np.lib.stride_tricks.sliding_window_view(dp, sigma_window)
    sig[sigma_window:] = win.std(axis=1, ddof=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        f = np.where(sig > 0, ndtr(np.concatenate(([0.0], dp)) / sig), 0.5)
    cum_v = np.concatenate(([0.0], np.cumsum(size)))
    cum_b = np.concatenate(([0.0], np.cumsum(f * size)))
    bounds = bucket_volume * np.arange(1, int(cum_v[-1] // bucket_volume) + 1)
    buy = np.diff(np.interp(np.concatenate(([0.0], bounds)), cum_v, cum_b))
    oi = np.abs(2.0 * buy - bucket_volume)
    c = np.cumsum(oi)
    return (c[window - 1 :] - np.concatenate(([0.0], c[:-window]))) / (window * bucket_volume)


def np_account(price: np.ndarray, target: np.ndarray, fee_rate: float) -> np.ndarray:
    """Positions from signals filled at the next trade, cash and equity; no limits."""
    idx = np.where(np.isnan(target), -1, np.arange(target.shape[0]))
    np.maximum.accumulate(idx, out=idx)
    pos = np.where(idx >= 0, target[np.maximum(idx, 0)], 0.0)
    pos = np.concatenate(([0.0], pos[:-1]))
    q = np.diff(pos, prepend=0.0)
    cash = -np.cumsum(q * price + fee_rate * np.abs(q) * price)
    return cash + pos * price


def tiled_real(path: Path, n: int) -> dict[str, np.ndarray]:
    """The real BTCUSDT trades repeated to n ticks: price changes and time gaps as recorded."""
    t = load_binance_um_trades(str(path))
    reps = -(-n // t["price"].shape[0])
    dp = np.tile(np.diff(t["price"], prepend=t["price"][0]), reps)[:n]
    dp[0] = t["price"][0]
    gaps = np.tile(np.diff(t["ts_ns"], prepend=t["ts_ns"][0] - 1_000_000), reps)[:n]
    gaps[0] = t["ts_ns"][0]
    return {"ts_ns": np.cumsum(gaps), "price": np.cumsum(dp), "size": np.tile(t["size"], reps)[:n]}


# ---------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=4_000_000, help="ticks in the synthetic stream")
    ap.add_argument("--ref-n", type=int, default=20_000, help="ticks given to the loop references")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--paths", type=int, default=1_000_000, help="Monte Carlo VaR paths")
    ap.add_argument("--horizon", type=int, default=10, help="Monte Carlo VaR steps per path")
    ap.add_argument(
        "--backend", default=None, choices=["numpy", "torch", "mlx"], help="extra MC VaR backend"
    )
    ap.add_argument("--device", default=None, help="device of --backend: cuda, mps, gpu, cpu")
    ap.add_argument("--vpin-device", default=None, help="torch device for the VPIN crossover table")
    ap.add_argument(
        "--gpu", action="store_true",
        help="--backend torch --device cuda --vpin-device cuda --portfolio-device cuda",
    )
    ap.add_argument("--portfolio-only", action="store_true", help="only the portfolio table")
    ap.add_argument("--portfolio-device", default=None, help="extra torch device, e.g. cuda")
    ap.add_argument("--portfolio-symbols", default="10,100,500", help="symbol counts")
    ap.add_argument("--portfolio-window", type=int, default=500, help="returns per window")
    ap.add_argument("--portfolio-threads", type=int, default=1, help="BLAS and torch threads")
    args = ap.parse_args()
    if args.gpu:
        args.backend, args.device, args.vpin_device = "torch", "cuda", "cuda"
        args.portfolio_device = "cuda"
    if args.portfolio_only:
        print(f"machine: {describe()}")
        portfolio_table(args)
        return

    print(f"machine: {describe()}")
    print(
        f"python {platform.python_version()}, numpy {np.__version__}, scipy {scipy.__version__ if scipy else 'not installed (baseline CDF via math.erf)'}, "
        f"numba {numba.__version__}; numba threads {numba.get_num_threads()} (kernels are single-threaded)"
    )

    n, rn, rep = args.n, min(args.ref_n, args.n), args.repeat
    t = generated_trades(n, seed=42)
    ts, price, size, side = t["ts_ns"], t["price"], t["size"], t["side"]
    rts, rprice, rsize, rside = (a[:rn].tolist() for a in (ts, price, size, side))
    total = float(size.sum())
    target = np.full(n, np.nan)
    sig_at = np.random.default_rng(1).random(n) < 0.01
    target[sig_at] = np.random.default_rng(2).choice([-1.0, 0.0, 1.0], sig_at.sum())
    prob = np.random.default_rng(3).random(n)
    toxic = np.zeros(n, dtype=bool)
    kill = np.zeros(n, dtype=bool)
    risk_params = RiskParams(max_position=5.0, max_drawdown=1e9, max_orders=100, fee_rate=1e-4)
    print(f"stream: {n:,} synthetic trades; loop references on the first {rn:,}; best of {rep}\n")

    def vpin_whole(bar_ns: int, v: float) -> Callable[[], object]:
        def run() -> object:
            s, _ = vpin_update(new_vpin_state(v, bar_ns=bar_ns), ts, price, size)
            return vpin_flush(s)

        return run

    rows: list[tuple[str, float, float, float, float]] = []

    def row(
        name: str, whole: Callable, stream: Callable, ref: Callable, plain: Callable | None
    ) -> None:
        rate = [n / best(whole, rep), n / best(stream, rep), rn / best(ref, 1)]
        rate.append(n / best(plain, rep) if plain is not None else float("nan"))
        rows.append((name, *rate))
        print(f"  measured {name}", flush=True)

    row(
        "features (13 cols)",
        lambda: features_update(new_feature_state(), ts, price, size, side),
        lambda: batched(features_update, new_feature_state(), (ts, price, size, side)),
        lambda: ref_features(rts, rprice, rsize, rside),
        lambda: np_features(ts, price, size, side),
    )
    v0 = total / 50
    row(
        "vpin bar_ns=0",
        vpin_whole(0, v0),
        lambda: batched(vpin_update, new_vpin_state(v0, bar_ns=0), (ts, price, size)),
        lambda: ref_vpin(rts, rprice, rsize, bucket_volume=v0 * rn / n, bar_ns=0),
        lambda: np_vpin(price, size, v0, 50, 100),
    )
    if REAL.is_file():
        real = tiled_real(REAL, n)
        rv = float(real["size"].sum()) / 50
        row(
            "vpin bar_ns=0 (BTCUSDT)",
            lambda: vpin_flush(vpin_update(new_vpin_state(rv, bar_ns=0), *real.values())[0]),
            lambda: batched(vpin_update, new_vpin_state(rv, bar_ns=0), tuple(real.values())),
            lambda: ref_vpin(
                *(a[:rn].tolist() for a in real.values()), bucket_volume=rv * rn / n, bar_ns=0
            ),
            lambda: np_vpin(real["price"], real["size"], rv, 50, 100),
        )
    row(
        "vpin bar_ns=60s",
        vpin_whole(60_000_000_000, v0),
        lambda: batched(vpin_update, new_vpin_state(v0), (ts, price, size)),
        lambda: ref_vpin(rts, rprice, rsize, bucket_volume=v0 * rn / n),
        None,
    )
    row(
        "risk account+limits",
        lambda: risk_update(new_risk_state(risk_params), ts, price, target),
        lambda: batched(risk_update, new_risk_state(risk_params), (ts, price, target)),
        lambda: ref_risk(
            rts,
            rprice,
            target[:rn].tolist(),
            max_position=5.0,
            max_drawdown=1e9,
            max_orders=100,
            fee_rate=1e-4,
        ),
        lambda: np_account(price, target, 1e-4),
    )
    row(
        "signal rule",
        lambda: signal_update(new_signal_state(), prob, toxic, kill),
        lambda: batched(signal_update, new_signal_state(), (prob, toxic, kill)),
        lambda: ref_signal(prob[:rn].tolist(), toxic[:rn].tolist(), kill[:rn].tolist()),
        None,
    )

    print(f"\nticks/s (M = 1e6), {n:,} ticks")
    print(
        f"{'kernel':<26}{'kernel':>12}{'kernel/4096':>13}{'loop ref':>12}{'numpy':>12}{'vs ref':>9}"
    )
    for name, whole, stream, ref, plain in rows:
        plain_s = f"{plain / 1e6:10.1f} M" if plain == plain else f"{'—':>12}"
        print(
            f"{name:<26}{whole / 1e6:10.1f} M{stream / 1e6:11.1f} M{ref / 1e6:10.3f} M{plain_s}"
            f"{whole / ref:8.0f}×"
        )

    print(f"\nMonte Carlo VaR, {args.paths:,} paths × {args.horizon} steps, normal, levels 95/99%")
    runs = [("numpy", None), ("torch", "cpu"), ("mlx", "cpu")]
    if args.backend and (args.backend, args.device) not in runs:
        runs.append((args.backend, args.device))
    for backend, device in runs:

        def go(backend: str = backend, device: str | None = device) -> np.ndarray:
            out = mc_var(
                0.001,
                1e6,
                args.horizon,
                args.paths,
                (0.95, 0.99),
                seed=1,
                backend=backend,
                device=device,
            )
            if backend == "torch" and device and device.startswith("cuda"):
                import torch

                torch.cuda.synchronize()
            return out

        try:
            sec = best(go, rep)
        except Exception as exc:  # a missing backend is reported, not fatal
            print(f"  {backend:<6} {device or '':<6} unavailable: {exc}")
            if args.gpu and backend == "torch":
                raise
            continue
        var = go()
        print(
            f"  {backend:<6} {device or 'cpu':<6} {sec * 1e3:9.1f} ms   VaR95 {var[0]:,.0f}  VaR99 {var[1]:,.0f}"
        )
    if args.vpin_device:
        vpin_crossover(t, args.vpin_device, rep)
    portfolio_table(args)


def vpin_crossover(trades: dict[str, np.ndarray], device: str, repeat: int) -> None:
    """Batch sizes at which the torch VPIN variant on ``device`` overtakes the CPU kernel."""
    import torch

    ts, price, size = trades["ts_ns"], trades["price"], trades["size"]
    n = ts.shape[0]
    v = float(size.sum()) / 50

    def stream(update: Callable, batch: int, **kw: object) -> None:
        state = new_vpin_state(v, bar_ns=0)
        for lo in range(0, n, batch):
            state, _ = update(
                state, ts[lo : lo + batch], price[lo : lo + batch], size[lo : lo + batch], **kw
            )
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    print(
        f"\nVPIN bar_ns=0 by batch size, {n:,} trades: CPU kernel vs torch on {device} (M trades/s)"
    )
    print(f"{'batch':>10}{'cpu':>10}{device:>10}{'gpu/cpu':>9}")
    for batch in (4096, 16384, 65536, 262144, 1 << 20, n):
        if batch > n:
            continue
        cpu = n / best(lambda b=batch: stream(vpin_update, b), repeat)
        gpu = n / best(lambda b=batch: stream(vpin_update_torch, b, device=device), repeat)
        print(f"{batch:>10,}{cpu / 1e6:10.1f}{gpu / 1e6:10.1f}{gpu / cpu:8.2f}×")


def portfolio_stream(n: int, bars: int, window: int, seed: int = 0) -> dict[str, np.ndarray]:
    """``bars`` one-second bars in which each of ``n`` symbols trades once (one factor + noise)."""
    rng = np.random.default_rng(seed)
    r = rng.normal(0, 1e-4, (bars, n)) + rng.normal(0, 2e-4, (bars, 1))
    close = 100.0 * np.exp(np.cumsum(r, axis=0))
    return {
        "symbol_index": np.tile(np.arange(n, dtype=np.int64), bars),
        "ts_ns": np.repeat(np.arange(bars, dtype=np.int64) * 1_000_000_000, n)
        + np.tile(np.arange(n, dtype=np.int64), bars),
        "price": close.reshape(-1),
    }


def portfolio_table(args: argparse.Namespace) -> None:
    """Output bars/s of the portfolio kernel by symbol count and backend (after a full window)."""
    from threadpoolctl import threadpool_limits

    from nautilus_pipeline.kernels.portfolio import (
        new_portfolio_state,
        portfolio_flush,
        portfolio_update,
    )

    window, threads = args.portfolio_window, args.portfolio_threads
    runs: list[tuple[str, str | None]] = [("numpy", None), ("torch", "cpu"), ("mlx", None)]
    if args.portfolio_device:
        runs.append(("torch", args.portfolio_device))
    try:
        import torch

        torch.set_num_threads(threads)
    except ImportError:
        torch = None
    counts = [int(x) for x in args.portfolio_symbols.split(",")]
    results: dict[tuple[int, str], float] = {}
    print(f"\nportfolio kernel, window {window}, {threads} BLAS/torch thread(s): output bars/s")
    with threadpool_limits(threads):
        for n in counts:
            timed = max(8, min(2000, 2_000_000 // (n * n)))
            t = portfolio_stream(n, window + 2 + timed, window)
            warm_rows = (window + 2) * n
            state0 = new_portfolio_state(n, bar_ns=1_000_000_000, window=window)
            state0, _ = portfolio_update(
                state0, *(t[k][:warm_rows] for k in ("symbol_index", "ts_ns", "price"))
            )
            rest = tuple(t[k][warm_rows:] for k in ("symbol_index", "ts_ns", "price"))
            for backend, device in runs:
                label = backend if device is None else f"{backend}:{device}"

                def go(backend=backend, device=device, state0=state0, rest=rest) -> int:
                    s, out = portfolio_update(state0, *rest, backend=backend, device=device)
                    _, tail = portfolio_flush(s, backend=backend, device=device)
                    return out["ts_ns"].shape[0] + tail["ts_ns"].shape[0]

                try:
                    assert go() == timed + 1  # the open warm-up bar closes here too
                    sec = best(go, max(1, min(args.repeat, 3)))
                except ImportError as exc:
                    print(f"  {label}: unavailable ({exc})")
                    continue
                results[(n, label)] = (timed + 1) / sec
                print(f"  measured n={n} {label}: {timed + 1} bars in {sec:.3f} s", flush=True)
    labels = [lb for lb in dict.fromkeys(lb for _, lb in results)]
    print(f"{'symbols':>8}" + "".join(f"{lb:>14}" for lb in labels) + f"{'best':>14}")
    for n in counts:
        rates = {lb: results[(n, lb)] for lb in labels if (n, lb) in results}
        top = max(rates, key=rates.get)
        print(f"{n:>8}" + "".join(f"{rates.get(lb, float('nan')):14,.1f}" for lb in labels)
              + f"{top:>14}")
    if torch is not None and not any(d and d.startswith("cuda") for _, d in runs):
        print("torch CUDA not measured here (no --portfolio-device cuda / --gpu)")


if __name__ == "__main__":
    main()
