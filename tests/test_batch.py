"""Batch replays: merged outputs equal one sequential run per symbol over its files, bit for
bit after sorting by (symbol, ts_ns); every row accounted for; bad input and dead workers."""

from __future__ import annotations

import asyncio
import gzip
import os
import re
import signal
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

import nautilus_pipeline as nt
from nautilus_pipeline import memory
from nautilus_pipeline.batch import BatchReport, expand_inputs, plan, replay_job, run_batch
from nautilus_pipeline.batch.job import PHASES, TMP_MARK, JobResult
from nautilus_pipeline.batch.plan import JobSpec
from nautilus_pipeline.config import find_definition, load

KINDS = ("signals", "vpin", "risk", "trace")
BTC_HEADER = "id,price,qty,quote_qty,time,is_buyer_maker"


# --- inputs -----------------------------------------------------------------------------------
def split_real(sample_dir: Path, folder: Path, *, damage: bool = True) -> dict[str, list[Path]]:
    """The bundled BTCUSDT (3 "days", named out of time order, one damaged row) and ETHUSDT
    (2 days) trade files, split into consecutive files named like Binance's daily files."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = (sample_dir / "binance-um-btcusdt-trades-20240808.csv").read_text().splitlines()
    rows = lines[1:]
    if damage:
        fields = rows[9000].split(",")
        rows[9000] = ",".join([fields[0], "not-a-price", *fields[2:]])
    btc = []
    for name, (a, b) in zip(("08-09", "08-07", "08-08"), ((0, 7000), (7000, 15000), (15000, len(rows))),
                            strict=True):
        p = folder / f"BTCUSDT-trades-2024-{name}.csv"
        p.write_text("\n".join([lines[0], *rows[a:b]]) + "\n")
        btc.append(p)
    eth_rows = (sample_dir / "binance-spot-ethusdt-trades-20240808.csv").read_text().splitlines()
    eth = []
    for i, (a, b) in enumerate(((0, 3000), (3000, len(eth_rows)))):
        p = folder / f"ETHUSDT-trades-2024-08-0{i + 1}.csv"
        p.write_text("\n".join(eth_rows[a:b]) + "\n")
        eth.append(p)
    return {"BTCUSDT": btc, "ETHUSDT": eth}


def generated(folder: Path, symbol: str = "SYNUSDT", days: int = 2, n: int = 4000, seed: int = 3) -> list[Path]:
    """Generated trades in Binance's USD-M layout, ``days`` consecutive files."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    total = days * n
    ts = 1_722_470_400_000 + np.cumsum(rng.integers(0, 40, total))
    price = 100.0 * np.exp(np.cumsum(rng.normal(0, 3e-4, total)))
    qty = np.round(rng.exponential(2.0, total), 3) + 0.001
    maker = rng.random(total) < 0.5
    out = []
    for d in range(days):
        p = folder / f"{symbol}-trades-2024-08-{d + 1:02d}.csv"
        body = [f"{i},{price[i]:.4f},{qty[i]:.3f},{price[i] * qty[i]:.4f},{ts[i]},{str(maker[i]).lower()}"
                for i in range(d * n, (d + 1) * n)]
        p.write_text("\n".join([BTC_HEADER, *body]) + "\n")
        out.append(p)
    return out


def sequential(definition: str, files: list[Path], out: Path, trace_every: int) -> dict[str, pa.Table]:
    """One run over ``files`` (a symbol's, in time order), its outputs by kind."""
    run = nt.Run(definition, ticks=[str(f) for f in files], out_dir=out, trace_every=trace_every)
    asyncio.run(run.execute())
    return {k: pq.read_table(out / f"{k}.parquet") for k in KINDS if (out / f"{k}.parquet").exists()}


def sorted_rows(table: pa.Table) -> dict[str, str]:
    """Each column of ``table`` in (symbol, ts_ns) order (stable), as the repr of its values:
    equal reprs are equal bits for floats (repr round-trips; -0.0 and NaN are kept apart)."""
    table = _in_symbol_time_order(table)
    return {c: repr(table[c].to_pylist()) for c in sorted(table.column_names)}


def _in_symbol_time_order(table: pa.Table) -> pa.Table:
    if "symbol" in table.column_names:
        table = table.set_column(table.column_names.index("symbol"), "symbol",
                                 table["symbol"].cast(pa.string()))
    return table.take(pc.sort_indices(table, sort_keys=[("symbol", "ascending"), ("ts_ns", "ascending")]))


def assert_merged_equals_sequential(out: Path, report, groups: dict[str, list[Path]], tmp: Path,
                                    definition: str = "default") -> None:
    chains = {c["symbol"]: c for c in report.summary["chains"]}
    refs: dict[str, list[pa.Table]] = {}
    for sym, files in groups.items():
        ordered = sorted(files, key=lambda p: report.summary["files"][str(p)].get("job", ""))
        for kind, table in sequential(definition, ordered, tmp / f"seq-{sym}", chains[sym]["trace_every"]).items():
            refs.setdefault(kind, []).append(table)
    assert set(refs) <= set(report.summary["outputs"])
    for kind, tables in refs.items():
        merged = pq.read_table(out / kind)
        merged = merged.filter(pc.is_in(merged["symbol"].cast(pa.string()), pa.array(sorted(groups))))
        want = pa.concat_tables(tables, promote_options="permissive")
        assert merged.num_rows == want.num_rows, kind
        assert sorted_rows(merged) == sorted_rows(want), kind


def assert_accounting_closes(summary: dict) -> None:
    assert summary["accounting_closes"] and not summary["unbalanced_files"]
    for f in summary["files"].values():
        assert f["read"] == f["delivered"] + f["rejected"] + f["quarantined"]
    t = summary["totals"]
    assert t["read"] == t["delivered"] + t["rejected"] + t["quarantined"]
    assert t["read"] == sum(f["read"] for f in summary["files"].values())


def assert_one_copy_of_each_output(out: Path, summary: dict) -> None:
    for kind in summary["outputs"]:
        parts = sorted((out / kind).rglob("*.parquet"))
        assert all(p.name == "part-0.parquet" for p in parts), parts
        assert len(parts) == len({p.parent for p in parts})
    jobs = [p for p in (out / "jobs").glob("*/*") if p.is_dir()]
    assert not [p for p in (out / "jobs").rglob(f"*{TMP_MARK}*")], "temporary job folders left"
    assert len(jobs) == len(summary["jobs"]) == len({j["job"] for j in summary["jobs"]})


