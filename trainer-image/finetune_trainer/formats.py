"""The JSONL data formats a Dataset can declare, parsed into one shape: a list of chat messages.

- chat:        {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}   (OpenAI style)
- instruction: {"instruction": str, "input": str (optional), "output": str}               (Alpaca style)
- completion:  {"prompt": str, "completion": str}

Any of them may carry `"metadata": {...}` (source, tags, a group label for training.balance, ...):
flat string / number / boolean values or lists of strings, kept in the validated files and never
trained on (see `parse_metadata`).

Every example becomes messages; the trainer renders them with the model's chat template
(completion examples are rendered as raw prompt + completion text, no template) and
computes the loss only on assistant / completion tokens. A new format is one more parser in PARSERS.

- image-text:  chat lines whose `content` may also be a list of parts, {"type": "text", "text": str} or
               {"type": "image", "image": URI} (optionally "sha256": hex, checked against the bytes).
               The messages' text is their text parts joined by "\n" (what PII, curation and token
               counts see); `Example.parts` keeps the parts; images.py checks and digests the images.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Optional

ROLES = ("system", "user", "assistant")
#: Deepest nesting of arrays/objects a line may have. Our formats need 3 levels; the limit is far above
#: any real example and far below what would exhaust the parser's recursion (a RecursionError).
MAX_DEPTH = 64
#: Longest integer literal, in digits. No format needs integers; Python refuses to convert more than
#: 4,300 digits (a ValueError), and big ones cost quadratic time to convert.
MAX_INT_DIGITS = 100
#: How much of a user's value a message quotes (a 400 KB role must not make a 400 KB message).
QUOTE_CHARS = 60


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
    #: the line's `metadata` object (validated by parse_metadata), or None; not part of equality
    metadata: Optional[dict] = field(default=None, compare=False, hash=False)
    #: image-text only: per message, its parts (None for a message whose content is a string)
    parts: Optional[tuple[Optional[tuple["Part", ...]], ...]] = None

    def images(self) -> list["Part"]:
        return [p for msg in (self.parts or ()) for p in (msg or ()) if p.type == "image"]

    def text(self) -> str:
        return "\n".join(content for _, content in self.messages)


@dataclass(frozen=True)
class Part:
    """One part of an image-text message: text, or an image reference (as written; after validation the
    canonical URI, its content digest and, for a standardised copy, the source's digest)."""

    type: str  # "text" or "image"
    value: str  # the text, or the image's URI
    sha256: Optional[str] = None
    source_sha256: Optional[str] = None
    where: str = ""  # the field path, for messages (messages[0].content[1])

    def record(self, with_uri: bool = True) -> dict:
        """The part's canonical JSON; without the URI an image is its content (what deduplication and the
        eval split look at, so moving a dataset's folder moves no example between the splits)."""
        if self.type == "text":
            return {"type": "text", "text": self.value}
        out = {"type": "image", "image": self.value} if with_uri or not self.sha256 else {"type": "image"}
        if self.sha256:
            out["sha256"] = self.sha256
        if self.source_sha256:
            out["sourceSha256"] = self.source_sha256
        return out


def clip(text: str, limit: int = QUOTE_CHARS) -> str:
    """`text` cut to `limit` characters, saying how much was left out ("… N more"); control characters
    and lone surrogates escaped, so a message quoting it stays one line and can be written as UTF-8."""
    head = text[:limit]
    if not head.isprintable():
        head = "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in head)
    head = head.encode("utf-8", "backslashreplace").decode("utf-8")
    return head if len(text) <= limit else f"{head}… {len(text) - limit} more"


def quote(value: Any, limit: int = QUOTE_CHARS) -> str:
    """A user's value as it appears in a message: repr() for strings, bounded either way."""
    if isinstance(value, str):
        return repr(clip(value, limit)) if len(value) > limit else repr(value)
    if isinstance(value, (dict, list)):
        return type(value).__name__  # never echo a structure (it may be huge)
    return clip(repr(value), limit)


def _string(obj: dict, field: str, required: bool = True) -> Optional[str]:
    if field not in obj:
        if required:
            raise FormatError(field, "missing required field")
        return None
    value = obj[field]
    if not isinstance(value, str):
        raise FormatError(field, f"must be a string, got {json_type(value)}")
    if required and not value.strip():
        raise FormatError(field, "must not be empty")
    return value


def _known_fields(obj: dict, allowed: set[str]) -> None:
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise FormatError(clip(unknown[0]), f"unknown field (allowed: {', '.join(sorted(allowed))})")


#: Bounds of a line's metadata: labels, not data.
MAX_METADATA_KEYS = 32
MAX_METADATA_STRING = 1024
MAX_METADATA_LIST = 64


def parse_metadata(obj: dict) -> Optional[dict]:
    """The line's `metadata`: an object of at most MAX_METADATA_KEYS flat values (string, number,
    boolean, null, or a list of strings), or None when absent. Raises FormatError naming the key."""
    if "metadata" not in obj:
        return None
    meta = obj["metadata"]
    if not isinstance(meta, dict):
        raise FormatError("metadata", f"must be an object, got {json_type(meta)}")
    if len(meta) > MAX_METADATA_KEYS:
        raise FormatError("metadata", f"has {len(meta)} keys, at most {MAX_METADATA_KEYS}")
    for key, value in meta.items():
        where = f"metadata.{clip(key, 40)}"
        if len(key) > 128:
            raise FormatError(where, "key longer than 128 characters")
        if isinstance(value, list):
            if len(value) > MAX_METADATA_LIST or not all(isinstance(v, str) and len(v) <= MAX_METADATA_STRING
                                                         for v in value):
                raise FormatError(where, f"a list must hold at most {MAX_METADATA_LIST} strings of at most "
                                  f"{MAX_METADATA_STRING} characters")
        elif isinstance(value, str):
            if len(value) > MAX_METADATA_STRING:
                raise FormatError(where, f"longer than {MAX_METADATA_STRING} characters")
        elif value is not None and not isinstance(value, (bool, int, float)):
            raise FormatError(where, f"must be a string, number, boolean or list of strings, got {json_type(value)}")
    return meta


def parse_chat(obj: dict) -> Example:
    messages = obj.get("messages")
    if messages is None:
        raise FormatError("messages", "missing required field")
    if not isinstance(messages, list):
        raise FormatError("messages", f"must be a non-empty list, got {json_type(messages)}")
    if not messages:
        raise FormatError("messages", "must be a non-empty list")
    out = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise FormatError(f"messages[{i}]", f"must be an object with role and content, got {json_type(msg)}")
        if "role" not in msg:
            raise FormatError(f"messages[{i}].role", "missing required field")
        role = msg["role"]
        if role not in ROLES:
            raise FormatError(f"messages[{i}].role", f"must be one of {', '.join(ROLES)}, got {quote(role)}")
        if "content" not in msg:
            raise FormatError(f"messages[{i}].content", "missing required field")
        content = msg["content"]
        if not isinstance(content, str):
            raise FormatError(f"messages[{i}].content", f"must be a string, got {json_type(content)}")
        out.append((role, content))
    if not any(role == "assistant" and content.strip() for role, content in out):
        raise FormatError("messages", "needs at least one non-empty assistant message to learn from")
    return Example(tuple(out), metadata=parse_metadata(obj))


def parse_instruction(obj: dict) -> Example:
    _known_fields(obj, {"instruction", "input", "output", "system", "metadata"})
    instruction = _string(obj, "instruction")
    extra = _string(obj, "input", required=False)
    output = _string(obj, "output")
    system = _string(obj, "system", required=False)
    prompt = instruction if not extra else f"{instruction}\n\n{extra}"
    msgs = ((("system", system),) if system else ()) + (("user", prompt), ("assistant", output))
    return Example(msgs, metadata=parse_metadata(obj))


def parse_completion(obj: dict) -> Example:
    _known_fields(obj, {"prompt", "completion", "metadata"})
    prompt = _string(obj, "prompt", required=False) or ""
    completion = _string(obj, "completion")
    return Example((("user", prompt), ("assistant", completion)), raw=True, metadata=parse_metadata(obj))


#: Most parts in one message and images in one example (a line of 10,000 images is not a training example).
MAX_PARTS = 64
MAX_IMAGES = 16
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def _parts(content: list, where: str) -> tuple[Part, ...]:
    if not content:
        raise FormatError(where, "a list of parts must not be empty")
    if len(content) > MAX_PARTS:
        raise FormatError(where, f"has {len(content)} parts, at most {MAX_PARTS}")
    out = []
    for j, part in enumerate(content):
        at = f"{where}[{j}]"
        if not isinstance(part, dict):
            raise FormatError(at, f"must be an object with type text or image, got {json_type(part)}")
        kind = part.get("type")
        if kind == "text":
            _known_fields(part, {"type", "text"})
            text = _string(part, "text", required=False)
            if text is None:
                raise FormatError(f"{at}.text", "missing required field")
            out.append(Part("text", text, where=at))
        elif kind == "image":
            # sourceSha256: what validated files hold for a standardised copy (the source image's digest)
            _known_fields(part, {"type", "image", "sha256", "sourceSha256"})
            uri = part.get("image")
            if not isinstance(uri, str) or not uri.strip():
                raise FormatError(f"{at}.image", "must be a non-empty string (s3://, file:// or a relative path)"
                                  if uri is not None else "missing required field")
            if len(uri) > 2048:
                raise FormatError(f"{at}.image", "longer than 2048 characters")
            digest = part.get("sha256")
            if digest is not None and not (isinstance(digest, str) and _HEX64.match(digest)):
                raise FormatError(f"{at}.sha256", "must be 64 lower-case hex digits")
            source = part.get("sourceSha256")
            if source is not None and not (isinstance(source, str) and _HEX64.match(source)):
                raise FormatError(f"{at}.sourceSha256", "must be 64 lower-case hex digits")
            out.append(Part("image", uri, sha256=digest, source_sha256=source, where=f"{at}.image"))
        else:
            raise FormatError(f"{at}.type", f"must be text or image, got {quote(kind)}")
    return tuple(out)


def message_text(parts: tuple[Part, ...]) -> str:
    return "\n".join(p.value for p in parts if p.type == "text")


def parse_image_text(obj: dict) -> Example:
    """Chat lines whose content may be a list of text and image parts (see the module docstring)."""
    messages = obj.get("messages")
    if not isinstance(messages, list) or not messages:
        return parse_chat(obj)  # the same messages for what is missing or not a list
    plain, parts, images = [], [], 0
    for i, msg in enumerate(messages):
        content = msg.get("content") if isinstance(msg, dict) else None
        if isinstance(content, list):
            msg_parts = _parts(content, f"messages[{i}].content")
            images += sum(p.type == "image" for p in msg_parts)
            if msg.get("role") == "assistant" and any(p.type == "image" for p in msg_parts):
                raise FormatError(f"messages[{i}].content", "an assistant message cannot hold images "
                                  "(the model writes text)")
            plain.append({**msg, "content": message_text(msg_parts)})
            parts.append(msg_parts)
        else:
            plain.append(msg)
            parts.append(None)
    if images > MAX_IMAGES:
        raise FormatError("messages", f"has {images} images, at most {MAX_IMAGES} per example")
    chat = parse_chat({**obj, "messages": plain})
    return Example(chat.messages, metadata=chat.metadata, parts=tuple(parts))


def with_parts(example: Example, parts: tuple[Optional[tuple[Part, ...]], ...]) -> Example:
    """The example with new parts (its messages' text re-derived from them)."""
    messages = tuple((role, content if msg_parts is None else message_text(msg_parts))
                     for (role, content), msg_parts in zip(example.messages, parts))
    return Example(messages, raw=example.raw, metadata=example.metadata, parts=parts)


PARSERS: dict[str, Callable[[dict], Example]] = {
    "chat": parse_chat,
    "instruction": parse_instruction,
    "completion": parse_completion,
    "image-text": parse_image_text,
}


class _Reject(ValueError):
    """Raised from inside json.loads' hooks; carries the message for the line's error."""


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    # RFC 8259 leaves duplicate names undefined and json.loads keeps the last one silently: a line
    # {"output": "a", "output": "b"} would train on "b" while a reviewer reading it sees "a".
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise _Reject(f"duplicate key {quote(key)}")
        out[key] = value
    return out


def _int(literal: str) -> int:
    digits = len(literal.lstrip("-"))
    if digits > MAX_INT_DIGITS:
        raise _Reject(f"integer of {digits} digits (at most {MAX_INT_DIGITS})")
    return int(literal)


def _float(literal: str) -> float:
    value = float(literal)
    if not math.isfinite(value):  # 1e999 parses as inf: not a number any JSON reader agrees on
        raise _Reject(f"number {clip(literal, 30)} is out of range for a double")
    return value


def _constant(name: str) -> Any:
    raise _Reject(f"{name} is not valid JSON (JSON numbers are finite)")


# Strings (with their escapes) are skipped, so brackets inside them do not count.
_DEPTH_TOKENS = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]')


