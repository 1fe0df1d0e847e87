"""The JSONL data formats a Dataset can declare, parsed into one shape: a list of chat messages.

- chat:        {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}   (OpenAI style)
- instruction: {"instruction": str, "input": str (optional), "output": str}               (Alpaca style)
- completion:  {"prompt": str, "completion": str}

Every example becomes messages; the trainer renders them with the model's chat template
(completion examples are rendered as raw prompt + completion text, no template) and
computes the loss only on assistant / completion tokens. A new format (e.g. image-text)
is one more parser in PARSERS.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

ROLES = ("system", "user", "assistant")


class FormatError(ValueError):
    """One malformed example; `field` names what is wrong."""

    def __init__(self, field: str, problem: str):
        self.field = field
        super().__init__(f"{field}: {problem}")


@dataclass(frozen=True)
class Example:
    """A parsed example. `raw` marks completion-format data (no chat template)."""

    messages: tuple[tuple[str, str], ...]
    raw: bool = False

    def text(self) -> str:
        return "\n".join(content for _, content in self.messages)


def _string(obj: dict, field: str, required: bool = True) -> Optional[str]:
    if field not in obj:
        if required:
            raise FormatError(field, "missing required field")
        return None
    value = obj[field]
    if not isinstance(value, str):
        raise FormatError(field, f"must be a string, got {type(value).__name__}")
    if required and not value.strip():
        raise FormatError(field, "must not be empty")
    return value


def _known_fields(obj: dict, allowed: set[str]) -> None:
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise FormatError(unknown[0], f"unknown field (allowed: {', '.join(sorted(allowed))})")


def parse_chat(obj: dict) -> Example:
    messages = obj.get("messages")
    if messages is None:
        raise FormatError("messages", "missing required field")
    if not isinstance(messages, list) or not messages:
        raise FormatError("messages", "must be a non-empty list")
    out = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise FormatError(f"messages[{i}]", "must be an object with role and content")
        role = msg.get("role")
        if role not in ROLES:
            raise FormatError(f"messages[{i}].role", f"must be one of {', '.join(ROLES)}, got {role!r}")
        content = msg.get("content")
        if not isinstance(content, str):
            raise FormatError(f"messages[{i}].content", "must be a string")
        out.append((role, content))
    if not any(role == "assistant" and content.strip() for role, content in out):
        raise FormatError("messages", "needs at least one non-empty assistant message to learn from")
    return Example(tuple(out))


def parse_instruction(obj: dict) -> Example:
    _known_fields(obj, {"instruction", "input", "output", "system"})
    instruction = _string(obj, "instruction")
    extra = _string(obj, "input", required=False)
    output = _string(obj, "output")
    system = _string(obj, "system", required=False)
    prompt = instruction if not extra else f"{instruction}\n\n{extra}"
    msgs = ((("system", system),) if system else ()) + (("user", prompt), ("assistant", output))
    return Example(msgs)


def parse_completion(obj: dict) -> Example:
    _known_fields(obj, {"prompt", "completion"})
    prompt = _string(obj, "prompt", required=False) or ""
    completion = _string(obj, "completion")
    return Example((("user", prompt), ("assistant", completion)), raw=True)


PARSERS: dict[str, Callable[[dict], Example]] = {
    "chat": parse_chat,
    "instruction": parse_instruction,
    "completion": parse_completion,
}


def parse_line(line: str, fmt: str) -> Example:
    """Parse one JSONL line; raises FormatError (or ValueError for bad JSON)."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise FormatError("json", f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(obj, dict):
        raise FormatError("json", f"each line must be a JSON object, got {type(obj).__name__}")
    try:
        parser = PARSERS[fmt]
    except KeyError:
        raise FormatError("format", f"unsupported format {fmt!r}") from None
    return parser(obj)


def iter_examples(text: str, fmt: str) -> Iterator[tuple[int, Example | FormatError]]:
    """Yield (line number, example or error) for every non-blank line (1-based numbers)."""
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield number, parse_line(line, fmt)
        except FormatError as exc:
            yield number, exc


def to_record(example: Example, fmt: str) -> dict:
    """The canonical JSON form of an example in its declared format (what validated files hold)."""
    msgs = [{"role": r, "content": c} for r, c in example.messages]
    if fmt == "completion":
        return {"prompt": msgs[0]["content"], "completion": msgs[1]["content"]}
    if fmt == "instruction":
        rec = {"instruction": next(c for r, c in example.messages if r == "user"),
               "output": next(c for r, c in example.messages if r == "assistant")}
        system = next((c for r, c in example.messages if r == "system"), None)
        if system:
            rec["system"] = system
        return rec
    return {"messages": msgs}
