#!/usr/bin/env bash
# The GPU check on the lent GPU machine: install the carried wheels (MLX's CUDA build too,
# when its two halves were carried), run the tests, the pipelines and the GPU benchmarks, and
# leave every output in $OUT (or ./gpu_out). The machine has torch, numpy, scipy, numba,
# pyarrow, uvloop and pytest but no internet: the rest travels as wheels in .whl/ (README,
# "GPU check"), MLX's CUDA wheel (90 MB, over one call's 64 MiB) in two halves, .mlx-a/ and
# .mlx-b/, made by ../shared/tools/mlx-cuda/prepare.sh. /tmp survives between two calls only
# while the machine is warm (30 s), hence two calls, the second right after the first:
#
#   1) carry [".whl", ".mlx-a"]:          bash scripts/gpu_check.sh stage
#   2) carry [".mlx-b", ...]:             bash scripts/gpu_check.sh [all|tests,pipeline,engine,bench]
#
# "gputests" runs only the GPU and MLX tests (by name), e.g. "gputests,pipeline" in one call.
# "tiles": the files that hold a prediction's bits to its batch (the model's tiles and its start-up probe, the batch
# merge against one sequential run, the stage at batch 1/7/4096, the backends, the GPU chain), whole,
# by name only (TILES_TIMEOUT, default 300 s).
# "batch": scripts/bench_batch.py at BATCH_WORKERS local workers, BATCH_TRADES per file, BATCH_DAYS files a symbol (16 symbols), BATCH_ROUNDS rounds (medians) (default pipeline on the
# host's cores), then `batch pipelines/gpu.toml --workers N` on the same files (GPU_WORKERS);
# BATCH_BIG=N: no scaling table, 16 generated files of N trades each for the gpu.toml runs;
# GPU_MPS=1: those runs again under CUDA MPS (one GPU context shared by the workers);
# GPU_MPS_MODES="off on on off" (with GPU_MPS=1): the order of the runs without and with it
# (default "off on"; a mode that is not "on" runs without it).
# GPU_MEMORY="auto pinned" and GPU_ROUNDS=N: those runs per slab memory, alternating, N rounds.
# GPU_BEFORE=DIR (a carried checkout, e.g. .gpuwt/base): each of those runs with DIR's package first, A/B.
# "profile": scripts/profile_pipeline.py on 10M generated trades through pipelines/gpu.toml at
# each of PROFILE_BATCHES (phases, stages' busy time, pool), then one sampled run at
# SAMPLE_BATCH (none: no sampled run); BEFORE=/path/of/another/checkout runs that checkout's package first, same file;
# PROFILE_COLD=1 adds a run with the calibration cache off (every calibration measured).
# "cores": scripts/bench_core_sharing.py --threads (CORE_THREADS, default "1 2 4 8 16"), by name only.
# "pairs": scripts/probe_cpu_pairs.py --all (which CPUs share a core), then bench_batch.py --control with
# PAIRS_PROCESSES (default 8) lone processes pinned one per core found apart vs the first N CPUs; by name only.
# "bridge": scripts/bench_bridge.py (BRIDGE_ONLY tables, default pipeline; BRIDGE_MODES, BRIDGE_TICKS,
# BRIDGE_REPEAT) with nats-server carried as .natsbin/nats-server (the machine has none); by name only.
# "pipeline_ab": BEFORE=/path/of/another/checkout: gpu.toml on 10M generated trades, BEFORE's package and this
# one alternately, AB_ROUNDS rounds at each of SIZES_10M (default 65536).
#
# Without the MLX halves step 2 runs everything else and says that MLX was not carried.
# (From a helper's worktree: copy it into the session checkout's ignored .gpuwt/, carry
# that too, and run from there; the wheels and MLX halves stay in the checkout's root.)
set -uo pipefail
cd "$(dirname "$0")/.."
what=${1:-all}
want() { [ "$what" = all ] || [[ ",$what," == *",$1,"* ]]; }
out=${OUT:-gpu_out}
mkdir -p "$out"
# where .whl/.mlx-a/.mlx-b are: here, or the checkout above a copied .gpuwt/ (or .gpuwt/NAME/)
root=$PWD
for up in . .. ../..; do
  if [ -d "$up/.whl" ] || [ -d "$up/.mlx-b" ] || [ -d "$up/.mlx-a" ]; then root=$(cd "$up" && pwd); break; fi
