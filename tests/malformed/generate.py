#!/usr/bin/env python3
"""Write the small files of the malformed-dataset corpus (tests/malformed/files/), deterministically.

    .venv/bin/python tests/malformed/generate.py

The files are committed; this script is how they were made (several are binary, or hold bytes an
editor would "fix": NUL, lone surrogates, a BOM, CRLF). What each must produce is in cases.yaml,
written by hand. Big and endless inputs (a line over 8 MiB, /dev/zero through a FIFO, 150 MB) are
generated at test time by tests/test_malformed_corpus.py instead.
"""

from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent / "files"


def instruction(i: int) -> str:
    return json.dumps({"instruction": f"What is item {i}?", "output": f"Item {i} is a widget."})


def chat(i: int) -> str:
    return json.dumps({"messages": [{"role": "user", "content": f"Hi {i}"},
                                    {"role": "assistant", "content": f"Hello {i}."}]})


def completion(i: int) -> str:
    return json.dumps({"prompt": f"Count: {i},", "completion": f" {i + 1}"})


GOOD = {"instruction": instruction, "chat": chat, "completion": completion}


def bad_third(bad: str | bytes, fmt: str = "instruction") -> bytes:
    """Two good lines, `bad` as line 3, two good lines: every line error is reported on line 3."""
    good = [GOOD[fmt](i).encode() for i in range(4)]
    bad = bad.encode("utf-8", "surrogatepass") if isinstance(bad, str) else bad
    return b"\n".join(good[:2] + [bad] + good[2:]) + b"\n"


def good_file(fmt: str = "instruction", n: int = 6, sep: bytes = b"\n") -> bytes:
    return sep.join(GOOD[fmt](i).encode() for i in range(n)) + sep


I = '{"instruction": "x", "output": "y", '  # an instruction line missing only its last field(s)
BIG = "x" * 400_000


def deep(n: int, open_: str, close: str) -> str:
    return open_ * n + close * n


