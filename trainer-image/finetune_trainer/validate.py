"""`finetune-trainer validate`: check, curate, split and digest a Dataset (no GPU, no torch).

The source is streamed (jsonlines.py: split on "\\n" only, at most 8 MiB a line, at most
`source.maxBytes` in all), one line at a time; what is kept per example is a 64-bit digest for
deduplication. Steps, per line, in order (`validate_lines`; `validate_text` runs the same on text
held in memory, for ftctl, governance and tests):

1. parse the line with the declared format (formats.parse_line: strict JSON -- no duplicate keys,
   NaN, huge numbers, deep nesting or lone surrogates); an error keeps the line number, the field,
   and a bounded excerpt of the line (report.json only: the excerpt is data);
2. drop exact duplicates when `curation.deduplicate` (same canonical JSON of the parsed example);
   with a separate `evaluation.uri`, read first, training examples that also appear in the
   evaluation file are dropped too (and counted), so eval loss is never measured on training data;
3. scan every string for PII (see pii.py) and apply `curation.piiPolicy`;
4. split off the evaluation set: an example goes to eval when
   sha256("{seed}:{canonical JSON}") read as a fraction in [0, 1) is below
   `evaluation.fraction`. The decision depends only on the example and the seed, so
   appending lines never moves existing examples between the splits. If that leaves eval
   empty, the single example with the lowest hash is held out instead;
5. count tokens: exact with the tokenizer at `tokenizerURI` (tokenizer.json via the
   `tokenizers` library), otherwise an estimate of one token per 4 non-whitespace
   characters of message content (rounded up per example);
6. write the example to the train or eval file (local temp files, uploaded at the end);

then decide validity (a source that is not JSON Lines or is over `source.maxBytes`, too many
invalid lines, PII under `reject`, fewer than `curation.minExamples` training examples) and
compute the content digest: "sha256:" + sha256(train.jsonl bytes + eval.jsonl bytes), where each
file holds one canonical JSON object per line (sorted keys, no spaces, UTF-8, "\\n" after each).

Outputs: {outputURI}/train.jsonl and eval.jsonl (only when valid) and report.json, always,
written last. A data problem is not a command failure: the report says Invalid and the
command exits 0; a missing source exits 3, S3 unreachable exits 4.
"""

from __future__ import annotations

import hashlib
import json
import math
import tempfile
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

from finetune_operator.api.dataset import DatasetSpec, DatasetStats
from finetune_operator.api.trainer_config import ValidationConfig

from . import jsonlines, pii, storage
from .errors import ConfigError
from .formats import Example, FormatError, clip, is_blank, parse_line, to_record
from .jsonlines import ByteBudget, Line, SourceProblem
from .logs import get_logger

MAX_LISTED = 20
#: Errors quoted in the message (status.message); the report lists MAX_LISTED.
MAX_IN_MESSAGE = 5
log = get_logger("validate")


@dataclass
class LineError:
    line: Optional[int]  # None for a whole-source problem found before reading (its size)
    field: str
    problem: str
    file: Optional[str] = None  # "eval" for the separate evaluation file, or a source file name
    file_line: Optional[int] = None  # line within `file` when the source is a folder
    excerpt: Optional[str] = None  # the line's start, bounded (report.json only, never status or logs)

    def to_dict(self) -> dict:
        out = {"line": self.line, "field": self.field, "problem": self.problem}
        if self.line is None:
            del out["line"]
        if self.file:
            out["file"] = self.file
        if self.file_line is not None:
            out["fileLine"] = self.file_line
        if self.excerpt is not None:
            out["excerpt"] = self.excerpt
        return out

    def describe(self) -> str:
        file = clip(self.file, 120) if self.file else None  # an S3 key may hold anything, "\n" included
        if self.line is None:
            where = file
        elif file and self.file_line is not None:
            where = f"{file} line {self.file_line}"
        else:
            where = f"{file} line {self.line}" if file else f"line {self.line}"
        what = self.problem if self.field == "line" else f"{self.field}: {self.problem}"
        return f"{where}: {what}" if where else what


@dataclass
class ValidationResult:
    valid: bool
    reason: str
    message: str
    stats: DatasetStats
    digest: Optional[str]
    pii_findings: dict[str, int]
    #: the first MAX_LISTED errors (stats.invalidLines counts them all)
    errors: list[LineError]
    invalid_line_numbers: list[int]
    #: validate_text only: the validated files' text (the command streams them to files instead)
    train_jsonl: str = ""
    eval_jsonl: str = ""
    #: first line number per PII kind (never the PII itself)
    pii_lines: dict[str, list[int]] = field(default_factory=dict)
    #: validate_lines: the validated files, in its work folder (valid results only)
    train_path: Optional[Path] = None
    eval_path: Optional[Path] = None

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