done
export PYTHONUNBUFFERED=1 PYTHONPATH="/tmp/mlx/site:/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"

install_wheels() {
  if [ -d "$root/.whl" ] && ls "$root"/.whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site "$root"/.whl/*.whl || exit 1
    echo "wheels: installed $(ls "$root"/.whl | wc -l) from .whl into /tmp/site"
  elif python3 -c 'import structlog, orjson' 2>/dev/null; then
    echo "wheels: none carried, the ones installed before are there"
  else
    echo "wheels: none carried and structlog/orjson missing: carry .whl (README, GPU check)"; exit 1
  fi
}

if [ "$what" = stage ]; then
  install_wheels
  mkdir -p /tmp/mlx
  if [ -d "$root/.mlx-a" ]; then cp "$root"/.mlx-a/* /tmp/mlx/ && echo "mlx: first half staged in /tmp/mlx"
  else echo "mlx: .mlx-a not carried, nothing staged"; fi
  exit 0
fi

python3 -c 'import structlog' 2>/dev/null || install_wheels
# MLX's CUDA build: reassemble the two halves, check, install both mlx wheels in ONE pip call
if python3 -c 'import mlx.core' 2>/dev/null; then
  mlx_note="mlx: $(python3 -c 'import mlx.core as mx; print(mx.__version__, mx.default_device())') (installed before)"
elif [ -f "$root/.mlx-b/part.01" ] && [ -f /tmp/mlx/part.00 ] && [ ! -f "$root/.mlx-b/wheel.sha256" ]; then
  # prepare.sh prints the wheel's sha256 and name; they go into .mlx-b/wheel.sha256 as "SUM NAME"
  mlx_note="mlx: .mlx-b/wheel.sha256 missing (write 'SHA256 mlx_cuda_13-...whl' there, as prepare.sh prints): MLX tests skip"
elif [ -f "$root/.mlx-b/part.01" ] && [ -f /tmp/mlx/part.00 ]; then
  read -r sum name < "$root/.mlx-b/wheel.sha256"
  cat /tmp/mlx/part.00 "$root/.mlx-b/part.01" > "/tmp/mlx/$name"
  if echo "$sum  /tmp/mlx/$name" | sha256sum -c --quiet - && python3 -m pip install -q --no-index \
      --no-deps --no-compile --target /tmp/mlx/site /tmp/mlx/mlx-*-cp312-*.whl "/tmp/mlx/$name"; then
    mlx_note="mlx: CUDA build from the carried halves, $(python3 -c 'import mlx.core as mx; print(mx.__version__, "default device", mx.default_device())')"
  else
    mlx_note="mlx: the carried halves did not reassemble (sha256) or install: MLX tests skip"
  fi
else
  mlx_note="mlx: not carried (stage .mlx-a, then carry .mlx-b: ../shared/tools/mlx-cuda/README.md); MLX tests skip"
fi
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c 'import sys, torch, numpy; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "numpy", numpy.__version__)'
  echo "$mlx_note"
  nproc
} 2>&1 | tee "$out/machine.txt"

rc=0
if want tests; then
  # the whole suite: GPU tests run here; tests needing coremltools or a Mac skip with the reason;
  # the bridge's tests take the carried nats-server (.natsbin); TESTS_TIMEOUT (s, default 300)
  [ -x "$root/.natsbin/nats-server" ] && export PATH="$root/.natsbin:$PATH"
  timeout "${TESTS_TIMEOUT:-300}" python3 -m pytest -q -p no:cacheprovider -rs tests 2>&1 | tail -n 80 | tee "$out/tests.txt"
  rc=${PIPESTATUS[0]}
fi
if [[ ",$what," == *",tiles,"* ]]; then
  [ -x "$root/.natsbin/nats-server" ] && export PATH="$root/.natsbin:$PATH"
  timeout "${TILES_TIMEOUT:-300}" python3 -m pytest -p no:cacheprovider -rs -v --tb=short tests/test_model_tiles.py tests/test_model_invariance.py \
    tests/test_engine_inline.py tests/test_batch.py tests/test_model_backends.py tests/test_gpu_chain.py 2>&1 \
    | grep -vE "^\s*$|pipeline_closed|\[info" | tail -n 150 | tee "$out/tests_tiles.txt" | grep -E "FAIL|ERROR|passed|failed"
  [ "${PIPESTATUS[0]}" = 0 ] || rc=1
fi
if want tests || want gputests; then
  # the GPU and MLX tests by name, so the log shows each one passed
  timeout 120 python3 -m pytest -p no:cacheprovider -rs -v tests -k "mlx or cuda or gpu" 2>&1 \
    | grep -E "PASS|FAIL|SKIP|ERROR|passed|failed" | tee "$out/tests_gpu.txt"
  [ "${PIPESTATUS[0]}" = 0 ] || rc=1
  # why MLX-GPU was 5.3e-4 from float64: TF32 matmuls; each process latches its setting
  if python3 -c 'import mlx.core as mx, sys; sys.exit(0 if mx.is_available(mx.gpu) else 1)' 2>/dev/null; then
    for v in 1 0; do
      MLX_ENABLE_TF32=$v python3 - <<'PY' 2>&1 | tee -a "$out/tests_gpu.txt"
import os, sys
sys.path.insert(0, "tests")
import numpy as np
from model_helpers import SPEC, reference, rows, weights
from nautilus_pipeline.model.mlx_runner import mlx_tf32_error
from nautilus_pipeline.model.runners import make_runner
w = weights(1); x = rows(w, 4096)
err = np.abs(make_runner("mlx:gpu", SPEC, w).predict(x) - reference(SPEC, w, x)).max()
print(f"MLX_ENABLE_TF32={os.environ['MLX_ENABLE_TF32']}: 128x128 matmul rel err "
      f"{mlx_tf32_error('gpu'):.1e}, model max err vs float64 {err:.1e} (4096 rows)")
PY
    done
  fi
fi
if want pipeline; then
  # QUICK=1 (a short lease): no run on the bundled sample, and 1M trades at one batch size
  sizes_1m="4096 65536"
  if [ -z "${QUICK:-}" ]; then
    timeout 120 python3 -m nautilus_pipeline.cli run pipelines/gpu.toml --no-progress \
      --out /tmp/gpu-run 2>&1 | tee "$out/gpu_pipeline.txt" | tail -n 40
  else
    sizes_1m="65536"
  fi
  # 10M generated trades: gpu.toml on the GPU at two batch sizes, and the same definition on
  # the host CPU alone (1M of them: Monte Carlo VaR on 16 cores is the slow part there)
  python3 scripts/make_synthetic_trades.py --rows 10000000 --out /tmp/trades10m.csv | tail -n 1
  head -n 1000001 /tmp/trades10m.csv > /tmp/trades1m.csv
  sed -E -e 's/^streams = \[.*/streams = ["cpu"]/' -e 's/^memory = .*/memory = "host"/' \
    pipelines/gpu.toml > /tmp/gpu_on_cpu.toml
  ticks=(--format binance_trades --symbol BTCUSDT-PERP --no-progress --log-level warning)
  for b in ${SIZES_10M-4096 65536}; do  # SIZES_10M="": none (the profile section times them)
    echo "== pipelines/gpu.toml, 10M generated trades, --batch $b"
    timeout 150 python3 -m nautilus_pipeline.cli run pipelines/gpu.toml --ticks /tmp/trades10m.csv \
      "${ticks[@]}" --batch $b --out /tmp/g10m-$b 2>&1 | tail -n 32
    python3 -c "import json; s=json.load(open('/tmp/g10m-$b/summary.json')); print({k: v for k, v in s.items() if k in ('pool', 'stages')})" 2>&1 | cut -c1-3000
  done 2>&1 | tee "$out/pipeline_10m.txt" | grep -E "ticks/s|==|features |inference |risk "
  # beside it, the same 10M trades through pipelines/default.toml on the host's cores alone
  sed -E 's/^streams = \[.*/streams = ["cpu"]/' pipelines/default.toml > /tmp/default_cpu.toml
  {
    echo "== pipelines/default.toml, every stream 'cpu' (the 16-core host), 10M generated trades"
    timeout 240 python3 -m nautilus_pipeline.cli run /tmp/default_cpu.toml --ticks /tmp/trades10m.csv \
      "${ticks[@]}" --out /tmp/d10m 2>&1 | tail -n 32
  } 2>&1 | tee "$out/pipeline_10m_default_cpu.txt" | grep -E "ticks/s|=="
  {
    for b in $sizes_1m; do
      echo "== pipelines/gpu.toml on the GPU, 1M generated trades, --batch $b"
      timeout 60 python3 -m nautilus_pipeline.cli run pipelines/gpu.toml --ticks /tmp/trades1m.csv \
        "${ticks[@]}" --batch $b --out /tmp/g1m-$b 2>&1 | tail -n 32
    done
    echo "== the same definition on the host CPU alone (every stream 'cpu'), 1M generated trades"
    timeout 150 python3 -m nautilus_pipeline.cli run /tmp/gpu_on_cpu.toml --ticks /tmp/trades1m.csv \
      "${ticks[@]}" --out /tmp/c1m 2>&1 | tail -n 32
    # outputs of the GPU runs against the CPU run: VPIN buckets and signals
    SIZES_1M="$sizes_1m" python3 - <<'PY'
import numpy as np, pyarrow.parquet as pq
import os
for b in [int(x) for x in os.environ["SIZES_1M"].split()]:
    for name in ("vpin", "signals"):
        g, c = pq.read_table(f"/tmp/g1m-{b}/{name}.parquet"), pq.read_table(f"/tmp/c1m/{name}.parquet")
        print(f"GPU --batch {b} vs CPU, {name}: {g.num_rows:,} vs {c.num_rows:,} rows")
        if g.num_rows != c.num_rows:
            continue
        for col in [n for n in g.column_names if n in c.column_names]:
            a, z = g[col].to_numpy(zero_copy_only=False), c[col].to_numpy(zero_copy_only=False)
            if a.dtype.kind == "f":
                d = float(np.nanmax(np.abs(a - z))) if a.size else 0.0
                print(f"  {col}: identical {np.array_equal(a, z, equal_nan=True)}, max |diff| {d:.3g}")
            else:
                same = [x == y for x, y in zip(g[col].to_pylist(), c[col].to_pylist())]
                print(f"  {col}: identical {all(same)} ({len(same) - sum(same)} rows differ)")
PY
  } 2>&1 | tee "$out/pipeline_1m_gpu_vs_cpu.txt" | grep -E "ticks/s|==|vs CPU|identical False"
fi
if want pipeline_ab; then
  # BEFORE=/path/of/another/checkout: gpu.toml on the same 10M generated trades, that package and
  # this one alternately (AB_ROUNDS rounds, the order swapped each round) at each of SIZES_10M,
  # after one untimed 1M-trade run of each (numba's cache, the calibrations); run from /tmp so that
  # neither tree's folder comes first on sys.path
  if [ -z "${BEFORE:-}" ]; then echo "pipeline_ab: set BEFORE=/path/of/another/checkout"; exit 2; fi
  [ -f /tmp/trades10m.csv ] || python3 scripts/make_synthetic_trades.py --rows 10000000 --out /tmp/trades10m.csv | tail -n 1
  [ -f /tmp/trades1m.csv ] || head -n 1000001 /tmp/trades10m.csv > /tmp/trades1m.csv
  after=$PWD
  ab_run() {  # tree, ticks, batch, out
    (cd /tmp && PYTHONPATH="/tmp/site:$1" timeout 150 python3 -m nautilus_pipeline.cli run "$1/pipelines/gpu.toml" \
      --ticks "$2" --format binance_trades --symbol BTCUSDT-PERP --no-progress --log-level warning \
      --batch "$3" --out "$4" 2>&1 | grep -E "ticks/s" | head -n 2 | tr -s ' \n' ' '; echo)
  }
  {
    echo "before: $BEFORE ($(cat "$BEFORE/VERSION" 2>/dev/null || git -C "$BEFORE" log --oneline -1 2>/dev/null | cut -c1-60))"
    echo "after:  $after ($(git -C "$after" log --oneline -1 2>/dev/null | cut -c1-60))"
    for tree in "$BEFORE" "$after"; do
      echo "$tree runs $(cd /tmp && PYTHONPATH="/tmp/site:$tree" python3 -c 'import nautilus_pipeline as n; print(n.__file__)')"
      ab_run "$tree" /tmp/trades1m.csv 65536 /tmp/ab-warm >/dev/null
    done
    for b in ${SIZES_10M:-65536}; do
      for r in $(seq "${AB_ROUNDS:-3}"); do
        if [ $((r % 2)) = 1 ]; then order="before after"; else order="after before"; fi
        for tag in $order; do
          tree=$BEFORE; [ "$tag" = after ] && tree=$after
          echo "== $tag, round $r, --batch $b: $(ab_run "$tree" /tmp/trades10m.csv "$b" "/tmp/ab-$tag-$r-$b")"
        done
      done
    done
  } 2>&1 | tee "$out/pipeline_ab.txt"
fi
if want profile; then
  [ -f /tmp/trades10m.csv ] || python3 scripts/make_synthetic_trades.py --rows 10000000 --out /tmp/trades10m.csv | tail -n 1
  pargs=(--ticks /tmp/trades10m.csv --format binance_trades --symbol BTCUSDT-PERP)
  {
    if [ -n "${BEFORE:-}" ]; then
      for b in ${PROFILE_BATCHES:-65536}; do
        echo "== before: the package at $BEFORE ($(git -C "$BEFORE" log --oneline -1 2>/dev/null | cut -c1-60)), --batch $b"
        PYTHONPATH="/tmp/site:$BEFORE" timeout 150 python3 scripts/profile_pipeline.py "$BEFORE/pipelines/gpu.toml" \
          "${pargs[@]}" --batch "$b" --no-sample --out "/tmp/p-before-$b"
      done
    fi
    if [ -n "${PROFILE_COLD:-}" ]; then  # the calibrations measured, as on a machine's first run
      b=${PROFILE_BATCHES%% *}; b=${b:-262144}
      echo "== this tree, --batch $b, calibration cache off (every calibration measured)"
      NAUTILUS_PIPELINE_CACHE=off timeout 150 python3 scripts/profile_pipeline.py pipelines/gpu.toml \
        "${pargs[@]}" --batch "$b" --no-sample --out "/tmp/p-cold-$b"
    fi
    for b in ${PROFILE_BATCHES:-65536 262144}; do
      echo "== this tree, --batch $b"
      timeout 150 python3 scripts/profile_pipeline.py pipelines/gpu.toml "${pargs[@]}" --batch "$b" \
        --no-sample --out "/tmp/p-$b"
    done
    b=${SAMPLE_BATCH:-65536}
    if [ "$b" != none ]; then
      echo "== this tree, --batch $b, every thread sampled every 2 ms"
      timeout 150 python3 scripts/profile_pipeline.py pipelines/gpu.toml "${pargs[@]}" --batch "$b" --out "/tmp/p-s-$b"
    fi
  } 2>&1 | tee "$out/profile_10m.txt"
fi
if want engine; then
  # the execution engine on the host's cores: serial beside concurrent, offload table, live
  timeout 200 python3 scripts/bench_pipeline.py --rows 2000000 --live-ticks 2000 --offload \
    --data /tmp/engine 2>&1 | tee "$out/bench_pipeline.txt"
fi
if want batch; then
  lscpu | grep -E '^(Model name|CPU\(s\)|Thread\(s\) per core|Core\(s\) per socket|Socket\(s\))' | tr -s ' '
  # issue 10's scaling on this host (default pipeline, CPU streams), then batch --workers N
  # with pipelines/gpu.toml: every worker a process of its own with a CUDA context on the GPU.
  # BATCH_BIG=N: skip the scaling table; 16 files of N generated trades each instead.
  if [ -n "${BATCH_BIG:-}" ] && [ "$(cat /tmp/bb/in/.rows 2>/dev/null)" = "$BATCH_BIG" ]; then
    echo "input: the 16 files x $BATCH_BIG generated trades of an earlier call, reused"
  elif [ -n "${BATCH_BIG:-}" ]; then
    rm -rf /tmp/bb/in && mkdir -p /tmp/bb/in
    for i in $(seq 0 15); do
      python3 scripts/make_synthetic_trades.py --rows "$BATCH_BIG" --seed "$i" \
        --out "/tmp/bb/in/SYM$(printf %02d "$i")USDT-trades-2024-08-01.csv" > /dev/null &
    done
    wait
    echo "$BATCH_BIG" > /tmp/bb/in/.rows
    echo "input: 16 files x $BATCH_BIG generated trades"
  else
    # a small batch first, so that the numba cache is compiled before the 1-worker row (a
    # fresh machine's first job compiled it inside that row: 37 s to its first job at cf4326d)
    timeout 200 python3 scripts/bench_batch.py --symbols 1 --days 1 --trades 20000 --workers 1 \
      --no-sequential --dir /tmp/bb-warm > "$out/bench_batch_warm.txt" 2>&1
    echo "numba cache warmed: $(grep -c '^| local' "$out/bench_batch_warm.txt") row(s) in $out/bench_batch_warm.txt"
    timeout 520 python3 scripts/bench_batch.py --symbols 16 --days ${BATCH_DAYS:-1} --trades ${BATCH_TRADES:-600000} \
      --workers ${BATCH_WORKERS:-1 2 4 8 16} --rounds ${BATCH_ROUNDS:-1} --no-sequential --dir /tmp/bb 2>&1 | tee "$out/bench_batch.txt"
  fi
  # GPU_MPS=1: each GPU row again under CUDA's Multi-Process Service (one shared GPU context
  # instead of 16 time-sliced ones), its control daemon started here and stopped after.
  mps_modes="off"
  if [ -n "${GPU_MPS:-}" ]; then
    if command -v nvidia-cuda-mps-control >/dev/null; then mps_modes=${GPU_MPS_MODES:-off on}
    else echo "MPS: nvidia-cuda-mps-control not on this machine, rows without MPS only"; fi
  fi
  for mps in $mps_modes; do
  if [ "$mps" = on ]; then
    if nvidia-cuda-mps-control -d; then echo "MPS: control daemon started (pipe dir /tmp/nvidia-mps)"
    else echo "MPS: the control daemon did not start: these rows run without it"; mps="on-failed"; fi
  fi
  # GPU_MEMORY="auto pinned": each row once per slab memory (pinned: a copy of gpu.toml with
  # memory = "pinned", beside auto, which batch workers resolve to host), GPU_ROUNDS times, alternating
  for round in $(seq "${GPU_ROUNDS:-1}"); do
  for mem in ${GPU_MEMORY:-auto}; do
  def=pipelines/gpu.toml
  if [ "$mem" != auto ]; then
    def=pipelines/_gpu_$mem.toml
    sed "s/^memory = \"auto\"/memory = \"$mem\"/" pipelines/gpu.toml > "$def"
  fi
  for w in ${GPU_WORKERS:-16}; do
  # GPU_BEFORE=.gpuwt/base (another checkout's package, carried): its row first, then this one's
  for tree in ${GPU_BEFORE:+"$GPU_BEFORE"} .; do
    pkg=$(cd "$tree" && pwd)
    echo "== nautilus-pipeline batch $def --workers $w (the same files), memory $mem, MPS $mps, round $round, package $pkg"
    rm -rf "/tmp/bb-gpu-$w-$mps-$mem"
    t0=$(date +%s.%N)
    # run from the package's folder: a batch run where the current folder holds another
    # nautilus_pipeline spawns its workers instead of forking them (executors._worker_context)
    (cd "$pkg" && PYTHONPATH="$pkg:$PYTHONPATH" timeout 200 python3 -m nautilus_pipeline.cli batch \
      "$OLDPWD/$def" '/tmp/bb/in/*.csv' --out "/tmp/bb-gpu-$w-$mps-$mem" --workers $w --no-progress \
      --log-level warning 2>&1 | tail -n 12)
    python3 - "$t0" "/tmp/bb-gpu-$w-$mps-$mem" <<'PY'
import json, sys, time
from pathlib import Path
wall = time.time() - float(sys.argv[1])
s = json.loads((Path(sys.argv[2]) / "summary.json").read_text())
ticks = s["totals"]["processed"]
jobs = s["jobs"]
print(f"batch gpu.toml: {ticks:,} ticks processed, wall {wall:.1f} s (the whole command: plan, "
      f"workers' start, jobs, merge) -> {ticks / wall:,.0f} ticks/s; {len(jobs)} jobs, "
      f"mean job run {sum(j['run_s'] for j in jobs) / max(len(jobs), 1):.2f} s, "
      f"accounting closes {s['accounting_closes']}, failed {s['failed']}")
js = sorted(jobs, key=lambda j: j["wall_s"])
print(f"  phases: plan {s.get('plan_s', 0):.2f} s, run {s.get('run_s', 0):.2f} s, merge {s.get('merge_s', 0):.2f} s; "
      f"executor start-up {s.get('executor_startup_s')}, workers warm {s.get('workers_warm_s')}; "
      f"job wall min/median/max {js[0]['wall_s']:.2f}/{js[len(js) // 2]['wall_s']:.2f}/{js[-1]['wall_s']:.2f} s, "
      f"replay (run_s) min/median/max {min(j['run_s'] for j in jobs):.2f}/"
      f"{sorted(j['run_s'] for j in jobs)[len(jobs) // 2]:.2f}/{max(j['run_s'] for j in jobs):.2f} s")
builds = sorted(j["phases"].get("build", 0.0) for j in jobs if j.get("phases"))
print(f"  first job started {s.get('first_job_start_s') or 0:.2f} s after the batch's start, the last job's result "
      f"{s.get('after_last_job_s') or 0:.2f} s before its end; job build (the file is read there when the job "
      f"works out bucket_volume) min/median/max {builds[0]:.2f}/{builds[len(builds) // 2]:.2f}/{builds[-1]:.2f} s")
print(f"  after the last job: the workers' stop (executor close) {s.get('executor_close_s') or 0:.2f} s, the merge's "
      f"finish {s.get('merge_s', 0):.2f} s; and outside the batch's own wall_s (the command's interpreter, "
      f"imports and exit, this script's start): {wall - s.get('wall_s', 0):.2f} s")
PY
  done
  done
  [ "$mem" != auto ] && rm -f "$def"
  done
  done
  if [ "$mps" = on ]; then  # quit returns at once: wait for the daemon to be gone before a next start
    echo quit | nvidia-cuda-mps-control && echo "MPS: control daemon stopped"
    for _ in $(seq 50); do pgrep -x nvidia-cuda-mps-control >/dev/null || break; sleep 0.1; done
  fi
  done 2>&1 | tee "$out/batch_gpu.txt"
fi
if [[ ",$what," == *",bridge,"* ]]; then  # asked by name only, not by "all"
  # issue 11's pipeline table on a host whose cores the pipeline does not fill: nats-server is
  # not installed there, so its binary travels in .natsbin/ (cp /usr/sbin/nats-server .natsbin/)
  [ -x "$root/.natsbin/nats-server" ] && export PATH="$root/.natsbin:$PATH"
  if command -v nats-server >/dev/null; then
    timeout 500 python3 scripts/bench_bridge.py --ticks ${BRIDGE_TICKS:-2000000} --repeat ${BRIDGE_REPEAT:-5} \
      --only ${BRIDGE_ONLY:-pipeline} ${BRIDGE_MODES:+--modes $BRIDGE_MODES} 2>&1 | tee "$out/bench_bridge.txt"
  else
    echo "bridge: no nats-server (carry .natsbin/nats-server)"; rc=1
  fi
fi
if [[ ",$what," == *",cores,"* ]]; then
  # by name only: what N cores of this host give N threads of the pipeline's kernels
  # (issue 10's ceiling: a job slower beside 15 others is the machine's, not the engine's)
  python3 scripts/bench_core_sharing.py --threads ${CORE_THREADS:-1 2 4 8 16} --rounds "${CORE_ROUNDS:-3}" \
    --seconds 0.3 2>&1 | tee "$out/core_scaling.txt"
fi
if [[ ",$what," == *",pairs,"* ]]; then
  # by name only: which vCPUs share a physical core (measured: lscpu on the lent hosts says
  # one thread per core, yet vector kernels run ~2x slower 16 at once while an integer loop
  # does not), then N lone processes pinned one per core found apart against the first N CPUs
  timeout 170 python3 scripts/probe_cpu_pairs.py --all --kernels fma --rounds 2 --seconds 0.2 2>&1 \
    | tee "$out/cpu_pairs.txt" | tail -n 4
  apart=$(grep '^apart:' "$out/cpu_pairs.txt" | awk '{print $2}')
  n=${PAIRS_PROCESSES:-8}
  found=$(echo "$apart" | tr ',' '\n' | grep -c .)
  if [ "$found" -lt "$n" ]; then
    echo "pairs: only $found CPU(s) apart ($apart), fewer than $n processes: PAIRS_PROCESSES=$found for a fair comparison"
    n=$found
  fi
  [ "$n" -ge 2 ] && timeout 300 python3 scripts/bench_batch.py --symbols "$n" --days 1 --trades 600000 --control 1 "$n" 1 "$n" \
    --control-lead 12 --control-pin "$(echo "$apart" | cut -d, -f1-"$n")" "0-$((n - 1))" 2>&1 \
    | tee "$out/control_pinned.txt" | grep -E '^\| [0-9]+ \||environment'
fi
if want bench; then
  timeout 150 python3 scripts/bench_gpu.py 2>&1 | tee "$out/bench_gpu.txt"
  timeout 150 python3 scripts/bench_inference.py --gpu --calibrate 2>&1 | tee "$out/bench_inference.txt"
fi
exit $rc
