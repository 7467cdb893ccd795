"""Local batch workers pinned one a CPU (``--cpus``): which CPUs, when, and that a worker that
replaces a dead one takes the CPU it left.

The pinning itself is checked from the workers: each job reports the CPU its worker holds
(``summary.json``'s ``jobs[].cpu``), read from the worker's own claim after
``sched_setaffinity`` succeeded.
"""

from __future__ import annotations

import os

import pytest
from test_batch import (
    assert_accounting_closes,
    assert_merged_equals_sequential,
    batch_with_a_worker_killed,
    generated,
)

from nautilus_pipeline.batch import run_batch
from nautilus_pipeline.batch.executors import CpuListError, parse_cpus, worker_cpus
from nautilus_pipeline.errors import ConfigError

pytestmark = pytest.mark.skipif(not hasattr(os, "sched_getaffinity"),
                                reason="pinning needs sched_setaffinity (Linux)")

USABLE = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []


def test_a_cpu_list_is_parsed_with_ranges():
    assert parse_cpus("0,2,4-7") == (0, 2, 4, 5, 6, 7)
    assert parse_cpus(" 3 ") == (3,)
    for bad in ("", "a", "3-1", "-1", "0,,1", "1-2-3"):
        with pytest.raises(ConfigError, match="expected CPUs like 0,2,4-7"):
            parse_cpus(bad)


def test_nothing_is_pinned_unless_asked_and_auto_pins_only_when_the_workers_fill_the_cpus():
    n = len(USABLE)
    assert worker_cpus(None, n) == worker_cpus("none", n) == ()
    assert worker_cpus("auto", n) == (tuple(USABLE) if n > 1 else ())
    assert worker_cpus("auto", n + 1) == ()  # more workers than CPUs: the scheduler's job
    if n > 1:
        assert worker_cpus("auto", n - 1) == ()  # a spare core for the workers' reader threads


def test_a_list_names_a_usable_cpu_for_every_worker():
    first = USABLE[0]
    assert worker_cpus(str(first), 1) == (first,)
    assert worker_cpus([first], 1) == (first,)
    with pytest.raises(ConfigError, match="not usable here"):
        worker_cpus(str(max(USABLE) + 1), 1)
    with pytest.raises(ConfigError, match="named twice"):
        worker_cpus(f"{first},{first}", 1)
    with pytest.raises(ConfigError, match="1 CPU\\(s\\) for 2 workers"):
        worker_cpus(str(first), 2)


def test_ray_refuses_a_cpu_list_and_auto(tmp_path):
    for cpus in ("0", "auto"):
        with pytest.raises(CpuListError, match="Ray places its own"):
            run_batch("default", [str(tmp_path / "*.csv")], tmp_path / "out", executor="ray", cpus=cpus)


def test_a_cpu_list_without_workers_runs_one_worker_a_cpu_and_each_job_says_its_cpu(tmp_path):
    cpu = USABLE[-1]
    generated(tmp_path / "in", "AAAUSDT", days=2, n=4000)
    report = run_batch("default", [str(tmp_path / "in" / "*.csv")], tmp_path / "out", cpus=str(cpu))
    s = report.summary
    assert report.exit_code == 0, s["failed"]
    assert s["workers"] == 1 and s["cpus"] == [cpu]
    assert [j["cpu"] for j in s["jobs"]] == [cpu, cpu]


def test_unpinned_jobs_say_so(tmp_path):
    generated(tmp_path / "in", "AAAUSDT", days=1, n=4000)
    report = run_batch("default", [str(tmp_path / "in" / "*.csv")], tmp_path / "out", workers=1)
    assert report.summary["cpus"] is None
    assert [j["cpu"] for j in report.summary["jobs"]] == [None]


@pytest.mark.skipif(len(USABLE) < 2, reason="needs 2 usable CPUs (one a worker)")
def test_the_worker_that_replaces_a_dead_one_takes_the_cpu_it_left(tmp_path):
    """Two workers on two listed CPUs; one is SIGKILLed mid-job. Its CPU's claim (an flock)
    goes with it, so its replacement is pinned too: every job ran on a listed CPU, none
    unpinned, and the batch's outputs are those of one run per symbol."""
    groups = {sym: generated(tmp_path / "in", sym, days=2, n=40_000, seed=i)
              for i, sym in enumerate(("AAAUSDT", "BBBUSDT"))}
    cpus = USABLE[:2]
    out = tmp_path / "out"
    report, killed = batch_with_a_worker_killed(out, inputs=[str(tmp_path / "in" / "*.csv")], workers=2,
                                                cpus=",".join(map(str, cpus)))
    assert killed, "no worker was caught mid-job"
    s = report.summary
    assert report.exit_code == 0, s["failed"]
    assert s["retries"] >= 1
    assert {j["cpu"] for j in s["jobs"]} <= set(cpus) and None not in {j["cpu"] for j in s["jobs"]}
    assert killed[0] not in {j["pid"] for j in s["jobs"]}  # the killed worker's job ran again elsewhere
    assert_accounting_closes(s)
    assert_merged_equals_sequential(out, report, groups, tmp_path)


def test_every_thread_a_worker_has_already_is_moved_to_its_cpu(tmp_path):
    """A spawned worker has BLAS's threads before its initializer pins it: they move too."""
    import subprocess
    import sys

    cpu = USABLE[-1]
    code = f"""
import os, threading
from nautilus_pipeline.batch import executors
started = threading.Event()
t = threading.Thread(target=lambda: (started.set(), threading.Event().wait(5)), daemon=True)
t.start(); started.wait()
executors._pin_worker(({cpu},), {str(tmp_path)!r})
tids = [int(x) for x in os.listdir("/proc/self/task")]
print(executors._PINNED_CPU, len(tids), sorted({{c for tid in tids for c in os.sched_getaffinity(tid)}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == str(cpu) and int(out[1]) >= 2
    assert out[2] == f"[{cpu}]"
