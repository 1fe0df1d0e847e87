"""`finetune-trainer validate`: check, curate, split and digest a Dataset (no GPU, no torch).

The source is streamed (jsonlines.py: split on "\\n" only, at most 8 MiB a line, at most
`source.maxBytes` in all), one line at a time; what is kept per example is a 64-bit digest for
deduplication. Steps, per line, in order (`validate_lines`; `validate_text` runs the same on text
held in memory, for ftctl, governance and tests):

1. parse the line with the declared format (formats.parse_line: strict JSON -- no duplicate keys,
   NaN, huge numbers, deep nesting or lone surrogates); an error keeps the line number, the field,
   and a bounded excerpt of the line (report.json only: the excerpt is data);
1a. image-text: every image part is found, read (at most 32 MiB), decoded and described (images.py:
   malformed and hostile images are the line's error, naming the part); the part then holds the
   image's absolute URI and sha256, so the content digest covers the image bytes; with
   `curation.images` it points at a standardised copy (images/<sha256>.<ext> beside the validated files);
2. drop exact duplicates when `curation.deduplicate` (same canonical JSON of the parsed example,
   its `metadata` aside); with a separate `evaluation.uri`, read first, training examples that
   also appear in the evaluation file are dropped too (and counted), so eval loss is never
   measured on training data;
3. scan every string for PII (see pii.py) and apply `curation.piiPolicy`;
3a. the curation steps that are set (curation.py): `quality` filters (source lines only, not a
   separate evaluation file), then `nearDuplicates` (the evaluation file's examples are indexed
   first, so a training near-duplicate of one is removed);
4. split off the evaluation set: an example goes to eval when
   sha256("{seed}:{canonical JSON}") read as a fraction in [0, 1) is below
   `evaluation.fraction`. The decision depends only on the example and the seed, so
   appending lines never moves existing examples between the splits. If that leaves eval
   empty, the single example with the lowest hash is held out instead;
5. count tokens: exact with the tokenizer at `tokenizerURI` (tokenizer.json via the
   `tokenizers` library), otherwise an estimate of one token per 4 non-whitespace
   characters of message content (rounded up per example);
6. write the example to the train or eval file (local temp files, uploaded at the end);
7. once every line is read, one more pass over the (local) train file: `quality.maxPromptsPerAnswer`
   (one answer given to many prompts) and `decontamination` (n-gram overlap with the eval file,
   `decontamination.evalSetURIs` and the policies' evalSetURI), then the stats of what is kept
   (token-length histogram, examples per metadata.source and metadata.tags);

then decide validity (a source that is not JSON Lines or is over `source.maxBytes`, too many
invalid lines, PII under `reject`, fewer than `curation.minExamples` training examples) and
compute the content digest: "sha256:" + sha256(train.jsonl bytes + eval.jsonl bytes), where each
file holds one canonical JSON object per line (sorted keys, no spaces, UTF-8, "\\n" after each).

Every line a step removes is one line of removed.jsonl (line, step, detail); status and
report.json hold the counts and the first lines (report.json with bounded, redacted excerpts).

Outputs: {outputURI}/train.jsonl and eval.jsonl (only when valid), removed.jsonl, and report.json,
always, written last. A data problem is not a command failure: the report says Invalid and the
command exits 0; a missing source exits 3, S3 unreachable exits 4.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence

from finetune_operator.api.curation import CurationStats
from finetune_operator.api.dataset import DatasetSpec, DatasetStats
from finetune_operator.api.trainer_config import ValidationConfig

from . import curation as cur
from . import images as img
from . import jsonlines, pii, storage
from .errors import ConfigError
from .formats import Example, FormatError, Part, clip, is_blank, loads_strict, parse_line, to_record, with_parts
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
    #: every removed line (removed.jsonl), in the work folder; validate_text: its text
    removed_path: Optional[Path] = None
    removed_jsonl: str = ""
    #: the curation record of report.json: settings, their digest, removals with excerpts
    curation: dict = field(default_factory=dict)
    #: image-text with curation.images: the standardised copies (uploaded to {outputURI}/images/)
    images_dir: Optional[Path] = None

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
            "curation": self.curation,
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

    @staticmethod
    def _key(canonical: str) -> int:
        return int.from_bytes(hashlib.sha256(canonical.encode("utf-8")).digest()[:8], "little") or 1

    def __contains__(self, canonical: str) -> bool:
        key, slots, mask = self._key(canonical), self._slots, self._mask
        i = key & mask
        while slots[i]:
            if slots[i] == key:
                return True
            i = (i + 1) & mask
        return False

    def add(self, canonical: str) -> bool:
        """Record an example; False when it was already there."""
        key = self._key(canonical)
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


def _examples(lines: Iterable[Line], fmt: str, errors: _Errors, eval_file: bool,
              images: Optional["img.ImageChecker"] = None) -> Iterator[tuple[int, Example]]:
    for line in lines:
        file = "eval" if eval_file else line.file
        if line.problem is not None:
            errors.add(line, "line", line.problem, file)
            continue
        if is_blank(line.text):
            continue
        try:
            example = parse_line(line.text, fmt)
            if images is not None:  # every image found, decoded, described and digested (images.py)
                example = images.check(example)
        except FormatError as exc:
            errors.add(line, exc.field, _format_problem(exc), file)
            continue
        yield line.number, example


def _scan_pii(number: int, ex: Example, policy: str, findings: dict[str, int],
              lines: dict[str, list[int]]) -> Example:
    """Count PII per kind; with `redact`, the example with placeholders in its contents."""
    if ex.parts is not None:  # image-text: the text parts are scanned one by one (the images are not text)
        ex = _scan_pii_parts(number, ex, policy, findings, lines)
    new_messages, changed = [], False
    for index, (role, content) in enumerate(ex.messages):
        if ex.parts is not None and ex.parts[index] is not None:
            new_messages.append((role, content))
            continue
        hits = pii.find(content)
        for hit in hits:
            findings[hit.kind] = findings.get(hit.kind, 0) + 1
            kind_lines = lines.setdefault(hit.kind, [])
            if number not in kind_lines and len(kind_lines) < 5:
                kind_lines.append(number)
        if hits and policy == "redact":
            content, changed = pii.redact(content, hits), True
        new_messages.append((role, content))
    metadata = ex.metadata
    if metadata:  # labels may hold PII too: counted, and redacted with the rest
        scanned = {}
        for key, value in metadata.items():
            values = value if isinstance(value, list) else [value]
            out = []
            for item in values:
                hits = pii.find(item) if isinstance(item, str) else []
                for hit in hits:
                    findings[hit.kind] = findings.get(hit.kind, 0) + 1
                    kind_lines = lines.setdefault(hit.kind, [])
                    if number not in kind_lines and len(kind_lines) < 5:
                        kind_lines.append(number)
                if hits and policy == "redact":
                    item, changed = pii.redact(item, hits), True
                out.append(item)
            scanned[key] = out if isinstance(value, list) else out[0]
        metadata = scanned
    return Example(tuple(new_messages), raw=ex.raw, metadata=metadata, parts=ex.parts) if changed else ex


def _scan_pii_parts(number: int, ex: Example, policy: str, findings: dict[str, int],
                    lines: dict[str, list[int]]) -> Example:
    new_parts, changed = [], False
    for msg_parts in ex.parts:
        if msg_parts is None:
            new_parts.append(None)
            continue
        out = []
        for part in msg_parts:
            hits = pii.find(part.value) if part.type == "text" else []
            for hit in hits:
                findings[hit.kind] = findings.get(hit.kind, 0) + 1
                kind_lines = lines.setdefault(hit.kind, [])
                if number not in kind_lines and len(kind_lines) < 5:
                    kind_lines.append(number)
            if hits and policy == "redact":
                part, changed = Part("text", pii.redact(part.value, hits), where=part.where), True
            out.append(part)
        new_parts.append(tuple(out))
    return with_parts(ex, tuple(new_parts)) if changed else ex


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
    count_text: Optional[Callable[[str], int]] = None,
    eval_set_uris: Sequence[str] = (),
    image_base: Optional[str] = None,
    eval_image_base: Optional[str] = None,
) -> ValidationResult:
    """Validate and curate a stream of lines; the validated files go to `workdir` (see the module
    docstring for the rules). Memory: one line, the digests of the examples, the first errors, and
    what the curation steps that are set keep per example (docs/datasets.md). image-text: relative
    image paths start at `image_base` (the source's folder) / `eval_image_base` (the evaluation file's)."""
    fmt, curation = spec.format, spec.curation
    images = img.ImageChecker(image_base, curation.images, workdir) if fmt == "image-text" else None
    eval_images = images.with_base(eval_image_base) if images is not None else None
    count_tokens = count_tokens or estimate_tokens
    count_text = count_text or cur.estimate_text_tokens
    quality, near, decon = curation.quality, curation.nearDuplicates, curation.decontamination
    errors = _Errors()
    seen = DigestSet() if curation.deduplicate else None
    eval_seen = DigestSet() if curation.deduplicate and eval_lines is not None else None
    near_index = cur.NearDuplicateIndex(near.threshold, near.numPerm) if near else None
    same = cur.SameAnswerIndex(quality.maxPromptsPerAnswer, quality.minAnswerWordsForSameAnswer) if quality else None
    removed = cur.RemovalLog(workdir / "removed.jsonl", pii.redact)
    findings: dict[str, int] = {}
    pii_lines: dict[str, list[int]] = {}
    duplicates = eval_tokens = n_train = n_eval = 0
    train_numbers, train_tokens = array("q"), array("q")  # per line of the train file: source line, tokens
    fraction, seed = spec.evaluation.fraction or 0.0, spec.evaluation.seed
    lowest: Optional[tuple[float, int]] = None  # (score, index in the train file): the fallback eval example
    fatal: Optional[LineError] = None
    fatal_reason = ""
    train_path, eval_path = workdir / "train.jsonl", workdir / "eval.jsonl"

    def curated(stream: Iterator[tuple[int, Example]], eval_file: bool) -> Iterator[tuple[int, str, str, Example]]:
        nonlocal duplicates
        file = "eval" if eval_file else None
        for number, ex in stream:
            content = canonical_json(to_record(ex, fmt, with_metadata=False))
            if seen is not None and not seen.add(content):
                duplicates += 1
                in_eval = not eval_file and eval_seen is not None and content in eval_seen
                removed.add(number, cur.Removal("exactDuplicate", "exact duplicate of an evaluation example" if in_eval
                                                else "exact duplicate of an earlier example"),
                            text=ex.text(), file=file, kind="eval" if in_eval else "exact")
                continue
            if eval_file and eval_seen is not None:
                eval_seen.add(content)
            redacted = _scan_pii(number, ex, curation.piiPolicy, findings, pii_lines)
            if redacted is not ex:
                ex, content = redacted, canonical_json(to_record(redacted, fmt, with_metadata=False))
            problem = cur.quality_check(ex, quality, count_text) if quality and not eval_file else None
            if problem is None and same is not None and not eval_file:  # before near-duplicates remove some
                same.add(cur.prompt_text(ex), cur.answer_text(ex))
            if problem is None and near_index is not None:
                found = near_index.match_or_add(-number if eval_file else number, ex.text())
                if found is not None:
                    of, similarity = found
                    what = f"evaluation file line {-of}" if of < 0 else f"line {of}"
                    problem = cur.Removal("nearDuplicate", f"near-duplicate of {what} (Jaccard {similarity:.2f})",
                                          of_line=abs(of))
                    kind = "eval" if of < 0 else "near"
            if problem is not None:
                removed.add(number, problem, text=ex.text(), file=file,
                            kind=kind if problem.step == "nearDuplicate" else None)
                continue
            yield number, content, canonical_json(to_record(ex, fmt)), ex

    with open(train_path, "wb") as train_out, open(eval_path, "wb") as eval_out:
        try:
            if eval_lines is not None:
                for _, _, canon, ex in curated(_examples(eval_lines, fmt, errors, eval_file=True, images=eval_images), True):
                    eval_out.write(canon.encode("utf-8") + b"\n")
                    eval_tokens += count_tokens(ex)
                    n_eval += 1
            for number, content, canon, ex in curated(_examples(lines, fmt, errors, eval_file=False, images=images), False):
                score = split_score(content, seed) if eval_lines is None else 1.0
                if score < fraction:
                    eval_out.write(canon.encode("utf-8") + b"\n")
                    eval_tokens += count_tokens(ex)
                    n_eval += 1
                    continue
                if lowest is None or score < lowest[0]:
                    lowest = (score, n_train)
                train_out.write(canon.encode("utf-8") + b"\n")
                train_numbers.append(number)
                train_tokens.append(count_tokens(ex))
                n_train += 1
        except SourceProblem as exc:  # not JSON Lines, or over maxBytes: stop reading
            fatal_reason = exc.reason
            fatal = LineError(exc.line, "source", exc.problem, getattr(exc, "label", None) or exc.file,
                              exc.file_line if exc.file else None)
    if eval_lines is None and n_eval == 0 and fraction > 0 and n_train > 1 and fatal is None:
        index = lowest[1]
        _move_line(train_path, index, eval_path)
        eval_tokens += train_tokens[index]
        del train_numbers[index], train_tokens[index]
        n_train, n_eval = n_train - 1, 1

    eval_sets = list(dict.fromkeys([*(decon.evalSetURIs if decon else []), *eval_set_uris]))
    summary = _Kept()
    if fatal is None:
        try:
            n_train = _second_pass(train_path, eval_path, fmt, train_numbers, train_tokens, removed, summary,
                                   same, decon, eval_sets, _budget(spec))
        except _EvalSetProblem as exc:
            fatal_reason, fatal = "InvalidEvalSet", LineError(None, "curation.decontamination", str(exc))
    removed.close()

    ran = [step for step, on in (("exactDuplicate", curation.deduplicate),
                                 *((s, quality is not None) for s in ("promptLength", "answerLength", "emptyAnswer",
                                                                      "repetition")),
                                 ("nearDuplicate", near is not None),
                                 ("sameAnswer", quality is not None and quality.maxPromptsPerAnswer > 0),
                                 ("decontamination", decon is not None)) if on]
    settings = {**curation.model_dump(mode="json"), "evalSetURIs": eval_sets if decon else []}
    curation_stats = CurationStats(
        settingsDigest=cur.settings_digest(settings), steps=removed.steps(ran), duplicates=dict(removed.duplicates),
        tokenHistogram=summary.histogram.buckets(), sources=summary.sources.top(), tags=summary.tags.top(),
        evalSetURIs=eval_sets if decon else [],
        tokenCount=curation.tokenizerURI or "estimate: 1 token per 4 non-whitespace characters")
    stats = DatasetStats(examples=n_train, evalExamples=n_eval, tokens=eval_tokens + summary.tokens,
                         duplicatesRemoved=duplicates, invalidLines=errors.count, curation=curation_stats,
                         images=images.stats() if images is not None else None)
    listed = errors.listed + ([fatal] if fatal else [])
    result = ValidationResult(
        valid=False, reason="", message="", stats=stats, digest=None, pii_findings=findings,
        errors=listed, invalid_line_numbers=errors.source_lines, pii_lines=pii_lines,
        removed_path=workdir / "removed.jsonl",
        curation={"settings": settings, "settingsDigest": curation_stats.settingsDigest,
                  "removed": {step: removed.counts.get(step, 0) for step in ran},
                  "examples": {step: rows for step, rows in removed.examples.items()}})

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
    curated_away = {step: n for step, n in removed.counts.items() if step != "exactDuplicate" and n}
    if n_train < curation.minExamples:
        result.reason = "TooFewExamples"
        result.message = (f"{n_train} valid training examples after curation, "
                          f"minimum is {curation.minExamples}")
        if curated_away:
            result.message += " (curation removed " + ", ".join(f"{k}={v}" for k, v in curated_away.items()) + ")"
        return result

    result.train_path, result.eval_path = train_path, eval_path
    # image-text: every image part holds its sha256, so the digest covers the image bytes too
    result.digest = _sha256_files(train_path, eval_path)
    if images is not None and images.copies is not None and images.copies.is_dir():
        result.images_dir = images.copies
    result.valid, result.reason = True, "Validated"
    notes = []
    if duplicates:
        notes.append(f"{duplicates} duplicates removed")
    if curated_away:
        notes.append("curation removed " + ", ".join(f"{k}={v}" for k, v in curated_away.items()))
    if errors.count:
        notes.append(f"{errors.count} invalid lines dropped")
    if findings:
        verb = "redacted" if curation.piiPolicy == "redact" else "allowed"
        notes.append(f"PII {verb}: " + ", ".join(f"{k}={v}" for k, v in sorted(findings.items())))
    result.message = (f"{stats.examples} training and {stats.evalExamples} evaluation examples, "
                      f"{stats.tokens} tokens" + (f" ({'; '.join(notes)})" if notes else ""))
    return result


class _EvalSetProblem(ValueError):
    """An evaluation file to decontaminate against cannot be read (named, with the line)."""


@dataclass
class _Kept:
    """Stats of the training examples that survive the second pass."""

    tokens: int = 0
    histogram: cur.TokenHistogram = field(default_factory=cur.TokenHistogram)
    sources: cur.TopCounts = field(default_factory=cur.TopCounts)
    tags: cur.TopCounts = field(default_factory=cur.TopCounts)


def _overlap_index(settings, eval_path: Path, eval_sets: Sequence[str], budget: ByteBudget) -> "cur.OverlapIndex":
    index = cur.OverlapIndex(settings)
    with open(eval_path, "rb") as fh:  # our own canonical lines
        for raw in fh:
            index.add(cur.record_text(json.loads(raw)))
    for uri in eval_sets:
        label = clip(uri, 200)
        try:
            for line in jsonlines.read(uri, budget):
                if line.problem is not None:
                    raise _EvalSetProblem(f"{label} line {line.number}: {line.problem}")
                if is_blank(line.text):
                    continue
                try:
                    index.add(cur.record_text(loads_strict(line.text)))
                except FormatError as exc:
                    raise _EvalSetProblem(f"{label} line {line.number}: {exc}") from None
        except FileNotFoundError:
            raise _EvalSetProblem(f"{label}: evaluation file not found") from None
        except SourceProblem as exc:
            raise _EvalSetProblem(f"{label}: {exc.problem}") from None
    return index


def _second_pass(train_path: Path, eval_path: Path, fmt: str, numbers: array, tokens: array,
                 removed: "cur.RemovalLog", kept: _Kept, same: Optional["cur.SameAnswerIndex"], decon,
                 eval_sets: Sequence[str], budget: ByteBudget) -> int:
    """The steps that need every line first (one answer for many prompts, decontamination) over the
    local train file, and the stats of what stays; returns how many training examples stay."""
    boilerplate = same.boilerplate() if same is not None else set()
    overlap = _overlap_index(decon, eval_path, eval_sets, budget) if decon is not None else None
    filtering = bool(boilerplate) or overlap is not None  # else only the stats: nothing is rewritten
    out_path = train_path.with_name(train_path.name + ".kept")
    n = 0
    with open(train_path, "rb") as src, open(out_path if filtering else os.devnull, "wb") as out:
        for i, raw in enumerate(src):
            # Without a filter a line is parsed only for its metadata (a canonical line without the key has none).
            ex = parse_line(raw.decode("utf-8"), fmt) if filtering or b'"metadata":' in raw else None
            problem = same.check(cur.answer_text(ex), boilerplate) if boilerplate else None
            if problem is None and overlap is not None:
                problem = overlap.check(ex.text())
            if problem is not None:
                removed.add(numbers[i], problem, text=ex.text())
                continue
            out.write(raw)
            n += 1
            kept.tokens += tokens[i]
            kept.histogram.add(tokens[i])
            meta = (ex.metadata if ex is not None else None) or {}
            kept.sources.add(meta.get("source"))
            tags = meta.get("tags")
            for tag in (tags if isinstance(tags, list) else [tags]):
                kept.tags.add(tag)
    if filtering:
        out_path.replace(train_path)
    return n


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
    eval_set_uris: Sequence[str] = (),
    image_base: Optional[str] = None,
) -> ValidationResult:
    """`validate_lines` on a dataset held in memory; the validated files come back as text (image-text:
    relative image paths start at `image_base`; standardised copies are not kept)."""
    with tempfile.TemporaryDirectory(prefix="ft-validate-") as workdir:
        evaluation = None if eval_text is None else _eval_lines(_text_lines(eval_text, _budget(spec)))
        counters = _counters(spec, count_tokens)
        result = validate_lines(_text_lines(text, _budget(spec)), spec, evaluation, workdir=Path(workdir),
                                count_tokens=counters[0], count_text=counters[1], eval_set_uris=eval_set_uris,
                                image_base=image_base, eval_image_base=image_base)
        result.images_dir = None
        if result.valid:
            result.train_jsonl = result.train_path.read_text(encoding="utf-8")
            result.eval_jsonl = result.eval_path.read_text(encoding="utf-8")
        result.removed_jsonl = result.removed_path.read_text(encoding="utf-8")
        result.train_path = result.eval_path = result.removed_path = None
    return result


def _counters(spec: DatasetSpec, count_tokens: Optional[Callable[[Example], int]]):
    """(per example, per text) token counters: the caller's, else spec.curation.tokenizerURI's, else None
    (the estimate)."""
    if count_tokens is not None or not spec.curation.tokenizerURI:
        return count_tokens, None
    tok = load_tokenizer(spec.curation.tokenizerURI)
    text = lambda content: len(tok.encode(content, add_special_tokens=False).ids)  # noqa: E731
    return (lambda ex: sum(text(content) for _, content in ex.messages)), text


def validate_source(spec: DatasetSpec, *, count_tokens: Optional[Callable[[Example], int]] = None,
                    workdir: Optional[Path] = None, eval_set_uris: Sequence[str] = ()) -> ValidationResult:
    """`validate_lines` on the spec's source (and evaluation file) as they are now, streamed: what the
    command computes. Without `workdir` the validated files go to a temp folder that is removed, so
    only the result is kept (governance re-validates a source to compare its digest this way)."""
    if workdir is None:
        with tempfile.TemporaryDirectory(prefix="ft-validate-") as tmp:
            result = validate_source(spec, count_tokens=count_tokens, workdir=Path(tmp), eval_set_uris=eval_set_uris)
            result.train_path = result.eval_path = result.removed_path = result.images_dir = None
            return result
    files = jsonlines.source_files(spec.source.uri)  # a missing source or eval file fails before any reading
    eval_files = jsonlines.source_files(spec.evaluation.uri) if spec.evaluation.uri else None
    evaluation = _eval_lines(jsonlines.read(spec.evaluation.uri, _budget(spec))) if spec.evaluation.uri else None
    counters = _counters(spec, count_tokens)
    return validate_lines(jsonlines.read(spec.source.uri, _budget(spec)), spec, evaluation, workdir=workdir,
                          count_tokens=counters[0], count_text=counters[1], eval_set_uris=eval_set_uris,
                          image_base=img.base_of(spec.source.uri, files),
                          eval_image_base=img.base_of(spec.evaluation.uri, eval_files) if eval_files else None)


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


def load_tokenizer(tokenizer_uri: str):
    """tokenizer.json of a model folder (the `tokenizers` library; no torch). Only that file is fetched."""
    from tokenizers import Tokenizer

    tmp = Path(tempfile.mkdtemp(prefix="ft-tokenizer-"))
    path = tmp / "tokenizer.json"
    try:
        storage.download_file(storage.join(tokenizer_uri, "tokenizer.json"), path)
    except FileNotFoundError:
        raise ConfigError(f"{tokenizer_uri}: no tokenizer.json in this folder") from None
    return Tokenizer.from_file(str(path))


def tokenizer_counter(tokenizer_uri: str) -> Callable[[Example], int]:
    """Exact token counts with tokenizer.json (the `tokenizers` library; no torch)."""
    tok = load_tokenizer(tokenizer_uri)
    return lambda ex: sum(len(tok.encode(content, add_special_tokens=False).ids) for _, content in ex.messages)


def run(config_path: str) -> int:
    config = _read_config(config_path)
    spec = config.dataset
    source = spec.source.uri
    counter = tokenizer_counter(config.tokenizerURI) if config.tokenizerURI else None
    try:
        with tempfile.TemporaryDirectory(prefix="ft-validate-") as workdir:
            result = validate_source(spec, count_tokens=counter, workdir=Path(workdir),
                                     eval_set_uris=config.policyEvalSetURIs)
            if result.valid:  # uploaded from the temp files: never in memory
                storage.upload_file(result.train_path, storage.join(config.outputURI, "train.jsonl"))
                storage.upload_file(result.eval_path, storage.join(config.outputURI, "eval.jsonl"))
                if result.images_dir is not None:  # before report.json: its presence means all is there
                    for copy in sorted(result.images_dir.iterdir()):
                        storage.upload_file(copy, storage.join(config.outputURI, "images", copy.name))
            removed_uri = storage.join(config.outputURI, "removed.jsonl")
            storage.upload_file(result.removed_path, removed_uri)
            result.stats.curation.removedURI = removed_uri
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
