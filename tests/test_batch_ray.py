"""Batch replays on a real local Ray (started by the test, never mocked): a worker killed
mid-job is retried, the batch completes, no output is doubled, the accounting closes, and
the merged outputs equal one sequential run per symbol."""

from __future__ import annotations

import threading

import pytest

from nautilus_pipeline.batch import run_batch

pytest.importorskip("ray", reason="the cluster extra: pip install 'nautilus-pipeline[cluster]'")

from test_batch import (
    assert_accounting_closes,
    assert_merged_equals_sequential,
    assert_one_copy_of_each_output,
    kill_a_worker_mid_job,
    split_real,
)


def test_ray_batch_survives_a_killed_worker(sample_dir, tmp_path):
    groups = split_real(sample_dir, tmp_path / "in")
    out = tmp_path / "out"
    stop, killed = threading.Event(), []
    killer = threading.Thread(target=kill_a_worker_mid_job, args=(out, stop, killed), kwargs={"after": 1})
    killer.start()
    try:
        report = run_batch("default", [str(tmp_path / "in" / "*.csv")], out, executor="ray", workers=2)
    finally:
        stop.set()
        killer.join()
    s = report.summary
    assert killed, "no Ray worker was caught mid-job"
    assert report.exit_code == 0, s["failed"]
    assert s["executor"] == "ray" and s["executor_startup_s"] > 0
    assert [c["status"] for c in s["chains"]] == ["done", "done"]
    assert_accounting_closes(s)
    assert_one_copy_of_each_output(out, s)
    assert_merged_equals_sequential(out, report, groups, tmp_path)
