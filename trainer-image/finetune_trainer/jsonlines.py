"""Read JSON Lines from s3:// or file:// in bounded memory: chunks in, lines out.

What every reader of our JSONL shares (the validation Job and the trainer), so a Dataset the
validator calls Ready is read the same way by the trainer:

- lines end at b"\\n" only (JSON Lines; U+2028, U+0085, \\x1c... are valid inside JSON strings,
  and str.splitlines() would cut there); one "\\r" before it is dropped (CRLF files);
- a line may be at most MAX_LINE_BYTES: a longer one is an error for that line (only its first
  EXCERPT_BYTES are kept) and reading goes on after its "\\n";
- every byte read counts against a ByteBudget (spec.source.maxBytes): past it, reading stops with
  SourceProblem("SourceTooLarge"), so an endless source (/dev/zero, a FIFO) ends;
- a UTF-8 byte order mark at the start of a file is dropped (as Python's utf-8-sig codec does;
  Windows editors often write one); a file that starts like gzip, zip, bzip2, xz, zstd, 7z, Parquet or UTF-16/32 is not
  JSON Lines: SourceProblem("NotJSONLines") says what it is and what to do;
- each line is decoded as strict UTF-8 (encoded surrogates included); NUL bytes are refused before
  that (binary data). A line that cannot be decoded keeps a problem instead of its text.

Nothing here holds more than one line (plus one chunk) at a time.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional

from . import storage
from .errors import ConfigError, TransientError

MAX_LINE_BYTES = 8 * 2**20
CHUNK_BYTES = 1 << 20
#: How much of a bad line its error shows (characters; bytes for lines that are not text).
EXCERPT_CHARS = 200
EXCERPT_BYTES = 4 * EXCERPT_CHARS

UTF8_BOM = b"\xef\xbb\xbf"

_REMEDY_COMPRESSED = "decompress it and point spec.source.uri at the .jsonl file"
_REMEDY_ARCHIVE = "extract it and point spec.source.uri at the .jsonl file (or a folder of them)"
_REMEDY_ENCODING = "re-encode it as UTF-8"
# (magic number, what it is, what to do). Longer magics first where one is a prefix of another.
MAGIC_NUMBERS: tuple[tuple[bytes, str, str], ...] = (
    (b"\x1f\x8b", "gzip-compressed", _REMEDY_COMPRESSED + " (gunzip)"),
    (b"PK\x03\x04", "a zip archive", _REMEDY_ARCHIVE),
    (b"PK\x05\x06", "an empty zip archive", _REMEDY_ARCHIVE),
    (b"\xfd7zXZ\x00", "xz-compressed", _REMEDY_COMPRESSED + " (unxz)"),
    (b"\x28\xb5\x2f\xfd", "zstd-compressed", _REMEDY_COMPRESSED + " (unzstd)"),
    (b"7z\xbc\xaf\x27\x1c", "a 7-Zip archive", _REMEDY_ARCHIVE),
    (b"PAR1", "a Parquet file", "convert it to JSON Lines"),
    (b"\x00\x00\xfe\xff", "UTF-32BE text", _REMEDY_ENCODING),  # byte order marks
    (b"\xff\xfe\x00\x00", "UTF-32LE text", _REMEDY_ENCODING),
    (b"\xfe\xff", "UTF-16BE text", _REMEDY_ENCODING),
    (b"\xff\xfe", "UTF-16LE text", _REMEDY_ENCODING),
) + tuple((b"BZh" + bytes([level]), "bzip2-compressed", _REMEDY_COMPRESSED + " (bunzip2)")
          for level in b"123456789")


def human_bytes(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


class SourceProblem(Exception):
    """The source as a whole cannot be read as JSON Lines; reading stops. `reason` is the report's."""

    def __init__(self, reason: str, problem: str, *, line: Optional[int] = None):
        self.reason, self.problem, self.line = reason, problem, line
        self.file: Optional[str] = None  # set by the reader that knows which file it was
        self.file_line: Optional[int] = None
        super().__init__(problem)


class ByteBudget:
    """Bytes a source may still deliver (one budget for all the files of a folder)."""

    def __init__(self, limit: int, setting: str = "spec.source.maxBytes", shown: Optional[str] = None):
        self.limit, self.used, self.setting = limit, 0, setting
        self.shown = f"{shown} = {limit} bytes" if shown else f"{limit} bytes"

    def too_large(self, detail: str, line: Optional[int] = None) -> SourceProblem:
        return SourceProblem("SourceTooLarge", f"{detail}larger than {self.setting} ({self.shown}); raise "
                             f"{self.setting} or split the data", line=line)

    def expect(self, size: Optional[int]) -> None:
        """Refuse up front a file whose size is known to be over what is left."""
        if size is not None and self.used + size > self.limit:
            total = self.used + size
            raise self.too_large(f"{total} bytes ({human_bytes(total)}){' in all' if self.used else ''}, ")

    def take(self, n: int, line: int) -> None:
        self.used += n
        if self.used > self.limit:
            raise self.too_large("reading stopped here: the source is ", line)


