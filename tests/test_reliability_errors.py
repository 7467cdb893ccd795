"""One line and the documented exit code, never a traceback (issue 12, items 9-11 and 13-17).

Exit codes (``cli.py``): 2 bad arguments, 3 bad definition, 4 unreadable or bad data, 5 a stage
failed on some batches, 1 other errors (an output that cannot be written). Each case runs the
command in-process (``cli.main``) and checks the code and that stderr is one line.
"""

from __future__ import annotations

import gzip
import os
import pickle
import socket
import stat
from pathlib import Path

import numpy as np
import orjson
import pytest

from nautilus_pipeline import config
from nautilus_pipeline.cli import main
from nautilus_pipeline.errors import ConfigError, DataError
from nautilus_pipeline.io import Replay, Source
from nautilus_pipeline.model.spec import ModelSpec, load_model, random_weights, save_model

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "nautilus_pipeline" / "data"
BINANCE = DATA / "binance-um-btcusdt-trades-20240808.csv"
VPIN = str(REPO / "pipelines" / "vpin.toml")
DEFAULT = str(REPO / "pipelines" / "default.toml")


@pytest.fixture(autouse=True)
def _restore_logging():
    yield
    import structlog

    structlog.reset_defaults()


def cli(capsys, *argv: str) -> tuple[int, str]:
    """Exit code and stderr of one command (argparse's exit 2 included)."""
    try:
        rc = main(list(argv))
    except SystemExit as e:  # argparse
        rc = e.code
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return rc, err


def one_line(err: str) -> str:
    """The error line; besides log records, only argparse's usage may come before it."""
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("{")]
    assert lines and "error:" in lines[-1], err
    assert len(lines) == 1 or lines[0].startswith("usage:"), err
    return lines[-1]


def definition(tmp_path: Path, body: str, name: str = "p.toml") -> str:
    p = tmp_path / name
    p.write_text(body.replace("package:", str(DATA) + "/"))
    return str(p)


VPIN_BODY = (REPO / "pipelines" / "vpin.toml").read_text()
DEFAULT_BODY = (REPO / "pipelines" / "default.toml").read_text()


# --- 17: arguments and settings out of range ---------------------------------------------
@pytest.mark.parametrize(("args", "what"), [
    (["--batch", "0"], "--batch"), (["--batch", "100000000000"], "--batch"), (["--batch", "1e11"], "--batch"),
    (["--speed", "-1"], "--speed"), (["--speed", "nan"], "--speed"), (["--metrics-port", "99999"], "--metrics-port"),
    (["--metrics-port", "-1"], "--metrics-port"), (["--trace-every", "-1"], "--trace-every"),
    (["--format", "nope", "--ticks", str(BINANCE)], "--format"), (["--format", "csv"], "--format"),
])
def test_bad_arguments_exit_2_with_one_line(capsys, tmp_path: Path, args: list[str], what: str) -> None:
    rc, err = cli(capsys, "run", VPIN, "--out", str(tmp_path), *args)
    assert rc == 2 and what in one_line(err)


def test_a_metrics_port_in_use_exits_2(capsys, tmp_path: Path) -> None:
    pytest.importorskip("prometheus_client")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        rc, err = cli(capsys, "run", VPIN, "--out", str(tmp_path), "--metrics-port", str(s.getsockname()[1]))
    assert rc == 2 and "--metrics-port" in one_line(err)


@pytest.mark.parametrize(("setting", "key"), [
    ("batch_size = 10000000000", "batch_size"), ("batch_size = 1e10", "batch_size"), ("slabs = 0", "slabs"),
    ("max_delay_us = -5.0", "max_delay_us"), ("blas_threads = -1", "blas_threads"),
    ("symbols = [1, 2]", "symbols"), ("symbols = ['BTCUSDT-PERP', 'BTCUSDT-PERP']", "symbols"),
    ("queue_size = 0", "queue_size"),
])
def test_pipeline_settings_out_of_range_exit_3_at_validate_and_run(capsys, tmp_path: Path, setting: str, key: str) -> None:
    body = VPIN_BODY.replace('batch_size = 4096', setting)
    path = definition(tmp_path, body)
    for cmd in (["validate", path], ["run", path, "--out", str(tmp_path / "o")]):
        rc, err = cli(capsys, *cmd)
        assert rc == 3 and key in one_line(err), (cmd, err)


