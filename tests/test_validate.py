"""Dataset validation: the pure `validate_text` rules, and the `validate` command end to end
against a real S3 server (moto_server) and file:// folders."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from finetune_operator.api.dataset import DatasetSpec, DatasetStats
from finetune_operator.api.trainer_config import ValidationConfig
from finetune_trainer import storage
from finetune_trainer.validate import split_score, validate_text

from testutil import free_port

REPO = Path(__file__).resolve().parent.parent


def make_spec(fmt: str = "instruction", **curation) -> DatasetSpec:
    return DatasetSpec.model_validate({
        "source": {"uri": "file:///unused.jsonl"},
        "format": fmt,
        "evaluation": {"fraction": 0.2, "seed": 7},
        "provenance": {"origin": "tests"},
        "curation": {"minExamples": 3, **curation},
    })


def instruction_lines(n: int, start: int = 0) -> list[str]:
    return [json.dumps({"instruction": f"What is item {i}?", "output": f"Item {i} is a widget."})
            for i in range(start, start + n)]


def jsonl(lines: list[str]) -> str:
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------ formats


@pytest.mark.parametrize("fmt, line", [
    ("chat", {"messages": [{"role": "system", "content": "Be brief."},
                           {"role": "user", "content": "Hi {n}"}, {"role": "assistant", "content": "Hello {n}."}]}),
    ("instruction", {"instruction": "Add {n} and 1.", "input": "numbers", "output": "The sum is {n}+1."}),
    ("completion", {"prompt": "Count: {n},", "completion": " {n}+1"}),
])
def test_each_format_validates_and_writes_canonical_lines(fmt, line):
    lines = [json.dumps(line).replace("{n}", str(i)) for i in range(12)]
    result = validate_text(jsonl(lines), make_spec(fmt))
    assert result.valid, result.message
    assert result.reason == "Validated"
    assert result.stats.examples + result.stats.evalExamples == 12
    assert result.stats.evalExamples >= 1
    for out_line in (result.train_jsonl + result.eval_jsonl).splitlines():
        record = json.loads(out_line)
        assert out_line == json.dumps(record, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    assert result.stats.tokens > 0


def test_malformed_lines_report_line_numbers_and_fields():
    lines = instruction_lines(10)
    lines[2] = '{"instruction": "x"'  # line 3: bad JSON
    lines[6] = json.dumps({"instruction": "x", "output": 5})  # line 7: wrong type
    result = validate_text(jsonl(lines), make_spec())
    assert not result.valid
    assert result.reason == "TooManyInvalidLines"
    assert result.invalid_line_numbers == [3, 7]
    assert [(e.line, e.field) for e in result.errors] == [(3, "json"), (7, "output")]
    assert "line 7: output: must be a string" in result.message
    assert result.stats.invalidLines == 2
    assert result.train_jsonl == "" and result.digest is None


def test_chat_role_error_names_the_message_index():
    bad = json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]})
    result = validate_text(jsonl([bad]), make_spec("chat"))
    assert "line 1: messages[1].role: must be one of system, user, assistant" in result.message


def test_invalid_lines_within_tolerance_are_dropped():
    lines = instruction_lines(10) + ["not json"]
    result = validate_text(jsonl(lines), make_spec(maxInvalidLines=1))
    assert result.valid
    assert result.stats.invalidLines == 1
    assert result.stats.examples + result.stats.evalExamples == 10


# ------------------------------------------------------------------------ curation


def test_exact_duplicates_are_removed_and_counted():
    lines = instruction_lines(8)
    # The same example written with different key order and spacing is still a duplicate.
    twin = json.dumps({"output": "Item 0 is a widget.", "instruction": "What is item 0?"}, indent=None)
    result = validate_text(jsonl(lines + [lines[1], twin, lines[1]]), make_spec())
    assert result.stats.duplicatesRemoved == 3
    assert result.stats.examples + result.stats.evalExamples == 8


def test_duplicates_kept_when_dedup_is_off():
    lines = instruction_lines(8)
    result = validate_text(jsonl(lines + lines[:2]), make_spec(deduplicate=False))
    assert result.stats.duplicatesRemoved == 0
    assert result.stats.examples + result.stats.evalExamples == 10


def test_too_few_examples_says_how_many_and_the_minimum():
    result = validate_text(jsonl(instruction_lines(4)), make_spec(minExamples=20))
    assert not result.valid
    assert result.reason == "TooFewExamples"
    assert str(result.stats.examples) in result.message and "minimum is 20" in result.message


# ------------------------------------------------------------------------ PII


def pii_lines() -> list[str]:
    lines = instruction_lines(10)
    lines.append(json.dumps({"instruction": "Contact?", "output": "Mail ann@example.org or call 555-123-4567."}))
    lines.append(json.dumps({"instruction": "Pay how?", "output": "Card 4111 1111 1111 1111, SSN 123-45-6789."}))
    # True negatives: an order number and a date are neither a card nor a phone.
    lines.append(json.dumps({"instruction": "Order?", "output": "Order 1234567890123 shipped on 2024-01-15."}))
    return lines


def test_pii_reject_lists_kinds_and_first_lines():
    result = validate_text(jsonl(pii_lines()), make_spec(piiPolicy="reject"))
    assert not result.valid and result.reason == "PIIFound"
    assert result.pii_findings == {"email": 1, "phone": 1, "card": 1, "ssn": 1}
    assert "email (1, first at line 11)" in result.message
    assert "card (1, first at line 12)" in result.message
    assert "ann@example.org" not in result.message  # the PII itself is never reported


def test_pii_redact_replaces_findings_in_validated_data():
    result = validate_text(jsonl(pii_lines()), make_spec(piiPolicy="redact"))
    assert result.valid, result.message
    assert result.pii_findings == {"email": 1, "phone": 1, "card": 1, "ssn": 1}
    data = result.train_jsonl + result.eval_jsonl
    assert "Mail [EMAIL] or call [PHONE]." in data
    assert "Card [CARD], SSN [SSN]." in data
    assert "ann@example.org" not in data and "4111" not in data
    assert "Order 1234567890123 shipped on 2024-01-15." in data


def test_pii_allow_keeps_data_and_reports_counts():
    result = validate_text(jsonl(pii_lines()), make_spec(piiPolicy="allow"))
    assert result.valid
    assert result.pii_findings["email"] == 1
    assert "ann@example.org" in result.train_jsonl + result.eval_jsonl


# ------------------------------------------------------------------------ split and digest


def test_eval_split_is_deterministic_and_stable_when_lines_are_appended():
    spec = make_spec()
    first = validate_text(jsonl(instruction_lines(40)), spec)
    again = validate_text(jsonl(instruction_lines(40)), spec)
    assert first.eval_jsonl == again.eval_jsonl and first.digest == again.digest
    assert 0 < first.stats.evalExamples < 40

    grown = validate_text(jsonl(instruction_lines(40) + instruction_lines(20, start=40)), spec)
    old_eval = set(first.eval_jsonl.splitlines())
    new_eval = set(grown.eval_jsonl.splitlines())
    assert old_eval <= new_eval  # nothing moved from eval to train
    assert set(first.train_jsonl.splitlines()) <= set(grown.train_jsonl.splitlines())

    # The rule is the documented one: hash of seed + canonical line below the fraction.
    for line in first.eval_jsonl.splitlines():
        assert split_score(line, 7) < 0.2
    for line in first.train_jsonl.splitlines():
        assert split_score(line, 7) >= 0.2


def test_a_different_seed_holds_out_different_examples():
    text = jsonl(instruction_lines(40))
    a = validate_text(text, make_spec())
    other = make_spec()
    other.evaluation.seed = 8
    b = validate_text(text, other)
    assert a.eval_jsonl != b.eval_jsonl


def test_small_dataset_still_gets_one_eval_example():
    spec = make_spec()
    spec.evaluation.fraction = 0.01
    result = validate_text(jsonl(instruction_lines(5)), spec)
    assert result.stats.evalExamples == 1 and result.stats.examples == 4


def test_separate_eval_file_and_contamination_removed():
    train = instruction_lines(10)
    evaluation = instruction_lines(3, start=100) + [train[0]]
    spec = make_spec()
    spec.evaluation.fraction, spec.evaluation.uri = None, "file:///eval.jsonl"
    result = validate_text(jsonl(train), spec, jsonl(evaluation))
    assert result.valid
    assert result.stats.evalExamples == 4
    assert result.stats.examples == 9  # train[0] also in eval: dropped from training
    assert result.stats.duplicatesRemoved == 1


def test_digest_is_sha256_of_train_then_eval_and_tracks_content():
    text = jsonl(instruction_lines(20))
    result = validate_text(text, make_spec())
    expected = hashlib.sha256((result.train_jsonl + result.eval_jsonl).encode()).hexdigest()
    assert result.digest == "sha256:" + expected
    changed = validate_text(text.replace("Item 3 is", "Item 3 was"), make_spec())
    assert changed.digest != result.digest
    # Formatting of the source does not matter, only content.
    respaced = "\n\n".join(json.dumps(json.loads(l), indent=None, separators=(", ", ": ")) for l in text.splitlines())
    assert validate_text(respaced, make_spec()).digest == result.digest


# ------------------------------------------------------------------------ the command


def write_config(tmp_path: Path, source: str, output: str, **dataset) -> Path:
    spec = make_spec().model_dump(exclude_none=True)
    spec["source"]["uri"] = source
    spec.update(dataset)
    config = ValidationConfig.model_validate({
        "job": {"namespace": "team-a", "name": "support"}, "dataset": spec, "outputURI": output})
    path = tmp_path / "validation.json"
    path.write_text(config.model_dump_json())
    return path


def run_validate(config: Path, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "finetune_trainer.cli", "validate", "--config", str(config)],
        capture_output=True, text=True, timeout=120, env={**os.environ, **env},
    )


def test_command_end_to_end_on_s3(tmp_path, bucket):
    lines = instruction_lines(30) + [json.dumps({"instruction": "Who?", "output": "ann@example.org"})]
    storage.write_text(f"s3://{bucket}/raw/support.jsonl", jsonl(lines + [lines[0]]))
    out = f"s3://{bucket}/validated/support"
    config = write_config(tmp_path, f"s3://{bucket}/raw/support.jsonl", out,
                          curation={"minExamples": 10, "piiPolicy": "redact"})
    proc = run_validate(config)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(storage.read_text(f"{out}/report.json"))
    assert report["valid"] is True and report["reason"] == "Validated"
    assert DatasetStats.model_validate(report["stats"]).duplicatesRemoved == 1
    assert report["stats"]["examples"] + report["stats"]["evalExamples"] == 31
    assert report["piiFindings"] == {"email": 1}
    assert report["validatedURI"] == out and report["sourceURI"].endswith("raw/support.jsonl")
    train, evaluation = storage.read_bytes(f"{out}/train.jsonl"), storage.read_bytes(f"{out}/eval.jsonl")
    assert report["digest"] == "sha256:" + hashlib.sha256(train + evaluation).hexdigest()
    assert b"[EMAIL]" in train + evaluation
    assert "ann@example.org" not in proc.stderr  # logs carry counts, never the PII


def test_command_reads_an_s3_folder_and_a_separate_eval_file(tmp_path, bucket):
    storage.write_text(f"s3://{bucket}/raw/part-2.jsonl", jsonl(instruction_lines(5, start=5)))
    storage.write_text(f"s3://{bucket}/raw/part-1.jsonl", jsonl(instruction_lines(5)))
    storage.write_text(f"s3://{bucket}/raw/README.md", "not data")
    storage.write_text(f"s3://{bucket}/eval/held-out.jsonl", jsonl(instruction_lines(3, start=50)))
    out = f"s3://{bucket}/validated"
    config = write_config(tmp_path, f"s3://{bucket}/raw", out,
                          evaluation={"uri": f"s3://{bucket}/eval/held-out.jsonl"})
    proc = run_validate(config)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(storage.read_text(f"{out}/report.json"))
    assert report["valid"] is True
    assert (report["stats"]["examples"], report["stats"]["evalExamples"]) == (10, 3)
    train = storage.read_text(f"{out}/train.jsonl").splitlines()
    assert json.loads(train[0])["instruction"] == "What is item 0?"  # part-1 before part-2
    assert json.loads(train[-1])["instruction"] == "What is item 9?"


def test_command_pii_reject_report_names_kinds_and_lines(tmp_path):
    src = tmp_path / "data.jsonl"
    src.write_text(jsonl(pii_lines()))
    out = tmp_path / "out"
    proc = run_validate(write_config(tmp_path, f"file://{src}", f"file://{out}"))
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["valid"] is False and report["reason"] == "PIIFound"
    assert report["piiLines"] == {"card": [12], "email": [11], "phone": [11], "ssn": [12]}
    assert "4111" not in (out / "report.json").read_text() and "4111" not in proc.stderr


def test_command_non_utf8_line_is_an_invalid_line_not_a_failure(tmp_path):
    # Bad data is the Dataset's problem (Invalid, exit 0), not the Job's: it used to exit 3 and give no report.
    src = tmp_path / "data.jsonl"
    src.write_bytes(jsonl(instruction_lines(12)).encode() + b'{"instruction": "caf\xe9", "output": "x"}\n')
    out = tmp_path / "out"
    proc = run_validate(write_config(tmp_path, f"file://{src}", f"file://{out}"))
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["valid"] is False and report["reason"] == "TooManyInvalidLines"
    assert report["message"] == ("1 invalid lines, at most 0 allowed: "
                                 "line 13: not UTF-8: byte 0xe9 (invalid continuation byte) at byte 21")
    assert report["errors"][0]["excerpt"] == '{"instruction": "caf\\xe9", "output": "x"}'


def test_command_reports_invalid_data_with_exit_0_and_no_data_files(tmp_path):
    src = tmp_path / "data.jsonl"
    lines = instruction_lines(12)
    lines[6] = json.dumps({"instruction": "x", "output": ""})
    src.write_text(jsonl(lines))
    out = tmp_path / "out"
    proc = run_validate(write_config(tmp_path, f"file://{src}", f"file://{out}"))
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["valid"] is False and report["reason"] == "TooManyInvalidLines"
    assert report["invalidLineNumbers"] == [7]
    assert report["errors"] == [{"line": 7, "field": "output", "problem": "must not be empty",
                                 "excerpt": '{"instruction": "x", "output": ""}'}]
    assert not (out / "train.jsonl").exists() and not (out / "eval.jsonl").exists()


def test_command_reads_a_folder_of_jsonl_files_in_order(tmp_path):
    folder = tmp_path / "raw"
    folder.mkdir()
    (folder / "b.jsonl").write_text(jsonl(instruction_lines(6, start=6)[:-1] + ["{broken"]))
    (folder / "a.jsonl").write_text(jsonl(instruction_lines(6)))
    (folder / "notes.txt").write_text("not data")
    out = tmp_path / "out"
    proc = run_validate(write_config(tmp_path, f"file://{folder}", f"file://{out}"))
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["invalidLineNumbers"] == [12]  # a.jsonl's 6 lines come first
    assert report["errors"][0]["file"] == "b.jsonl" and report["errors"][0]["fileLine"] == 6


def test_command_missing_source_exits_3(tmp_path):
    out = tmp_path / "out"
    proc = run_validate(write_config(tmp_path, f"file://{tmp_path}/nope.jsonl", f"file://{out}"))
    assert proc.returncode == 3
    assert "nope.jsonl" in proc.stderr
    assert not (out / "report.json").exists()


def test_command_s3_unreachable_exits_4(tmp_path, s3_server):
    config = write_config(tmp_path, "s3://some-bucket/data.jsonl", f"file://{tmp_path}/out")
    proc = run_validate(config, AWS_ENDPOINT_URL=f"http://127.0.0.1:{free_port()}",
                        FINETUNE_S3_MAX_ATTEMPTS="1", FINETUNE_S3_CONNECT_TIMEOUT="1")
    assert proc.returncode == 4, proc.stderr


def test_command_counts_tokens_with_a_tokenizer_and_never_imports_torch(tmp_path, tiny_model_dir):
    src = tmp_path / "data.jsonl"
    src.write_text(jsonl(instruction_lines(12)))
    config_path = write_config(tmp_path, f"file://{src}", f"file://{tmp_path}/out")
    config = json.loads(config_path.read_text())
    config["tokenizerURI"] = f"file://{tiny_model_dir}"
    config_path.write_text(json.dumps(config))
    code = (
        "import sys; from finetune_trainer.validate import run; "
        f"rc = run({str(config_path)!r}); "
        "assert 'torch' not in sys.modules, 'validate imported torch'; sys.exit(rc)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())

    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))
    data = [json.loads(l) for l in (tmp_path / "out" / "train.jsonl").read_text().splitlines()]
    data += [json.loads(l) for l in (tmp_path / "out" / "eval.jsonl").read_text().splitlines()]
    expected = sum(len(tok.encode(r[k], add_special_tokens=False).ids) for r in data for k in ("instruction", "output"))
    assert report["stats"]["tokens"] == expected


def test_quickstart_dataset_validates_against_its_manifest():
    import yaml

    manifest = yaml.safe_load((REPO / "examples/quickstart/dataset.yaml").read_text())
    spec = DatasetSpec.model_validate(manifest["spec"])
    text = (REPO / "examples/quickstart/data/support-answers.jsonl").read_text()
    result = validate_text(text, spec)
    assert result.valid, result.message
    assert result.stats.duplicatesRemoved == 0 and result.stats.invalidLines == 0
    assert result.pii_findings == {}
    assert result.stats.examples >= 50 and result.stats.evalExamples >= 5
    for line in (result.train_jsonl + result.eval_jsonl).splitlines():
        assert json.loads(line)["output"].startswith("FTO:")


# ------------------------------------------------------------------------ streaming pieces


def test_lines_split_on_newline_only_whatever_the_chunks():
    from finetune_trainer import jsonlines

    data = ('{"a": "x\u2028y\u0085z"}\r\n' + '{"b": 1}\n' + "\n" + '{"c": "\x1c"}').encode()
    whole = [(r.number, r.data) for r in jsonlines.split([data])]
    assert whole == [(1, '{"a": "x\u2028y\u0085z"}'.encode()), (2, b'{"b": 1}'), (3, b""), (4, '{"c": "\x1c"}'.encode())]
    byte_by_byte = [(r.number, r.data) for r in jsonlines.split(data[i:i + 1] for i in range(len(data)))]
    assert byte_by_byte == whole


def test_a_line_over_the_bound_keeps_only_its_start_and_reading_goes_on():
    from finetune_trainer import jsonlines

    long = b"y" * (jsonlines.MAX_LINE_BYTES + 10)
    chunks = [b"first\n" + long[:3 * 2**20], long[3 * 2**20:] + b"\nlast"]
    lines = list(jsonlines.split(c for c in chunks))
    assert [(r.number, r.too_long, r.length) for r in lines] == [(1, False, 5), (2, True, len(long)), (3, False, 4)]
    assert len(lines[1].data) == jsonlines.EXCERPT_BYTES and lines[2].data == b"last"


def test_the_byte_budget_stops_reading():
    from finetune_trainer import jsonlines

    budget = jsonlines.ByteBudget(10, "spec.source.maxBytes", "10")
    with pytest.raises(jsonlines.SourceProblem) as exc:
        list(jsonlines.split([b"a\nb\n", b"c\nd\ne\nf\n"], budget))
    assert exc.value.reason == "SourceTooLarge" and exc.value.line == 3


def test_digest_set_finds_duplicates_and_stays_small():
    from finetune_trainer.validate import DigestSet

    seen = DigestSet()
    assert all(seen.add(f"example {i}") for i in range(100_000))
    assert not any(seen.add(f"example {i}") for i in range(0, 100_000, 7))
    assert seen.add("one more") and len(seen) == 100_001
    assert seen.nbytes <= 100_001 * 8 / 0.3  # 8-byte slots, at least 30% full


def test_byte_quantities():
    import re

    from pydantic import ValidationError

    from finetune_operator.api.dataset import BYTES_QUANTITY_PATTERN, DataSource, byte_quantity

    assert byte_quantity("10Gi") == 10 * 2**30 and byte_quantity("1.5M") == 1_500_000
    assert byte_quantity("1000") == 1000 and byte_quantity("0.5Ki") == 512
    for bad in ("0", "0.0", "10GB", "1e9", "-1", "10 Gi", "1m"):
        assert not re.match(BYTES_QUANTITY_PATTERN, bad), bad
    with pytest.raises(ValidationError, match="maxBytes"):
        DataSource(uri="file:///x.jsonl", maxBytes="0")
    assert DataSource(uri="file:///x.jsonl").max_bytes() == 10 * 2**30  # the default


def test_excerpts_redact_pii_and_messages_never_quote_lines():
    bad = json.dumps({"instruction": "Mail ann@example.org", "output": 5})
    result = validate_text(jsonl(instruction_lines(5) + [bad]), make_spec())
    assert result.errors[0].excerpt == '{"instruction": "Mail [EMAIL]", "output": 5}'
    assert "ann@example.org" not in result.message and "[EMAIL]" not in result.message


def test_folder_errors_name_the_file_and_its_own_line(tmp_path):
    folder = tmp_path / "raw"
    folder.mkdir()
    (folder / "a.jsonl").write_text(jsonl(instruction_lines(6)))
    (folder / "b.jsonl").write_text(jsonl(instruction_lines(2, start=6) + ['{"instruction": "x"}']))
    from finetune_trainer import jsonlines
    from finetune_trainer.validate import read_source, validate_lines

    text, starts = read_source(f"file://{folder}")  # the in-memory form governance uses
    assert starts == [(1, "a.jsonl"), (7, "b.jsonl")] and text.count("\n") == 9

    result = validate_lines(jsonlines.read(f"file://{folder}"), make_spec(), workdir=tmp_path)
    assert result.message == "1 invalid lines, at most 0 allowed: b.jsonl line 3: output: missing required field"
    assert result.invalid_line_numbers == [9] and result.errors[0].file_line == 3


def test_validate_source_gives_the_commands_digest_for_a_tolerated_non_utf8_line(tmp_path):
    # Governance re-validates the source with validate_source: a Dataset the Job made Ready with a
    # dropped non-UTF-8 line must get the same digest there (reading it as text would raise instead).
    from finetune_trainer.validate import validate_source

    src = tmp_path / "data.jsonl"
    src.write_bytes(jsonl(instruction_lines(12)).encode() + b'{"instruction": "caf\xe9", "output": "x"}\n')
    out = tmp_path / "out"
    config = write_config(tmp_path, f"file://{src}", f"file://{out}", curation={"minExamples": 3, "maxInvalidLines": 1})
    assert run_validate(config).returncode == 0
    report = json.loads((out / "report.json").read_text())
    assert report["valid"] is True and report["stats"]["invalidLines"] == 1
    spec = ValidationConfig.model_validate_json(config.read_text()).dataset
    again = validate_source(spec)
    assert again.digest == report["digest"] and again.train_path is None



def test_command_source_path_with_a_nul_exits_3(tmp_path):
    proc = run_validate(write_config(tmp_path, "file:///tmp/a\x00b.jsonl", f"file://{tmp_path}/out"))
    assert proc.returncode == 3 and "Traceback" not in proc.stderr, proc.stderr
    assert "NUL character" in proc.stderr


def test_a_file_name_with_a_newline_stays_on_one_line_in_the_message(tmp_path):
    from finetune_trainer import jsonlines
    from finetune_trainer.validate import validate_lines

    files = [("ok.jsonl", [jsonl(instruction_lines(3)).encode()]), ("evil\nname.jsonl", [b"{broken\n"])]
    result = validate_lines(jsonlines.lines(files), make_spec(minExamples=1), workdir=tmp_path)
    assert result.message == ("1 invalid lines, at most 0 allowed: evil\\nname.jsonl line 1: json: not valid JSON "
                              "(Expecting property name enclosed in double quotes at column 2)")


def test_a_separate_eval_file_over_max_bytes_is_named_as_the_eval_file():
    spec = make_spec()
    spec.evaluation.fraction, spec.evaluation.uri = None, "file:///eval.jsonl"
    spec.source.maxBytes = "1Ki"
    result = validate_text(jsonl(instruction_lines(3)), spec, jsonl(instruction_lines(40, start=100)))
    assert not result.valid and result.reason == "SourceTooLarge"
    assert result.message.startswith("eval line 1: source: reading stopped here: the source is larger than "
                                     "spec.source.maxBytes (1Ki = 1024 bytes)")