@dataclass
class RawLine:
    number: int  # 1-based, within its file
    data: bytes  # without "\n" (and a "\r" before it); only the first EXCERPT_BYTES when too long
    length: int  # the line's real length in bytes
    too_long: bool = False  # over MAX_LINE_BYTES: `data` is only its start


def split(chunks: Iterable[bytes], budget: Optional[ByteBudget] = None) -> Iterator[RawLine]:
    """Lines of a byte stream, split on b"\\n" only; at most MAX_LINE_BYTES (+ one chunk) held."""
    max_line_bytes = MAX_LINE_BYTES
    number, buf, dropped = 1, bytearray(), 0  # dropped: bytes of an over-long line not kept
    for chunk in chunks:
        if budget is not None:
            budget.take(len(chunk), number)
        start = 0
        while True:
            end = chunk.find(b"\n", start)
            if end >= 0 and not buf and not dropped and end - start <= max_line_bytes:  # the usual case
                yield _line(number, chunk[start:end], 0)
                number, start = number + 1, end + 1
                continue
            piece = chunk[start:] if end < 0 else chunk[start:end]
            if dropped:
                dropped += len(piece)
            elif len(buf) + len(piece) > max_line_bytes:
                kept = (bytes(buf) + piece[:EXCERPT_BYTES])[:EXCERPT_BYTES]
                dropped = len(buf) + len(piece) - len(kept)
                buf = bytearray(kept)
            else:
                buf += piece
            if end < 0:
                break
            yield _line(number, buf, dropped)
            number, buf, dropped, start = number + 1, bytearray(), 0, end + 1
    if buf or dropped:  # a last line without "\n"
        yield _line(number, buf, dropped)


def _line(number: int, buf: bytes | bytearray, dropped: int) -> RawLine:
    length = len(buf) + dropped
    if not dropped and buf.endswith(b"\r"):
        return RawLine(number, bytes(buf[:-1]), length - 1)
    return RawLine(number, bytes(buf), length, too_long=dropped > 0)


def sniff(head: bytes) -> Optional[str]:
    """What a file that starts with `head` is, when it is certainly not UTF-8 JSON Lines."""
    for magic, what, remedy in MAGIC_NUMBERS:
        if head.startswith(magic):
            return f"{what} (starts with bytes {magic[:4].hex(' ')}), not JSON Lines: {remedy}"
    return None


def decode(raw: RawLine) -> tuple[Optional[str], Optional[str]]:
    """(text, None) or (None, problem) for one line."""
    if raw.too_long:
        return None, (f"longer than the {MAX_LINE_BYTES // 2**20} MiB a line may have "
                      f"({raw.length} bytes); split or shorten this example")
    nul = raw.data.find(b"\x00")
    if nul >= 0:
        return None, f"NUL byte at byte {nul + 1} (binary data, not JSON text)"
    try:
        return raw.data.decode("utf-8"), None
    except UnicodeDecodeError as exc:
        bad = raw.data[exc.start:exc.start + 3]
        if len(bad) >= 2 and bad[0] == 0xED and 0xA0 <= bad[1] <= 0xBF:
            what = "a UTF-8-encoded surrogate (U+D800-U+DFFF)"
        else:
            what = f"byte 0x{raw.data[exc.start]:02x} ({exc.reason})"
        return None, f"not UTF-8: {what} at byte {exc.start + 1}"


def _shown(ch: str) -> str:
    return ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii")  # \\x01, \\u2028, ...


def _pieces(data: bytes) -> Iterator[tuple[str, int]]:
    """(how it is shown, bytes) per character of bytes that may not be UTF-8: a bad byte is \\xNN."""
    pos = 0
    while pos < len(data):
        for size in (1, 2, 3, 4):
            try:
                ch = data[pos:pos + size].decode("utf-8")
            except UnicodeDecodeError:
                continue
            yield _shown(ch), size
            break
        else:
            size = 1
            yield f"\\x{data[pos]:02x}", 1
        pos += size


def excerpt(raw: RawLine, text: Optional[str]) -> str:
    """The start of a line for its error: control characters and undecodable bytes escaped, at most
    EXCERPT_CHARS characters as shown, then "… N more" (characters, or bytes for a line not text)."""
    if text is not None:
        pieces, total, unit = ((_shown(ch), 1) for ch in text[:EXCERPT_CHARS]), len(text), ""
    else:
        pieces, total, unit = _pieces(raw.data[:EXCERPT_CHARS]), raw.length, " bytes"
    shown, used, taken = [], 0, 0  # taken: characters (or bytes) of the line shown
    for piece, size in pieces:
        if used + len(piece) > EXCERPT_CHARS:
            break
        shown.append(piece)
        used, taken = used + len(piece), taken + size
    head = "".join(shown).encode("utf-8", "backslashreplace").decode("utf-8")  # lone surrogates
    rest = total - taken
    return head + (f"… {rest} more{unit}" if rest > 0 else "")


