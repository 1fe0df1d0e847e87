"""The malformed-dataset corpus (tests/malformed/) through the real `finetune-trainer validate` command.

Every case runs in its own subprocess, as the validation Job runs it, and must end with exit 0, no
traceback, an Invalid report (or Valid, for the inputs that must be accepted) whose one-line message
is exactly the expected one and names the line. Then what a hostile source cannot do: an endless
source (/dev/zero, a FIFO that never ends) stops at spec.source.maxBytes; a 150 MB source is
streamed in bounded memory (peak RSS measured in the subprocess).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from finetune_operator.api.trainer_config import ValidationConfig
from finetune_trainer import storage

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "malformed"
CASES = yaml.safe_load((CORPUS / "cases.yaml").read_text(encoding="utf-8"))
sys.path.insert(0, str(CORPUS))
import generate  # noqa: E402  (tests/malformed/generate.py: the corpus' files)

#: A message is one line of at most this many characters, whatever the input (status keeps 1 KiB).
MESSAGE_MAX = 900


def case_id(case: dict) -> str:
    extra = "+eval" if case.get("evaluation") else f"+maxInvalidLines={case['maxInvalidLines']}" \
        if "maxInvalidLines" in case else ""
    return case["file"] + extra


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Every file of the corpus, the big ones included (built here, never committed)."""
    dest = tmp_path_factory.mktemp("malformed")
    generate.build(dest)
    return dest


def write_config(tmp_path: Path, case: dict, source_uri: str, output_uri: str, eval_uri: str | None = None) -> Path:
    dataset = {
        "source": {"uri": source_uri},
        "format": case.get("format", "instruction"),
        "evaluation": {"uri": eval_uri} if eval_uri else {"fraction": 0.2, "seed": 7},
        "provenance": {"origin": "tests/malformed"},
        "curation": {"minExamples": 1, "maxInvalidLines": case.get("maxInvalidLines", 0)},
    }
    if "maxBytes" in case:
        dataset["source"]["maxBytes"] = case["maxBytes"]
    config = ValidationConfig.model_validate({"job": {"namespace": "team-a", "name": "corpus"},
                                              "dataset": dataset, "outputURI": output_uri})
    path = tmp_path / "validation.json"
    path.write_text(config.model_dump_json())
    return path


def run_validate(config: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "finetune_trainer.cli", "validate", "--config", str(config)],
                          capture_output=True, text=True, timeout=timeout, env={**os.environ})


def check(case: dict, proc: subprocess.CompletedProcess, output_uri: str) -> dict:
    """The assertions every case shares; returns the report."""
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-3000:]
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(storage.read_text(storage.join(output_uri, "report.json")))
    message = report["message"]
    assert "\n" not in message and len(message) <= MESSAGE_MAX, message[:2000]
    assert message == case["expect"]
    for err in report["errors"]:  # each error's excerpt is bounded too
        assert len(err.get("excerpt", "")) < 260, err["excerpt"][:300]
    if case.get("valid"):
        assert report["valid"] is True and report["reason"] == "Validated", message
        assert report["digest"].startswith("sha256:")
    else:
        assert report["valid"] is False and report["reason"] == case["reason"], message
        assert not storage.exists(storage.join(output_uri, "train.jsonl"))
        if "line" in case:
            assert f"line {case['line']}:" in message
            assert case["line"] in [e.get("fileLine", e.get("line")) for e in report["errors"]], report["errors"]
    return report


# ------------------------------------------------------------------------ the corpus itself


def test_the_corpus_has_60_cases_and_the_committed_files_are_what_generate_writes(corpus):
    assert len(CASES) >= 60
    used = {c["file"] for c in CASES} | {c["evaluation"] for c in CASES if c.get("evaluation")}
    built = {p.name for p in corpus.iterdir()}
    assert used == built, (sorted(used - built), sorted(built - used))
    committed = CORPUS / "files"
    for path in corpus.rglob("*"):
        if path.is_file() and path.stat().st_size <= generate.COMMITTED_MAX_BYTES:
            twin = committed / path.relative_to(corpus)
            assert twin.is_file() and twin.read_bytes() == path.read_bytes(), f"{twin}: run generate.py"
    assert len([c for c in CASES if not c.get("valid")]) >= 60


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_case_through_the_validate_command(case, corpus, tmp_path):
    out = f"file://{tmp_path}/out"
    eval_uri = f"file://{corpus / case['evaluation']}" if case.get("evaluation") else None
    proc = run_validate(write_config(tmp_path, case, f"file://{corpus / case['file']}", out, eval_uri))
    report = check(case, proc, out)
    if case.get("valid"):
        # What the validation accepted, the trainer reads line for line (same "\n"-only splitting).
        from finetune_trainer import data

        fmt = case.get("format", "instruction")
        assert len(data.read_examples(out, "train.jsonl", fmt)) == report["stats"]["examples"]
        assert len(data.read_examples(out, "eval.jsonl", fmt)) == report["stats"]["evalExamples"]