# --- the plan and the unit of work ------------------------------------------------------------------
def test_plan_groups_by_symbol_and_orders_by_first_timestamp(sample_dir, tmp_path):
    groups = split_real(sample_dir, tmp_path / "in", damage=False)
    chains = plan(load("default"), expand_inputs([str(tmp_path / "in" / "*.csv")]))
    assert [c.symbol for c in chains] == ["BTCUSDT", "ETHUSDT"]
    btc = [Path(f.path).name for f in chains[0].files]
    assert btc == [p.name for p in groups["BTCUSDT"]]  # by first timestamp, not by name
    assert [j.last for j in chains[0].jobs()] == [False, False, True]
    firsts = [f.first_ts_ns for f in chains[0].files]
    assert firsts == sorted(firsts)


def test_replay_job_runs_on_any_thread_and_a_rerun_replaces_its_outputs(sample_dir, tmp_path):
    files = split_real(sample_dir, tmp_path / "in", damage=False)["ETHUSDT"][:1]
    out = tmp_path / "job"
    handler = signal.getsignal(signal.SIGINT)
    results = []
    for _ in range(2):  # the second one is a retry of the first
        t = threading.Thread(target=lambda: results.append(replay_job("default", files, out, None, last=False)))
        t.start()
        t.join()
    assert signal.getsignal(signal.SIGINT) is handler
    a, b = results
    assert a.paths == b.paths and a.accounting == b.accounting and a.state == b.state
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [*(os.path.basename(p) for p in a.paths.values()), "summary.json"])
    assert not [p for p in tmp_path.iterdir() if TMP_MARK in p.name]
    assert a.ticks["read"] == 3000 and a.accounting[str(files[0])]["delivered"] == 3000
    from nautilus_pipeline.snapshot import decode

    assert decode(a.state, kind="pipeline").meta["pipeline"] == "default"


def test_replay_job_with_no_file_is_refused_and_writes_nothing(tmp_path):
    with pytest.raises(ValueError, match="at least one file"):
        replay_job("default", [], tmp_path / "job")
    assert not list(tmp_path.iterdir())


def test_a_jobs_summary_says_the_cpu_its_replay_took(sample_dir, tmp_path):
    """Its summary.json's ``cpu_s`` is the process's CPU over the replay's ``wall_s``, as a
    run's (not the field's 0.0 default): inside the job's own, which also counts its set-up."""
    import orjson

    files = split_real(sample_dir, tmp_path / "in", damage=False)["ETHUSDT"][:1]
    result = replay_job("default", files, tmp_path / "job", None)
    summary = orjson.loads((tmp_path / "job" / "summary.json").read_bytes())
    assert 0 < summary["cpu_s"] < result.cpu_s
    assert summary["wall_s"] == pytest.approx(result.run_s)  # the replay's window


# --- whole batches ------------------------------------------------------------------------
def test_merged_outputs_equal_one_sequential_run_per_symbol(sample_dir, tmp_path):
    groups = split_real(sample_dir, tmp_path / "in")
    groups["SYNUSDT"] = generated(tmp_path / "in")
    out = tmp_path / "out"
    report = run_batch("default", [str(tmp_path / "in" / "*.csv")], out, workers=2)
    assert report.exit_code == 0, report.summary["failed"]
    s = report.summary
    assert [c["status"] for c in s["chains"]] == ["done"] * 3
    assert s["totals"]["quarantined"] == 1  # the damaged row, in its file
    damaged = [p for p, f in s["files"].items() if f["quarantined"]]
    assert damaged == [str(groups["BTCUSDT"][1])]
    assert_accounting_closes(s)
    assert_one_copy_of_each_output(out, s)
    assert sorted(p.name for p in (out / "signals").iterdir()) == [
        "symbol=BTCUSDT", "symbol=ETHUSDT", "symbol=SYNUSDT"]
    assert s["outputs"]["vpin"]["rows"] and s["outputs"]["risk"]["rows"]
    assert all(o["streamed"] for o in s["outputs"].values())  # merged while the jobs ran
    for job in s["jobs"]:  # each job's time in the engine outside its replay, in three parts
        assert job["overhead_s"] == job["dispatch_s"] + job["in_worker_s"] + job["return_s"]
        assert job["in_worker_s"] > 0 and job["run_s"] > 0
        # what in_worker_s is made of, phase by phase (perf_counter inside it, so they add up
        # to no more than it, within the two clocks' rounding), and the worker's CPU
        assert list(job["phases"]) == list(PHASES)
        assert all(v >= 0 for v in job["phases"].values())
        assert sum(job["phases"].values()) <= job["in_worker_s"] + 1e-3
        assert job["cpu_s"] > 0
    assert s["first_job_start_s"] is not None and s["after_last_job_s"] is not None
    assert_merged_equals_sequential(out, report, groups, tmp_path)


def test_a_chain_of_one_file_has_its_job_work_out_the_bucket_volume(sample_dir, tmp_path, monkeypatch):
    """No calibration task reads a one-file chain's file before its job: the job works the
    ``auto`` bucket volume out over the file it reads (read once), the number
    ``calibrate_chain`` gives, and the merge equals one sequential run per symbol."""
    from nautilus_pipeline.batch import executors
    from nautilus_pipeline.batch.plan import calibrate_chain

    one = generated(tmp_path / "in", days=1)
    res = replay_job("default", one, tmp_path / "job", None)
    assert res.overrides == calibrate_chain("default", [str(one[0])], "SYNUSDT")
    assert res.overrides["vpin"]["bucket_volume"]["SYNUSDT"] > 0
    given = {"vpin": {"bucket_volume": {"SYNUSDT": 2.5}}}  # given: kept as it is
    assert replay_job("default", one, tmp_path / "job2", None, overrides=given).overrides == given

    groups = {"SYNUSDT": one, "GENUSDT": generated(tmp_path / "in", "GENUSDT", days=1, seed=5)}
    # a calibration task would fail its chain: a lambda cannot be sent to a worker
    monkeypatch.setattr(executors, "run_calibration", lambda work, chain: {})
    out = tmp_path / "out"
    report = run_batch("default", [str(tmp_path / "in" / "*.csv")], out, workers=2)
    assert report.exit_code == 0, report.summary["failed"]
    chains = {c["symbol"]: c for c in report.summary["chains"]}
    for sym, files in groups.items():
        assert chains[sym]["overrides"] == calibrate_chain("default", [str(files[0])], sym)
    assert_accounting_closes(report.summary)
    assert_merged_equals_sequential(out, report, groups, tmp_path)
    # ... and a chain of two files still has its calibration task (which the lambda fails)
    generated(tmp_path / "in2", "TWOUSDT", days=2)
    failed = run_batch("default", [str(tmp_path / "in2" / "*.csv")], tmp_path / "out2", workers=1)
    assert [f["symbol"] for f in failed.summary["failed"]] == ["TWOUSDT"]
    assert "pickle" in failed.summary["failed"][0]["error"]