def nesting_depth(text: str) -> int:
    """Deepest bracket nesting in JSON text, without parsing it (no recursion, any depth)."""
    depth = deepest = 0
    for m in _DEPTH_TOKENS.finditer(text):
        ch = m.group()
        if ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def _lone_surrogate(value: Any) -> Optional[tuple[str, str]]:
    """(field path, the code point) of the first string holding a lone UTF-16 surrogate ("\\ud800"
    is valid JSON syntax but not Unicode: it cannot be written as UTF-8). Iterative: no recursion."""
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, dict):
            for key, sub in reversed(list(item.items())):
                sub_path = f"{path}.{clip(key, 40)}" if path else clip(key, 40)
                stack.append((sub_path, sub))
                stack.append((f"{sub_path} (key)", key))
        elif isinstance(item, list):
            stack.extend((f"{path}[{i}]", sub) for i, sub in reversed(list(enumerate(item))))
        elif isinstance(item, str) and not item.isascii():
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as exc:
                return path or "json", f"\\u{ord(item[exc.start]):04x}"
    return None


def loads_strict(line: str) -> Any:
    """json.loads that refuses what JSON readers disagree on, and never raises anything but FormatError:
    duplicate keys, NaN / Infinity, numbers out of range, integers over MAX_INT_DIGITS digits, nesting
    deeper than MAX_DEPTH, lone surrogates, a byte order mark."""
    if line.startswith("\ufeff"):
        raise FormatError("json", "starts with a byte order mark (U+FEFF); only a file's first line may")
    if line.count("[") + line.count("{") > MAX_DEPTH and nesting_depth(line) > MAX_DEPTH:
        raise FormatError("json", f"nested deeper than {MAX_DEPTH} levels")
    try:
        obj = json.loads(line, object_pairs_hook=_no_duplicates, parse_int=_int, parse_float=_float,
                         parse_constant=_constant)
    except json.JSONDecodeError as exc:
        raise FormatError("json", f"not valid JSON ({exc.msg.removesuffix(' at')} at column {exc.colno})") from None
    except _Reject as exc:
        raise FormatError("json", str(exc)) from None
    except RecursionError:  # the depth check above makes this unreachable; kept so it can never crash
        raise FormatError("json", f"nested deeper than {MAX_DEPTH} levels") from None
    if "\\u" in line:  # a lone surrogate can only come from an escape (raw ones fail UTF-8 decoding)
        found = _lone_surrogate(obj)
        if found:
            raise FormatError(found[0], f"lone surrogate {found[1]} (a JSON escape that is not Unicode)")
    return obj