@pytest.mark.parametrize(("old", "new", "key"), [
    ("[[stages]]\ntype = \"features\"", "[[stages]]\ntype = \"features\"\nhalf_lives = [\"a\"]", "half_lives"),
    ("[[stages]]\ntype = \"features\"", "[[stages]]\ntype = \"features\"\nhalf_lives = [0, 10]", "half_lives"),
    ("var_every = 2000", "var_every = 2000\nvar_levels = [1.5]", "var_levels"),
    ("var_every = 2000", "var_every = 2000\nvar_levels = []", "var_levels"),
    ("bucket_volume = \"auto\"", "bucket_volume = { ETHUSDT = 10.0 }", "no entry for ['BTCUSDT-PERP']"),
    ("bucket_volume = \"auto\"", "bucket_volume = { BTCUSDT-PERP = -1.0 }", "bucket_volume.BTCUSDT-PERP"),
    ("type = \"inference\"", "type = \"inference\"\nmodel = \"missing.npz\"", "stages[1] (inference)"),
])
def test_stage_settings_that_would_fail_every_batch_exit_3_at_build(capsys, tmp_path: Path, old: str, new: str, key: str) -> None:
    assert old in DEFAULT_BODY
    path = definition(tmp_path, DEFAULT_BODY.replace(old, new, 1))
    for cmd in (["validate", path], ["run", path, "--out", str(tmp_path / "o")]):
        rc, err = cli(capsys, *cmd)
        assert rc == 3 and key in one_line(err), (cmd, err)


def test_a_stage_failing_on_batches_at_run_time_exits_5_with_the_count(capsys, sample_dir: Path, tmp_path: Path) -> None:
    """A symbol that appears only late in a capture has no bucket_volume: build passes (the
    first chunk names ETHUSDT only), the batches with the new symbol fail, rc 5."""
    lines = gzip.decompress((sample_dir / "binance-feed-spot-ethusdt_20240808.jsonl.gz").read_bytes()).split(b"\n")
    lines = [ln if i < 20_000 else ln.replace(b'"s":"ETHUSDT"', b'"s":"ETHBTC"') for i, ln in enumerate(lines)]
    feed = tmp_path / "feed.jsonl"
    feed.write_bytes(b"\n".join(lines))
    path = definition(tmp_path, f'[[sources]]\npath = "{feed}"\n[[stages]]\ntype = "vpin"\n'
                                'bucket_volume = { ETHUSDT = 10.0 }\nbar_ns = 0\n[outputs]\ntopics = ["vpin.>"]\n')
    rc, err = cli(capsys, "run", path, "--out", str(tmp_path / "o"))
    assert rc == 5 and "failed in stages: vpin" in one_line(err)
    summary = orjson.loads((tmp_path / "o" / "summary.json").read_bytes())
    t = summary["ticks"]
    assert t["failed_batches"] > 0 and t["failed_in_stages"] > 0
    assert t["processed"] + t["failed_in_stages"] == t["delivered"]


# --- 10: an allow-list with a file of several symbols ------------------------------------
def test_symbols_outside_the_allow_list_are_bad_rows_not_a_config_error(capsys, tmp_path: Path) -> None:
    src = (DATA / "tardis-bitmex-xbtusd-trades.csv").read_text().splitlines()
    rows = [src[0]]
    for i, ln in enumerate(src[1:] * 20):
        f = ln.split(",")
        f[1], f[2] = ("XBTUSD" if i % 3 else "ETHUSD"), str(1583020803145000 + i * 1000)
        rows.append(",".join(f))
    data = tmp_path / "mixed.csv"
    data.write_text("\n".join(rows) + "\n")
    path = definition(tmp_path, f'[pipeline]\nsymbols = ["XBTUSD"]\n[[sources]]\npath = "{data}"\n'
                                'on_bad_row = "reject"\n[[stages]]\ntype = "vpin"\nbucket_volume = 1000.0\n'
                                'bar_ns = 0\n[outputs]\ntopics = ["vpin.>"]\n')
    rc, err = cli(capsys, "run", path, "--out", str(tmp_path / "o"))
    assert rc == 0, err
    t = orjson.loads((tmp_path / "o" / "summary.json").read_bytes())["ticks"]
    assert (t["read"], t["rejected"], t["by_reason"]) == (200, 67, {"unknown_symbol": 67})


