"""Batch replays on a real Ray (started by the tests, never mocked).

A local Ray: a worker killed mid-job is retried, the batch completes, no output is doubled,
the accounting closes, and the merged outputs equal one sequential run per symbol.

An existing cluster: a head started as ``ray start --head --block`` does, with token
authentication on (the default of Ray's coming releases), its own temporary folder and free
ports; the CLI's driver joins it with ``--ray-address`` and the jobs run on the head's own
workers. A driver without the token is refused with exit 2 and a line that says what to set.
Only that head is stopped, by its process group (never ``ray stop``: it stops every Ray of the
machine)."""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import orjson
import pytest

pytest.importorskip("ray", reason="the cluster extra: pip install 'nautilus-pipeline[cluster]'")

from conftest import REPO
from test_batch import (
    assert_accounting_closes,
    assert_merged_equals_sequential,
    assert_one_copy_of_each_output,
    batch_with_a_worker_killed,
    split_real,
)


def test_ray_batch_survives_a_killed_worker(sample_dir, tmp_path):
    groups = split_real(sample_dir, tmp_path / "in")
    out = tmp_path / "out"
    report, killed = batch_with_a_worker_killed(out, inputs=[str(tmp_path / "in" / "*.csv")], executor="ray",
                                                workers=2, after=1)
    s = report.summary
    assert killed, "no Ray worker was caught mid-job"
    assert report.exit_code == 0, s["failed"]
    assert s["executor"] == "ray" and s["executor_startup_s"] > 0
    assert s["ray_cluster"]["started_here"] and s["ray_cluster"]["cpus"] == 2
    assert [c["status"] for c in s["chains"]] == ["done", "done"]
    assert_accounting_closes(s)
    assert_one_copy_of_each_output(out, s)
    assert_merged_equals_sequential(out, report, groups, tmp_path)


# --- an existing cluster ----------------------------------------------------------------------
@dataclass
class Head:
    address: str
    token: str
    temp: Path
    proc: subprocess.Popen


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _driver_env(**extra: str) -> dict[str, str]:
    """This process's environment without any Ray authentication setting of its own (an
    earlier local Ray in this process sets RAY_AUTH_MODE), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    return {**env, **extra}


@pytest.fixture(scope="module")
def ray_head():
    token = secrets.token_hex(16)
    # short: Ray's socket paths under it must fit in 107 bytes (pytest's tmp_path may not)
    temp = Path(tempfile.mkdtemp(prefix="nt-ray-", dir="/tmp"))
    gcs, agent, agent_grpc, metrics, node, objects, runtime_env = _free_ports(7)
    log = temp / "head.log"
    with log.open("wb") as f:
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", f"--port={gcs}",
             f"--temp-dir={temp}", "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats",
             f"--dashboard-agent-listen-port={agent}",
             f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
             f"--node-manager-port={node}", f"--object-manager-port={objects}",
             f"--runtime-env-agent-port={runtime_env}"],
            env=_driver_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token), stdout=f,
            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while b"Ray runtime started" not in log.read_bytes():
            assert proc.poll() is None, f"the Ray head exited: {log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, f"the Ray head did not start: {log.read_text()[-2000:]}"
            time.sleep(0.25)
        yield Head(f"127.0.0.1:{gcs}", token, temp, proc)
    finally:
        _stop_head(proc)
        shutil.rmtree(temp, ignore_errors=True)


def _stop_head(proc: subprocess.Popen) -> None:
    """That head's process group only: SIGTERM (Ray drains), SIGKILL if it takes too long."""
    for sig, wait in ((signal.SIGTERM, 40), (signal.SIGKILL, 10)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _cli_batch(inputs: str, out: Path, address: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nautilus_pipeline.cli", "batch", "default", inputs,
                           "--out", str(out), "--executor", "ray", "--ray-address", address],
                          env=env, capture_output=True, text=True, timeout=600)


def _head_worker_pids(head: Head) -> set[int]:
    """Pids of the workers the head's raylet started (its log files are named by them)."""
    names = (p.name for p in head.temp.glob("session_*/logs/worker-*.out"))
    return {int(m.group(1)) for n in names if (m := re.search(r"-(\d+)\.out$", n))}


def test_the_cli_joins_an_existing_cluster_with_its_token(ray_head, sample_dir, tmp_path):
    groups = split_real(sample_dir, tmp_path / "in")
    out = tmp_path / "out"
    done = _cli_batch(str(tmp_path / "in" / "*.csv"), out, ray_head.address,
                      _driver_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=ray_head.token))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "5 of 5 files" in done.stdout and "on ray (cluster workers)" in done.stdout
    s = orjson.loads((out / "summary.json").read_bytes())
    assert s["ray_address"] == ray_head.address
    cluster = s["ray_cluster"]
    assert not cluster["started_here"] and cluster["cpus"] == 2 and cluster["nodes"] == 1
    assert cluster["gcs_address"].endswith(f":{ray_head.address.rsplit(':', 1)[1]}")
    assert {j["pid"] for j in s["jobs"]} <= _head_worker_pids(ray_head)  # the head's workers ran them
    assert ray_head.proc.poll() is None, "the driver's exit stopped the cluster"
    assert_accounting_closes(s)
    assert_one_copy_of_each_output(out, s)
    assert_merged_equals_sequential(out, SimpleNamespace(summary=s), groups, tmp_path)


def test_a_driver_without_the_clusters_token_exits_2_saying_what_to_set(ray_head, sample_dir, tmp_path):
    split_real(sample_dir, tmp_path / "in", damage=False)
    home = tmp_path / "home"  # no ~/.ray/auth_token there
    home.mkdir()
    done = _cli_batch(str(tmp_path / "in" / "*.csv"), tmp_path / "out", ray_head.address,
                      _driver_env(RAY_AUTH_MODE="token", HOME=str(home)))
    assert done.returncode == 2, done.stderr[-3000:]
    assert f"--ray-address {ray_head.address}: the cluster needs a token" in done.stderr
    assert "RAY_AUTH_TOKEN" in done.stderr
    assert ray_head.proc.poll() is None
