"""Human review of synthetic candidates: decisions in the work folder, where the review stands, the
reviewed file. No torch here: the operator and ftctl import this module.

The work folder (SyntheticDataset status.workURI, layout in finetune_operator.api.synthetic):
    candidates.jsonl   SyntheticCandidate lines (the generation Job's, immutable; digest in generation.json)
    reviews/<id>.json  one ReviewDecision per reviewed candidate
    reviewed.jsonl     written by materialize: the examples that made it, lineage in `metadata`
    review.json        written last by materialize: ReviewStats + candidatesDigest + reviewedDigest

Concurrency: each decision is its own object, so reviewers working at once never overwrite each
other's decisions on different candidates (no shared file is read, changed and written back). Two
decisions on the same candidate resolve by time: the one with the later `at` stands, whichever was
written last -- record_decision reads the object first and does not replace a later decision (it
returns the one that stands). Only two writes within the same few milliseconds can both pass that
check; the store's last write then wins, and both were decisions people made on that candidate.

Cost, for the operator's polls: `summarize` is one listing of reviews/ (one request per 1,000
decisions on S3), one read of generation.json (at most 1 MiB), and a read of only the decision
objects that are new or changed since the previous call in this process (the listing's ETag or the
file's mtime tells); candidates.jsonl is read once per candidatesDigest (streamed; only ids kept).
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import re
import socket
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Iterator, Literal, Mapping, Optional

from pydantic import ValidationError

from finetune_operator.api.synthetic import (ReviewDecision, ReviewSettings, ReviewStats, SynthesisConfig,
                                             SyntheticCandidate)

from . import formats, jsonlines, storage
from .errors import ConfigError

from .synthesis.records import (CANDIDATES, GENERATION, REVIEW_STATS as REVIEW_JSON, REVIEWED, REVIEWS,
                                candidate_id, lineage_metadata)

#: A decision object is small; an edited example is at most MAX_EXAMPLE_BYTES of JSON.
MAX_DECISION_BYTES = 2 * 2**20
MAX_EXAMPLE_BYTES = 2**20
MAX_GENERATION_BYTES = 2**20
#: How many problems an error or a report lists (then "and N more").
MAX_LISTED = 10
_ID = re.compile(r"^[a-f0-9]{16}$")
_FORMAT_KEYS = {"chat": {"messages"}, "instruction": {"instruction", "input", "output", "system"},
                "completion": {"prompt", "completion"}}
Outcome = Literal["pending", "passed", "failed"]


class ReviewError(ConfigError):
    """A decision or an import that cannot be recorded; the message names the id, field or line."""


# --- time and identity ------------------------------------------------------------------------------------

def parse_time(value: str, where: str = "at") -> datetime:
    """An RFC 3339 time (a time without an offset, as some exports write, is read as UTC)."""
    if not isinstance(value, str) or not value.strip():
        raise ReviewError(f"{where}: must be an RFC 3339 time, got {formats.quote(value)}")
    try:
        dt = datetime.fromisoformat(value.strip().replace("z", "Z").replace("Z", "+00:00"))
    except ValueError:
        raise ReviewError(f"{where}: not an RFC 3339 time: {formats.quote(value)}") from None
    return dt.replace(tzinfo=timezone.utc) if dt.tzinfo is None else dt.astimezone(timezone.utc)


def rfc3339(dt: datetime) -> str:
    """UTC with microseconds: two decisions in one second still order."""
    return dt.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def now() -> str:
    return rfc3339(datetime.now(timezone.utc))


def default_reviewer(explicit: Optional[str] = None) -> str:
    """--reviewer, else $FTCTL_REVIEWER, else user@host of the OS account."""
    for candidate in (explicit, os.environ.get("FTCTL_REVIEWER")):
        if candidate and candidate.strip():
            return candidate.strip()[:256]
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # a container user without a passwd entry
        user = f"uid{os.getuid()}"
    return f"{user}@{socket.gethostname()}"[:256]


# --- candidates -------------------------------------------------------------------------------------------

def example_format(example: dict) -> str:
    """chat, instruction or completion, from the keys of a candidate's example."""
    for fmt, keys in _FORMAT_KEYS.items():
        if isinstance(example, dict) and keys & set(example):
            return fmt
    raise ReviewError("example: neither messages (chat), instruction nor prompt/completion")


