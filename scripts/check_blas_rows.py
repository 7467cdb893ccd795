"""Does this machine's BLAS give a row the same float32 product whatever batch it is in?

For each layer shape of the default model (13→128→64→32→1), float32 ``x @ w`` of random
rows, compared to the bit: a batch's first rows against the same rows as a shorter batch
(shape), the batch against itself rolled by 1, 7 and 48 rows (position), and with BLAS on
1 thread against the default (threads). Any difference means a job of ``batch``, whose
batches start at its file's first row, can round the model's output differently from one
run over the files (the batch tests compare those columns to float32 rounding for this
reason). Prints counts of differing elements; ``numpy``'s BLAS and its kernels first.
"""

from __future__ import annotations

import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits

SHAPES = ((13, 128), (128, 64), (64, 32), (32, 1))


def main() -> None:
    info = [(i.get("internal_api"), i.get("version"), i.get("architecture"), i.get("num_threads"))
            for i in threadpool_info() if i.get("user_api") == "blas"]
    print(f"BLAS: {info}")
    print()
    print("| layer | rows | shape: first rows of 4096 vs alone | position: rolled 1/7/48 | threads: 1 vs default |")
    print("|---|---:|---:|---:|---:|")
    rng = np.random.default_rng(0)
    for k, w in SHAPES:
        m = rng.normal(size=(k, w)).astype(np.float32)
        x = rng.normal(size=(4096, k)).astype(np.float32)
        full = x @ m
        for n in (16, 100, 1000, 4096):
            shape = int((x[:n] @ m != full[:n]).sum())
            position = sum(int((np.roll(x[:n], s, axis=0) @ m != np.roll(x[:n] @ m, s, axis=0)).sum())
                           for s in (1, 7, 48))
            with threadpool_limits(1, user_api="blas"):
                one = x[:n] @ m
            threads = int((one != x[:n] @ m).sum())
            print(f"| {k}x{w} | {n} | {shape} | {position} | {threads} |")


if __name__ == "__main__":
    main()
