"""Inference latency and throughput of every backend present, on one MLP, in one run.

Per runner: latency p50/p99 of single-row calls (batch 1, the live path), and throughput
(rows/s, from the median call time) at batch 256 and 4096 (replay / backfill). Every
runner's output is checked against the float64 reference first (``max err`` column). Each
call is synchronous and includes the host→device→host copies, as the pipeline sees it.

The model is the seeds' shape, 50 → 128 → 64 → 32 → 1 with random weights (so numbers
compare with the seeds' claims: 0.037 ms at batch 1 and 958K rows/s at batch 256 on an
M4 Max), or the shipped default model with ``--default-model``. ``torch-cuda graphs`` captures
the host↔device copies inside the graph; ``graphs/c`` issues them outside it.

    .venv/bin/python scripts/bench_inference.py [--default-model] [--calibrate] [--calls 3000]
    .venv/bin/python scripts/bench_inference.py --fixed-order   # the inference stage's two CPU paths
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

from nautilus_pipeline.kernels.mlp import mlp_reference
from nautilus_pipeline.machine import describe
from nautilus_pipeline.model.runners import calibrate, make_runner, runner_usable, time_calls
from nautilus_pipeline.model.spec import ModelSpec, load_default_model, random_weights

VARIANTS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("numpy", "numpy", {}),
    ("torch-cpu eager", "torch:cpu", {}),
    ("torch-cpu script", "torch:cpu", {"mode": "script"}),
    ("mlx-cpu eager", "mlx:cpu", {}),
    ("mlx-cpu compiled", "mlx:cpu", {"compile": True}),
    ("torch-cuda eager", "torch:cuda", {"cuda_graphs": False}),
    ("torch-cuda graphs", "torch:cuda", {"cuda_graphs": True}),  # 4096-row tiles, graphs of 1 and 4
    # smaller tiles: lower batch-1 latency, more launches for a large batch (same bits per tile size)
    ("torch-cuda graphs t256", "torch:cuda", {"cuda_graphs": True, "tile_rows": 256, "graph_tiles": (1, 16)}),
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


def fixed_order_table(spec: ModelSpec, w: Any, reps_rows: int = 40_000) -> None:
    """The inference stage's numpy path, ``kernels.mlp.RowOrderForward`` (one numba call,
    sums in one order), beside BLAS on rows padded to 16 (``mlp_forward``, what the stage
    ran before): median µs per call by rows, side by side in one run, and whether each gives
    the bits of batch 4,096 for the same rows (the rule every analytic keeps)."""
    from nautilus_pipeline.kernels.mlp import MLPWorkspace, RowOrderForward, mlp_forward

    ws = MLPWorkspace(w.mean, w.std, w.weights, w.biases, spec.activation, 4096)
    fixed = RowOrderForward(ws)
    rng = np.random.default_rng(1)
    feats = rng.standard_normal((4096, spec.n_inputs)) * w.std + w.mean
    x32 = np.zeros((4096, spec.n_inputs), dtype=np.float32)

    def blas(n: int, out: np.ndarray) -> None:
        rows = -(-n // 16) * 16
        x = x32[:rows]
        np.copyto(x[:n], feats[:n], casting="same_kind")
        x[n:] = 0.0
        out[:n] = mlp_forward(ws, x)[:n]

    def row_order(n: int, out: np.ndarray) -> None:
        fixed(feats, n, out)

    paths = {"blas (16-row pad)": blas, "row order (numba)": row_order}
    full = {}
    for name, fn in paths.items():
        full[name] = np.empty(4096, np.float32)
        fn(4096, full[name])
    print("\nfixed order vs BLAS: median µs per call, same bits as batch 4096 for those rows "
          "(one BLAS thread, as a pipeline runs it)")
    print(f"{'rows':>6} " + " ".join(f"{n:>24}" for n in paths))
    for n in (1, 16, 256, 4096):
        cells = []
        for name, fn in paths.items():
            out = np.empty(4096, np.float32)
            reps = max(20, reps_rows // n)
            t = []
            for _ in range(reps):
                t0 = time.perf_counter_ns()
                fn(n, out)
                t.append(time.perf_counter_ns() - t0)
            same = out[:n].tobytes() == full[name][:n].tobytes()
            cells.append(f"{np.median(t) / 1e3:>12.1f} µs  {'same' if same else 'DIFFER':>6}")
        print(f"{n:>6} " + " ".join(f"{c:>24}" for c in cells))


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
    ap.add_argument("--path", choices=("tiled", "predict"), default="tiled",
                    help="tiled (default): predict_tiled, what the inference stage calls (every row "
                         "in a call of the runner's tile size); predict: one call over the batch")
    ap.add_argument("--fixed-order", action="store_true",
                    help="only the inference stage's numpy paths: fixed-order numba vs padded BLAS")
    args = ap.parse_args()

    if args.default_model or args.fixed_order:
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
    header.append(f"timed: {'predict_tiled (the stage path)' if args.path == 'tiled' else 'predict (one call)'}")
    for line in header:
        print(line)
    if args.fixed_order:
        from threadpoolctl import threadpool_limits

        with threadpool_limits(1, user_api="blas"):  # as a pipeline runs it (blas_threads=1)
            fixed_order_table(spec, w)
        return
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
            runner = make_runner(backend, spec, w, **options)
            call = runner.predict_tiled if args.path == "tiled" else runner.predict
            outs = {b: np.empty(b, np.float32) for b in xs}
            err = float(np.max(np.abs(call(xs[4096], outs[4096]) - ref)))
            x1 = xs[1]
            out1 = outs[1]
            t1 = time_calls(
                lambda call=call, x1=x1, out1=out1: call(x1, out1),
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
                    lambda call=call, xb=xb, ob=outs[b]: call(xb, ob),
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
