"""Shared fixtures: where the real tick files are.

``sample_dir`` is the small real data bundled in the package (always present);
``shared_data`` is the larger ``../shared/data`` set beside a developer's checkout (and CI's),
absent from a user's fresh clone: tests that need it skip and say so.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE_DIR = REPO / "nautilus_pipeline" / "data"
SHARED_DATA = Path(os.environ.get("NAUTILUS_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    return SAMPLE_DIR


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(reason=f"needs the real data set in {SHARED_DATA} (not part of a fresh clone)")
    return SHARED_DATA


pytest_plugins = ["nautilus_pipeline.testing"]


@pytest.fixture(autouse=True, scope="session")
def _calibration_cache(tmp_path_factory) -> None:
    """Stored calibrations (``calibration_cache``) go to a folder of the test session, never
    to the user's cache."""
    os.environ["NAUTILUS_PIPELINE_CACHE"] = str(tmp_path_factory.mktemp("calibration-cache"))