class DigestSet:
    """The canonical examples seen so far, as 64-bit digests in an open-addressing table of 8-byte
    slots kept 30-60% full: ~18 bytes per example (a Python set of the examples would hold them
    all; one of 16-byte digests ~100 bytes each). Two different examples share a digest with
    probability ~n^2 / 2^65 (1e-5 for 20 million examples): then one is dropped as a duplicate."""

    def __init__(self, capacity: int = 1 << 12):
        self._slots = array("Q", bytes(8 * capacity))
        self._mask, self._count = capacity - 1, 0

    def __len__(self) -> int:
        return self._count

    def add(self, canonical: str) -> bool:
        """Record an example; False when it was already there."""
        key = int.from_bytes(hashlib.sha256(canonical.encode("utf-8")).digest()[:8], "little") or 1
        slots, mask = self._slots, self._mask
        i = key & mask
        while slots[i]:
            if slots[i] == key:
                return False
            i = (i + 1) & mask
        slots[i] = key
        self._count += 1
        if self._count * 5 > len(slots) * 3:
            self._grow()
        return True

    def _grow(self) -> None:
        old = self._slots
        self._slots = slots = array("Q", bytes(16 * len(old)))
        self._mask = mask = len(slots) - 1
        for key in old:
            if key:
                i = key & mask
                while slots[i]:
                    i = (i + 1) & mask
                slots[i] = key

    @property
    def nbytes(self) -> int:
        return len(self._slots) * self._slots.itemsize


class _Errors:
    """Every invalid line counted, the first MAX_LISTED kept (a 10 GiB file of garbage lists 20)."""

    def __init__(self) -> None:
        self.count, self.listed, self.source_lines = 0, [], []

    def add(self, line: Line, field: str, problem: str, file: Optional[str]) -> None:
        self.count += 1
        if file != "eval" and len(self.source_lines) < MAX_LISTED:
            self.source_lines.append(line.number)
        if len(self.listed) < MAX_LISTED:
            self.listed.append(LineError(line.number, clip(field, 80), problem, file,
                                         line.file_line if line.file else None, pii.redact(line.excerpt())))


def _examples(lines: Iterable[Line], fmt: str, errors: _Errors, eval_file: bool) -> Iterator[tuple[int, Example]]:
    for line in lines:
        file = "eval" if eval_file else line.file
        if line.problem is not None:
            errors.add(line, "line", line.problem, file)
            continue
        if is_blank(line.text):
            continue
        try:
            example = parse_line(line.text, fmt)
        except FormatError as exc:
            errors.add(line, exc.field, _format_problem(exc), file)
            continue
        yield line.number, example


def _scan_pii(number: int, ex: Example, policy: str, findings: dict[str, int],
              lines: dict[str, list[int]]) -> Example:
    """Count PII per kind; with `redact`, the example with placeholders in its contents."""
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
    return Example(tuple(new_messages), raw=ex.raw) if changed else ex


def _sha256_files(*paths: Path) -> str:
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return "sha256:" + h.hexdigest()


def _move_line(train: Path, index: int, evaluation: Path) -> None:
    """Move line `index` (0-based) of the train file to the (empty) eval file, streaming."""
    kept = train.with_name(train.name + ".tmp")
    with open(train, "rb") as src, open(kept, "wb") as out, open(evaluation, "ab") as held:
        for i, line in enumerate(src):  # the file holds canonical lines: b"\n" ends each, nothing else
            (held if i == index else out).write(line)
    kept.replace(train)


