"""Load the manifests a user would `kubectl apply` and check them like the API server does."""

from __future__ import annotations

import base64
import binascii
import datetime
import math
import re
import struct
import warnings
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, Iterable, Optional

from ruamel.yaml import YAML
from ruamel.yaml.error import MarkedYAMLError, YAMLError
from ruamel.yaml.nodes import MappingNode, ScalarNode, SequenceNode
from ruamel.yaml.resolver import VersionedResolver
from ruamel.yaml.tag import Tag

from ..api.validation import ManifestError, validate_manifest
from .errors import EXIT_USAGE, FtctlError

MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")


@dataclass
class ManifestSet:
    """Validated (defaulted) manifests, by kind, in the order they were read."""

    datasets: list[dict] = field(default_factory=list)
    jobs: list[dict] = field(default_factory=list)
    policies: list[dict] = field(default_factory=list)
    synthetic: list[dict] = field(default_factory=list)
    federations: list[dict] = field(default_factory=list)

    def dataset(self, name: str) -> dict | None:
        return next((d for d in self.datasets if d["metadata"]["name"] == name), None)

    def all(self) -> list[dict]:
        return [*self.policies, *self.datasets, *self.synthetic, *self.jobs, *self.federations]


def manifest_files(paths: Iterable[str | Path]) -> list[Path]:
    """Files named on the command line, with directories expanded (sorted, non-recursive)."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in MANIFEST_SUFFIXES)
            if not found:
                raise FtctlError(f"{path}: no .yaml, .yml or .json manifests in this folder", EXIT_USAGE)
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise FtctlError(f"{path}: no such file or folder", EXIT_USAGE)
    return files


def read_file(path: Path) -> list["Document"]:
    """Every object in a file, read the way kubectl reads it (parse_documents below): empty
    documents dropped, lists expanded. A JSON file is one YAML document, as for kubectl."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise FtctlError(f"{path}: not UTF-8 text (byte {exc.start} cannot be decoded)", EXIT_USAGE) from None
    except OSError as exc:
        raise FtctlError(f"{path}: cannot read: {exc.strerror}", EXIT_USAGE) from None
    return parse_documents(text, str(path))


def read_documents(path: Path) -> list[Any]:
    """The objects of a file as kubectl would send them (what `ftctl submit` checks and sends)."""
    return [doc.value for doc in read_file(path)]


# --- YAML as kubectl reads it ------------------------------------------------------------------
# kubectl (and the API server, for YAML bodies) turns each YAML document into JSON with
# sigs.k8s.io/yaml, whose scalars follow go-yaml v2's resolver: neither PyYAML's YAML 1.1 nor plain
# YAML 1.2. Checked against kubectl v1.36 (tests/realcluster/test_ftctl_yaml.py):
#   1e-3, 5e3, .5, 3. are numbers (PyYAML: strings)    yes/no/on/off/y/n are booleans (1.2: strings)
#   017 and 0o17 are 15, 0x1F is 31, 1_000 is 1000     1:30 is a string (no base 60)
#   2024-01-01 stays a string (no datetime)            ~, null, Null, an empty value are null
#   map keys become strings (true, 1.5, 16)            .inf/.nan and null keys are errors
# Then kubectl decodes that JSON into int64-or-float64 before sending it, so 8.0 reaches the API
# server as the integer 8 and an integer beyond int64 as a float (which an integer field rejects).
# ruamel.yaml parses (nodes that keep plain vs quoted, anchors and line numbers); the resolution
# below is go-yaml v2's, applied to those nodes.
# One deliberate difference: a key twice in one mapping is an error naming the key and its line,
# as the API server's strict field validation says for a YAML body, where kubectl's own conversion
# silently keeps the last one (a second `training:` block would hide the first).

_PLAIN = "!ftctl/plain"  # our marker for a plain (unquoted) scalar with no explicit tag
_CORE = "tag:yaml.org,2002:"
_RESOLVABLE = {"", "!!str", "!!bool", "!!int", "!!float", "!!null", "!!timestamp"}
_INT64 = 2**63
#: go-yaml v2's resolveMap: words that are not strings when plain.
_WORDS: dict[str, tuple[str, Any]] = {}
for _tag, _value, _words in (
    ("!!bool", True, "y Y yes Yes YES true True TRUE on On ON"),
    ("!!bool", False, "n N no No NO false False FALSE off Off OFF"),
    ("!!null", None, "~ null Null NULL"),
    ("!!float", math.nan, ".nan .NaN .NAN"),
    ("!!float", math.inf, ".inf .Inf .INF +.inf +.Inf +.INF"),
    ("!!float", -math.inf, "-.inf -.Inf -.INF"),
):
    _WORDS.update((word, (_tag, _value)) for word in _words.split())
