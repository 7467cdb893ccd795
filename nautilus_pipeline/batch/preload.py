"""Imported by the local executor's fork server: importing it loads the package and every
kernel a job calls (numba's cached machine code), by replaying the bundled sample file once,
so that each worker forked from the server starts with them loaded instead of loading them
on its first job. The warm-up logs warnings only, writes into a temporary folder it removes,
and leaves no Python thread behind (its event loop and readers are closed before any fork;
native pool threads of jemalloc, OpenBLAS and Arrow remain, which have at-fork handlers)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from ..runtime import configure_logging
from .job import replay_job

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "binance-um-btcusdt-trades-20240808.csv"


def _warm_kernels() -> None:
    configure_logging("json", "error")
    folder = tempfile.mkdtemp(prefix="nt-preload-")
    try:
        replay_job("default", [SAMPLE], os.path.join(folder, "job"), None, trace_every=1)
    except Exception:  # a warm-up only: a job that needs the kernels loads them itself
        pass
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if SAMPLE.exists():
    _warm_kernels()
