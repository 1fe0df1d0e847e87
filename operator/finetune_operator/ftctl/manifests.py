"""Load the manifests a user would `kubectl apply` and check them like the API server does."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import yaml

from ..api.validation import ManifestError, validate_manifest
from .errors import EXIT_USAGE, FtctlError

MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")


@dataclass
class ManifestSet:
    """Validated (defaulted) manifests, by kind, in the order they were read."""

    datasets: list[dict] = field(default_factory=list)
    jobs: list[dict] = field(default_factory=list)
    policies: list[dict] = field(default_factory=list)

    def dataset(self, name: str) -> dict | None:
        return next((d for d in self.datasets if d["metadata"]["name"] == name), None)

    def all(self) -> list[dict]:
        return [*self.policies, *self.datasets, *self.jobs]


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


def read_documents(path: Path) -> list[dict[str, Any]]:
    """Every non-empty YAML document in a file (a JSON file is one YAML document)."""
    try:
        docs = list(yaml.safe_load_all(path.read_text(encoding="utf-8")))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise FtctlError(f"{path}{where}: not valid YAML: {problem}", EXIT_USAGE) from None
    out = []
    for doc in docs:
        if doc is None:
            continue
        if isinstance(doc, dict) and doc.get("kind") == "List" and isinstance(doc.get("items"), list):
            out.extend(doc["items"])  # what `kubectl get -o yaml` writes
        else:
            out.append(doc)
    return out


def describe(manifest: Any) -> str:
    if not isinstance(manifest, dict):
        return "document"
    name = (manifest.get("metadata") or {}).get("name") or "<unnamed>"
    return f"{manifest.get('kind', '<no kind>')}/{name}"


def check(manifest: dict, source: str, old: dict | None = None) -> dict:
    """The defaulted manifest, or FtctlError with the API server's message naming the field."""
    try:
        return validate_manifest(manifest, old=old)
    except ManifestError as exc:
        # One line per command, as the user asked: the first error plus a count of the rest.
        more = f" (and {len(exc.errors) - 1} more: {'; '.join(exc.errors[1:])})" if len(exc.errors) > 1 else ""
        raise FtctlError(f"{source}: {describe(manifest)} is invalid: {exc.errors[0]}{more}", EXIT_USAGE) from None


def load(paths: Iterable[str | Path]) -> ManifestSet:
    """Read, validate and group every manifest; the first invalid one stops everything."""
    result = ManifestSet()
    seen: set[tuple[str, str]] = set()
    for path in manifest_files(paths):
        for doc in read_documents(path):
            obj = check(doc, str(path))
            key = (obj["kind"], obj["metadata"]["name"])
            if key in seen:
                raise FtctlError(f"{path}: {describe(obj)} is defined twice", EXIT_USAGE)
            seen.add(key)
            {"Dataset": result.datasets, "FineTuneJob": result.jobs,
             "GovernancePolicy": result.policies}[obj["kind"]].append(obj)
    if not seen:
        raise FtctlError("no manifests found in " + ", ".join(map(str, paths)), EXIT_USAGE)
    return result
