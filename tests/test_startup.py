"""Start-up: what ``import nautilus_pipeline`` loads, checked in a fresh interpreter.

An app that embeds a Pipeline (or a replay of one format) should not pay for the definitions'
runner (config, every built-in stage, the model loaders) or the readers (pyarrow, every
format): those names load on first use (``scripts/bench_startup.py`` measures the phases)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import sys
import nautilus_pipeline as nt
eager = sorted(m for m in ("pyarrow", "nautilus_pipeline.io", "nautilus_pipeline.app",
                           "nautilus_pipeline.config", "nautilus_pipeline.stages") if m in sys.modules)
from nautilus_pipeline import Run, Summary
assert nt.Replay.__module__ == "nautilus_pipeline.io.replay" and Run.__name__ == "Run"
assert {"Run", "Replay", "detect_format"} <= set(dir(nt)) and Summary is nt.Summary
try:
    nt.NoSuchThing
except AttributeError as exc:
    assert "NoSuchThing" in str(exc)
else:
    raise AssertionError("an unknown name must raise AttributeError")
print(",".join(eager))
"""


def test_importing_the_package_leaves_the_runner_and_readers_for_first_use():
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == ""