S3_CASES = ["gzip.jsonl.gz", "oversize-for-1Ki.jsonl", "lone-high-surrogate-escaped.jsonl",
            "line-longer-than-8mib.jsonl", "folder-bad-second-file", "folder-with-gzip-file",
            "valid-u2028-u2029-u0085-in-strings.jsonl", "valid-utf8-bom.jsonl"]


@pytest.mark.parametrize("name", S3_CASES)
def test_case_from_s3(name, corpus, bucket, tmp_path):
    """The same cases streamed from S3 (moto_server): get_object's body read in chunks, its
    ContentLength checked against maxBytes before reading, a folder listed."""
    case = next(c for c in CASES if c["file"] == name and not c.get("evaluation") and "maxInvalidLines" not in c)
    local = corpus / name
    key = f"raw/{name}"
    for path in ([local] if local.is_file() else sorted(local.iterdir())):
        storage.upload_file(path, f"s3://{bucket}/{key}" + ("" if local.is_file() else f"/{path.name}"))
    out = f"s3://{bucket}/validated/{name}"
    proc = run_validate(write_config(tmp_path, case, f"s3://{bucket}/{key}", out))
    check(case, proc, out)


def test_missing_source_exits_3_without_a_traceback(tmp_path):
    out = tmp_path / "out"
    case = {"file": "nope.jsonl"}
    proc = run_validate(write_config(tmp_path, case, f"file://{tmp_path}/nope.jsonl", f"file://{out}"))
    assert proc.returncode == 3 and "Traceback" not in proc.stderr
    assert "nope.jsonl" in proc.stderr
    assert not (out / "report.json").exists()


# ------------------------------------------------------------------------ endless and big sources


def test_dev_zero_stops_at_max_bytes(tmp_path):
    # Before: read into memory until the pod was OOM-killed (exit 137, retried 3 times).
    case = {"file": "/dev/zero", "maxBytes": "64Mi", "reason": "SourceTooLarge", "line": 1,
            "expect": "line 1: source: reading stopped here: the source is larger than spec.source.maxBytes "
                      "(64Mi = 67108864 bytes); raise spec.source.maxBytes or split the data"}
    out = f"file://{tmp_path}/out"
    check(case, run_validate(write_config(tmp_path, case, "file:///dev/zero", out)), out)


def test_a_fifo_of_endless_valid_lines_stops_at_max_bytes(tmp_path):
    fifo = tmp_path / "endless.jsonl"
    os.mkfifo(fifo)
    line = (json.dumps({"instruction": "What is item?", "output": "x" * 1000}) + "\n").encode()
    stop = threading.Event()

    def writer() -> None:
        try:
            with open(fifo, "wb") as fh:
                n = 0
                while not stop.is_set():
                    # distinct lines, so deduplication keeps every one
                    fh.write(line.replace(b"item?", b"item %d?" % n))
                    n += 1
        except BrokenPipeError:  # the validator stopped reading: what this test expects
            pass

    # Reading goes by 1 MiB chunks; the budget is spent by the chunk that starts at byte 8 MiB, so
    # the report names the line in progress there.
    limit, offset, number = 8 * 2**20, 0, 0
    while offset + len(line.replace(b"item?", b"item %d?" % number)) <= limit:
        offset += len(line.replace(b"item?", b"item %d?" % number))
        number += 1
    expected_line = number + 1
    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        case = {"file": str(fifo), "maxBytes": "8Mi", "reason": "SourceTooLarge", "line": expected_line,
                "expect": f"line {expected_line}: source: reading stopped here: the source is larger than "
                          "spec.source.maxBytes (8Mi = 8388608 bytes); raise spec.source.maxBytes or split the data"}
        out = f"file://{tmp_path}/out"
        report = check(case, run_validate(write_config(tmp_path, case, f"file://{fifo}", out)), out)
        assert report["stats"]["invalidLines"] == 0
        assert report["stats"]["examples"] + report["stats"]["evalExamples"] == expected_line - 1  # every line wholly inside the 8 MiB
    finally:
        stop.set()
        thread.join(10)


