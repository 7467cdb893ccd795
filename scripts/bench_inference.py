"""Inference latency and throughput of every backend present, on one MLP, in one run.

Per runner: latency p50/p99 of single-row calls (batch 1, the live path), and throughput
(rows/s, from the median call time) at batch 256 and 4096 (replay / backfill). ``numpy
fixed-order`` is what the inference stage runs on the CPU (``kernels.mlp.RowForward``: the
same math summed in one order whatever the batch), beside the BLAS ``numpy`` runner. Every
runner's output is checked against the float64 reference first (``max err`` column). Each
call is synchronous and includes the host→device→host copies, as the pipeline sees it.

The model is the seeds' shape, 50 → 128 → 64 → 32 → 1 with random weights (so numbers
compare with the seeds' claims: 0.037 ms at batch 1 and 958K rows/s at batch 256 on an
M4 Max), or the shipped default model with ``--default-model``. ``torch-cuda graphs`` captures
the host↔device copies inside the graph; ``graphs/c`` issues them outside it.

    .venv/bin/python scripts/bench_inference.py [--default-model] [--calibrate] [--calls 3000]
    python3 scripts/bench_inference.py --gpu     # on a GPU machine: fails if no GPU backend ran
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nautilus_pipeline.kernels.mlp import RowForward, mlp_reference
from nautilus_pipeline.machine import describe
from nautilus_pipeline.model.runners import calibrate, make_runner, runner_usable, time_calls
from nautilus_pipeline.model.spec import ModelSpec, load_default_model, random_weights

VARIANTS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("numpy", "numpy", {}),
    ("numpy fixed-order", "numpy", {"fixed_order": True}),
    ("torch-cpu eager", "torch:cpu", {}),
    ("torch-cpu script", "torch:cpu", {"mode": "script"}),
    ("mlx-cpu eager", "mlx:cpu", {}),
    ("mlx-cpu compiled", "mlx:cpu", {"compile": True}),
    ("torch-cuda eager", "torch:cuda", {"cuda_graphs": False}),
    ("torch-cuda graphs", "torch:cuda", {"cuda_graphs": True, "graph_batches": (1, 256, 4096)}),
    (
        "torch-cuda graphs/c",
        "torch:cuda",
        {"cuda_graphs": True, "graph_batches": (1, 256, 4096), "graph_copies": False},
    ),
    ("torch-mps eager", "torch:mps", {}),
    ("mlx-gpu eager", "mlx:gpu", {}),
    ("mlx-gpu compiled", "mlx:gpu", {"compile": True}),
    ("coreml-ane", "coreml:ane", {}),
    ("coreml-all", "coreml:all", {}),
    ("coreml-cpu", "coreml:cpu", {}),
)


def machine() -> list[str]:
    """CPU model, cores, GPU and library versions, for the table's header."""
    out = [f"cpu: {describe()}, numpy {np.__version__}"]
    libs = []
    try:
        import torch

        libs.append(f"torch {torch.__version__} ({torch.get_num_threads()} threads)")
        if torch.cuda.is_available():
            out.append(f"gpu: {torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda}")
    except ImportError:
        pass
    try:
        import mlx.core as mx

        libs.append(f"mlx {mx.__version__}")
    except ImportError:
        pass
    out.append("libs: " + ", ".join(libs))
    blas = os.environ.get("OPENBLAS_NUM_THREADS", "unset")
    omp = os.environ.get("OMP_NUM_THREADS", "unset")
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    out.append(f"OPENBLAS_NUM_THREADS={blas} OMP_NUM_THREADS={omp}; load average: {load}")
    return out