def iter_candidates(work_uri: str, digest: Optional["hashlib._Hash"] = None) -> Iterator[SyntheticCandidate]:
    """candidates.jsonl, streamed; a line that is not a SyntheticCandidate is an error naming it.
    `digest`: a hash object fed every byte read (the file's digest, while reading it once)."""
    uri = storage.join(work_uri, CANDIDATES)
    chunks = jsonlines.open_file(uri)
    if digest is not None:
        chunks = _hashing(chunks, digest)
    for line in jsonlines.lines([(None, chunks)]):
        if line.text is None:
            raise ReviewError(f"{uri} line {line.number}: {line.problem}")
        if formats.is_blank(line.text):
            continue
        try:
            yield SyntheticCandidate.model_validate(formats.loads_strict(line.text))
        except formats.FormatError as exc:
            raise ReviewError(f"{uri} line {line.number}: {exc}") from None
        except ValidationError as exc:
            raise ReviewError(f"{uri} line {line.number}: not a candidate: {_first_error(exc)}") from None


def _hashing(chunks: Iterable[bytes], digest) -> Iterator[bytes]:
    for chunk in chunks:
        digest.update(chunk)
        yield chunk


def load_candidates(work_uri: str) -> "OrderedDict[str, SyntheticCandidate]":
    """Every candidate by id, in file order (for ftctl review and imports: read once, used for each decision)."""
    out: OrderedDict[str, SyntheticCandidate] = OrderedDict()
    for cand in iter_candidates(work_uri):
        out.setdefault(cand.id, cand)
    return out


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err.get("loc", ())) or "record"
    return f"{where}: {err.get('msg', 'invalid')}"


# --- decisions --------------------------------------------------------------------------------------------

def decision_uri(work_uri: str, cid: str) -> str:
    if not isinstance(cid, str) or not _ID.match(cid):  # never a path: reviews/../x.json cannot be formed
        raise ReviewError(f"id: must be 16 lower-case hex digits, got {formats.quote(cid)}")
    return storage.join(work_uri, REVIEWS, f"{cid}.json")


def validate_edit(example: object, fmt: str) -> dict:
    """An edited example as a Dataset line of `fmt`; ReviewError naming the field otherwise."""
    if not isinstance(example, dict):
        raise ReviewError(f"example: an edit must be a JSON object, got {formats.json_type(example)}")
    if "metadata" in example:
        raise ReviewError("example.metadata: an edit cannot set metadata (materialize writes the lineage there)")
    text = json.dumps(example, ensure_ascii=False)
    if len(text.encode("utf-8")) > MAX_EXAMPLE_BYTES:
        raise ReviewError(f"example: {len(text.encode('utf-8'))} bytes of JSON, at most {MAX_EXAMPLE_BYTES}")
    try:
        formats.parse_line(text, fmt)
    except formats.FormatError as exc:
        raise ReviewError(f"example.{exc} (a {fmt} example)") from None
    return example


