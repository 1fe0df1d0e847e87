"""`finetune-trainer validate`: check, curate, split and digest a Dataset (no GPU, no torch).

Steps, in order (all but the I/O live in `validate_text`, so `ftctl` and tests reuse them):

1. parse every non-blank line with the declared format (errors keep line number + field);
2. drop exact duplicates when `curation.deduplicate` (same canonical JSON of the parsed
   example); with a separate `evaluation.uri`, training examples that also appear in the
   evaluation file are dropped too (and counted), so eval loss is never measured on
   training data;
3. scan every string for PII (see pii.py) and apply `curation.piiPolicy`;
4. split off the evaluation set: an example goes to eval when
   sha256("{seed}:{canonical JSON}") read as a fraction in [0, 1) is below
   `evaluation.fraction`. The decision depends only on the example and the seed, so
   appending lines never moves existing examples between the splits. If that leaves eval
   empty, the single example with the lowest hash is held out instead;
5. count tokens: exact with the tokenizer at `tokenizerURI` (tokenizer.json via the
   `tokenizers` library), otherwise an estimate of one token per 4 non-whitespace
   characters of message content (rounded up per example);
6. decide validity (too many invalid lines, PII under `reject`, fewer than
   `curation.minExamples` training examples) and compute the content digest:
   "sha256:" + sha256(train.jsonl bytes + eval.jsonl bytes), where each file holds one
   canonical JSON object per line (sorted keys, no spaces, UTF-8, "\\n" after each line).

Outputs: {outputURI}/train.jsonl and eval.jsonl (only when valid) and report.json, always,
written last. A data problem is not a command failure: the report says Invalid and the
command exits 0; a missing source exits 3, S3 unreachable exits 4.
"""

from __future__ import annotations

import hashlib
import json
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from finetune_operator.api.dataset import DatasetSpec, DatasetStats
from finetune_operator.api.trainer_config import ValidationConfig

from . import pii, storage
from .errors import ConfigError
from .formats import Example, FormatError, iter_examples, to_record
from .logs import get_logger

MAX_LISTED = 20
log = get_logger("validate")


@dataclass
class LineError:
    line: int
    field: str
    problem: str
    file: Optional[str] = None  # "eval" for the separate evaluation file, or a source file name
    file_line: Optional[int] = None  # line within `file` when the source is a folder

    def to_dict(self) -> dict:
        out = {"line": self.line, "field": self.field, "problem": self.problem}
        if self.file:
            out["file"] = self.file
        if self.file_line is not None:
            out["fileLine"] = self.file_line
        return out

    def describe(self) -> str:
        where = f"{self.file} line {self.line}" if self.file else f"line {self.line}"
        return f"{where}: {self.field}: {self.problem}"


@dataclass
class ValidationResult:
    valid: bool
    reason: str
    message: str
    stats: DatasetStats
    digest: Optional[str]
    pii_findings: dict[str, int]
    errors: list[LineError]
    invalid_line_numbers: list[int]
    train_jsonl: str = ""
    eval_jsonl: str = ""
    #: first line number per PII kind (never the PII itself)
    pii_lines: dict[str, list[int]] = field(default_factory=dict)

    def report(self, *, source_uri: str, validated_uri: str, fmt: str) -> dict:
        return {
            "valid": self.valid,
            "reason": self.reason,
            "message": self.message,
            "stats": self.stats.model_dump(),
            "digest": self.digest,
            "piiFindings": dict(self.pii_findings),
            "piiLines": {kind: lines for kind, lines in sorted(self.pii_lines.items())},
            "invalidLineNumbers": self.invalid_line_numbers[:MAX_LISTED],
            "errors": [e.to_dict() for e in self.errors[:MAX_LISTED]],
            "validatedURI": validated_uri,
            "sourceURI": source_uri,
            "format": fmt,
        }


