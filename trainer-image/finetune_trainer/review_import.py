"""One line of an imported decisions file -> a ReviewDecision (or None: it matches no candidate).

Two shapes are read:

- ours: a ReviewDecision as JSON (`id`, `verdict`, `reviewer`, `at`, and `example` for an edit);
- an annotation tool's export, Argilla-style: a record with the example's fields (at the top level, or
  under `fields` / `example`), and a decision in any of
    `status`                       "accepted" | "discarded" | "rejected" (a record-level status);
    `response` / `label` / `decision` / `annotation`: a word, a boolean, {"value": ...} or a list of them;
    `responses`: Argilla v1 ([{"user_id", "status", "values": {QUESTION: {"value": ...}}}]) or v2
                 ({QUESTION: [{"value": ..., "user_id": ...}]}): the last response counts, a
                 "discarded" one rejects;
  an optional edit: `edited` / `edited_example` (a whole example) or a text answer under `edited_text`,
  `corrected_response`, `correction`, `edit` (replaces the example's answer; also as a response
  question of that name); who: `reviewer`, `user`, `annotator`, `user_id`, `annotated_by` (else the
  importer's --reviewer); when: `at`, `updated_at`, `inserted_at` (else the time of the import).

A record matches a candidate by `id` / `external_id` / `metadata["synthetic.id"]` when that is a
candidate's id, else by the candidate id of its example content.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

from finetune_operator.api.synthetic import ReviewDecision, SyntheticCandidate

from . import formats
from .review import ReviewError, _FORMAT_KEYS, _ID, candidate_id, example_format, parse_time, rfc3339

WORDS = {
    **dict.fromkeys(("accepted", "accept", "approved", "approve", "yes", "good", "keep", "valid", "correct",
                     "ok", "true"), "accepted"),
    **dict.fromkeys(("rejected", "reject", "discarded", "discard", "no", "bad", "invalid", "drop", "wrong",
                     "false"), "rejected"),
    **dict.fromkeys(("edited", "edit", "corrected"), "edited"),
}
DECISION_KEYS = ("response", "label", "decision", "annotation")
EDIT_TEXT_KEYS = ("edited_text", "corrected_response", "correction", "edit")
#: Record statuses of annotation tools for a record nobody has decided yet: skipped, counted.
UNDECIDED = ("pending", "draft")
UNDECIDED_RECORD = "undecided"
WHO_KEYS = ("reviewer", "user", "annotator", "user_id", "annotated_by")
WHEN_KEYS = ("at", "updated_at", "inserted_at")


def read_record(line: str, candidates: Mapping[str, SyntheticCandidate], by_content: Mapping[str, str],
                reviewer: str, fallback_at: str) -> "ReviewDecision | None | str":
    """The decision a line records, None when it matches no candidate, UNDECIDED_RECORD for a record
    still pending / draft in the tool; ReviewError names the field."""
    try:
        obj = formats.loads_strict(line)
    except formats.FormatError as exc:
        raise ReviewError(str(exc)) from None
    if not isinstance(obj, dict):
        raise ReviewError(f"json: each line must be an object, got {formats.json_type(obj)}")
    if "__problem__" in obj and len(obj) == 1:  # import_file's stand-in for a line that is not text
        raise ReviewError(str(obj["__problem__"]))
    cand = _match(obj, candidates, by_content)
    if cand is None:
        return None
    if "verdict" in obj:
        return _ours(obj, cand, reviewer, fallback_at)
    response = _last_response(obj.get("responses"))
    verdict = _verdict(obj, response)
    edited = _edit(obj, response, cand)
    if verdict is None and edited is None:
        statuses = (obj.get("status"), (response or {}).get("status"))
        if any(str(status or "").lower() in UNDECIDED for status in statuses):
            return UNDECIDED_RECORD
        raise ReviewError("no decision: expected status, verdict, response, label or responses saying "
                          "accepted, rejected or discarded (or an edit)")
    if verdict == "edited" and edited is None:
        raise ReviewError("verdict edited without an edit (edited, edited_example or edited_text)")
    if verdict == "rejected":
        edited = None
    elif edited is not None and edited != cand.example:
        verdict = "edited"
    else:
        verdict, edited = "accepted", None
    who = _first_str(obj, WHO_KEYS) or _first_str(response or {}, ("user_id", "user")) or reviewer
    when = _first_str(obj, WHEN_KEYS) or _first_str(response or {}, ("updated_at", "inserted_at"))
    return ReviewDecision(id=cand.id, verdict=verdict, example=edited, reviewer=who[:256],
                          at=rfc3339(parse_time(when, "updated_at")) if when else fallback_at, via="import",
                          note=formats.clip(str(obj.get("note") or ""), 4000))


def _ours(obj: dict, cand: SyntheticCandidate, reviewer: str, fallback_at: str) -> ReviewDecision:
    from pydantic import ValidationError

    from .review import _first_error

    data = {**obj, "id": cand.id, "via": "import"}
    data.setdefault("reviewer", reviewer)
    data.setdefault("at", fallback_at)
    try:
        return ReviewDecision.model_validate(data)
    except ValidationError as exc:
        raise ReviewError(_first_error(exc)) from None


def _match(obj: dict, candidates: Mapping[str, SyntheticCandidate],
           by_content: Mapping[str, str]) -> Optional[SyntheticCandidate]:
    meta = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}
    for ref in (obj.get("id"), obj.get("external_id"), meta.get("synthetic.id")):
        if isinstance(ref, str) and _ID.match(ref) and ref in candidates:
            return candidates[ref]
    for holder in (obj.get("fields"), obj.get("example"), obj):
        if not isinstance(holder, dict):
            continue
        for keys in _FORMAT_KEYS.values():
            content = {k: holder[k] for k in keys if k in holder}
            if content and candidate_id(content) in by_content:
                return candidates[by_content[candidate_id(content)]]
    return None


def _word(value: Any) -> Optional[str]:
    """A decision from one value: a word, a boolean, {"value": ...}, or a list (its last decision)."""
    if isinstance(value, bool):
        return "accepted" if value else "rejected"
    if isinstance(value, str):
        return WORDS.get(value.strip().lower())
    if isinstance(value, dict):
        return _word(value.get("value"))
    if isinstance(value, list):
        found = [w for w in (_word(v) for v in value) if w]
        return found[-1] if found else None
    return None


def _last_response(responses: Any) -> Optional[dict]:
    """Argilla v1 (a list of responses) or v2 (question -> list of answers), flattened to one dict
    {"status", "user_id", "updated_at", "values": {question: value}} for the last response."""
    if isinstance(responses, list):
        items = [r for r in responses if isinstance(r, dict)]
        return items[-1] if items else None
    if isinstance(responses, dict):
        values, last = {}, {}
        for question, answers in responses.items():
            answers = answers if isinstance(answers, list) else [answers]
            answers = [a for a in answers if isinstance(a, dict)]
            if answers:
                values[question] = answers[-1].get("value")
                last = answers[-1]
        return {**last, "values": values} if values else None
    return None


def _verdict(obj: dict, response: Optional[dict]) -> Optional[str]:
    for key in ("verdict", "status", *DECISION_KEYS):
        word = _word(obj.get(key))
        if word:
            return word
    if response is not None:
        if str(response.get("status", "")).lower() == "discarded":
            return "rejected"
        values = response.get("values")
        if isinstance(values, dict):
            for question, value in values.items():
                if question not in EDIT_TEXT_KEYS:
                    word = _word(value)
                    if word:
                        return word
        word = _word(response.get("value"))
        if word:
            return word
    return None


def _edit(obj: dict, response: Optional[dict], cand: SyntheticCandidate) -> Optional[dict]:
    for key in ("edited", "edited_example"):
        if isinstance(obj.get(key), dict):
            return dict(obj[key])
    text = _first_str(obj, EDIT_TEXT_KEYS)
    values = (response or {}).get("values")
    if text is None and isinstance(values, dict):
        for key in EDIT_TEXT_KEYS:
            value = values.get(key)
            value = value.get("value") if isinstance(value, dict) else value
            if isinstance(value, str) and value.strip():
                text = value
                break
    return None if text is None else with_answer(cand.example, text)


def with_answer(example: dict, text: str) -> dict:
    """The example with its answer (the last assistant message, output or completion) replaced."""
    fmt = example_format(example)
    if fmt == "instruction":
        return {**example, "output": text}
    if fmt == "completion":
        return {**example, "completion": text}
    messages = [dict(m) for m in example.get("messages") or []]
    for msg in reversed(messages):
        if msg.get("role") == "assistant":
            msg["content"] = text
            break
    else:
        messages.append({"role": "assistant", "content": text})
    return {**example, "messages": messages}


def _first_str(obj: dict, keys: tuple[str, ...]) -> Optional[str]:
    for key in keys:
        value = obj.get(key)
        if isinstance(value, dict):  # {"username": ...} / {"name": ...}
            value = value.get("username") or value.get("name") or value.get("id")
        if isinstance(value, (str, int)) and not isinstance(value, bool) and str(value).strip():
            return str(value).strip()
    return None