# VmHWM (this process' peak RSS), not ru_maxrss: ru_maxrss survives exec, so a child of a big pytest
# process would start at pytest's size.
PEAK_RSS = """
import json, sys
from finetune_trainer import validate

def hwm_kib():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))

base = hwm_kib()
rc = validate.run(sys.argv[1])
print(json.dumps({"rc": rc, "base_kib": base, "peak_kib": hwm_kib()}))
"""


@pytest.mark.slow  # ~50 s on one core: 35 s of it the PII scan of 145,000 examples
def test_a_150_mb_source_streams_in_bounded_memory(tmp_path):
    """150 MB of JSONL, validated in a subprocess: the peak RSS grows by less than 200 MiB (reading
    it whole, as before, held the text twice over plus every parsed example)."""
    src = tmp_path / "big.jsonl"
    filler = "lorem ipsum dolor sit amet " * 36  # ~1 KB of text per example
    with open(src, "w", encoding="utf-8") as fh:
        i = 0
        while fh.tell() < 150 * 10**6:
            fh.write(json.dumps({"instruction": f"Question {i}: {filler}", "output": f"Answer {i}."}) + "\n")
            i += 1
    out = tmp_path / "out"
    case = {"file": "big.jsonl"}
    config = write_config(tmp_path, case, f"file://{src}", f"file://{out}")
    proc = subprocess.run([sys.executable, "-c", PEAK_RSS, str(config)], capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    measured = json.loads(proc.stdout.strip().splitlines()[-1])
    report = json.loads((out / "report.json").read_text())
    assert report["valid"] is True, report["message"]
    assert report["stats"]["examples"] + report["stats"]["evalExamples"] == i
    growth_mib = (measured["peak_kib"] - measured["base_kib"]) / 1024
    print(f"150 MB source, {i} examples: peak RSS {measured['peak_kib'] / 1024:.0f} MiB, "
          f"growth {growth_mib:.0f} MiB")
    assert growth_mib < 200
    assert (out / "train.jsonl").stat().st_size + (out / "eval.jsonl").stat().st_size > 140 * 10**6


# ------------------------------------------------------------------------ mutations


def test_thousands_of_mutated_lines_never_raise(tmp_path):
    """Random byte mutations of valid lines (fixed seed, all three formats) through the validator's
    own reader and parser: every one ends in a result with a one-line bounded message."""
    import random

    from finetune_operator.api.dataset import DatasetSpec
    from finetune_trainer import jsonlines
    from finetune_trainer.validate import validate_lines

    rng = random.Random(12)
    alphabet = [b"{", b"}", b"[", b"]", b'"', b"\\", b"\\u", b"\\ud800", b":", b",", b"\x00", b"\xff", b"\xed\xa0\x80",
                b"\r", b"\n", b"\xef\xbb\xbf", b"NaN", b"1e999", b"9" * 200, b"\xe2\x80\xa8", b" ", b"null", b"-"]
    messages = 0
    for fmt, good in generate.GOOD.items():
        spec = DatasetSpec.model_validate({"source": {"uri": "file:///mutated.jsonl"}, "format": fmt,
                                           "provenance": {"origin": "fuzz"}, "curation": {"minExamples": 1}})
        for _ in range(2000):
            data = bytearray(good(rng.randrange(100)).encode())
            for _ in range(rng.randint(1, 4)):
                pos = rng.randrange(len(data) + 1)
                op = rng.random()
                if op < 0.4:
                    data[pos:pos] = rng.choice(alphabet)
                elif op < 0.7:
                    del data[pos:pos + rng.randint(1, 8)]
                else:
                    data[pos:pos + 1] = bytes([rng.randrange(256)])
            result = validate_lines(jsonlines.lines([(None, [bytes(data) + b"\n"])]), spec, workdir=tmp_path)
            assert result.message and "\n" not in result.message and len(result.message) <= MESSAGE_MAX
            messages += not result.valid
    assert messages > 3000  # most mutations break the line; each was reported, none raised