def validate_lines(
    lines: Iterable[Line],
    spec: DatasetSpec,
    eval_lines: Optional[Iterable[Line]] = None,
    *,
    workdir: Path,
    count_tokens: Optional[Callable[[Example], int]] = None,
) -> ValidationResult:
    """Validate and curate a stream of lines; the validated files go to `workdir` (see the module
    docstring for the rules). Memory: one line, the digests of the examples, the first errors."""
    fmt, curation = spec.format, spec.curation
    count_tokens = count_tokens or estimate_tokens
    errors = _Errors()
    seen = DigestSet() if curation.deduplicate else None
    findings: dict[str, int] = {}
    pii_lines: dict[str, list[int]] = {}
    duplicates = tokens = n_train = n_eval = 0
    fraction, seed = spec.evaluation.fraction or 0.0, spec.evaluation.seed
    lowest: Optional[tuple[float, int]] = None  # (score, index in the train file): the fallback eval example
    fatal: Optional[LineError] = None
    fatal_reason = ""
    train_path, eval_path = workdir / "train.jsonl", workdir / "eval.jsonl"

    def curated(stream: Iterator[tuple[int, Example]]) -> Iterator[tuple[str, Example]]:
        nonlocal duplicates, tokens
        for number, ex in stream:
            canon = canonical_json(to_record(ex, fmt))
            if seen is not None and not seen.add(canon):
                duplicates += 1
                continue
            redacted = _scan_pii(number, ex, curation.piiPolicy, findings, pii_lines)
            if redacted is not ex:
                ex, canon = redacted, canonical_json(to_record(redacted, fmt))
            tokens += count_tokens(ex)
            yield canon, ex

    with open(train_path, "wb") as train_out, open(eval_path, "wb") as eval_out:
        try:
            if eval_lines is not None:
                for canon, _ in curated(_examples(eval_lines, fmt, errors, eval_file=True)):
                    eval_out.write(canon.encode("utf-8") + b"\n")
                    n_eval += 1
            for canon, _ in curated(_examples(lines, fmt, errors, eval_file=False)):
                score = split_score(canon, seed) if eval_lines is None else 1.0
                if score < fraction:
                    eval_out.write(canon.encode("utf-8") + b"\n")
                    n_eval += 1
                    continue
                if lowest is None or score < lowest[0]:
                    lowest = (score, n_train)
                train_out.write(canon.encode("utf-8") + b"\n")
                n_train += 1
        except SourceProblem as exc:  # not JSON Lines, or over maxBytes: stop reading
            fatal_reason = exc.reason
            fatal = LineError(exc.line, "source", exc.problem, getattr(exc, "label", None) or exc.file,
                              exc.file_line if exc.file else None)
    if eval_lines is None and n_eval == 0 and fraction > 0 and n_train > 1 and fatal is None:
        _move_line(train_path, lowest[1], eval_path)
        n_train, n_eval = n_train - 1, 1

    stats = DatasetStats(examples=n_train, evalExamples=n_eval, tokens=tokens,
                         duplicatesRemoved=duplicates, invalidLines=errors.count)
    listed = errors.listed + ([fatal] if fatal else [])
    result = ValidationResult(
        valid=False, reason="", message="", stats=stats, digest=None, pii_findings=findings,
        errors=listed, invalid_line_numbers=errors.source_lines, pii_lines=pii_lines)

    if fatal is not None:
        result.reason = fatal_reason
        result.message = fatal.describe()
        return result
    if errors.count > curation.maxInvalidLines:
        quoted = "; ".join(e.describe() for e in errors.listed[:MAX_IN_MESSAGE])
        more = f" (and {errors.count - MAX_IN_MESSAGE} more)" if errors.count > MAX_IN_MESSAGE else ""
        result.reason = "TooManyInvalidLines"
        result.message = (f"{errors.count} invalid lines, at most {curation.maxInvalidLines} allowed: "
                          f"{quoted}{more}")
        return result
    if findings and curation.piiPolicy == "reject":
        kinds = ", ".join(f"{kind} ({findings[kind]}, first at line {', '.join(map(str, pii_lines[kind]))})"
                          for kind in sorted(findings))
        result.reason = "PIIFound"
        result.message = f"personal data found and piiPolicy is reject: {kinds}"
        return result
    if n_train < curation.minExamples:
        result.reason = "TooFewExamples"
        result.message = (f"{n_train} valid training examples after curation, "
                          f"minimum is {curation.minExamples}")
        return result

    result.train_path, result.eval_path = train_path, eval_path
    result.digest = _sha256_files(train_path, eval_path)
    result.valid, result.reason = True, "Validated"
    notes = []
    if duplicates:
        notes.append(f"{duplicates} duplicates removed")
    if errors.count:
        notes.append(f"{errors.count} invalid lines dropped")
    if findings:
        verb = "redacted" if curation.piiPolicy == "redact" else "allowed"
        notes.append(f"PII {verb}: " + ", ".join(f"{k}={v}" for k, v in sorted(findings.items())))
    result.message = (f"{stats.examples} training and {stats.evalExamples} evaluation examples, "
                      f"{stats.tokens} tokens" + (f" ({'; '.join(notes)})" if notes else ""))
    return result


def _text_lines(text: str, budget: ByteBudget) -> Iterator[Line]:
    # Through the same byte reader as files ("surrogatepass": a str holding a lone surrogate becomes
    # bytes that are not UTF-8, reported for its line like any other).
    return jsonlines.lines([(None, [text.encode("utf-8", "surrogatepass")])], budget)


def _budget(spec: DatasetSpec) -> ByteBudget:
    return ByteBudget(spec.source.max_bytes(), "spec.source.maxBytes", spec.source.maxBytes)