class FixedOrder:
    """The numpy runner's weights through ``RowForward``, behind the runner's ``predict``."""

    def __init__(self, runner: Any) -> None:
        self.fwd = RowForward(runner._ws)
        self.close = runner.close

    def predict(self, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        out = np.empty(x.shape[0], np.float32) if out is None else out
        self.fwd(x, x.shape[0], out)
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--default-model", action="store_true", help="bench the shipped default model")
    ap.add_argument("--calls", type=int, default=3000, help="batch-1 calls timed per runner")
    ap.add_argument("--budget", type=float, default=1.0, help="seconds per large-batch cell")
    ap.add_argument("--only", nargs="*", help="runner labels to run (default: all present)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument(
        "--calibrate",
        action="store_true",
        help="also run model.runners.calibrate over the measured runners and print its routing",
    )
    ap.add_argument(
        "--gpu",
        action="store_true",
        help="GPU machine run: exit 1 unless at least one GPU backend was measured",
    )
    args = ap.parse_args()

    if args.default_model:
        spec, w = load_default_model()
        model = "default model"
    else:
        spec = ModelSpec(tuple(f"f{i}" for i in range(50)), hidden=(128, 64, 32))
        w = random_weights(spec, 0)
        model = "random weights"
    rng = np.random.default_rng(0)
    xs = {
        b: (rng.standard_normal((b, spec.n_inputs)) * w.std + w.mean).astype(np.float32)
        for b in (1, 256, 4096)
    }
    ref = mlp_reference(xs[4096], w.mean, w.std, w.weights, w.biases, spec.activation)

    header = machine()
    header.insert(
        0, f"model: {' → '.join(map(str, spec.layer_sizes))}, {spec.activation}, {model}, float32"
    )
    for line in header:
        print(line)
    print()
    widths = (19, 10, 10, 12, 13, 8)
    names = ("runner", "b=1 p50 µs", "b=1 p99 µs", "b=256 rows/s", "b=4096 rows/s", "max err")
    print(
        "| "
        + " | ".join(
            f"{n:<{w}}" if i == 0 else f"{n:>{w}}"
            for i, (n, w) in enumerate(zip(names, widths, strict=True))
        )
        + " |"
    )
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    results: list[dict[str, Any]] = []
    absent: list[str] = []
    built = []
    for label, backend, options in VARIANTS:
        if args.only and label not in args.only:
            continue
        ok, why = runner_usable(backend)
        if not ok:
            absent.append(f"{label}: {why}")
            continue
        try:
            fixed = options.get("fixed_order", False)
            runner = make_runner(backend, spec, w, **{k: v for k, v in options.items() if k != "fixed_order"})
            if fixed:
                runner = FixedOrder(runner)
            err = float(np.max(np.abs(runner.predict(xs[4096]) - ref)))
            x1 = xs[1]
            out1 = np.empty(1, np.float32)
            t1 = time_calls(
                lambda r=runner, x1=x1, out1=out1: r.predict(x1, out1),
                min_repeats=args.calls,
                max_repeats=args.calls,
                budget_s=0.0,
                warmup=50,
            )
            row: dict[str, Any] = {
                "runner": label,
                "b1_p50_us": float(np.percentile(t1, 50)),
                "b1_p99_us": float(np.percentile(t1, 99)),
                "max_err": err,
            }
            for b in (256, 4096):
                xb = xs[b]
                tb = time_calls(
                    lambda r=runner, xb=xb: r.predict(xb),
                    min_repeats=10,
                    budget_s=args.budget,
                    warmup=5,
                )
                row[f"b{b}_rows_per_s"] = b / (float(np.median(tb)) * 1e-6)
        except Exception as e:  # a backend that breaks is reported, not fatal to the table
            absent.append(f"{label}: failed: {type(e).__name__}: {e}")
            continue
        results.append(row)
        runner.name = label
        if not isinstance(runner, FixedOrder):  # calibrate() routes between real runners
            built.append(runner)
        print(
            f"| {label:<19} | {row['b1_p50_us']:>10.1f} | {row['b1_p99_us']:>10.1f} | "
            f"{row['b256_rows_per_s']:>12,.0f} | {row['b4096_rows_per_s']:>13,.0f} | "
            f"{err:>8.1e} |",
            flush=True,
        )
    for line in absent:
        print(f"absent: {line}")
    if args.calibrate:
        cal = calibrate(built, spec, w, budget_s=args.budget / 4)
        print("\ncalibrate(): median µs per call, * = routed there")
        print(cal.format())
    gpu_rows = [
        r for r in results if any(g in r["runner"] for g in ("cuda", "mps", "gpu", "coreml"))
    ]
    if args.gpu and not gpu_rows:
        print("--gpu: no GPU backend was measured on this machine")
        sys.exit(1)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "machine": header,
                    "results": results,
                    "absent": absent,
                    "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