def parse_line(line: str, fmt: str) -> Example:
    """Parse one JSONL line; raises FormatError naming the field."""
    obj = loads_strict(line)
    if not isinstance(obj, dict):
        raise FormatError("json", f"each line must be a JSON object, got {json_type(obj)}")
    try:
        parser = PARSERS[fmt]
    except KeyError:
        raise FormatError("format", f"unsupported format {fmt!r}") from None
    return parser(obj)


def json_type(value: Any) -> str:
    """What a parsed JSON value is, in JSON's words (a message never says NoneType or dict)."""
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)


def is_blank(line: str) -> bool:
    """Only JSON whitespace (a line of U+2028 or NBSP is not blank: it is text, and not JSON)."""
    return not line.strip(" \t\r")


def split_lines(text: str) -> Iterator[str]:
    """Lines of JSON Lines text: split on "\\n" only (str.splitlines() also splits at U+2028, U+0085,
    \\x1c-\\x1e, ... which are valid inside JSON strings), a trailing "\\r" dropped (CRLF files)."""
    start = 0
    while start < len(text):
        end = text.find("\n", start)
        if end < 0:
            end = len(text)
        line = text[start:end]
        yield line[:-1] if line.endswith("\r") else line
        start = end + 1


def iter_parsed(lines: Iterable[str], fmt: str, start: int = 1) -> Iterator[tuple[int, Example | FormatError]]:
    """Yield (line number, example or error) for every non-blank line."""
    for number, line in enumerate(lines, start=start):
        if is_blank(line):
            continue
        try:
            yield number, parse_line(line, fmt)
        except FormatError as exc:
            yield number, exc


def iter_examples(text: str, fmt: str) -> Iterator[tuple[int, Example | FormatError]]:
    """Yield (line number, example or error) for every non-blank line (1-based numbers)."""
    return iter_parsed(split_lines(text), fmt)


def to_record(example: Example, fmt: str, with_metadata: bool = True) -> dict:
    """The canonical JSON form of an example in its declared format (what validated files hold);
    `with_metadata` False: the content alone (what deduplication and the eval split look at; an image is
    its sha256 there, not its URI)."""
    record = _content_record(example, fmt, with_uri=with_metadata)
    if with_metadata and example.metadata is not None:
        record["metadata"] = example.metadata
    return record


def _content_record(example: Example, fmt: str, with_uri: bool = True) -> dict:
    msgs = [{"role": r, "content": c} for r, c in example.messages]
    if example.parts is not None:
        for msg, msg_parts in zip(msgs, example.parts):
            if msg_parts is not None:
                msg["content"] = [p.record(with_uri) for p in msg_parts]
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