@dataclass
class Line:
    number: int  # 1-based, continuous across the files of a folder
    file: Optional[str]  # the file's name within a folder source (None for a single file)
    file_line: int  # 1-based within its file
    raw: RawLine
    text: Optional[str]  # None when the line is not text (problem says why)
    problem: Optional[str]

    def excerpt(self) -> str:
        return excerpt(self.raw, self.text)


def lines(files: Iterable[tuple[Optional[str], Iterable[bytes]]],
          budget: Optional[ByteBudget] = None) -> Iterator[Line]:
    """Decoded lines of several files read one after the other (a folder source), numbered on."""
    offset = 0
    for name, chunks in files:
        last = 0
        try:
            for raw in split(chunks, budget):
                last = raw.number
                if raw.number == 1:
                    what = sniff(raw.data)
                    if what:
                        raise SourceProblem("NotJSONLines", what, line=1)
                    if raw.data.startswith(UTF8_BOM):
                        raw = RawLine(1, raw.data[len(UTF8_BOM):], raw.length - len(UTF8_BOM), raw.too_long)
                text, problem = decode(raw)
                yield Line(offset + raw.number, name, raw.number, raw, text, problem)
        except SourceProblem as exc:
            exc.file, exc.file_line = name, exc.line
            exc.line = None if exc.line is None else offset + exc.line
            raise
        offset += last


# ---------------------------------------------------------------------------------- sources


def _file_chunks(path: str) -> Iterator[bytes]:
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK_BYTES):
            yield chunk


def _s3_chunks(body) -> Iterator[bytes]:
    from botocore.exceptions import BotoCoreError

    try:
        while chunk := body.read(CHUNK_BYTES):
            yield chunk
    except (BotoCoreError, OSError) as exc:  # a read timeout or a connection cut mid-object: retry the Job
        raise TransientError(f"S3 read failed mid-object: {exc}") from exc
    finally:
        body.close()


def open_file(uri: str, budget: Optional[ByteBudget] = None) -> Iterator[bytes]:
    """The chunks of one object or file; its size is checked against the budget first when known
    (a FIFO or a device such as /dev/zero has none: the budget stops it while reading)."""
    loc = storage.parse(uri)
    if loc.scheme == "file":
        info = os.stat(loc.key)  # FileNotFoundError: a missing source (exit 3)
        if stat.S_ISDIR(info.st_mode):
            raise ConfigError(f"{uri}: a folder, expected a file")
        if budget is not None:
            budget.expect(info.st_size if stat.S_ISREG(info.st_mode) else None)
        return _file_chunks(loc.key)
    reply = storage._s3_call(storage.s3_client().get_object, Bucket=loc.bucket, Key=loc.key)
    if budget is not None:
        try:
            budget.expect(reply.get("ContentLength"))
        except SourceProblem:
            reply["Body"].close()
            raise
    return _s3_chunks(reply["Body"])


def source_files(uri: str) -> list[tuple[Optional[str], str]]:
    """(name within the folder or None, uri) of the file(s) a source URI means: one .jsonl file (or
    any file, FIFO or device that is not a folder), or a folder's *.jsonl files sorted by name."""
    loc = storage.parse(uri)
    if loc.scheme == "file":
        if "\x00" in loc.key:  # os.stat would raise ValueError
            raise ConfigError(f"{uri!r}: a path cannot hold a NUL character")
        path = Path(loc.key)
        if not path.is_dir():
            if not path.exists():
                raise FileNotFoundError(f"{uri}: no such file")
            return [(None, uri)]
    elif uri.rstrip("/").endswith(".jsonl"):
        return [(None, uri)]
    names = [n for n in storage.list_keys(uri) if n.endswith(".jsonl")]
    if names:
        return [(name, storage.join(uri, name)) for name in names]
    if loc.scheme == "s3" and storage.exists(uri):  # an object without the .jsonl suffix
        return [(None, uri)]
    raise ConfigError(f"{uri}: no .jsonl file or folder of .jsonl files found")


def read(uri: str, budget: Optional[ByteBudget] = None) -> Iterator[Line]:
    """Every line of a source (a file or a folder of .jsonl files), streamed."""
    files = source_files(uri)

    def opened() -> Iterator[tuple[Optional[str], Iterable[bytes]]]:
        for name, file_uri in files:
            try:
                yield name, open_file(file_uri, budget)
            except SourceProblem as exc:
                exc.file = name
                raise

    return lines(opened(), budget)
