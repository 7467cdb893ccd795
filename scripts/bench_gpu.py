"""GPU kernels against the host CPU, by size: Monte Carlo VaR, the features recurrences.

Each row is the median of ``--repeat`` timed calls after two warm-up calls; every call is
synchronous as the pipeline sees it (the device is synchronised before the clock stops,
and the result is on the host). Before timing, each GPU result is checked against the CPU
kernel (VaR within Monte Carlo error; features within the stated float64 tolerance).

- **Monte Carlo VaR**, ``--paths`` × ``--horizon`` normal steps, levels 95/99 %: numpy on
  the host, torch on CUDA (float64), MLX on its GPU (float32), where present.
- **Features** (``kernels.features_torch`` vs ``kernels.features.features_update``), one
  symbol's trades per batch, batch sizes 4,096 … 1,048,576: rows/s of each and the ratio,
  the crossover that sets the features stage's ``gpu_min_batch``.

    python3 scripts/bench_gpu.py [--paths 1000000] [--horizon 10] [--repeat 20]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from reference_analytics import generated_trades

from nautilus_pipeline.compute import unusable_reason
from nautilus_pipeline.kernels.features import features_update, new_feature_state
from nautilus_pipeline.kernels.risk import mc_var
from nautilus_pipeline.machine import describe


def median_s(fn: Callable[[], object], repeat: int, sync: Callable[[], None]) -> float:
    for _ in range(2):
        fn()
        sync()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def cuda_sync() -> None:
    import torch

    torch.cuda.synchronize()


def mc_var_table(paths: int, horizon: int, repeat: int) -> None:
    print(f"\nMonte Carlo VaR, {paths:,} paths × {horizon} steps, normal, levels 95/99 %")
    print(f"{'backend':<12}{'device':<8}{'dtype':<9}{'median ms':>10}{'VaR95':>12}{'VaR99':>12}")
    runs = [("numpy", None, "float64", lambda: None)]
    if unusable_reason("torch:cuda") is None:
        runs.append(("torch", "cuda", "float64", cuda_sync))
    else:
        print(f"  torch cuda: {unusable_reason('torch:cuda')}")
    if unusable_reason("mlx:gpu") is None:
        runs.append(("mlx", "gpu", "float32", lambda: None))
    else:
        print(f"  mlx gpu: {unusable_reason('mlx:gpu')}")
    ref = None
    for backend, device, dtype, sync in runs:

        def go(b: str = backend, d: str | None = device) -> np.ndarray:
            return mc_var(0.001, 1e6, horizon, paths, (0.95, 0.99), seed=1, backend=b, device=d)

        var = go()
        if ref is None:
            ref = var
        elif not np.allclose(var, ref, rtol=0.01):
            raise SystemExit(f"mc_var {backend}:{device} gives {var}, numpy {ref}: beyond MC error")
        sec = median_s(go, repeat if backend != "numpy" else max(3, repeat // 5), sync)
        print(f"{backend:<12}{device or 'cpu':<8}{dtype:<9}{sec * 1e3:10.2f}{var[0]:12,.0f}{var[1]:12,.0f}")


def features_table(repeat: int, device: str) -> None:
    from nautilus_pipeline.kernels.features_torch import FEATURES_ATOL, features_update_torch

    print(f"\nfeatures, one symbol's trades per batch: CPU kernel vs torch:{device} scan (M rows/s)")
    print(f"{'batch':>10}{'cpu':>9}{device:>9}{'gpu/cpu':>9}{'max |diff|':>12}")
    n_max = 1 << 20
    t = generated_trades(n_max + 64, seed=5)
    warm_n = 64  # seed the state (RSI, first trade) on the CPU, as the stage does
    st0, _ = features_update(
        new_feature_state(), t["ts_ns"][:warm_n], t["price"][:warm_n], t["size"][:warm_n],
        t["side"][:warm_n],
    )
    sync = cuda_sync if device.startswith("cuda") else (lambda: None)
    for batch in (4096, 16_384, 65_536, 262_144, n_max):
        sl = slice(warm_n, warm_n + batch)
        args = (t["ts_ns"][sl], t["price"][sl], t["size"][sl], t["side"][sl])
        _, want = features_update(st0, *args)
        _, got = features_update_torch(st0, *args, device=device)
        diff = float(np.nanmax(np.abs(got - want)))
        if not np.allclose(got, want, atol=FEATURES_ATOL, rtol=FEATURES_ATOL, equal_nan=True):
            raise SystemExit(f"features on {device} differ from the CPU kernel by {diff}")
        reps = max(3, repeat // 4) if batch >= 262_144 else repeat
        cpu = batch / median_s(lambda a=args: features_update(st0, *a), reps, lambda: None)
        gpu = batch / median_s(lambda a=args: features_update_torch(st0, *a, device=device), reps, sync)
        print(f"{batch:>10,}{cpu / 1e6:9.2f}{gpu / 1e6:9.2f}{gpu / cpu:8.2f}×{diff:12.1e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--paths", type=int, default=1_000_000)
    ap.add_argument("--horizon", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--features-device", default=None,
                    help="torch device for the features table (default: cuda if present)")
    args = ap.parse_args()
    print(f"machine: {describe()}")
    mc_var_table(args.paths, args.horizon, args.repeat)
    dev = args.features_device or ("cuda" if unusable_reason("torch:cuda") is None else None)
    if dev is not None:
        features_table(args.repeat, dev)
    else:
        print("\nfeatures: no CUDA device (give --features-device cpu to time the torch scan on the CPU)")


if __name__ == "__main__":
    main()