def parse_edit_text(text: str, fmt: str) -> dict:
    """What an editor saved: JSON text of one example (a Dataset line, pretty-printed or not)."""
    if len(text.encode("utf-8")) > MAX_EXAMPLE_BYTES:
        raise ReviewError(f"example: longer than {MAX_EXAMPLE_BYTES} bytes")
    try:  # an editor's file has lines: say which one first
        json.loads(text)
    except json.JSONDecodeError as exc:
        raise ReviewError(f"example: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    except (ValueError, RecursionError):
        pass  # loads_strict says what
    try:
        obj = formats.loads_strict(text.strip())
    except formats.FormatError as exc:
        raise ReviewError(f"example: {exc}") from None
    return validate_edit(obj, fmt)


def check_decision(decision: ReviewDecision, candidate: Optional[SyntheticCandidate]) -> ReviewDecision:
    """The decision re-validated (a model_construct'ed one too), its time in UTC, its edit checked."""
    try:
        decision = ReviewDecision.model_validate(decision.model_dump())
    except ValidationError as exc:
        raise ReviewError(f"decision: {_first_error(exc)}") from None
    if candidate is None:
        raise ReviewError(f"id {decision.id}: not a candidate of this work folder")
    at = rfc3339(parse_time(decision.at))
    example = decision.example
    if decision.verdict == "edited":
        if example is None:
            raise ReviewError(f"id {decision.id}: an edited decision needs its example")
        example = validate_edit(example, example_format(candidate.example))
        if example == candidate.example:  # an edit that changed nothing is an acceptance
            return decision.model_copy(update={"verdict": "accepted", "example": None, "at": at})
    elif example is not None:
        raise ReviewError(f"id {decision.id}: only an edited decision carries an example")
    return decision.model_copy(update={"at": at, "example": example})


@dataclass
class Recorded:
    """What stands for the id after record_decision: ours (written) or a later one already there."""

    decision: ReviewDecision
    written: bool


def record_decision(work_uri: str, decision: ReviewDecision,
                    candidates: Optional[Mapping[str, SyntheticCandidate]] = None) -> Recorded:
    """Write reviews/<id>.json unless a decision with a later `at` is there (see the module docstring).
    `candidates`: load_candidates' result, to check the id without reading candidates.jsonl again."""
    decision_uri(work_uri, getattr(decision, "id", None))  # a hostile id fails before anything is read
    if candidates is None:
        candidates = {c.id: c for c in iter_candidates(work_uri) if c.id == decision.id}
    decision = check_decision(decision, candidates.get(decision.id))
    uri = decision_uri(work_uri, decision.id)
    try:
        existing = _read_decision(uri, decision.id)
    except FileNotFoundError:
        existing = None
    except ReviewError:
        existing = None  # an unreadable object is replaced by a good decision
    if existing is not None:
        if existing == decision:
            return Recorded(existing, written=False)
        if parse_time(existing.at) > parse_time(decision.at):
            return Recorded(existing, written=False)
    storage.write_text(uri, decision.model_dump_json(exclude_none=True, indent=1) + "\n")
    return Recorded(decision, written=True)


def _read_decision(uri: str, cid: str) -> ReviewDecision:
    try:
        data = storage.read_bytes_limited(uri, MAX_DECISION_BYTES)
    except ValueError:
        raise ReviewError(f"{uri}: larger than {MAX_DECISION_BYTES} bytes") from None
    try:
        decision = ReviewDecision.model_validate(formats.loads_strict(data.decode("utf-8")))
    except UnicodeDecodeError:
        raise ReviewError(f"{uri}: not UTF-8") from None
    except formats.FormatError as exc:
        raise ReviewError(f"{uri}: {exc}") from None
    except ValidationError as exc:
        raise ReviewError(f"{uri}: not a ReviewDecision: {_first_error(exc)}") from None
    if decision.id != cid:
        raise ReviewError(f"{uri}: holds the decision for id {decision.id}, not {cid}")
    parse_time(decision.at, f"{uri}: at")
    return decision


def _decision_names(work_uri: str) -> list[tuple[str, str]]:
    """(name under reviews/, a stamp that changes when the object does), one listing."""
    root = storage.join(work_uri, REVIEWS)
    loc = storage.parse(root)
    if loc.scheme == "file":
        folder = Path(loc.key)
        if not folder.is_dir():
            return []
        out = []
        for entry in os.scandir(folder):
            if entry.is_file() and not entry.name.startswith("."):
                info = entry.stat()
                out.append((entry.name, f"{info.st_mtime_ns}:{info.st_size}"))
        return sorted(out)
    prefix = loc.key + "/"
    paginator = storage.s3_client().get_paginator("list_objects_v2")
    pages = storage._s3_call(lambda: list(paginator.paginate(Bucket=loc.bucket, Prefix=prefix)))
    return sorted((obj["Key"][len(prefix):], f"{obj.get('ETag')}:{obj.get('Size')}")
                  for page in pages for obj in page.get("Contents", []))


def load_decisions(work_uri: str) -> tuple[dict[str, ReviewDecision], list[str]]:
    """(decision by id, problems): every readable reviews/<id>.json; an object that is not one (a bad
    name, bad JSON, a wrong id inside, too large) is a problem that names it, never a crash."""
    decisions: dict[str, ReviewDecision] = {}
    problems: list[str] = []
    for name, _ in _decision_names(work_uri):
        cid = name[:-len(".json")] if name.endswith(".json") else ""
        uri = storage.join(work_uri, REVIEWS, name)
        if not _ID.match(cid):
            problems.append(f"{uri}: not a decision (expected reviews/<16 hex digits>.json)")
            continue
        try:
            decision = _read_decision(uri, cid)
        except (ReviewError, FileNotFoundError) as exc:
            problems.append(str(exc))
            continue
        kept = decisions.get(cid)
        if kept is None or parse_time(decision.at) >= parse_time(kept.at):
            decisions[cid] = decision
    return decisions, problems


def pending(work_uri: str, candidates: Optional[Mapping[str, SyntheticCandidate]] = None,
            decisions: Optional[Mapping[str, ReviewDecision]] = None) -> list[SyntheticCandidate]:
    """The sampled candidates without a decision, in file order."""
    if candidates is None:
        candidates = load_candidates(work_uri)
    if decisions is None:
        decisions = load_decisions(work_uri)[0]
    return [c for c in candidates.values() if c.reviewRequired and c.id not in decisions]


# --- where the review stands ------------------------------------------------------------------------------

def stats_of(sampled: Iterable[str], verdicts: Mapping[str, str]) -> ReviewStats:
    """ReviewStats over the sampled ids; decisions on candidates not sampled do not count here
    (materialize still honours them)."""
    counts = {"accepted": 0, "edited": 0, "rejected": 0}
    required = reviewed = 0
    for cid in sampled:
        required += 1
        verdict = verdicts.get(cid)
        if verdict is not None:
            reviewed += 1
            counts[verdict] += 1
    rate = (counts["accepted"] + counts["edited"]) / reviewed if reviewed else None
    return ReviewStats(required=required, reviewed=reviewed, pending=required - reviewed,
                       acceptanceRate=None if rate is None else round(rate, 6), **counts)


def review_outcome(stats: ReviewStats, settings: ReviewSettings) -> tuple[Outcome, str]:
    """pending while a sampled candidate awaits review; then passed when (accepted + edited) /
    reviewed >= minAcceptanceRate, else failed. The message carries the numbers."""
    good = stats.accepted + stats.edited
    numbers = (f"{good} of {stats.reviewed} reviewed accepted ({stats.accepted} as generated, {stats.edited} "
               f"edited, {stats.rejected} rejected)")
    if stats.required == 0:
        return "failed", "no candidate was sampled for review (no candidate passed the filters)"
    if stats.pending:
        return "pending", f"{stats.pending} of {stats.required} sampled candidates await review; {numbers}"
    rate, floor = good / stats.reviewed, settings.minAcceptanceRate
    # counts, not rounded rates: 4 of 5 meets 0.8 exactly
    if good >= floor * stats.reviewed - 1e-9:
        return "passed", f"review passed: {numbers}, {rate:.1%} >= minAcceptanceRate {floor:.1%}"
    return "failed", f"acceptance {rate:.1%} is below minAcceptanceRate {floor:.1%}: {numbers}"


@dataclass
class _Index:
    digest: Optional[str]
    sampled: tuple[str, ...]
    stamps: dict[str, tuple[str, str]] = field(default_factory=dict)  # name -> (stamp, verdict)


#: Per work folder: the sampled ids (per candidatesDigest) and the verdicts read so far. Bounded.
_SUMMARY_CACHE: "OrderedDict[str, _Index]" = OrderedDict()
_SUMMARY_CACHE_SIZE = 32
_SUMMARY_LOCK = threading.Lock()  # the operator reconciles several objects at once, in threads


def _generation_digest(work_uri: str) -> Optional[str]:
    try:
        data = storage.read_bytes_limited(storage.join(work_uri, GENERATION), MAX_GENERATION_BYTES)
        digest = json.loads(data).get("candidatesDigest")
    except (FileNotFoundError, ValueError, AttributeError):
        return None
    return digest if isinstance(digest, str) else None


def summarize(work_uri: str, settings: ReviewSettings, problems: Optional[list[str]] = None) -> ReviewStats:
    """Where the review stands (cheap: see the module docstring). Decision objects that cannot be read
    are appended to `problems` (when given) and count as no decision."""
    del settings  # the sample is the generation Job's (reviewRequired); the rate is review_outcome's
    digest = _generation_digest(work_uri)
    with _SUMMARY_LOCK:
        index = _SUMMARY_CACHE.pop(work_uri, None)  # ours alone while we work on it
    if index is None or digest is None or index.digest != digest:
        index = _Index(digest, tuple(c.id for c in iter_candidates(work_uri) if c.reviewRequired))
    stats = _update(work_uri, index, problems)
    with _SUMMARY_LOCK:
        _SUMMARY_CACHE[work_uri] = index
        while len(_SUMMARY_CACHE) > _SUMMARY_CACHE_SIZE:
            _SUMMARY_CACHE.popitem(last=False)
    return stats


def _update(work_uri: str, index: _Index, problems: Optional[list[str]]) -> ReviewStats:
    listed = dict(_decision_names(work_uri))
    for name in list(index.stamps):
        if name not in listed:
            del index.stamps[name]
    for name, stamp in listed.items():
        cached = index.stamps.get(name)
        if cached is not None and cached[0] == stamp:
            continue
        cid = name[:-len(".json")] if name.endswith(".json") else ""
        try:
            if not _ID.match(cid):
                raise ReviewError(f"{storage.join(work_uri, REVIEWS, name)}: not a decision")
            verdict = _read_decision(storage.join(work_uri, REVIEWS, name), cid).verdict
        except (ReviewError, FileNotFoundError) as exc:
            if problems is not None:
                problems.append(str(exc))
            continue  # not cached: reported on every call until it is fixed or deleted
        index.stamps[name] = (stamp, verdict)
    verdicts = {name[:-len(".json")]: verdict for name, (_, verdict) in index.stamps.items()}
    return stats_of(index.sampled, verdicts)


# --- imports ----------------------------------------------------------------------------------------------

@dataclass
class ImportResult:
    """What an import did. `unknown`: line numbers of records that match no candidate."""

    imported: dict[str, int] = field(default_factory=lambda: {"accepted": 0, "edited": 0, "rejected": 0})
    unchanged: int = 0  # the same decision was there already (a re-import)
    superseded: int = 0  # a later decision on the candidate was there already and stands
    unknown: list[int] = field(default_factory=list)
    undecided: int = 0  # records still pending / draft in the annotation tool
    records: int = 0

    def summary(self) -> str:
        counts = ", ".join(f"{n} {v}" for v, n in self.imported.items())
        unknown = ""
        if self.unknown:
            shown = ", ".join(map(str, self.unknown[:MAX_LISTED]))
            more = f" and {len(self.unknown) - MAX_LISTED} more" if len(self.unknown) > MAX_LISTED else ""
            unknown = f"; {len(self.unknown)} matched no candidate (lines {shown}{more})"
        return (f"{self.records} records: imported {sum(self.imported.values())} ({counts}); "
                f"{self.unchanged} already recorded, {self.superseded} kept a later decision, "
                f"{self.undecided} undecided{unknown}")


#: Lines an import reads at most, and the longest line (a decision, even with an edit, is far smaller).
MAX_IMPORT_LINES = 1_000_000
MAX_IMPORT_LINE_CHARS = 2 * 2**20


def import_decisions(work_uri: str, lines: Iterable[str], reviewer: str,
                     candidates: Optional[Mapping[str, SyntheticCandidate]] = None) -> ImportResult:
    """Import decisions from JSON Lines: our ReviewDecision lines, or Argilla-style records (see
    review_import). A record matches a candidate by its id or by the candidate id of its example.

    All or nothing on bad input: every line is checked first, and one bad line (its number and field
    named; up to MAX_LISTED listed) means nothing is written. Records matching no candidate are not an
    error (an export may hold other records): their line numbers are in the result. Then each decision
    is written as its own object; a write cut off half-way is finished by running the same import again
    (an identical decision is not written twice, a later one already there stands)."""
    from .review_import import UNDECIDED_RECORD, read_record

    if candidates is None:
        candidates = load_candidates(work_uri)
    by_content: dict[str, str] = {candidate_id(c.example): c.id for c in candidates.values()}
    result, errors = ImportResult(), []
    chosen: dict[str, tuple[datetime, int, ReviewDecision]] = {}
    fallback_at = now()
    for number, line in enumerate(lines, start=1):
        if number > MAX_IMPORT_LINES:
            raise ReviewError(f"line {number}: more than {MAX_IMPORT_LINES} lines; split the file")
        if len(line) > MAX_IMPORT_LINE_CHARS:
            errors.append(f"line {number}: longer than {MAX_IMPORT_LINE_CHARS} characters")
            continue
        if formats.is_blank(line):
            continue
        result.records += 1
        try:
            decision = read_record(line, candidates, by_content, reviewer, fallback_at)
            if decision is None:
                result.unknown.append(number)
                continue
            if decision == UNDECIDED_RECORD:
                result.undecided += 1
                continue
            decision = check_decision(decision, candidates.get(decision.id))
        except ReviewError as exc:
            errors.append(f"line {number}: {exc}")
            continue
        at = parse_time(decision.at)
        kept = chosen.get(decision.id)
        if kept is None or (at, number) >= kept[:2]:  # the file's latest decision per candidate
            chosen[decision.id] = (at, number, decision)
    if errors:
        more = f" (and {len(errors) - MAX_LISTED} more)" if len(errors) > MAX_LISTED else ""
        raise ReviewError(f"nothing imported: {len(errors)} bad line(s){more}: " + "; ".join(errors[:MAX_LISTED]))
    for _, _, decision in sorted(chosen.values(), key=lambda item: item[1]):
        recorded = record_decision(work_uri, decision, candidates)
        if recorded.written:
            result.imported[decision.verdict] += 1
        elif recorded.decision == decision:
            result.unchanged += 1
        else:
            result.superseded += 1
    return result


def import_file(work_uri: str, uri: str, reviewer: str,
                candidates: Optional[Mapping[str, SyntheticCandidate]] = None) -> ImportResult:
    """import_decisions over a file (file:// or s3://, or a local path), streamed: an over-long or
    non-UTF-8 line is a bad line, never held whole in memory."""
    if "://" not in uri:
        uri = "file://" + str(Path(uri).resolve())

    def texts() -> Iterator[str]:
        for line in jsonlines.lines([(None, jsonlines.open_file(uri))]):
            # a line that is not text becomes one that fails with its problem, under its number
            yield line.text if line.text is not None else json.dumps({"__problem__": line.problem})

    return import_decisions(work_uri, texts(), reviewer, candidates)


# --- the reviewed file ------------------------------------------------------------------------------------

@dataclass
class Materialized:
    stats: ReviewStats
    message: str
    examples: int
    reviewed_digest: str
    written: bool  # False: review.json already said exactly this (a repeated run)


def _reviewed_line(cand: SyntheticCandidate, decision: Optional[ReviewDecision], fmt: str) -> Optional[str]:
    if decision is not None and decision.verdict == "rejected":
        return None
    if decision is None:
        example, how, who = cand.example, "not-sampled", None
    elif decision.verdict == "edited":
        example, how, who = decision.example, "edited", decision.reviewer
    else:
        example, how, who = cand.example, "accepted", decision.reviewer
    meta = {**(example.get("metadata") or {}), **lineage_metadata(cand.id, cand.lineage, how, who or "")}
    if len(meta) > formats.MAX_METADATA_KEYS:
        raise ReviewError(f"candidate {cand.id}: metadata would have {len(meta)} keys, at most "
                          f"{formats.MAX_METADATA_KEYS}")
    line = json.dumps({**{k: v for k, v in example.items() if k != "metadata"}, "metadata": meta},
                      ensure_ascii=False)
    try:
        formats.parse_line(line, fmt)  # the reviewed file must validate as the Dataset it becomes
    except formats.FormatError as exc:
        raise ReviewError(f"candidate {cand.id}: not a valid {fmt} example: {exc}") from None
    return line


def materialize(config: SynthesisConfig) -> Materialized:
    """Write reviewed.jsonl and review.json for a review that passed (ReviewError, nothing written,
    while it is pending or when it failed, or when a decision object cannot be read).

    reviewed.jsonl: in candidate order, every candidate accepted (as generated), edited (the edited
    example), or not sampled and not rejected, each with the lineage keys in `metadata`. Complete or
    absent: review.json (whose reviewedDigest names reviewed.jsonl's bytes) is removed first and written
    last. Idempotent: the same inputs give the same bytes, and a run that finds review.json saying just
    that writes nothing."""
    work, fmt = config.workURI, config.spec.format
    decisions, problems = load_decisions(work)
    if problems:
        raise ReviewError(f"{len(problems)} decision object(s) cannot be read (fix or delete them): "
                          + "; ".join(problems[:MAX_LISTED]))
    hasher = hashlib.sha256()
    out_hash, examples, sampled, unknown_format = hashlib.sha256(), 0, [], None
    with tempfile.TemporaryDirectory(prefix="ft-review-") as tmp:
        path = Path(tmp) / REVIEWED
        with open(path, "w", encoding="utf-8", newline="\n") as fh:
            for cand in iter_candidates(work, hasher):
                if cand.reviewRequired:
                    sampled.append(cand.id)
                if example_format(cand.example) != fmt and unknown_format is None:
                    unknown_format = f"candidate {cand.id} is not a {fmt} example"
                line = _reviewed_line(cand, decisions.get(cand.id), fmt)
                if line is not None:
                    data = line + "\n"
                    fh.write(data)
                    out_hash.update(data.encode("utf-8"))
                    examples += 1
        if unknown_format:
            raise ReviewError(unknown_format)
        candidates_digest = "sha256:" + hasher.hexdigest()
        recorded = _generation_digest(work)
        if recorded is not None and recorded != candidates_digest:
            raise ReviewError(f"{storage.join(work, CANDIDATES)} changed after generation ({candidates_digest}, "
                              f"generation.json says {recorded})")
        stats = stats_of(sampled, {cid: d.verdict for cid, d in decisions.items()})
        outcome, message = review_outcome(stats, config.spec.review)
        if outcome != "passed":
            raise ReviewError(f"nothing written: {message}")
        if examples == 0:
            raise ReviewError("nothing written: no example was accepted")
        reviewed_digest = "sha256:" + out_hash.hexdigest()
        report = {**stats.model_dump(), "candidatesDigest": candidates_digest, "reviewedDigest": reviewed_digest,
                  "examples": examples, "message": message}
        report_text = json.dumps(report, indent=1, sort_keys=True) + "\n"
        report_uri, reviewed_uri = storage.join(work, REVIEW_JSON), storage.join(work, REVIEWED)
        if _already(report_uri, report_text, reviewed_uri, reviewed_digest):
            return Materialized(stats, message, examples, reviewed_digest, written=False)
        storage.delete(report_uri)  # from here until the last write, the folder says "not complete"
        storage.upload_file(path, reviewed_uri)
        storage.write_text(report_uri, report_text)
    return Materialized(stats, message, examples, reviewed_digest, written=True)


def _already(report_uri: str, report_text: str, reviewed_uri: str, reviewed_digest: str) -> bool:
    try:
        if storage.read_bytes_limited(report_uri, MAX_GENERATION_BYTES).decode("utf-8") != report_text:
            return False
        digest, _ = storage.sha256_stream(storage.iter_chunks(reviewed_uri))
    except (FileNotFoundError, ValueError, UnicodeDecodeError):
        return False
    return "sha256:" + digest == reviewed_digest


def read_config(config_path: str) -> SynthesisConfig:
    text = storage.read_text(config_path) if "://" in config_path else Path(config_path).read_text()
    try:
        return SynthesisConfig.model_validate_json(text)
    except ValidationError as exc:
        raise ConfigError(f"{config_path}: invalid synthesis config: {_first_error(exc)}") from None


def run(config_path: str) -> int:
    """`finetune-trainer synthesis-finalize --config synthesis.json`."""
    from .logs import get_logger

    done = materialize(read_config(config_path))
    get_logger("synthesis-finalize").info(
        f"{done.examples} examples in {REVIEWED} ({done.reviewed_digest}); {done.message}",
        extra={"event": "reviewed", "examples": done.examples, "written": done.written})
    return 0