CASES: dict[str, bytes] = {
    # --- JSON syntax ------------------------------------------------------------------------
    "json-truncated-last-line.jsonl": good_file()[:-1] + b'\n{"instruction": "x", "outp',
    "json-trailing-comma.jsonl": bad_third('{"instruction": "x", "output": "y",}'),
    "json-single-quotes.jsonl": bad_third("{'instruction': 'x', 'output': 'y'}"),
    "json-unquoted-keys.jsonl": bad_third('{instruction: "x", output: "y"}'),
    "json-comment.jsonl": bad_third('// a comment'),
    "json-two-objects-on-a-line.jsonl": bad_third(instruction(7) + instruction(8)),
    "json-extra-data.jsonl": bad_third(instruction(7) + " x"),
    "json-raw-control-character.jsonl": bad_third('{"instruction": "a\x01b", "output": "y"}'),
    "json-raw-tab-in-string.jsonl": bad_third('{"instruction": "a\tb", "output": "y"}'),
    "json-line-of-u2028.jsonl": bad_third("\u2028"),
    "json-nbsp-before-object.jsonl": bad_third("\u00a0" + instruction(7)),
    "json-bom-on-line-3.jsonl": bad_third("\ufeff" + instruction(7)),
    # --- not an object ----------------------------------------------------------------------
    "top-level-array.jsonl": bad_third('[{"instruction": "x", "output": "y"}]'),
    "top-level-number.jsonl": bad_third("42"),
    "top-level-string.jsonl": bad_third('"What is item 2?"'),
    "top-level-null.jsonl": bad_third("null"),
    "top-level-boolean.jsonl": bad_third("true"),
    # --- what JSON readers disagree on ------------------------------------------------------
    "deep-nesting-arrays-100000.jsonl": bad_third(deep(100_000, "[", "]")),
    "deep-nesting-objects-100000.jsonl": bad_third('{"a":' * 100_000 + "1" + "}" * 100_000),
    "deep-nesting-65.jsonl": bad_third(json.dumps({"messages": [{"role": "assistant", "content": "y"}],
                                                   "meta": json.loads(deep(64, "[", "]"))}), "chat"),
    "huge-integer-5000-digits.jsonl": bad_third(I + '"n": ' + "7" * 5000 + "}"),
    "huge-negative-integer.jsonl": bad_third(I + '"n": -' + "7" * 101 + "}"),
    "huge-float-exponent.jsonl": bad_third(I + '"n": 1e999999}'),
    "huge-float-digits.jsonl": bad_third(I + '"n": ' + "9" * 400 + ".5}"),
    "negative-float-overflow.jsonl": bad_third(I + '"n": -1.5e309}'),
    "nan.jsonl": bad_third(I + '"n": NaN}'),
    "infinity.jsonl": bad_third(I + '"n": Infinity}'),
    "negative-infinity.jsonl": bad_third(I + '"n": -Infinity}'),
    "duplicate-key.jsonl": bad_third('{"instruction": "x", "output": "y", "output": "z"}'),
    "duplicate-key-nested.jsonl": bad_third(
        '{"messages": [{"role": "user", "role": "assistant", "content": "y"}]}', "chat"),
    "duplicate-key-400kb.jsonl": bad_third('{"' + BIG + '": 1, "' + BIG + '": 2}'),
    # --- Unicode and bytes ------------------------------------------------------------------
    "lone-high-surrogate-escaped.jsonl": bad_third('{"instruction": "x\\ud800", "output": "y"}'),
    "lone-low-surrogate-escaped.jsonl": bad_third('{"instruction": "x", "output": "\\udc00y"}'),
    "reversed-surrogate-pair-escaped.jsonl": bad_third('{"instruction": "\\ude00\\ud83d", "output": "y"}'),
    "lone-surrogate-escaped-in-key.jsonl": bad_third('{"instruction": "x", "output": "y", "\\ud800": 1}'),
    "lone-surrogate-raw-bytes.jsonl": bad_third(b'{"instruction": "x\xed\xa0\x80", "output": "y"}'),
    "invalid-utf8-latin1.jsonl": bad_third(b'{"instruction": "caf\xe9", "output": "y"}'),
    "invalid-utf8-truncated-sequence.jsonl": bad_third(b'{"instruction": "x\xe2\x82", "output": "y"}'),
    "invalid-utf8-overlong-slash.jsonl": bad_third(b'{"instruction": "x\xc0\xaf", "output": "y"}'),
    "invalid-utf8-continuation-byte.jsonl": bad_third(b'{"instruction": "\x80x", "output": "y"}'),
    "nul-byte-in-string.jsonl": bad_third(b'{"instruction": "x\x00y", "output": "y"}'),
    "nul-bytes-line.jsonl": bad_third(b"\x00" * 64),
    "utf16-le-with-bom.jsonl": "\ufeff".encode("utf-16-le") + good_file().decode().encode("utf-16-le"),
    "utf16-be-with-bom.jsonl": "\ufeff".encode("utf-16-be") + good_file().decode().encode("utf-16-be"),
    "utf32-le-with-bom.jsonl": "\ufeff".encode("utf-32-le") + good_file().decode().encode("utf-32-le"),
    # --- not JSON Lines at all --------------------------------------------------------------
    "gzip.jsonl.gz": gzip.compress(good_file(), mtime=0),
    "gzip-named-jsonl.jsonl": gzip.compress(good_file(), mtime=0),
    "bzip2.jsonl.bz2": bz2.compress(good_file()),
    "xz.jsonl.xz": lzma.compress(good_file()),
    "zstd-magic.jsonl": b"\x28\xb5\x2f\xfd" + bytes(range(64)),
    "parquet-magic.jsonl": b"PAR1" + bytes(range(64)) + b"PAR1",
    "png-image.jsonl": b"\x89PNG\r\n\x1a\n" + bytes(range(256)),
    "elf-binary.jsonl": b"\x7fELF\x02\x01\x01" + bytes(57) + bytes(range(1, 200)),
    # --- missing fields and wrong types, per format -----------------------------------------
    "instruction-missing-output.jsonl": bad_third('{"instruction": "x"}'),
    "instruction-missing-instruction.jsonl": bad_third('{"output": "y"}'),
    "instruction-output-number.jsonl": bad_third('{"instruction": "x", "output": 5}'),
    "instruction-instruction-list.jsonl": bad_third('{"instruction": ["x"], "output": "y"}'),
    "instruction-input-object.jsonl": bad_third('{"instruction": "x", "input": {"a": 1}, "output": "y"}'),
    "instruction-empty-output.jsonl": bad_third('{"instruction": "x", "output": "  "}'),
    "instruction-null-output.jsonl": bad_third('{"instruction": "x", "output": null}'),
    "instruction-unknown-field.jsonl": bad_third('{"instruction": "x", "output": "y", "answer": "z"}'),
    "instruction-unknown-field-400kb-name.jsonl": bad_third(I + '"' + BIG + '": 1}'),
    "instruction-chat-shaped-line.jsonl": bad_third(chat(9)),
    "completion-missing-completion.jsonl": bad_third('{"prompt": "x"}', "completion"),
    "completion-prompt-number.jsonl": bad_third('{"prompt": 1, "completion": "y"}', "completion"),
    "completion-empty-completion.jsonl": bad_third('{"prompt": "x", "completion": ""}', "completion"),
    "completion-unknown-field.jsonl": bad_third('{"prompt": "x", "completion": "y", "label": 1}', "completion"),
    "chat-missing-messages.jsonl": bad_third('{"conversation": []}', "chat"),
    "chat-messages-not-a-list.jsonl": bad_third('{"messages": "hello"}', "chat"),
    "chat-messages-empty.jsonl": bad_third('{"messages": []}', "chat"),
    "chat-message-not-an-object.jsonl": bad_third('{"messages": ["hello"]}', "chat"),
    "chat-role-not-allowed.jsonl": bad_third(
        '{"messages": [{"role": "user", "content": "x"}, {"role": "bot", "content": "y"}]}', "chat"),
    "chat-role-missing.jsonl": bad_third('{"messages": [{"content": "y"}]}', "chat"),
    "chat-role-400kb.jsonl": bad_third('{"messages": [{"role": "' + BIG + '", "content": "y"}]}', "chat"),
    "chat-content-number.jsonl": bad_third('{"messages": [{"role": "assistant", "content": 3}]}', "chat"),
    "chat-content-missing.jsonl": bad_third('{"messages": [{"role": "assistant"}]}', "chat"),
    "chat-no-assistant.jsonl": bad_third('{"messages": [{"role": "user", "content": "x"}]}', "chat"),
    "chat-empty-assistant.jsonl": bad_third(
        '{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": " "}]}', "chat"),
    # --- whole-file problems ----------------------------------------------------------------
    "empty-file.jsonl": b"",
    "only-blank-lines.jsonl": b"\n   \n\t\n\r\n\n",
    "oversize-for-1Ki.jsonl": good_file(n=40),
    "many-bad-lines.jsonl": b"\n".join([instruction(0).encode()] + [b"{broken %d" % i for i in range(30)]) + b"\n",
    # --- valid: accepted as written -------------------------------------------------------------
    "valid-u2028-u2029-u0085-in-strings.jsonl": good_file() + json.dumps(
        {"instruction": "a\u2028b\u2029c\x85d", "output": "e\u2028f"}, ensure_ascii=False).encode() + b"\n",
    "valid-crlf.jsonl": good_file(sep=b"\r\n"),
    "valid-mixed-crlf-lf.jsonl": good_file(n=3, sep=b"\r\n") + good_file(n=3),
    "valid-utf8-bom.jsonl": b"\xef\xbb\xbf" + good_file(),
    "valid-surrogate-pair-escaped.jsonl": good_file() + b'{"instruction": "smile \\ud83d\\ude00", "output": "y"}\n',
    "valid-no-final-newline.jsonl": good_file()[:-1],
    "valid-nesting-64.jsonl": good_file("chat") + json.dumps(
        {"messages": [{"role": "assistant", "content": "y"}], "meta": json.loads(deep(63, "[", "]"))}).encode() + b"\n",
    "valid-integer-100-digits.jsonl": good_file("chat") + json.dumps(
        {"messages": [{"role": "assistant", "content": "y"}], "id": int("9" * 100)}).encode() + b"\n",
}


