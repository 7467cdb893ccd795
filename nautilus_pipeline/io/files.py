"""Opening tick files: transparent .gz/.zst, line iteration, and errors a user can act on.

Compression is recognised by the file's magic bytes (gzip ``1f 8b``, zstd ``28 b5 2f fd``),
not its name, so a renamed file still opens. Decompression streams through pyarrow's native
codecs (no Python per block for CSV), and a cut-off archive raises a :class:`DataError`
saying the file is truncated instead of an ``OSError`` from inside the codec.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa

from nautilus_pipeline.errors import DataError

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def compression_of(path: str | Path) -> str | None:
    """``"gzip"``, ``"zstd"`` or ``None``, from the first bytes of the file."""
    with open(path, "rb") as fh:
        head = fh.read(4)
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    if head.startswith(ZSTD_MAGIC):
        return "zstd"
    return None


def check_file(path: str | Path) -> Path:
    """The path, after checking it exists and is not empty (else a clear DataError)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: no such file; check the path in the source definition")
    if p.stat().st_size == 0:
        raise DataError(f"{p}: the file is empty (0 bytes); nothing to replay")
    return p


def open_stream(path: str | Path) -> pa.NativeFile:
    """A decompressed byte stream of ``path`` (pyarrow native)."""
    p = check_file(path)
    codec = compression_of(p)
    if codec is None:
        return pa.memory_map(str(p), "r")
    return pa.input_stream(str(p), compression=codec)


@contextlib.contextmanager
def decoding_errors(path: str | Path) -> Iterator[None]:
    """Turn codec errors (cut-off or corrupt .gz/.zst) into a DataError naming the file."""
    try:
        yield
    except OSError as e:
        text = str(e)
        if any(w in text.lower() for w in ("truncated", "zstd", "gzip", "deflate", "decompress", "corrupt", "inflate")):
            raise DataError(
                f"{path}: the compressed file is truncated or corrupt ({text}); "
                "re-download or re-copy it (its checksum will not match)"
            ) from e
        raise


def read_head(path: str | Path, nbytes: int = 65_536) -> bytes:
    """Up to ``nbytes`` of the decompressed start of the file, for sniffing formats."""
    with decoding_errors(path), open_stream(path) as s:
        return s.read(nbytes)


def iter_lines(path: str | Path, block: int = 1 << 20) -> Iterator[tuple[int, bytes]]:
    """``(line_number, line)`` for every line (1-based, without the newline), streamed.

    A last line without a newline is still yielded.
    """
    lineno = 0
    rest = b""
    with decoding_errors(path), open_stream(path) as s:
        while True:
            buf = s.read(block)
            if not buf:
                break
            buf = rest + buf
            parts = buf.split(b"\n")
            rest = parts.pop()
            for line in parts:
                lineno += 1
                yield lineno, line.rstrip(b"\r")
    if rest:
        yield lineno + 1, rest.rstrip(b"\r")