# --- 11: outputs that cannot be written -------------------------------------------------
def test_out_that_is_a_file_exits_2_before_reading(capsys, tmp_path: Path) -> None:
    f = tmp_path / "a-file"
    f.write_text("x")
    rc, err = cli(capsys, "run", VPIN, "--out", str(f))
    assert rc == 2 and "is a file, not a folder" in one_line(err)


def test_out_not_writable_exits_2_even_as_root(capsys, tmp_path: Path, monkeypatch) -> None:
    from nautilus_pipeline import cli as cli_module

    out, real = tmp_path / "out", os.access
    monkeypatch.setattr(cli_module.os, "access", lambda path, mode: Path(path) != out and real(path, mode))
    rc, err = cli(capsys, "run", VPIN, "--out", str(out))  # what a read-only folder says to a user
    assert rc == 2 and "not writable" in one_line(err)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_out_in_a_read_only_folder_exits_2(capsys, tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        rc, err = cli(capsys, "run", VPIN, "--out", str(ro / "out"))
    finally:
        ro.chmod(stat.S_IRWXU)
    assert rc == 2 and "--out" in one_line(err)


def test_a_full_disk_stops_with_one_error_and_leaves_whole_lines(capsys, tmp_path: Path, monkeypatch) -> None:
    """The sink's writes fail with ENOSPC after 20 kB (simulated: runs anywhere)."""
    from nautilus_pipeline.io import sinks

    budget = [20_000]
    real = os.write

    def write(fd: int, data) -> int:
        if budget[0] <= 0:
            raise OSError(28, "No space left on device")
        n = min(len(data), budget[0])
        budget[0] -= n
        return real(fd, bytes(data[:n]))

    monkeypatch.setattr(sinks.os, "write", write)
    out = tmp_path / "o"
    rc, err = cli(capsys, "run", DEFAULT, "--out", str(out), "--batch", "512")
    assert rc == 1 and "No space left on device" in one_line(err)
    for f in out.glob("*.jsonl"):
        data = f.read_bytes()
        assert not data or data.endswith(b"\n"), f
        [orjson.loads(line) for line in data.splitlines()]  # every line whole
    assert not (out / "signals.parquet").exists()  # not written whole: not there


def test_a_real_full_disk_on_a_tiny_tmpfs(capsys, tmp_path: Path) -> None:
    import subprocess

    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=100k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip(reason="cannot mount a tmpfs here (needs root)")
    try:
        rc, err = cli(capsys, "run", DEFAULT, "--out", str(mnt / "o"))
        assert rc == 1 and "No space left on device" in one_line(err)
        for f in (mnt / "o").glob("*.jsonl"):
            data = f.read_bytes()
            assert not data or data.endswith(b"\n")
            [orjson.loads(line) for line in data.splitlines()]
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(mnt)], check=False)  # a file still open: detach


def test_quarantine_write_errors_cut_the_file_to_whole_lines(tmp_path: Path, monkeypatch) -> None:
    from nautilus_pipeline.errors import PipelineError
    from nautilus_pipeline.io.checks import Quarantine

    lines = BINANCE.read_text().splitlines()[:2000]
    for i in range(100, 2000, 10):
        lines[i] = lines[i].replace(",", ",x", 1)
    p = tmp_path / "BTCUSDT-trades.csv"
    p.write_text("\n".join(lines) + "\n")
    q = tmp_path / "q.jsonl"
    calls = [0]
    real = Quarantine._write

    def failing(self, row):
        calls[0] += 1
        if calls[0] == 50:
            self._fh.write(b'{"half a line')  # what a full disk leaves
            raise OSError(28, "No space left on device")
        return real(self, row)

    monkeypatch.setattr(Quarantine, "_write", failing)
    with pytest.raises(PipelineError, match=r"q\.jsonl: cannot write the quarantine file"):
        list(Replay([Source(p, format="binance_trades", policy="quarantine", quarantine=q)]).iter_arrays())
    assert len([orjson.loads(x) for x in q.read_bytes().splitlines()]) == 49