def test_a_chains_calibration_is_read_back_until_one_of_its_files_changes(tmp_path, monkeypatch):
    """A chain of several files is calibrated over all of them (a second read of each) once;
    the same files again take the stored answer, the same bits; a file rewritten, other
    buckets or the cache off measure again."""
    from nautilus_pipeline import config
    from nautilus_pipeline.batch.plan import calibrate_chain

    files = [str(f) for f in generated(tmp_path / "in", "SYNUSDT", days=3, n=3000)]
    measured = []
    real = config.BuildContext.propose_bucket_volumes

    def counted(self, buckets):
        measured.append(buckets)
        return real(self, buckets)

    monkeypatch.setattr(config.BuildContext, "propose_bucket_volumes", counted)
    first = calibrate_chain("default", files, "SYNUSDT")
    again = calibrate_chain("default", files, "SYNUSDT")
    assert len(measured) == 1 and again == first
    v = first["vpin"]["bucket_volume"]["SYNUSDT"]
    assert repr(again["vpin"]["bucket_volume"]["SYNUSDT"]) == repr(v)
    st = os.stat(files[1])
    os.utime(files[1], ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # rewritten, say
    assert calibrate_chain("default", files, "SYNUSDT") == first and len(measured) == 2
    d = load(find_definition("default"))
    fewer = replace(d, stages=[replace(sd, values={**sd.values, "buckets_per_source": 10}) if sd.type == "vpin"
                               else sd for sd in d.stages])
    assert calibrate_chain(fewer, files, "SYNUSDT")["vpin"]["bucket_volume"]["SYNUSDT"] == pytest.approx(5 * v)
    assert len(measured) == 3
    # what decides the rows read measures again; the slab memory batch sets by workers does not
    others = [replace(d, pipeline={**d.pipeline, "symbols": ["SYNUSDT", "OTHER"]}),
              replace(d, replay={**d.replay, "order_by": "ts_event"})]
    for other in others:
        calibrate_chain(other, files, "SYNUSDT")
    calibrate_chain("default", files, "SYNUSDT", format="binance_trades")
    assert len(measured) == 6
    host = replace(d, pipeline={**d.pipeline, "memory": "host", "slabs": 3})
    assert calibrate_chain(host, files, "SYNUSDT") == first and len(measured) == 6
    monkeypatch.setenv("NAUTILUS_PIPELINE_CACHE", "off")
    assert calibrate_chain("default", files, "SYNUSDT") == first and len(measured) == 7


def test_a_chains_calibration_leaves_its_bad_rows_out_and_writes_no_quarantine_file(tmp_path, monkeypatch):
    """The calibration reads a chain once more; the rows it refuses are the run's to write
    (into the batch's output), so none lands in the worker's current folder."""
    from nautilus_pipeline.batch.plan import calibrate_chain

    files = generated(tmp_path / "in", "SYNUSDT", days=2, n=3000)
    lines = files[1].read_text().splitlines()
    lines[10] = lines[10].replace(lines[10].split(",")[2], "-1.0", 1)  # a negative qty
    files[1].write_text("\n".join(lines) + "\n")
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    monkeypatch.setenv("NAUTILUS_PIPELINE_CACHE", "off")
    volume = calibrate_chain("default", [str(f) for f in files], "SYNUSDT")["vpin"]["bucket_volume"]["SYNUSDT"]
    assert not list((tmp_path / "cwd").rglob("*"))
    qty = [float(ln.split(",")[2]) for f in files for ln in f.read_text().splitlines()[1:]]
    assert volume == pytest.approx(sum(q for q in qty if q > 0) / 50, rel=1e-12)


def test_empty_glob_and_mixed_formats_are_refused(sample_dir, tmp_path):
    with pytest.raises(nt.ConfigError, match=r"nothing\*\.csv: the pattern matches no file"):
        run_batch("default", [str(tmp_path / "nothing*.csv")], tmp_path / "out")
    split_real(sample_dir, tmp_path / "in", damage=False)
    (tmp_path / "in" / "quotes.parquet").write_bytes((sample_dir / "nautilus-binance-btcusdt-quotes.parquet").read_bytes())
    with pytest.raises(nt.ConfigError, match=r"mixed formats \(binance_trades: .*; nautilus_parquet|mixed formats"):
        run_batch("default", [str(tmp_path / "in" / "*")], tmp_path / "out")


def test_one_unreadable_file_fails_its_symbol_and_the_others_complete(sample_dir, tmp_path):
    groups = split_real(sample_dir, tmp_path / "in", damage=False)
    bad = tmp_path / "in" / "BTCUSDT-trades-2024-08-10.csv.gz"
    bad.write_bytes(gzip.compress(b"id,price,qty\n")[:12] + b"\x00garbage" * 50)
    out = tmp_path / "out"
    report = run_batch("default", [str(tmp_path / "in" / "*")], out, workers=2)
    s = report.summary
    assert report.exit_code == 4
    (failed,) = s["failed"]
    assert failed["symbol"] == "BTCUSDT" and str(bad) in failed["error"]
    assert s["files"][str(bad)]["status"] == "failed"
    assert {c["symbol"]: c["status"] for c in s["chains"]} == {"BTCUSDT": "failed", "ETHUSDT": "done"}
    assert sorted(p.name for p in (out / "signals").iterdir()) == ["symbol=ETHUSDT"]
    assert_accounting_closes(s)
    assert_merged_equals_sequential(out, report, {"ETHUSDT": groups["ETHUSDT"]}, tmp_path)


def kill_a_worker_mid_job(out: Path, stop: threading.Event, killed: list, *, after: int = 0,
                          busy: int = 1) -> None:
    """SIGKILL the first worker seen writing a job (its temporary folder names its pid),
    once ``after`` jobs have finished and ``busy`` workers are writing one; ``killed`` gets
    the pid and the job's id (``<chain>/<index>``)."""
    while not stop.is_set():
        done = len([p for p in (out / "jobs").glob("*/*") if p.is_dir() and TMP_MARK not in p.name])
        writing = {int(t.name.split(TMP_MARK)[1].split("-")[0]): t for t in (out / "jobs").glob(f"*/.*{TMP_MARK}*")}
        if done >= after and len(writing) >= busy:
            for pid, tmp in writing.items():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    continue
                killed.extend([pid, f"{tmp.parent.name}/{tmp.name[1:5]}"])
                return
        time.sleep(0.005)


def batch_with_a_worker_killed(out: Path, **batch) -> tuple[BatchReport, list]:
    """``run_batch("default", ..., out, **batch)`` while :func:`kill_a_worker_mid_job` watches
    ``out`` (its ``after``/``busy`` taken from ``batch``); the report and what was killed."""
    when = {k: batch.pop(k) for k in ("after", "busy") if k in batch}
    inputs = batch.pop("inputs")
    stop, killed = threading.Event(), []
    killer = threading.Thread(target=kill_a_worker_mid_job, args=(out, stop, killed), kwargs=when)
    killer.start()
    try:
        return run_batch("default", inputs, out, **batch), killed
    finally:
        stop.set()
        killer.join()


def test_a_worker_killed_mid_job_is_retried_and_nothing_is_doubled(sample_dir, tmp_path):
    groups = split_real(sample_dir, tmp_path / "in", damage=False)
    out = tmp_path / "out"
    report, killed = batch_with_a_worker_killed(out, inputs=[str(tmp_path / "in" / "*.csv")], workers=2, after=1)
    assert killed, "no worker was caught mid-job"
    s = report.summary
    assert report.exit_code == 0, s["failed"]
    assert s["retries"] >= 1
    assert_accounting_closes(s)
    assert_one_copy_of_each_output(out, s)
    assert_merged_equals_sequential(out, report, groups, tmp_path)


class _BreaksAtAFollowUp:
    """A worker pool whose first submit of a chain's next job (one that follows a result)
    raises BrokenProcessPool, as a real pool does once a worker has died since that result
    came back: the race CI met once (the submit's error escaped and failed the batch)."""

    def __init__(self, pool, broke: list):
        self._inner, self._broke = pool, broke

    def submit(self, fn, *args, **kwargs):
        from concurrent.futures.process import BrokenProcessPool

        from nautilus_pipeline.batch.executors import run_job
        if fn is run_job and args[1].index > 0 and not self._broke:
            self._broke.append(args[1].job_id)
            raise BrokenProcessPool("a child process terminated abruptly (made up by the test)")
        return self._inner.submit(fn, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._inner, name)


def test_a_pool_that_breaks_at_the_next_submit_has_its_tasks_resubmitted(sample_dir, tmp_path, monkeypatch):
    from nautilus_pipeline.batch.executors import LocalExecutor
    groups = split_real(sample_dir, tmp_path / "in", damage=False)
    out, broke = tmp_path / "out", []
    make = LocalExecutor._pool
    monkeypatch.setattr(LocalExecutor, "_pool", lambda self, work: _BreaksAtAFollowUp(make(self, work), broke))
    report = run_batch("default", [str(tmp_path / "in" / "*.csv")], out, workers=2)
    assert broke, "no follow-up job was submitted"
    s = report.summary
    assert report.exit_code == 0, s["failed"]
    assert {j["job"] for j in s["jobs"]} >= set(broke)
    # no worker died: the job whose submit failed never ran, so none counts a retry
    assert s["retries"] == 0 and all(j["attempts"] == 1 for j in s["jobs"])
    assert_accounting_closes(s)
    assert_one_copy_of_each_output(out, s)
    assert_merged_equals_sequential(out, report, groups, tmp_path)


class _AlwaysBroken:
    """A worker pool that is broken at every submit, as one whose workers die at start-up."""

    def __init__(self, pool):
        self._inner = pool

    def submit(self, fn, *args, **kwargs):
        from concurrent.futures.process import BrokenProcessPool
        raise BrokenProcessPool("a child process terminated abruptly (made up by the test)")

    def __getattr__(self, name):
        return getattr(self._inner, name)


def test_a_pool_that_breaks_every_time_fails_its_chains_instead_of_looping(tmp_path, monkeypatch):
    from nautilus_pipeline.batch.executors import LocalExecutor

    files = generated(tmp_path / "in", "SYNUSDT", days=2, n=2000)
    made = []
    real = LocalExecutor._pool

    def broken(self, work):
        made.append(1)
        return _AlwaysBroken(real(self, work))

    monkeypatch.setattr(LocalExecutor, "_pool", broken)
    report = run_batch("default", [str(f) for f in files], tmp_path / "out", workers=1)
    assert report.exit_code == 1  # not the data's fault (4): the engine's
    assert "broke 3 times in a row" in str(report.summary["failed"])
    assert len(made) <= 5  # the batch's pool (and its warm-up's), then two more: not a loop


def test_a_dead_worker_counts_an_attempt_for_its_job_only(tmp_path):
    groups = {sym: generated(tmp_path / "in", sym, days=2, n=40_000, seed=i)
              for i, sym in enumerate(("AAAUSDT", "BBBUSDT"))}
    out = tmp_path / "out"
    report, killed = batch_with_a_worker_killed(out, inputs=[str(tmp_path / "in" / "*.csv")], workers=2, busy=2)
    assert killed, "no two workers were caught mid-job at once"
    s = report.summary
    assert report.exit_code == 0, s["failed"]
    assert s["retries"] == 1
    attempts = {j["job"]: j["attempts"] for j in s["jobs"]}
    assert attempts == {job: 2 if job == killed[1] else 1 for job in attempts}
    assert not (out / ".workers").exists()
    assert_accounting_closes(s)
    assert_one_copy_of_each_output(out, s)
    assert_merged_equals_sequential(out, report, groups, tmp_path)


def test_a_file_that_breaks_mid_chain_fails_its_symbol_after_the_files_before_it(sample_dir, tmp_path):
    groups = split_real(sample_dir, tmp_path / "in", damage=False)
    middle = groups["BTCUSDT"][1]  # the chain's second file, by time
    cut = tmp_path / "in" / (middle.name + ".gz")
    packed = gzip.compress(middle.read_bytes())
    cut.write_bytes(packed[: len(packed) // 2])  # its first rows read, then the stream ends short
    middle.unlink()
    out = tmp_path / "out"
    definition = tmp_path / "fixed.toml"  # no 'auto' volume: its calibration would read the file first
    definition.write_text(re.sub(r'bucket_volume = "auto".*', "bucket_volume = 20.0",
                                 find_definition("default").read_text()))
    report = run_batch(str(definition), [str(tmp_path / "in" / "*")], out, workers=2)
    s = report.summary
    assert report.exit_code == 4
    assert s["failed"][0]["symbol"] == "BTCUSDT" and str(cut) in s["failed"][0]["error"]
    statuses = [s["files"][str(p)]["status"] for p in (groups["BTCUSDT"][0], cut, groups["BTCUSDT"][2])]
    assert statuses == ["done", "failed", "not_run"]
    assert {c["symbol"]: c["status"] for c in s["chains"]} == {"BTCUSDT": "failed", "ETHUSDT": "done"}
    assert_accounting_closes(s)
    assert pq.read_table(out / "trace" / "symbol=BTCUSDT").num_rows == s["files"][str(groups["BTCUSDT"][0])]["delivered"]
    assert_merged_equals_sequential(out, report, {"ETHUSDT": groups["ETHUSDT"]}, tmp_path, str(definition))


def test_a_symbol_with_a_slash_is_one_uri_encoded_partition(tmp_path):
    import pyarrow as pa
    import pyarrow.dataset as ds
    import pyarrow.parquet as pq

    from nautilus_pipeline.batch.merge import merge_outputs

    results = []
    for i, sym in enumerate(("EUR/USD", "USDJPY")):
        path = tmp_path / f"signals-{i}.parquet"
        pq.write_table(pa.table({"symbol": [sym, sym], "ts_ns": [1, 2], "x": [0.5, 1.5]}), path)
        results.append(JobResult(f"j{i}", (), str(tmp_path), {"signals": str(path)}, {}, {}, {}, b""))
    merged = merge_outputs(tmp_path / "out", results)
    assert merged["signals"]["rows"] == 4
    assert sorted(p.name for p in (tmp_path / "out" / "signals").iterdir()) == ["symbol=EUR%2FUSD", "symbol=USDJPY"]
    table = ds.dataset(tmp_path / "out" / "signals", partitioning="hive").to_table()
    assert sorted(set(table["symbol"].to_pylist())) == ["EUR/USD", "USDJPY"]


# --- files of one symbol that overlap in time ------------------------------------------------
def test_a_file_overlapping_the_one_before_fails_its_symbol_naming_both(sample_dir, tmp_path):
    groups = split_real(sample_dir, tmp_path / "in", damage=False)
    first, second = generated(tmp_path / "in", days=2)
    rows = first.read_text().splitlines()
    overlap = tmp_path / "in" / "SYNUSDT-trades-2024-08-03.csv"  # a copy of day 1's second half
    overlap.write_text("\n".join([rows[0], *rows[len(rows) // 2:]]) + "\n")
    out = tmp_path / "out"
    report = run_batch("default", [str(tmp_path / "in" / "*.csv")], out, workers=2)
    s = report.summary
    assert report.exit_code == 4
    (failed,) = s["failed"]
    assert failed["symbol"] == "SYNUSDT"
    assert str(overlap) in failed["error"] and str(first) in failed["error"] and "overlap" in failed["error"]
    assert [s["files"][str(p)]["status"] for p in (first, overlap, second)] == ["done", "failed", "not_run"]
    assert {c["symbol"]: c["status"] for c in s["chains"]}["BTCUSDT"] == "done"
    assert_accounting_closes(s)
    assert_merged_equals_sequential(out, report, groups, tmp_path)


def test_a_file_starting_at_the_last_tick_of_the_one_before_is_chained(tmp_path):
    (whole,) = generated(tmp_path / "all", days=1, n=6000)
    rows = whole.read_text().splitlines()
    ts = [int(r.split(",")[4]) for r in rows[1:]]
    cut = next(i for i in range(3000, len(ts)) if ts[i] == ts[i - 1])  # a tie across the boundary
    a, b = tmp_path / "in" / "SYNUSDT-trades-2024-08-01.csv", tmp_path / "in" / "SYNUSDT-trades-2024-08-02.csv"
    a.parent.mkdir()
    a.write_text("\n".join([rows[0], *rows[1:cut + 1]]) + "\n")
    b.write_text("\n".join([rows[0], *rows[cut + 1:]]) + "\n")
    out = tmp_path / "out"
    report = run_batch("default", [str(tmp_path / "in" / "*.csv")], out, workers=1)
    assert report.exit_code == 0, report.summary["failed"]
    assert_merged_equals_sequential(out, report, {"SYNUSDT": [a, b]}, tmp_path)


# --- the merge, part by part ------------------------------------------------------------------
def _part_result(tmp: Path, i: int, table: pa.Table) -> JobResult:
    path = tmp / f"part-{i}.parquet"
    pq.write_table(table, path)
    return JobResult(f"{table['symbol'][0].as_py()}/{i:04d}", (), str(tmp), {"signals": str(path)}, {}, {}, {}, b"")


def test_the_merge_appends_parts_one_by_one_and_sorts_a_symbol_whose_parts_overlap(tmp_path):
    from nautilus_pipeline.batch.merge import merge_outputs

    a = [pa.table({"symbol": ["A"] * 3, "ts_ns": [1, 2, 2], "x": [0.5, -0.0, float("nan")]}),
         pa.table({"symbol": ["A"] * 2, "ts_ns": [2, 5]}),  # no x: nulls in the merge
         pa.table({"symbol": ["A"] * 2, "ts_ns": [7, 9], "x": [1.0, 2.0]})]
    b = [pa.table({"symbol": ["B"] * 2, "ts_ns": [10, 20], "x": [1.0, 2.0]}),
         pa.table({"symbol": ["B"] * 3, "ts_ns": [5, 10, 30], "x": [3.0, 4.0, 5.0]})]  # starts before
    results = [_part_result(tmp_path, i, t) for i, t in enumerate(a + b)]
    merged = merge_outputs(tmp_path / "out", results)
    assert merged["signals"]["rows"] == 12 and merged["signals"]["streamed"] is False
    fa = pq.ParquetFile(tmp_path / "out" / "signals" / "symbol=A" / "part-0.parquet")
    assert fa.metadata.num_row_groups == 3  # appended part by part, not concatenated in memory
    ta = fa.read()
    assert ta["ts_ns"].to_pylist() == [1, 2, 2, 2, 5, 7, 9]
    assert repr(ta["x"].to_pylist()) == repr([0.5, -0.0, float("nan"), None, None, 1.0, 2.0])
    tb = pq.read_table(tmp_path / "out" / "signals" / "symbol=B" / "part-0.parquet")
    assert tb["ts_ns"].to_pylist() == [5, 10, 10, 20, 30]
    assert tb["x"].to_pylist() == [3.0, 1.0, 4.0, 2.0, 5.0]  # stable: the tie keeps the chain's order


def test_the_streaming_merge_holds_a_result_ahead_of_its_turn_and_writes_what_the_whole_merge_writes(tmp_path):
    from nautilus_pipeline.batch.merge import StreamingMerge, _merge_all

    rng = np.random.default_rng(5)
    results, start = [], {"A": 0, "B": 10**9}
    for sym in ("A", "B"):
        for i in range(3):
            n = int(rng.integers(1, 50))
            ts = start[sym] + np.sort(rng.integers(0, 1000, n))
            start[sym] = int(ts[-1])
            table = pa.table({"symbol": pa.array([sym] * n).dictionary_encode(), "ts_ns": ts,
                              "x": rng.normal(size=n)})
            path = tmp_path / f"{sym}-{i}.parquet"
            pq.write_table(table, path)
            results.append(JobResult(f"{sym}/{i:04d}", (), str(tmp_path), {"signals": str(path)}, {}, {}, {}, b""))
    merger = StreamingMerge(tmp_path / "streamed")
    for res in [results[1], results[3], results[0], results[4], results[2], results[5]]:  # A/0001 first
        merger.add(res)
    got = merger.finish(results)
    want: dict = {}
    _merge_all(tmp_path / "whole", {"signals": [(r.job_id, r.paths["signals"]) for r in results]}, want)
    assert got["signals"]["streamed"] and got["signals"]["rows"] == want["signals"]["rows"]
    for sym in ("A", "B"):
        a = pq.read_table(tmp_path / "streamed" / "signals" / f"symbol={sym}" / "part-0.parquet")
        b = pq.read_table(tmp_path / "whole" / "signals" / f"symbol={sym}" / "part-0.parquet")
        assert a.equals(b) and a.schema.equals(b.schema)
    assert not list((tmp_path / "streamed").glob(".*.merging"))


def test_the_pooled_merge_appends_chains_side_by_side_and_writes_what_one_thread_writes(tmp_path, monkeypatch):
    """Many chains' results at once, shuffled (a chain's jobs out of order too): the pool's
    files equal, byte for byte, what the merge on one thread writes (``merge_outputs``), a
    kind with a chain out of time order merged the whole way in both; and two chains were
    being appended at the same moment, on two threads (they meet at a barrier: one thread
    alone would break it and the kind would not stream)."""
    from nautilus_pipeline.batch import merge
    from nautilus_pipeline.batch.merge import StreamingMerge, merge_outputs

    rng = np.random.default_rng(11)
    results = []
    for c in range(12):
        sym, start = f"S{c:02d}", 0
        for i in range(3):
            n = int(rng.integers(1, 400))
            ts = start + np.sort(rng.integers(0, 10_000, n))
            start = int(ts[-1])
            paths = {}
            for kind in ("signals", "vpin", "risk", "latency"):
                kts = ts[::-1].copy() if (kind == "risk" and c == 7 and i == 1) else ts  # out of order
                path = tmp_path / f"{kind}-{sym}-{i}.parquet"
                pq.write_table(pa.table({"symbol": pa.array([sym] * n).dictionary_encode(), "ts_ns": kts,
                                         "x": rng.normal(size=n)}), path)
                paths[kind] = str(path)
            results.append(JobResult(f"{sym}/{i:04d}", (), str(tmp_path), paths, {}, {}, {}, b""))
    shuffled = [results[i] for i in rng.permutation(len(results))]
    seen = [r.job_id for r in shuffled]
    assert any(seen.index(f"S{c:02d}/0001") < seen.index(f"S{c:02d}/0000") for c in range(12))  # ahead of its turn

    monkeypatch.setattr(merge, "MERGE_THREADS", 4)
    merger = StreamingMerge(tmp_path / "pooled")
    appending, barrier, lock = set(), threading.Barrier(2, timeout=120), threading.Lock()
    append = merger._append

    def met_by_another_thread(kind, chain, path):
        with lock:
            first = len(appending) < 2 and threading.get_ident() not in appending
            appending.add(threading.get_ident())
        if first:  # the first appends of two threads wait for each other
            barrier.wait()
        return append(kind, chain, path)

    merger._append = met_by_another_thread
    for res in shuffled:
        merger.add(res)
    pooled = merger.finish(results)
    one = merge_outputs(tmp_path / "one", results)

    assert len(appending) > 1 and merger.cpu_s > 0
    assert sorted(pooled) == sorted(one) == ["risk", "signals", "vpin"]
    for kind in pooled:
        assert {k: v for k, v in pooled[kind].items() if k != "path"} == \
            {k: v for k, v in one[kind].items() if k != "path"}, kind
    assert pooled["signals"]["streamed"] and pooled["vpin"]["streamed"] and not pooled["risk"]["streamed"]
    files = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*.parquet"))
    assert len(files) == 3 * 12
    assert files == sorted(p.relative_to(tmp_path / "pooled") for p in (tmp_path / "pooled").rglob("*.parquet"))
    for f in files:
        assert (tmp_path / "pooled" / f).read_bytes() == (tmp_path / "one" / f).read_bytes(), f
    assert not list((tmp_path / "pooled").glob(".*"))


def test_aborting_the_pooled_merge_ends_it_after_the_part_it_is_on(tmp_path, monkeypatch):
    """abort() while a part is being appended: that part is finished, no other one is begun
    (the chains still queued are dropped), the threads end and no temporary folder is left."""
    from nautilus_pipeline.batch import merge
    from nautilus_pipeline.batch.merge import StreamingMerge

    monkeypatch.setattr(merge, "MERGE_THREADS", 1)
    results = [_signals_result(tmp_path, f"S{c}", i, [10 * i, 10 * i + 1]) for c in range(4) for i in range(2)]
    merger = StreamingMerge(tmp_path / "out")
    entered, release, appended = threading.Event(), threading.Event(), []
    append = merger._append

    def held(kind, chain, path):
        entered.set()
        assert release.wait(120)
        appended.append(path)
        return append(kind, chain, path)

    merger._append = held
    for res in results:
        merger.add(res)
    assert entered.wait(120)
    aborting = threading.Thread(target=merger.abort)
    aborting.start()
    assert merger._stop.wait(120)  # abort() has begun: it waits for the part in hand
    release.set()
    aborting.join(120)
    assert not aborting.is_alive() and len(appended) == 1
    assert not [t for t in threading.enumerate() if t.name.startswith("batch-merge")]
    assert not list((tmp_path / "out").glob(".*"))


def test_engine_times_count_from_when_a_job_could_start():
    """Dispatch is counted from the latest of: submitted, its chain's job before ended, its
    worker's job before ended, its worker warm; never the time it queued behind others."""
    from nautilus_pipeline.batch import engine_times
    from nautilus_pipeline.batch.executors import Outcome

    def job(job_id, pid, started, ended, run_s):
        return JobResult(job_id, (), "", {}, {}, {}, {}, b"", run_s=run_s, pid=pid, started_at=started,
                         ended_at=ended)

    out = Outcome(results=[job("A/0000", 1, 10.0, 12.0, 1.5), job("B/0000", 1, 12.25, 14.0, 1.0),
                           job("A/0001", 2, 12.5, 13.0, 0.25)],
                  submitted_at={"A/0000": 1.0, "B/0000": 1.0, "A/0001": 12.125},
                  returned_at={"A/0000": 12.125, "B/0000": 14.5, "A/0001": 13.0},
                  warm_at={1: 9.0, 2: 12.375})
    t = engine_times(out)
    assert t["A/0000"] == {"dispatch_s": 1.0, "in_worker_s": 0.5, "return_s": 0.125, "overhead_s": 1.625}
    assert t["B/0000"]["dispatch_s"] == 0.25  # queued behind A/0000 on worker 1 until 12.0
    assert t["A/0001"]["dispatch_s"] == 0.125  # its worker warm at 12.375
    assert t["A/0001"]["in_worker_s"] == 0.25 and t["A/0001"]["return_s"] == 0.0


def test_a_worker_warms_up_on_the_batch_definition_and_one_the_sample_does_not_fit_warms_imports_only():
    import concurrent.futures as cf

    from nautilus_pipeline.batch import executors

    with cf.ProcessPoolExecutor(max_workers=1, mp_context=executors._worker_context()) as pool:
        for name in ("default", "quotes"):  # quotes: the trades sample has no ts_recv_ns for it
            pid, imported, warm = pool.submit(executors.warm_up, "warning", 1, load(name)).result(timeout=300)
            assert pid != os.getpid() and imported <= warm


def test_a_warm_worker_has_its_survivors_frozen_and_a_cold_one_after_its_first_job(tmp_path):
    """Full collections in a warm worker skip what lives as long as the worker (gc.freeze
    once warm); a pool worker that no warm-up reached freezes after its first job; the
    process that runs a job in-process (this one) is left as it was."""
    import concurrent.futures as cf
    import gc

    from nautilus_pipeline.batch import executors

    work = executors.Work(load("default"), str(tmp_path))
    spec = JobSpec("S/0000", "S", 0, (str(executors.WARM_SAMPLE),), True, None)
    ctx = executors._worker_context()
    with cf.ProcessPoolExecutor(1, mp_context=ctx, initializer=executors._pool_init,
                                initargs=("warning", 1)) as pool:
        fresh = pool.submit(gc.get_freeze_count).result(timeout=300)  # 0; 375 on the GPU host's Python 3.12
        assert fresh < 10_000
        pool.submit(executors.warm_up, "warning", 1, load("default")).result(timeout=300)
        assert pool.submit(gc.get_freeze_count).result(timeout=300) > fresh + 10_000
    with cf.ProcessPoolExecutor(1, mp_context=ctx, initializer=executors._pool_init,
                                initargs=("warning", 1)) as pool:
        fresh = pool.submit(gc.get_freeze_count).result(timeout=300)
        pool.submit(executors.run_job, work, spec, {}, 1, None).result(timeout=300)
        assert pool.submit(gc.get_freeze_count).result(timeout=300) > fresh + 10_000
    before = gc.get_freeze_count()
    try:
        executors.run_job(work, replace(spec, job_id="S/0001"), {}, 1, None)
    finally:
        memory.keep_slabs(False)  # the worker set-up it ran turned slab keeping on here
    assert gc.get_freeze_count() == before


MERGE_MEMORY_CHILD = """
import sys, pathlib, numpy as np, pyarrow as pa, pyarrow.parquet as pq
from nautilus_pipeline.batch.job import JobResult
from nautilus_pipeline.batch.merge import merge_outputs
tmp, parts, rows = pathlib.Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
results = []
for i in range(parts):
    ts = np.arange(i * rows, (i + 1) * rows, dtype=np.int64)
    t = pa.table({"symbol": pa.array(["S"] * rows).dictionary_encode(), "ts_ns": ts,
                  "a": ts * 0.5, "b": ts * 0.25, "c": ts * 0.125})
    pq.write_table(t, tmp / f"p{i}.parquet")
    results.append(JobResult(f"S/{i:04d}", (), str(tmp), {"signals": str(tmp / f"p{i}.parquet")}, {}, {}, {}, b""))
pool = pa.default_memory_pool()
before = pool.max_memory()
merge_outputs(tmp / "out", results)
print(pool.max_memory() - before, rows * 8 * 4)
"""


def test_the_merge_holds_one_part_in_memory_not_the_kind(tmp_path):
    import subprocess
    import sys

    parts, rows = 12, 200_000
    done = subprocess.run([sys.executable, "-c", MERGE_MEMORY_CHILD, str(tmp_path), str(parts), str(rows)],
                          capture_output=True, text=True, check=True)
    peak, part_bytes = map(int, done.stdout.split())
    assert pq.read_table(tmp_path / "out" / "signals")["ts_ns"].to_pylist() == list(range(parts * rows))
    assert peak < 4 * part_bytes, (peak, part_bytes)  # the whole kind is 12 parts


def test_workers_import_the_drivers_package_when_the_current_folder_holds_another(tmp_path, monkeypatch):
    """A fork server started as ``python -c`` in a folder with another checkout's
    ``nautilus_pipeline`` would import that one: there the workers are spawned with the
    driver's sys.path, and run the driver's code."""
    import concurrent.futures as cf
    import inspect

    from nautilus_pipeline.batch import executors

    other = tmp_path / "nautilus_pipeline"
    other.mkdir()
    (other / "__init__.py").write_text('raise ImportError("the other checkout was imported")\n')
    monkeypatch.setattr(executors, "_server_env", None)
    assert executors._worker_context().get_start_method() == "forkserver"  # from this checkout
    monkeypatch.chdir(tmp_path)
    ctx = executors._worker_context()
    assert ctx.get_start_method() == "spawn"
    with cf.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        got = Path(pool.submit(inspect.getfile, executors.replay_job).result(timeout=300))
    assert got.resolve().is_relative_to(executors._PACKAGE)


def test_workers_get_the_drivers_environment_as_it_is_when_their_pool_starts(monkeypatch):
    """The fork server lives as long as the driver and its children inherit its environment:
    a variable changed after the first pool must still reach the next pool's workers (they
    are spawned then), and an unchanged environment keeps the fork server."""
    import concurrent.futures as cf

    from nautilus_pipeline.batch import executors

    monkeypatch.delenv("NT_TEST_ENV_REACHES_WORKERS", raising=False)
    monkeypatch.setattr(executors, "_server_env", None)

    def worker_sees() -> tuple[str, str | None]:
        ctx = executors._worker_context()
        with cf.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
            return ctx.get_start_method(), pool.submit(os.getenv, "NT_TEST_ENV_REACHES_WORKERS").result(timeout=300)

    assert worker_sees() == ("forkserver", None)
    monkeypatch.setenv("NT_TEST_ENV_REACHES_WORKERS", "changed")
    assert worker_sees() == ("spawn", "changed")
    monkeypatch.delenv("NT_TEST_ENV_REACHES_WORKERS")
    assert worker_sees() == ("forkserver", None)


def _signals_result(tmp: Path, sym: str, i: int, ts: list[int]) -> JobResult:
    path = tmp / f"{sym}-{i}.parquet"
    pq.write_table(pa.table({"symbol": [sym] * len(ts), "ts_ns": ts}), path)
    return JobResult(f"{sym}/{i:04d}", (), str(tmp), {"signals": str(path)}, {}, {}, {}, b"")


def test_what_a_killed_batch_left_streaming_is_not_installed_with_the_next_one(tmp_path):
    """A batch killed (-9, OOM) while its merge streamed leaves ``OUT/.<kind>.merging/``; the
    next batch into OUT must install its own parts only (review finding: a stale partition was
    installed, and the dataset held more rows than summary.json said)."""
    from nautilus_pipeline.batch.merge import StreamingMerge

    out = tmp_path / "out"
    stale = out / ".signals.merging" / "symbol=STALE"
    stale.mkdir(parents=True)
    pq.write_table(pa.table({"ts_ns": [1, 2, 3]}), stale / "part-0.parquet")
    results = [_signals_result(tmp_path, "A", 0, [1, 2]), _signals_result(tmp_path, "A", 1, [3, 4])]
    merge = StreamingMerge(out)
    for r in results:
        merge.add(r)
    merged = merge.finish(results)
    assert merged["signals"]["rows"] == 4
    assert {p.name for p in (out / "signals").iterdir()} == {"symbol=A"}


@pytest.mark.parametrize("parts", [[[None, 5, 7], [8, 9]], [[3, 4], [None]], [[None], [None, 2]]])
def test_a_part_with_null_timestamps_is_merged_sorted_with_its_nulls_last(tmp_path, parts):
    """No time order to follow in a part with a null ``ts_ns``: its symbol goes to the sorted
    merge (nulls last), streamed or not (review finding: read as the zeros under the nulls,
    they were taken as in order and written first)."""
    from nautilus_pipeline.batch.merge import StreamingMerge, merge_outputs

    results = [_signals_result(tmp_path, "A", i, ts) for i, ts in enumerate(parts)]
    want = sorted(t for ts in parts for t in ts if t is not None) + [None] * sum(ts.count(None) for ts in parts)
    merge_outputs(tmp_path / "whole", results)
    streamed = StreamingMerge(tmp_path / "streamed")
    for r in results:
        streamed.add(r)
    streamed.finish(results)
    for out in ("whole", "streamed"):
        got = pq.ParquetFile(tmp_path / out / "signals" / "symbol=A" / "part-0.parquet").read()
        assert got["ts_ns"].to_pylist() == want, out


def test_an_error_while_the_jobs_run_stops_the_merge_and_leaves_no_half_written_file(tmp_path):
    """Not only a Ctrl-C: any failure of the run phase joins the merge thread and removes its
    unfinished Parquet files (review finding: the thread and footer-less files were left)."""
    from nautilus_pipeline.batch import Progress

    class Boom(Progress):
        def job_done(self, result):
            raise RuntimeError("a progress callback failed")

    out = tmp_path / "out"
    files = [str(p) for p in generated(tmp_path / "a", symbol="SYNUSDT", days=2)]
    with pytest.raises(RuntimeError, match="progress callback failed"):
        run_batch(str(find_definition("default")), files, out, workers=1, progress=Boom())
    assert not [t for t in threading.enumerate() if t.name.startswith("batch-merge")]
    assert not list(out.glob(".*.merging/**/*.parquet"))


def _warm_up_that_fails(log_level, threads, definition=None):
    raise MemoryError("the warm-up replay ran out of memory")  # a worker lost while warming


def test_a_failed_ray_warm_up_costs_its_timing_not_the_batch(tmp_path, monkeypatch):
    """Review finding: one warm-up task that failed made ``ray.get`` raise and failed the batch."""
    pytest.importorskip("ray")
    import nautilus_pipeline.batch.executors as executors

    monkeypatch.setattr(executors, "warm_up", _warm_up_that_fails)
    files = [str(p) for p in generated(tmp_path / "a", symbol="SYNUSDT", days=1)]
    report = run_batch(str(find_definition("default")), files, tmp_path / "out", executor="ray", workers=1)
    assert report.exit_code == 0 and report.summary["accounting_closes"]


def test_batch_workers_take_host_slabs_for_auto_memory_and_keep_an_explicit_choice():
    from nautilus_pipeline.batch import worker_memory
    gpu = load(find_definition("gpu"))
    assert gpu.pipeline["memory"] == "auto"
    assert worker_memory(gpu, 16).pipeline["memory"] == "host"
    assert worker_memory(gpu, 1).pipeline["memory"] == "auto"  # one worker: the run's own rule
    pinned = replace(gpu, pipeline={**gpu.pipeline, "memory": "pinned"})
    assert worker_memory(pinned, 16).pipeline["memory"] == "pinned"
    assert gpu.pipeline["memory"] == "auto"  # the definition passed in is not changed