_WORDS[""] = ("!!null", None)
#: go-yaml v2's resolveTable: the first character says what a plain scalar may be.
_HINTS = {**{c: "S" for c in "+-"}, **{c: "D" for c in "0123456789"}, **{c: "M" for c in "yYnNtTfFoO~"}, ".": "."}
_FLOAT_RE = re.compile(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?")  # go-yaml v2 yamlStyleFloat
#: What Go's ParseFloat reads from a leading ".": underscores allowed between digits (.37_83).
_DOT_FLOAT_RE = re.compile(r"\.[0-9](_?[0-9])*([eE][-+]?[0-9](_?[0-9])*)?")
_GO_INT_RE = re.compile(r"([-+]?)(0[xX][0-9a-fA-F]+|0[bB][01]+|0[oO][0-7]+|0[0-7]*|[1-9][0-9]*)")  # ParseInt(s, 0)
#: go-yaml v2's timestamp layouts (time.Parse): 2006-1-2T15:4:5.999999999Z07:00 (or t), the same with a
#: space and no zone, and 2006-1-2.
_TIMESTAMP_RE = re.compile(r"([0-9]{4})-([0-9]{1,2})-([0-9]{1,2})(?:(?:[Tt]([0-9]{1,2}):([0-9]{1,2}):([0-9]{1,2})"
                           r"(?:\.[0-9]+)?(?:Z|[-+]([0-9]{2}):([0-9]{2})))|(?: ([0-9]{1,2}):([0-9]{1,2}):([0-9]{1,2})"
                           r"(?:\.[0-9]+)?))?")
_DIRECTIVE_RE = re.compile(r"^(%YAML|%TAG)[ \t]", re.MULTILINE)
#: Values one document may expand to through aliases (go-yaml stops "excessive aliasing" too).
MAX_VALUES = 1_000_000


class _KeepPlainResolver(VersionedResolver):
    """Resolves nothing: plain scalars keep a marker tag, so plain `12` and quoted "12" stay apart."""

    def resolve(self, kind: Any, value: Any, implicit: Any) -> Any:
        if kind is ScalarNode and implicit[0]:
            return Tag(suffix=_PLAIN)
        return super().resolve(kind, value, implicit)


class _Bad(Exception):
    """A document kubectl would not accept, with the line (1-based) it is about."""

    def __init__(self, line: int, message: str):
        super().__init__(message)
        self.line = line


@dataclass
class Document:
    """One object of a file as kubectl would send it, where it starts, and its fields' lines."""

    value: Any
    line: int
    lines: dict[tuple, int] = field(default_factory=dict)

    def line_of(self, path: str) -> int:
        """The line of a field named like the API server names it (`spec.training.maxSteps`,
        `spec.lora.targetModules[0]`), or of its nearest parent that is in the file."""
        keys: list[Any] = []
        for name, index in re.findall(r"([^.\[\]]+)|\[([^\]]*)\]", path):
            keys.append(name if name else (int(index) if index.isdigit() else index))
        while keys:
            if tuple(keys) in self.lines:
                return self.lines[tuple(keys)]
            keys.pop()
        return self.line


def _short_tag(tag: Any) -> str:
    text = str(tag)
    if text == _PLAIN:
        return ""
    return "!!" + text[len(_CORE):] if text.startswith(_CORE) else text


def _go_int(text: str) -> Optional[int]:
    """Go's strconv.ParseInt(text, 0, 64), then ParseUint(text, 0, 64): None when neither reads it."""
    match = _GO_INT_RE.fullmatch(text)
    if match is None:
        return None
    sign, digits = match.groups()
    prefix = digits[:2].lower()
    if prefix in ("0x", "0b", "0o"):
        number = int(digits[2:], {"0x": 16, "0b": 2, "0o": 8}[prefix])
    else:
        number = int(digits, 8) if digits.startswith("0") else int(digits)
    number = -number if sign == "-" else number
    if -_INT64 <= number < _INT64 or (not sign and number < 2**64):
        return number
    return None


def _is_timestamp(text: str) -> bool:
    """Whether Go's time.Parse takes `text` in one of go-yaml's layouts (a real date and time)."""
    match = _TIMESTAMP_RE.fullmatch(text)
    if match is None:
        return False
    year, month, day, *clock = (int(g) if g is not None else None for g in match.groups())
    try:
        datetime.date(year, month, day)
    except ValueError:
        return False
    hour, minute, second, zone_h, zone_m = (clock[0:3] if clock[0] is not None else clock[5:8]) + clock[3:5]
    return ((hour is None or (hour < 24 and minute < 60 and second < 60))
            and (zone_h is None or (zone_h < 24 and zone_m < 60)))


def resolve_scalar(tag: str, text: str) -> tuple[str, Any]:
    """go-yaml v2's resolve(): (tag, value) of a scalar; tag "" is a plain one without a tag.

    A timestamp stays its text (go-yaml keeps timestamps as strings when decoding to JSON).
    Raises ValueError for a value its explicit tag does not allow (`!!int abc`)."""
    if tag == "!!binary":
        try:
            return "!!str", base64.b64decode("".join(text.split()), validate=True).decode("utf-8", "replace")
        except (binascii.Error, ValueError):
            raise ValueError("!!binary value contains invalid base64 data") from None
    if tag not in _RESOLVABLE:  # a local tag (!foo): go-yaml keeps the text
        return "!!str", text
    resolved: tuple[str, Any] = ("!!str", text)
    hint = _HINTS.get(text[:1], "N" if text == "" else None)
    if tag != "!!str" and hint is not None:
        if text in _WORDS:
            resolved = _WORDS[text]
        elif hint == "." and _DOT_FLOAT_RE.fullmatch(text) and not math.isinf(float(text.replace("_", ""))):
            resolved = ("!!float", float(text.replace("_", "")))
        elif hint in ("D", "S"):
            plain = text.replace("_", "")
            number = _go_int(plain)
            if tag in ("", "!!timestamp") and _is_timestamp(text):
                resolved = ("!!timestamp", text)
            elif number is not None:
                resolved = ("!!int", number)
            elif _FLOAT_RE.fullmatch(plain) and not math.isinf(float(plain)):  # Go: out of range is an error
                resolved = ("!!float", float(plain))
    if tag in ("", "!!str", resolved[0]):
        return resolved
    if tag == "!!float" and resolved[0] == "!!int" and -_INT64 <= resolved[1] < _INT64:
        return "!!float", float(resolved[1])
    raise ValueError(f"cannot decode {resolved[0]} `{text}` as a {tag}")


def json_number(value: Any) -> Any:
    """A number as kubectl sends it: Go's JSON encoding read back as int64, else float64."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return value
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            raise ValueError("JSON has no infinity or NaN (kubectl: json: unsupported value)")
        if not value.is_integer() or abs(value) >= 1e21:  # Go writes these with a fraction or exponent
            return value
        # Go writes the shortest digits that read back as this float, padded with zeros (2**60 is
        # 1152921504606847000): read back as an integer when that fits in int64.
        value = int(Decimal(repr(value)))
    return value if -_INT64 <= value < _INT64 else float(value)


def go_float32_key(value: float) -> str:
    """A float map key as sigs.k8s.io/yaml writes it: strconv.FormatFloat(key, 'g', -1, 32)."""
    if math.isnan(value):
        return ".nan"
    try:
        single = struct.unpack("f", struct.pack("f", value))[0]
    except OverflowError:
        single = math.copysign(math.inf, value)
    if math.isinf(single):
        return ".inf" if single > 0 else "-.inf"
    for digits in range(1, 10):  # the shortest decimal that reads back as the same float32
        text = f"{single:.{digits - 1}e}"
        if struct.unpack("f", struct.pack("f", float(text)))[0] == single:
            break
    mantissa, exponent = text.split("e")
    exp = int(exponent)
    significant = mantissa.replace(".", "").replace("-", "").rstrip("0") or "0"
    if exp < -4 or exp >= 6:  # Go's %g with the shortest precision switches to %e here
        body = significant[0] + ("." + significant[1:] if len(significant) > 1 else "")
        return f"{'-' if single < 0 else ''}{body}e{'-' if exp < 0 else '+'}{abs(exp):02d}"
    return f"{single:.{max(len(significant) - exp - 1, 0)}f}"


class _Converter:
    """Nodes of one document -> JSON-like Python, as sigs.k8s.io/yaml converts them."""

    def __init__(self) -> None:
        self.lines: dict[tuple, int] = {}
        self.active: set[int] = set()  # nodes being converted: an alias back into one is a cycle
        self.count = 0

    def value(self, node: Any, path: tuple) -> Any:
        self.count += 1
        if self.count > MAX_VALUES:
            raise _Bad(node.start_mark.line + 1, f"more than {MAX_VALUES} values once aliases are expanded")
        if id(node) in self.active:
            raise _Bad(node.start_mark.line + 1, f"anchor '{node.anchor}' value contains itself")
        if isinstance(node, ScalarNode):
            try:
                return json_number(self.scalar(node)[1])
            except ValueError as exc:
                raise _Bad(node.start_mark.line + 1, f"{node.value}: {exc}") from None
        self.active.add(id(node))
        try:
            if isinstance(node, SequenceNode):
                out = []
                for index, item in enumerate(node.value):
                    self.lines.setdefault((*path, index), item.start_mark.line + 1)
                    out.append(self.value(item, (*path, index)))
                return out
            return self.mapping(node, path)
        finally:
            self.active.discard(id(node))

    def scalar(self, node: ScalarNode) -> tuple[str, Any]:
        try:
            return resolve_scalar(_short_tag(node.tag), node.value)
        except ValueError as exc:
            raise _Bad(node.start_mark.line + 1, str(exc)) from None

    def key(self, node: Any) -> str:
        line = node.start_mark.line + 1
        if not isinstance(node, ScalarNode):
            raise _Bad(line, "a map key must be a scalar, not a list or a map")
        tag, key = self.scalar(node)
        if tag == "!!bool":
            return "true" if key else "false"
        if tag == "!!int" and -_INT64 <= key < _INT64:
            return str(key)
        if tag == "!!float":
            return go_float32_key(key)
        if tag in ("!!str", "!!timestamp"):
            return key
        what = "null" if tag == "!!null" else "an integer beyond int64"
        raise _Bad(line, f"unsupported map key {node.value!r}: {what} cannot be a JSON key")

    def mapping(self, node: MappingNode, path: tuple) -> dict:
        out: dict[str, Any] = {}
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            line = key_node.start_mark.line + 1
            if (isinstance(key_node, ScalarNode) and key_node.value == "<<"
                    and _short_tag(key_node.tag) in ("", "!!merge")):
                self.merge(value_node, out, path)
                continue
            key = self.key(key_node)
            if key in seen:
                shown = key if key == key_node.value else f"{key_node.value} (read as {key})"
                raise _Bad(line, f'key "{shown}" already set in this map at line {seen[key]}')
            seen[key] = line
            self.lines[(*path, key)] = line
            out[key] = self.value(value_node, (*path, key))
        return out

    def merge(self, node: Any, out: dict, path: tuple) -> None:
        """`<<: *base` or `<<: [*a, *b]`, as go-yaml v2 does it: written where it stands (a key
        before it is overwritten, one after it wins), the first map of a list taking precedence."""
        sources = list(reversed(node.value)) if isinstance(node, SequenceNode) else [node]
        for source in sources:
            if not isinstance(source, MappingNode):
                raise _Bad(node.start_mark.line + 1, "map merge requires map or sequence of maps as the value")
            out.update(self.value(source, path))


def _yaml_error(source: str, text: str, exc: Exception) -> FtctlError:
    """ruamel's error as one line: the file, the line, what is wrong (and where that construct began)."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    if mark is not None:
        line: Optional[int] = mark.line + 1
    elif isinstance(getattr(exc, "position", None), int):  # a ReaderError: a character YAML does not allow
        line = text.count("\n", 0, exc.position) + 1
    else:
        line = None
    if isinstance(exc, MarkedYAMLError) and exc.problem:
        problem = exc.problem
        context_mark = exc.context_mark
        if exc.context:
            began = f" at line {context_mark.line + 1}" if context_mark is not None and context_mark.line + 1 != line else ""
            problem = f"{exc.context}{began}: {problem}"
    else:
        problem = " ".join(str(exc).split()) or type(exc).__name__
    return FtctlError(f"{source}{f':{line}' if line else ''}: not valid YAML: {problem}", EXIT_USAGE)


def parse_documents(text: str, source: str = "<input>") -> list[Document]:
    """The objects of a YAML (or JSON) stream as kubectl would send them, with their lines.

    Empty documents are dropped; an object with `items` (kind: List, FooList) is expanded
    into its items, like kubectl. Errors name the source and line, and are FtctlError."""
    directive = _DIRECTIVE_RE.search(text)
    if directive:  # kubectl splits the stream on `---` first and then fails on the directive's line
        line = text.count("\n", 0, directive.start()) + 1
        raise FtctlError(f"{source}:{line}: {directive.group(1)} directive: kubectl cannot read a file with one "
                         "(remove the line; ftctl reads YAML as kubectl does)", EXIT_USAGE)
    loader = YAML(typ="safe", pure=True)
    loader.Resolver = _KeepPlainResolver
    docs: list[Document] = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ruamel warns about re-used anchors; go-yaml allows them
            nodes = list(loader.compose_all(text))
        for node in nodes:
            converter = _Converter()
            value = converter.value(node, ())
            if value is None:
                continue
            line = node.start_mark.line + 1
            for item, item_path in _expand_list(value, line):
                lines = {k[len(item_path):]: v for k, v in converter.lines.items() if k[:len(item_path)] == item_path}
                docs.append(Document(item, converter.lines.get(item_path, line) if item_path else line, lines))
    except _Bad as exc:
        raise FtctlError(f"{source}:{exc.line}: {exc}", EXIT_USAGE) from None
    except YAMLError as exc:
        raise _yaml_error(source, text, exc) from None
    except RecursionError:
        raise FtctlError(f"{source}: not valid YAML: nested too deeply", EXIT_USAGE) from None
    return docs


def _expand_list(value: Any, line: int) -> list[tuple[Any, tuple]]:
    """kubectl reads any object with an `items` field as a list (unstructured's list detector: even
    `items: null` or `[]`, which apply nothing) and applies its items; an item with neither kind
    nor apiVersion takes them from the list (FooList -> Foo)."""
    if not isinstance(value, dict) or "items" not in value:
        return [(value, ())]
    items = value["items"] or []
    if not isinstance(items, list):
        raise _Bad(line, f"items: a list's items must be a list, not {type(items).__name__}")
    kind = value.get("kind")
    out = []
    for index, item in enumerate(items):
        if isinstance(item, dict) and "kind" not in item and "apiVersion" not in item and isinstance(kind, str):
            item = {"apiVersion": value.get("apiVersion"), "kind": kind.removesuffix("List"), **item}
        out.append((item, ("items", index)))
    return out


def describe(manifest: Any) -> str:
    if not isinstance(manifest, dict):
        return "document"
    name = (manifest.get("metadata") or {}).get("name") or "<unnamed>"
    return f"{manifest.get('kind', '<no kind>')}/{name}"


_ERROR_PATH = re.compile(r'unknown field "([^"]+)"|([A-Za-z0-9_.\[\]/-]+): ')


def check(manifest: dict, source: str, old: dict | None = None, document: Optional[Document] = None) -> dict:
    """The defaulted manifest, or FtctlError with the API server's message naming the field
    (and, for a manifest read from a file, the line of that field)."""
    try:
        return validate_manifest(manifest, old=old)
    except ManifestError as exc:
        if document is not None:
            match = _ERROR_PATH.match(exc.errors[0])
            source = f"{source}:{document.line_of(next(g for g in match.groups() if g)) if match else document.line}"
        # One line per command, as the user asked: the first error plus a count of the rest.
        more = f" (and {len(exc.errors) - 1} more: {'; '.join(exc.errors[1:])})" if len(exc.errors) > 1 else ""
        raise FtctlError(f"{source}: {describe(manifest)} is invalid: {exc.errors[0]}{more}", EXIT_USAGE) from None


def load(paths: Iterable[str | Path]) -> ManifestSet:
    """Read, validate and group every manifest; the first invalid one stops everything."""
    result = ManifestSet()
    seen: set[tuple[str, str]] = set()
    for path in manifest_files(paths):
        for doc in read_file(path):
            obj = check(doc.value, str(path), document=doc)
            key = (obj["kind"], obj["metadata"]["name"])
            if key in seen:
                raise FtctlError(f"{path}:{doc.line}: {describe(obj)} is defined twice", EXIT_USAGE)
            seen.add(key)
            {"Dataset": result.datasets, "FineTuneJob": result.jobs, "GovernancePolicy": result.policies,
             "SyntheticDataset": result.synthetic, "FederatedFineTuneJob": result.federations}[obj["kind"]].append(obj)
    if not seen:
        raise FtctlError("no manifests found in " + ", ".join(map(str, paths)), EXIT_USAGE)
    return result