# --- 13: feed captures -------------------------------------------------------------------
def test_feed_messages_of_the_wrong_shape_are_bad_lines(sample_dir: Path, tmp_path: Path) -> None:
    src = gzip.decompress((sample_dir / "binance-feed-spot-ethusdt_20240808.jsonl.gz").read_bytes()).splitlines()
    trades = [i for i, ln in enumerate(src) if b"@trade" in ln]
    out = list(src)

    def edit(i: int, fn) -> None:
        head, _, body = out[i].partition(b" ")
        msg = orjson.loads(body)
        fn(msg)
        out[i] = head + b" " + orjson.dumps(msg)

    edit(trades[0], lambda m: m.update(stream=17))
    edit(trades[1], lambda m: m["data"].update(s=None))
    edit(trades[2], lambda m: m["data"].update(m="false"))
    edit(trades[3], lambda m: m["data"].update(p=True))
    edit(trades[4], lambda m: m.update(data=[1, 2]))
    out[trades[5]] = out[trades[5]].partition(b" ")[0] + b" [1, 2, 3]"
    out[trades[6]] = out[trades[6]].partition(b" ")[0] + b" 42"
    p = tmp_path / "feed.jsonl"
    p.write_bytes(b"\n".join(out) + b"\n")
    _, good = _replay(sample_dir / "binance-feed-spot-ethusdt_20240808.jsonl.gz", "binance_feed")
    q = tmp_path / "q.jsonl"
    _, r = _replay(p, "binance_feed", policy="quarantine", quarantine=q)
    t = r.accounting.total
    assert t.read == good.accounting.total.read and t.quarantined == 7
    assert sorted(orjson.loads(x)["record"] for x in q.read_bytes().splitlines()) == [i + 1 for i in trades[:7]]


def _replay(path: Path, fmt: str, policy: str = "fail", **kw) -> tuple[int, Replay]:
    r = Replay([Source(path, format=fmt, policy=policy, **kw)])
    return sum(len(b["ts_ns"]) for b in r.iter_arrays()), r


# --- 14: DBN, Parquet, JSON lines ---------------------------------------------------------
def test_damaged_dbn_files_are_data_errors_never_tracebacks(sample_dir: Path, tmp_path: Path) -> None:
    import io

    import zstandard

    with zstandard.ZstdDecompressor().stream_reader(
            io.BytesIO((sample_dir / "databento-glbx-futures-mbp1-20240701.dbn.zst").read_bytes()), read_across_frames=True) as z:
        raw = z.read()
    assert len(raw) > 100_000
    rng = np.random.default_rng(3)
    for k in range(120):
        data = bytearray(raw)
        for pos in rng.integers(0, min(len(data), 4000) if k % 2 else len(data), size=1 + k % 4):
            data[int(pos)] ^= 1 << int(rng.integers(8))
        p = tmp_path / "x.dbn"
        p.write_bytes(bytes(data))
        try:
            _replay(p, "databento", policy="reject")
        except DataError:
            pass


