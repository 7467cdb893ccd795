#!/usr/bin/env bash
# Benchmark: a batch of the default pipeline (bucket_volume = "auto") over chains of several
# files, with each chain's calibration (a first read of all its files) measured, and read
# back from the calibration cache (the same files again), alternating; the stage routes are
# read back in both (one cold run first). Prints the wall of each run and checks that the
# merged outputs of the two kinds of run are identical, bit for bit.
#
#   bash scripts/bench_calibration_cache.sh "DIR/*.csv" [WORKERS] [ROUNDS]
#
# (scripts/bench_batch.py --dir DIR --trades 2000000 --days 4 writes such files in DIR/in.)
set -euo pipefail
glob=$1; workers=${2:-2}; rounds=${3:-3}
py=${PYTHON:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export NAUTILUS_PIPELINE_CACHE="$work/cache"
run() {  # $1 label, $2 output folder
  local s e
  s=$(date +%s.%N)
  "$py" -m nautilus_pipeline.cli batch default "$glob" --out "$2" --workers "$workers" --no-progress \
    > "$work/log" 2>&1 || { cat "$work/log"; exit 1; }
  e=$(date +%s.%N)
  printf "| %s | %.2f |\n" "$1" "$(echo "$e - $s" | bc)"
}
echo "| run (default pipeline, --workers $workers) | wall s |"
echo "|---|---:|"
run "cold cache: routes and volumes measured" "$work/cold"
for r in $(seq 1 "$rounds"); do
  rm -f "$NAUTILUS_PIPELINE_CACHE"/calibration/bucket_volume-*.json
  rm -rf "$work/measured"; run "round $r: volumes measured" "$work/measured"
  rm -rf "$work/read"; run "round $r: volumes read back" "$work/read"
done
"$py" - "$work/measured" "$work/read" <<'PY'
import sys
import numpy as np
import pyarrow.dataset as ds
a_dir, b_dir = sys.argv[1:3]
for kind in ("signals", "vpin", "risk", "trace"):
    a = ds.dataset(f"{a_dir}/{kind}", partitioning="hive").to_table()
    b = ds.dataset(f"{b_dir}/{kind}", partitioning="hive").to_table()
    same = a.schema.equals(b.schema) and a.num_rows == b.num_rows
    for c in a.schema.names if same else []:
        x, y = a[c].to_numpy(zero_copy_only=False), b[c].to_numpy(zero_copy_only=False)
        same &= (np.array_equal(x.view(f"u{x.itemsize}"), y.view(f"u{y.itemsize}")) if x.dtype.kind == "f"
                 else a[c].equals(b[c]))
    print(f"{kind}: {a.num_rows:,} rows, measured and read-back runs {'identical' if same else 'DIFFER'}")
    if not same:
        sys.exit(1)
PY
