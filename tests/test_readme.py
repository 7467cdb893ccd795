"""Every Python example in the README runs as written (the embedding example as a script,
the testing example as a test file under pytest)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def test_the_readme_has_python_examples():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("code", [b for b in BLOCKS if "async def test_" not in b])
def test_a_readme_example_runs_as_written(code, tmp_path):
    script = tmp_path / "example.py"
    script.write_text(code)
    # from an empty folder: the examples need nothing of the checkout (bundled definitions)
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.parametrize("code", [b for b in BLOCKS if "async def test_" in b])
def test_a_readme_test_example_passes_under_pytest(code, tmp_path):
    (tmp_path / "conftest.py").write_text('pytest_plugins = ["nautilus_pipeline.testing"]\n')
    (tmp_path / "test_example.py").write_text(code)
    (tmp_path / "pytest.ini").write_text("[pytest]\nasyncio_mode = auto\n")
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c",
         str(tmp_path / "pytest.ini"), "--rootdir", str(tmp_path), str(tmp_path)],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert " passed" in done.stdout