def test_a_cut_parquet_with_a_fixed_bucket_volume_is_rc_4(capsys, tmp_path: Path) -> None:
    src = (DATA / "nautilus-binance-btcusdt-trades.parquet").read_bytes()
    cut = tmp_path / "cut.parquet"
    cut.write_bytes(src[: len(src) // 2])
    body = VPIN_BODY.replace('bucket_volume = "auto"', "bucket_volume = 5.0")
    rc, err = cli(capsys, "run", definition(tmp_path, body), "--ticks", str(cut), "--out", str(tmp_path / "o"))
    assert rc == 4 and "cut.parquet" in one_line(err)


# --- 15: files that are not readable files --------------------------------------------------
def test_a_folder_or_fifo_given_as_a_file_says_what_it_is(capsys, tmp_path: Path) -> None:
    rc, err = cli(capsys, "run", VPIN, "--ticks", str(tmp_path), "--out", str(tmp_path / "o"))
    assert rc == 4 and "is a folder" in one_line(err)
    fifo = tmp_path / "pipe.csv"
    os.mkfifo(fifo)
    rc, err = cli(capsys, "inspect", str(fifo))
    assert rc == 4 and "FIFO" in one_line(err)


def test_a_file_without_read_permission_is_rc_4_even_as_root(capsys, tmp_path: Path, monkeypatch) -> None:
    from nautilus_pipeline.io import files

    p = tmp_path / "BTCUSDT-trades.csv"
    p.write_bytes(BINANCE.read_bytes())
    real = os.access
    monkeypatch.setattr(files.os, "access", lambda path, mode: Path(path) != p and real(path, mode))
    rc, err = cli(capsys, "run", VPIN, "--ticks", str(p), "--out", str(tmp_path / "o"))
    assert rc == 4 and "permission denied" in one_line(err)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_an_unreadable_file_is_rc_4_with_one_line(capsys, tmp_path: Path) -> None:
    p = tmp_path / "BTCUSDT-trades.csv"
    p.write_bytes(BINANCE.read_bytes())
    p.chmod(0)
    rc, err = cli(capsys, "inspect", str(p))
    assert rc == 4 and "permission" in one_line(err).lower()


# --- 16: model files ----------------------------------------------------------------------
class _Boom:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ.get('NP_PICKLE_MARKER', '/tmp/unpickled')}",))


def test_bad_model_files_are_config_errors_and_nothing_is_unpickled(tmp_path: Path, monkeypatch) -> None:
    marker = tmp_path / "unpickled"
    monkeypatch.setenv("NP_PICKLE_MARKER", str(marker))
    spec = ModelSpec(("a", "b"), hidden=(4,))
    good = save_model(tmp_path / "good.npz", spec, random_weights(spec))
    cases = {
        "garbage.npz": b"not a zip at all" * 10,
        "pickle.npz": pickle.dumps(_Boom()),
        "cut.npz": good.read_bytes()[:300],
        "garbage.safetensors": b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}",
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    np.savez(tmp_path / "object.npz", **{"__spec__": np.array(orjson.dumps(spec.to_dict()).decode()),
                                         "norm.mean": np.array([_Boom()], dtype=object)})
    np.savez(tmp_path / "badspec.npz", **{"__spec__": np.array("{nope"), "norm.mean": np.zeros(2)})
    np.savez(tmp_path / "listspec.npz", **{"__spec__": np.array("[1, 2]"), "norm.mean": np.zeros(2)})
    np.savez(tmp_path / "typespec.npz", **{"__spec__": np.array('{"format": "nautilus_pipeline.mlp/1", "input_names": ["a"], '
                                                                 '"hidden": ["x"], "activation": "relu"}')})
    for name in [*cases, "object.npz", "badspec.npz", "listspec.npz", "typespec.npz"]:
        with pytest.raises(ConfigError, match=name.replace(".", r"\.")):
            load_model(tmp_path / name)
    assert not marker.exists(), "a model file was unpickled"
    assert load_model(good)[0] == spec


def test_a_bad_model_in_a_definition_is_rc_3_naming_the_inference_stage(capsys, tmp_path: Path) -> None:
    (tmp_path / "bad.npz").write_bytes(b"garbage")
    body = DEFAULT_BODY.replace('type = "inference"', 'type = "inference"\nmodel = "bad.npz"')
    rc, err = cli(capsys, "validate", definition(tmp_path, body))
    assert rc == 3 and "stages[1] (inference)" in one_line(err) and "bad.npz" in one_line(err)


def test_config_build_errors_from_factories_name_the_stage() -> None:
    text = VPIN_BODY.replace('bucket_volume = "auto"', "bucket_volume = 5.0").replace("\nwindow = 10", "\nwindow = 0")
    d = config.loads(text.replace("package:", str(DATA) + "/"), "x.toml")
    with pytest.raises(ConfigError, match=r"x\.toml: stages\[0\] \(vpin\)"):
        config.build_stages(d, config.make_sources(d, None, None))