def zip_archive() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        info = zipfile.ZipInfo("data.jsonl", date_time=(2024, 1, 1, 0, 0, 0))
        zf.writestr(info, good_file())
    return buf.getvalue()


CASES["zip.jsonl.zip"] = zip_archive()
CASES["zip-named-jsonl.jsonl"] = zip_archive()


CASES["eval-with-bad-line.jsonl"] = bad_third('{"instruction": "x"}')
CASES["line-longer-than-8mib.jsonl"] = bad_third('{"instruction": "' + "x" * (9 * 2**20) + '", "output": "y"}')
#: Files up to this size are committed; bigger ones are only built at test time (build()).
COMMITTED_MAX_BYTES = 64 * 1024


def build(dest: Path, *, big: bool = True) -> None:
    """Write the corpus into dest: every file of CASES (only the small ones unless `big`) and the folders."""
    dest.mkdir(parents=True, exist_ok=True)
    for name, data in CASES.items():
        if big or len(data) <= COMMITTED_MAX_BYTES:
            (dest / name).write_bytes(data)
    # A folder source whose second file has a bad line, and one whose second file is gzip.
    folder = dest / "folder-bad-second-file"
    folder.mkdir(exist_ok=True)
    (folder / "a.jsonl").write_bytes(good_file(n=4))
    (folder / "b.jsonl").write_bytes(good_file(n=1) + b'{"instruction": "x", "output": 7}\n')
    gz_folder = dest / "folder-with-gzip-file"
    gz_folder.mkdir(exist_ok=True)
    (gz_folder / "a.jsonl").write_bytes(good_file(n=4))
    (gz_folder / "b.jsonl").write_bytes(gzip.compress(good_file(), mtime=0))


def main() -> None:
    for old in HERE.glob("*"):
        if old.is_file():
            old.unlink()
    build(HERE, big=False)
    small = sum(len(d) <= COMMITTED_MAX_BYTES for d in CASES.values())
    print(f"{small} files and 2 folders in {HERE} ({len(CASES) - small} bigger ones are built at test time)")


if __name__ == "__main__":
    main()
