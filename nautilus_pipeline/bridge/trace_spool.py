"""The trace of a live run, carried across restarts: its rows moved to disk at each snapshot.

The recorder stage, told so by the spool, keeps its sampled rows in memory and writes what
is left of them to ``trace.parquet`` when the pipeline closes; its sampling position
(per-symbol counters, positions, the unkept last trade row) is in the stage's snapshot
already. A live run killed with ``kill -9`` would
lose the rows kept before its last snapshot, and its restarted trace would start there.

So ``run --nats`` spools them: at each snapshot (the pipeline drained) the rows kept since
the previous one go to ``<out>/trace.parts/part-NNNNNN.parquet`` (written whole or not at
all), and the stored state records how many parts it covers, as it records the JSON lines
files' lengths. A restarted run deletes the parts beyond that count (written after the
snapshot it resumes from), and at the end ``trace.parquet`` is the parts followed by what the
recorder wrote at close: the table of one uninterrupted run. The rows of a snapshot rather
than the whole trace in the KV state: a trace can be much larger than the state, and it is
an output (like the JSON lines), not something the pipeline needs to go on.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ..app import write_atomic
from ..io.parquet_out import dictionary_columns
from ..pipeline import Pipeline
from ..stages.recorder import RecorderStage

PARTS_DIR = "trace.parts"


class TraceSpool:
    """Parts of ``recorder``'s trace under ``<its file's folder>/trace.parts``."""

    def __init__(self, recorder: RecorderStage, pipe: Pipeline):
        self.recorder = recorder
        recorder.stream_to_file = False  # its rows until each snapshot, taken by spool()
        self.pipe = pipe
        self.dir = recorder.path.parent / PARTS_DIR
        self.parts = 0

    def _part(self, index: int) -> Path:
        return self.dir / f"part-{index:06d}.parquet"

    def start(self, parts: int | None) -> None:
        """Before the first batch: keep the ``parts`` a restored state covers (None: a fresh
        run, nothing kept); the trace file of an earlier run is re-made at the end."""
        if parts is None:
            shutil.rmtree(self.dir, ignore_errors=True)
            parts = 0
        for index in range(parts):
            if not self._part(index).exists():
                raise OSError(f"{self._part(index)}: missing, the stored state covers {parts} trace parts: "
                              "the output folder is not the one of the interrupted run")
        if self.dir.exists():
            for path in self.dir.glob("part-*.parquet"):
                if int(path.stem.removeprefix("part-")) >= parts:
                    path.unlink()
        self.recorder.path.unlink(missing_ok=True)
        self.parts = parts

    def spool(self) -> int:
        """At a snapshot: the rows kept since the last one to a new part; the parts now."""
        table = self.recorder.take_rows(self.pipe.symbols.names)
        if table is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
            buf = io.BytesIO()
            pq.write_table(table, buf, use_dictionary=dictionary_columns(table.schema))
            write_atomic(self._part(self.parts), buf.getvalue())
            self.parts += 1
        return self.parts

    def finish(self) -> None:
        """After the pipeline closed: ``trace.parquet`` = the parts, then what the recorder wrote."""
        tables = [pq.read_table(self._part(i)) for i in range(self.parts)]
        last = self.recorder.path
        if last.exists():
            tables.append(pq.read_table(last))
        if not tables:
            return
        buf = io.BytesIO()
        table = pa.concat_tables(tables)
        pq.write_table(table, buf, use_dictionary=dictionary_columns(table.schema))
        write_atomic(last, buf.getvalue())
