"""Opening tick files: transparent .gz/.zst/.bz2/.zip, line iteration, and errors a user can act on.

Compression is recognised by the file's magic bytes (gzip ``1f 8b``, zstd ``28 b5 2f fd``,
bzip2 ``BZh``, zip ``PK 03 04``), not its name, so a renamed file still opens. Skippable
frames (``5? 2a 4d 18``, with their length) before the first frame are passed over: ``pzstd``
starts every frame with one, and lz4 frames may have them too, so the frame after them
decides. pzstd's says how long its frame is: a file that ends before a frame so announced is
truncated, even where it ends just after the announcement (the codec sees a whole, valid
stream there). A zip archive
(how Binance's public data and Bybit ship files) must hold one file (a ``.CHECKSUM`` member
aside), streamed from the archive; more files are refused with their names. Containers we do
not open (xz, 7z, rar, tar, lz4 frames) are named by :func:`unsupported_container`, so the user
reads "unrecognised container xz", not a column-mapping error about binary bytes.

Checksums. Beside ``X.zip`` Binance publishes ``X.zip.CHECKSUM`` (``<sha256>  X.zip``): when
such a file sits next to the tick file, the sha256 is verified once per process (per size
and modification time) and a mismatch is a :class:`DataError` saying to re-download. Decompression streams through pyarrow's native
codecs (no Python per block for CSV), and a cut-off archive raises a :class:`DataError`
saying the file is truncated instead of an ``OSError`` from inside the codec.

Text encodings. Tick text files are read as UTF-8 (ASCII in practice). A UTF-8 byte-order
mark is skipped (Excel writes one), so it never becomes part of the first field. A UTF-16 or
UTF-32 file (a byte-order mark, or NUL bytes in every other position, as Windows tools write
"Unicode" text) is refused up front with a :class:`DataError` that says how to convert it:
read as UTF-8 every row would be refused, which says nothing about the cause.

Paths. A path that is a folder, a FIFO or a device, or a file that cannot be read
(permissions), is a :class:`DataError` saying which, not "no such file" or an ``OSError``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import stat
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa

from ..errors import DataError

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
BZ2_MAGIC = b"BZh"
ZIP_MAGIC = b"PK\x03\x04"
LZ4_MAGIC = b"\x04\x22\x4d\x18"
_OTHER_CONTAINERS = {b"\xfd7zXZ\x00": "xz", b"7z\xbc\xaf\x27\x1c": "7z", b"Rar!\x1a\x07": "rar",
                     LZ4_MAGIC: "lz4 frame", b"PK\x05\x06": "zip (empty archive)",
                     b"\x89HDF": "HDF5", b"SQLite format 3": "SQLite", b"\x1f\x9d": "compress (.Z)"}
UTF8_BOM = b"\xef\xbb\xbf"
_WIDE_BOMS = {b"\xff\xfe\x00\x00": "UTF-32-LE", b"\x00\x00\xfe\xff": "UTF-32-BE",
              b"\xff\xfe": "UTF-16-LE", b"\xfe\xff": "UTF-16-BE"}


def _read_error(p: Path, e: OSError) -> DataError:
    why = e.strerror or str(e)
    if isinstance(e, PermissionError):
        return DataError(f"{p}: cannot read the file ({why}); check its permissions")
    return DataError(f"{p}: cannot read the file ({why})")


def _skippable(head: bytes) -> bool:
    """Whether ``head`` starts a skippable frame (zstd and lz4 share the format)."""
    return len(head) >= 4 and head[0] & 0xF0 == 0x50 and head[1:4] == b"\x2a\x4d\x18"


def _after_skippable(fh) -> bytes:
    """The first 4 bytes after the skippable frames at ``fh``'s start (b"" at the end)."""
    head = fh.read(4)
    while _skippable(head):
        size = fh.read(4)
        if len(size) < 4:
            return b""
        fh.seek(int.from_bytes(size, "little"), os.SEEK_CUR)
        head = fh.read(4)
    return head


_PZSTD_HEAD = b"\x50\x2a\x4d\x18\x04\x00\x00\x00"  # pzstd's skippable frame: 4 bytes, the next frame's size


def _check_pzstd(p: Path) -> None:
    """A :class:`DataError` when a file in pzstd's layout ends before a frame it announces
    (a zstd file in any other layout: nothing to check here, the codec sees a cut frame)."""
    try:
        with open(p, "rb") as fh:
            size, pos = os.fstat(fh.fileno()).st_size, 0
            while pos < size:
                fh.seek(pos)
                head = fh.read(12)
                if len(head) < 12 or not head.startswith(_PZSTD_HEAD):
                    return
                pos += 12 + int.from_bytes(head[8:], "little")
    except OSError as e:
        raise _read_error(p, e) from None
    if pos > size:
        raise DataError(f"{p}: the compressed file is truncated (it ends {pos - size:,} bytes before the end of "
                        "the last zstd frame it announces); re-download or re-copy it (its checksum will not match)")