def validate_text(
    text: str,
    spec: DatasetSpec,
    eval_text: Optional[str] = None,
    *,
    count_tokens: Optional[Callable[[Example], int]] = None,
) -> ValidationResult:
    """`validate_lines` on a dataset held in memory; the validated files come back as text."""
    with tempfile.TemporaryDirectory(prefix="ft-validate-") as workdir:
        evaluation = None if eval_text is None else _eval_lines(_text_lines(eval_text, _budget(spec)))
        result = validate_lines(_text_lines(text, _budget(spec)), spec, evaluation, workdir=Path(workdir),
                                count_tokens=count_tokens)
        if result.valid:
            result.train_jsonl = result.train_path.read_text(encoding="utf-8")
            result.eval_jsonl = result.eval_path.read_text(encoding="utf-8")
        result.train_path = result.eval_path = None
    return result


def validate_source(spec: DatasetSpec, *, count_tokens: Optional[Callable[[Example], int]] = None,
                    workdir: Optional[Path] = None) -> ValidationResult:
    """`validate_lines` on the spec's source (and evaluation file) as they are now, streamed: what the
    command computes. Without `workdir` the validated files go to a temp folder that is removed, so
    only the result is kept (governance re-validates a source to compare its digest this way)."""
    if workdir is None:
        with tempfile.TemporaryDirectory(prefix="ft-validate-") as tmp:
            result = validate_source(spec, count_tokens=count_tokens, workdir=Path(tmp))
            result.train_path = result.eval_path = None
            return result
    jsonlines.source_files(spec.source.uri)  # a missing source or eval file fails before any reading
    if spec.evaluation.uri:
        jsonlines.source_files(spec.evaluation.uri)
    evaluation = _eval_lines(jsonlines.read(spec.evaluation.uri, _budget(spec))) if spec.evaluation.uri else None
    return validate_lines(jsonlines.read(spec.source.uri, _budget(spec)), spec, evaluation, workdir=workdir,
                          count_tokens=count_tokens)


def _eval_lines(lines: Iterator[Line]) -> Iterator[Line]:
    """The evaluation file's lines; a SourceProblem in it is labelled "eval"."""
    try:
        yield from lines
    except SourceProblem as exc:
        exc.label = "eval" if exc.file is None else f"eval {exc.file}"
        raise


# ---------------------------------------------------------------------------------- I/O


def _read_config(config_path: str) -> ValidationConfig:
    from pydantic import ValidationError

    text = storage.read_text(config_path) if "://" in config_path else Path(config_path).read_text()
    try:
        return ValidationConfig.model_validate_json(text)
    except ValidationError as exc:
        raise ConfigError(f"{config_path}: invalid validation config: {exc}") from None


def read_source(uri: str, max_bytes: Optional[int] = None) -> tuple[str, list[tuple[int, str]]]:
    """The text at a .jsonl file or a folder of *.jsonl files (sorted, concatenated), in memory: for
    callers that want text (tests, governance). The command streams instead (jsonlines.read).

    Also returns (first line number, file name) per file so errors can name the file.
    """
    parts, starts, line = [], [], 1
    budget = ByteBudget(max_bytes) if max_bytes else None
    for name, file_uri in jsonlines.source_files(uri):
        chunk = b"".join(jsonlines.open_file(file_uri, budget)).decode("utf-8")
        if chunk and not chunk.endswith("\n"):
            chunk += "\n"
        if name is not None:
            starts.append((line, name))
        line += chunk.count("\n")
        parts.append(chunk)
    return "".join(parts), starts


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
    counter = tokenizer_counter(config.tokenizerURI) if config.tokenizerURI else None
    try:
        with tempfile.TemporaryDirectory(prefix="ft-validate-") as workdir:
            result = validate_source(spec, count_tokens=counter, workdir=Path(workdir))
            if result.valid:  # uploaded from the temp files: never in memory
                storage.upload_file(result.train_path, storage.join(config.outputURI, "train.jsonl"))
                storage.upload_file(result.eval_path, storage.join(config.outputURI, "eval.jsonl"))
    except FileNotFoundError as exc:
        raise ConfigError(f"dataset source not found: {exc}") from None
    except PermissionError as exc:  # a source the Job may not read is a configuration problem, not a crash
        raise ConfigError(f"dataset source not readable: {exc}") from None
    report = result.report(source_uri=source, validated_uri=config.outputURI, fmt=spec.format)
    # Written last: its presence means the validated files beside it are complete.
    storage.write_text(storage.join(config.outputURI, "report.json"), json.dumps(report, indent=2) + "\n")
    log.info(result.message, extra={
        "event": "validated", "valid": result.valid, "reason": result.reason,
        "dataset": f"{config.job.namespace}/{config.job.name}", **result.stats.model_dump(),
        "piiFindings": result.pii_findings, "digest": result.digest,
    })
    return 0