def canonical_json(record: dict) -> str:
    return json.dumps(record, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def content_digest(train_jsonl: str, eval_jsonl: str) -> str:
    return "sha256:" + hashlib.sha256(train_jsonl.encode("utf-8") + eval_jsonl.encode("utf-8")).hexdigest()


def split_score(canonical: str, seed: int) -> float:
    """Where an example falls in [0, 1) for the eval split (stable for a given seed)."""
    h = hashlib.sha256(f"{seed}:{canonical}".encode("utf-8")).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def estimate_tokens(example: Example) -> int:
    chars = sum(len("".join(content.split())) for _, content in example.messages)
    return math.ceil(chars / 4)


def _format_problem(exc: FormatError) -> str:
    text = str(exc)
    prefix = f"{exc.field}: "
    return text[len(prefix):] if text.startswith(prefix) else text


def _parse(text: str, fmt: str, file: Optional[str]) -> tuple[list[tuple[int, Example]], list[LineError]]:
    examples, errors = [], []
    for number, item in iter_examples(text, fmt):
        if isinstance(item, FormatError):
            errors.append(LineError(number, item.field, _format_problem(item), file))
        else:
            examples.append((number, item))
    return examples, errors


def _dedupe(examples: list[tuple[int, Example]], fmt: str, seen: set[str]) -> tuple[list[tuple[int, Example, str]], int]:
    kept, removed = [], 0
    for number, ex in examples:
        canon = canonical_json(to_record(ex, fmt))
        if canon in seen:
            removed += 1
            continue
        seen.add(canon)
        kept.append((number, ex, canon))
    return kept, removed


def _scan_pii(examples, policy: str, findings: dict[str, int], lines: dict[str, list[int]], fmt: str):
    """Count PII per kind; with `redact`, return examples whose contents carry placeholders."""
    out = []
    for number, ex, canon in examples:
        new_messages, changed = [], False
        for role, content in ex.messages:
            hits = pii.find(content)
            for hit in hits:
                findings[hit.kind] = findings.get(hit.kind, 0) + 1
                kind_lines = lines.setdefault(hit.kind, [])
                if number not in kind_lines and len(kind_lines) < 5:
                    kind_lines.append(number)
            if hits and policy == "redact":
                content, changed = pii.redact(content, hits), True
            new_messages.append((role, content))
        if changed:
            ex = Example(tuple(new_messages), raw=ex.raw)
            canon = canonical_json(to_record(ex, fmt))
        out.append((number, ex, canon))
    return out


def _jsonl(canonicals: list[str]) -> str:
    return "".join(c + "\n" for c in canonicals)


def validate_text(
    text: str,
    spec: DatasetSpec,
    eval_text: Optional[str] = None,
    *,
    count_tokens: Optional[Callable[[Example], int]] = None,
) -> ValidationResult:
    """Validate and curate a dataset held in memory (see the module docstring for the rules)."""
    fmt, curation = spec.format, spec.curation
    count_tokens = count_tokens or estimate_tokens

    train_parsed, errors = _parse(text, fmt, None)
    eval_parsed, eval_errors = ([], []) if eval_text is None else _parse(eval_text, fmt, "eval")
    errors += eval_errors

    duplicates = 0
    if curation.deduplicate:
        seen: set[str] = set()
        eval_items, removed = _dedupe(eval_parsed, fmt, seen)
        duplicates += removed
        train_items, removed = _dedupe(train_parsed, fmt, seen)
        duplicates += removed
    else:
        eval_items = [(n, ex, canonical_json(to_record(ex, fmt))) for n, ex in eval_parsed]
        train_items = [(n, ex, canonical_json(to_record(ex, fmt))) for n, ex in train_parsed]

    findings: dict[str, int] = {}
    pii_lines: dict[str, list[int]] = {}
    train_items = _scan_pii(train_items, curation.piiPolicy, findings, pii_lines, fmt)
    eval_items = _scan_pii(eval_items, curation.piiPolicy, findings, pii_lines, fmt)

    if eval_text is None and train_items:
        fraction, seed = spec.evaluation.fraction or 0.0, spec.evaluation.seed
        scores = [split_score(canon, seed) for _, _, canon in train_items]
        held = {i for i, s in enumerate(scores) if s < fraction}
        if not held and fraction > 0 and len(train_items) > 1:
            held = {min(range(len(scores)), key=scores.__getitem__)}
        eval_items = [item for i, item in enumerate(train_items) if i in held]
        train_items = [item for i, item in enumerate(train_items) if i not in held]

    stats = DatasetStats(
        examples=len(train_items),
        evalExamples=len(eval_items),
        tokens=sum(count_tokens(ex) for _, ex, _ in train_items + eval_items),
        duplicatesRemoved=duplicates,
        invalidLines=len(errors),
    )
    result = ValidationResult(
        valid=False, reason="", message="", stats=stats, digest=None, pii_findings=findings,
        errors=errors, invalid_line_numbers=[e.line for e in errors if e.file is None][:MAX_LISTED],
        pii_lines=pii_lines,
    )

    if len(errors) > curation.maxInvalidLines:
        listed = "; ".join(e.describe() for e in errors[:5])
        more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
        result.reason = "TooManyInvalidLines"
        result.message = (f"{len(errors)} invalid lines, at most {curation.maxInvalidLines} allowed: "
                          f"{listed}{more}")
        return result
    if findings and curation.piiPolicy == "reject":
        kinds = ", ".join(f"{kind} ({findings[kind]}, first at line {', '.join(map(str, pii_lines[kind]))})"
                          for kind in sorted(findings))
        result.reason = "PIIFound"
        result.message = f"personal data found and piiPolicy is reject: {kinds}"
        return result
    if len(train_items) < curation.minExamples:
        result.reason = "TooFewExamples"
        result.message = (f"{len(train_items)} valid training examples after curation, "
                          f"minimum is {curation.minExamples}")
        return result

    result.train_jsonl = _jsonl([canon for _, _, canon in train_items])
    result.eval_jsonl = _jsonl([canon for _, _, canon in eval_items])
    result.digest = content_digest(result.train_jsonl, result.eval_jsonl)
    result.valid, result.reason = True, "Validated"
    notes = []
    if duplicates:
        notes.append(f"{duplicates} duplicates removed")
    if errors:
        notes.append(f"{len(errors)} invalid lines dropped")
    if findings:
        verb = "redacted" if curation.piiPolicy == "redact" else "allowed"
        notes.append(f"PII {verb}: " + ", ".join(f"{k}={v}" for k, v in sorted(findings.items())))
    result.message = (f"{stats.examples} training and {stats.evalExamples} evaluation examples, "
                      f"{stats.tokens} tokens" + (f" ({'; '.join(notes)})" if notes else ""))
    return result


# ---------------------------------------------------------------------------------- I/O


def _read_config(config_path: str) -> ValidationConfig:
    from pydantic import ValidationError

    text = storage.read_text(config_path) if "://" in config_path else Path(config_path).read_text()
    try:
        return ValidationConfig.model_validate_json(text)
    except ValidationError as exc:
        raise ConfigError(f"{config_path}: invalid validation config: {exc}") from None


def read_source(uri: str) -> tuple[str, list[tuple[int, str]]]:
    """The text at a .jsonl file or a folder of *.jsonl files (sorted, concatenated).

    Also returns (first line number, file name) per file so errors can name the file.
    """
    if uri.rstrip("/").endswith(".jsonl") or (storage.parse(uri).scheme == "file" and
                                             Path(storage.parse(uri).key).is_file()):
        return storage.read_text(uri), []
    names = [n for n in storage.list_keys(uri) if n.endswith(".jsonl")]
    if not names:
        if storage.exists(uri):  # an object without the .jsonl suffix
            return storage.read_text(uri), []
        raise ConfigError(f"{uri}: no .jsonl file or folder of .jsonl files found")
    parts, starts, line = [], [], 1
    for name in names:
        chunk = storage.read_text(storage.join(uri, name))
        if chunk and not chunk.endswith("\n"):
            chunk += "\n"
        starts.append((line, name))
        line += chunk.count("\n")
        parts.append(chunk)
    return "".join(parts), starts


def _name_files(result: ValidationResult, starts: list[tuple[int, str]]) -> None:
    """For folder sources, errors also say which file and which line in it."""
    if not starts:
        return
    for err in result.errors:
        if err.file is None:
            first, name = max((s for s in starts if s[0] <= err.line), key=lambda s: s[0])
            err.file, err.file_line = name, err.line - first + 1


def tokenizer_counter(tokenizer_uri: str) -> Callable[[Example], int]:
    """Exact token counts with tokenizer.json (the `tokenizers` library; no torch)."""
    from tokenizers import Tokenizer

    tmp = Path(tempfile.mkdtemp(prefix="ft-tokenizer-"))
    folder = storage.download_folder(tokenizer_uri, tmp)
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise ConfigError(f"{tokenizer_uri}: no tokenizer.json in this folder")
    tok = Tokenizer.from_file(str(path))
    return lambda ex: sum(len(tok.encode(content, add_special_tokens=False).ids) for _, content in ex.messages)


def run(config_path: str) -> int:
    config = _read_config(config_path)
    spec = config.dataset
    source = spec.source.uri
    try:
        text, starts = read_source(source)
        eval_text = storage.read_text(spec.evaluation.uri) if spec.evaluation.uri else None
    except FileNotFoundError as exc:
        raise ConfigError(f"dataset source not found: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{source}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    counter = tokenizer_counter(config.tokenizerURI) if config.tokenizerURI else None

    result = validate_text(text, spec, eval_text, count_tokens=counter)
    _name_files(result, starts)
    if result.valid:
        storage.write_text(storage.join(config.outputURI, "train.jsonl"), result.train_jsonl)
        storage.write_text(storage.join(config.outputURI, "eval.jsonl"), result.eval_jsonl)
    report = result.report(source_uri=source, validated_uri=config.outputURI, fmt=spec.format)
    # Written last: its presence means the validated files beside it are complete.
    storage.write_text(storage.join(config.outputURI, "report.json"), json.dumps(report, indent=2) + "\n")
    log.info(result.message, extra={
        "event": "validated", "valid": result.valid, "reason": result.reason,
        "dataset": f"{config.job.namespace}/{config.job.name}", **result.stats.model_dump(),
        "piiFindings": result.pii_findings, "digest": result.digest,
    })
    return 0