def compression_of(path: str | Path) -> str | None:
    """``"gzip"``, ``"zstd"``, ``"bz2"``, ``"zip"`` or ``None``, from the first bytes of the file."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
            if _skippable(head):
                fh.seek(0)
                after = _after_skippable(fh)
                return None if after.startswith(LZ4_MAGIC) else "zstd"
    except OSError as e:
        raise _read_error(Path(path), e) from None
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    if head.startswith(ZSTD_MAGIC):
        return "zstd"
    if head.startswith(BZ2_MAGIC) and len(head) == 4 and head[3:4].isdigit():
        return "bz2"
    if head.startswith(ZIP_MAGIC):
        return "zip"
    return None


def unsupported_container(path: str | Path) -> str | None:
    """The name of a container this package does not open (xz, 7z, tar, ...), or None."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(512)
            if _skippable(head):
                fh.seek(0)
                head = _after_skippable(fh)
    except OSError as e:
        raise _read_error(Path(path), e) from None
    for magic, name in _OTHER_CONTAINERS.items():
        if head.startswith(magic):
            return name
    if head[257:262] == b"ustar":
        return "tar"
    return None


def zip_member(path: str | Path) -> str:
    """The one tick file inside a zip archive (a ``.CHECKSUM`` member is not one)."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = [i.filename for i in zf.infolist() if not i.is_dir() and not i.filename.endswith(".CHECKSUM")]
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise DataError(f"{path}: not a readable zip archive ({e}); truncated or corrupt: re-download it") from None
    if len(names) != 1:
        listed = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
        raise DataError(f"{path}: a zip archive of {len(names)} files ({listed or 'none'}); it must hold one "
                        "tick file: unzip it and name the file")
    return names[0]


class _ZipMember(io.RawIOBase):
    """A zip member as a raw stream that closes its archive with it."""

    def __init__(self, path: Path, name: str):
        self._zf = zipfile.ZipFile(path)
        self._f = self._zf.open(name)

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:  # type: ignore[override]
        try:
            return self._f.readinto(b)
        except (zipfile.BadZipFile, EOFError, zlib.error) as e:  # a CRC mismatch, a cut-off or damaged member
            raise OSError(f"zip member is corrupt or truncated ({e})") from e

    def close(self) -> None:
        if not self.closed:
            self._f.close()
            self._zf.close()
        super().close()


_CHECKED: dict[tuple[str, int, int], str] = {}


def verify_checksum(p: Path) -> None:
    """Compare ``p`` with the sha256 in ``<p>.CHECKSUM`` when that file exists. The file's
    digest is cached by (path, size, mtime); the checksum file is read every time, so a
    corrected or replaced one is compared again."""
    side = p.with_name(p.name + ".CHECKSUM")
    if not side.is_file():
        return
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    try:
        words = side.read_text(encoding="utf-8", errors="replace").split()
    except OSError as e:
        raise _read_error(side, e) from None
    want = words[0].lower() if words else ""
    if len(want) != 64 or any(c not in "0123456789abcdef" for c in want):
        raise DataError(f"{side}: not a sha256 checksum file (expected '<64 hex digits>  {p.name}')")
    got = _CHECKED.get(key)
    if got is None:
        h = hashlib.sha256()
        with open(p, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        got = h.hexdigest()
    if got != want:
        raise DataError(f"{p}: sha256 {got} does not match {side.name} ({want}); the file is damaged "
                        "or incomplete: re-download it")
    _CHECKED[key] = got


def check_file(path: str | Path) -> Path:
    """The path, after checking it exists and is not empty (else a clear DataError)."""
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise DataError(f"{p}: no such file; check the path in the source definition") from None
    except OSError as e:
        raise _read_error(p, e) from None
    if stat.S_ISDIR(st.st_mode):
        raise DataError(f"{p}: is a folder, not a tick file; name a file in it")
    if not stat.S_ISREG(st.st_mode):
        kind = "a FIFO (named pipe)" if stat.S_ISFIFO(st.st_mode) else "not a regular file"
        raise DataError(f"{p}: is {kind}; tick files are read twice (sniffing, then reading), "
                        "so copy the data to a regular file first")
    if st.st_size == 0:
        raise DataError(f"{p}: the file is empty (0 bytes); nothing to replay")
    if not os.access(p, os.R_OK):
        raise DataError(f"{p}: cannot read the file (permission denied); check its permissions")
    return p


def byte_blocks(path: str | Path, block: int = 1 << 20) -> Iterator[bytes]:
    """The decompressed bytes of ``path`` in blocks (for the readers that parse bytes themselves).

    zstd goes through ``zstandard``'s decompression object, 256 KiB of compressed bytes at a
    time (about 1 MB out: larger outputs are slower; 3 ms for the 3.9 MB of the shared MBO file
    where pyarrow's codec stream takes 7-16 ms), frame
    after frame; a stream that ends inside a frame is a :class:`DataError` (truncated), which
    ``zstandard``'s stream reader would not notice. Other codecs: :func:`open_stream`, ``block``
    bytes at a time.
    """
    p = check_file(path)
    if compression_of(p) != "zstd":
        with decoding_errors(p), open_stream(p) as s:
            while buf := s.read(block):
                yield buf
        return
    import zstandard

    verify_checksum(p)
    _check_pzstd(p)
    pending = False
    try:
        with open(p, "rb") as fh:
            dec = zstandard.ZstdDecompressor().decompressobj()
            while data := fh.read(1 << 18):
                while data:
                    out = dec.decompress(data)
                    pending = True
                    if out:
                        yield out
                    if dec.eof:  # a frame ended: the rest is the next frame
                        pending, data = False, dec.unused_data
                        dec = zstandard.ZstdDecompressor().decompressobj()
                    else:
                        data = b""
    except zstandard.ZstdError as e:
        raise DataError(f"{p}: the compressed file is truncated or corrupt ({e}); "
                        "re-download or re-copy it (its checksum will not match)") from None
    except OSError as e:
        raise _read_error(p, e) from None
    if pending:
        raise DataError(f"{p}: the compressed file is truncated or corrupt (the zstd stream ends inside a frame); "
                        "re-download or re-copy it (its checksum will not match)")


def open_stream(path: str | Path) -> pa.NativeFile:
    """A decompressed byte stream of ``path`` (pyarrow native)."""
    p = check_file(path)
    codec = compression_of(p)
    verify_checksum(p)
    try:
        if codec is None:
            return pa.memory_map(str(p), "r")
        if codec == "zip":
            return pa.PythonFile(_ZipMember(p, zip_member(p)), mode="r")
        if codec == "zstd":
            _check_pzstd(p)
        return pa.input_stream(str(p), compression=codec)
    except OSError as e:
        raise _read_error(p, e) from None


@contextlib.contextmanager
def decoding_errors(path: str | Path) -> Iterator[None]:
    """Turn codec errors (cut-off or corrupt .gz/.zst) into a DataError naming the file."""
    try:
        yield
    except OSError as e:
        text = str(e)
        if any(w in text.lower() for w in ("truncated", "zstd", "gzip", "deflate", "decompress", "corrupt", "inflate",
                                           "bz2", "bzip")):
            raise DataError(
                f"{path}: the compressed file is truncated or corrupt ({text}); "
                "re-download or re-copy it (its checksum will not match)"
            ) from e
        raise _read_error(Path(path), e) from e


def read_head(path: str | Path, nbytes: int = 65_536) -> bytes:
    """Up to ``nbytes`` of the decompressed start of the file, for sniffing formats.

    A UTF-8 byte-order mark is removed (it is not part of the first field).
    """
    with decoding_errors(path), open_stream(path) as s:
        head = s.read(nbytes)
    return head[len(UTF8_BOM):] if head.startswith(UTF8_BOM) else head


def wide_encoding(head: bytes) -> str | None:
    """``"UTF-16-LE"`` etc. when ``head`` (the raw start of a text file) is UTF-16/32, else None.

    Recognised by a byte-order mark, or without one by NUL bytes: text tick files have
    none, while UTF-16 text of ASCII characters has one in every other byte.
    """
    for bom, name in _WIDE_BOMS.items():
        if head.startswith(bom):
            return name
    sample = head[:4096]
    if len(sample) >= 8 and sample.count(0) * 4 >= len(sample):
        even, odd = sample[0::2].count(0), sample[1::2].count(0)
        return "UTF-16-BE" if even > odd else "UTF-16-LE"
    return None


def check_text(path: str | Path) -> None:
    """Raise a :class:`DataError` when a text tick file is UTF-16/32 (see the module docstring),
    or a compressed one holds nothing (else each reader names it by what it then misses: "a
    header but no rows", "only blank lines")."""
    with decoding_errors(path), open_stream(path) as s:
        head = s.read(4096)
    if not head:
        codec = compression_of(path)
        if codec is not None:
            raise DataError(f"{path}: the {codec} file holds no data (it decompresses to 0 bytes); nothing to replay")
    enc = wide_encoding(head)
    if enc is not None:
        raise DataError(
            f"{path}: the file is {enc} text; tick files are read as UTF-8: convert it first, "
            f"e.g. iconv -f {enc} -t UTF-8 {Path(path).name} > converted.csv"
        )


def iter_lines(path: str | Path, block: int = 1 << 20) -> Iterator[tuple[int, bytes]]:
    """``(line_number, line)`` for every line (1-based, without the newline), streamed.

    A last line without a newline is still yielded; a UTF-8 byte-order mark is skipped.
    """
    lineno = 0
    rest = b""
    first = True
    with decoding_errors(path), open_stream(path) as s:
        while True:
            buf = s.read(block)
            if not buf:
                break
            if first:
                first = False
                if buf.startswith(UTF8_BOM):
                    buf = buf[len(UTF8_BOM):]
            buf = rest + buf
            parts = buf.split(b"\n")
            rest = parts.pop()
            for line in parts:
                lineno += 1
                yield lineno, line.rstrip(b"\r")
    if rest:
        yield lineno + 1, rest.rstrip(b"\r")
