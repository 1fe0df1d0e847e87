"""MODEL_CARD.md beside a promoted adapter: what it is, what it was trained on, how it was judged.

Hugging Face model card conventions: YAML front matter (base_model, library_name, license, tags,
datasets) and Markdown sections (model details, training data and provenance, training, evaluation
and governance, lineage). Written by the operator when it promotes, from the FineTuneJob, its
Dataset and the verified governance report, so a serving team reads one file instead of three
objects. Pure (no I/O): decisions.py calls it and the handler writes the text.

Every value comes from a user's manifest or data, so each is one escaped line of bounded length:
a Dataset whose `origin` holds newlines, `---` or HTML cannot add front matter keys or markup.
"""

from __future__ import annotations

import json
from typing import Any, Iterable, Optional

FILENAME = "MODEL_CARD.md"
#: The longest a single value may be in the card (the rest is cut with "… N more").
VALUE_LIMIT = 300


def uri(adapter_uri: str) -> str:
    return f"{adapter_uri.rstrip('/')}/{FILENAME}"


def _line(value: Any, limit: int = VALUE_LIMIT) -> str:
    """One Markdown-safe line: newlines and control characters become spaces; HTML, Markdown
    table and emphasis characters are escaped."""
    if value is None:
        return "-"
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    text = "".join(" " if (ord(ch) < 32 or ch in "\u2028\u2029\u0085") else ch for ch in text)
    if len(text) > limit:
        text = f"{text[:limit]}… {len(text) - limit} more"
    for ch in "\\`*_[]<>|#":
        text = text.replace(ch, "\\" + ch)
    return text


def _yaml_scalar(value: Any) -> str:
    """A YAML front matter value: JSON is YAML, and a JSON string cannot break out of its quotes."""
    return json.dumps(value if isinstance(value, (int, float, bool)) or value is None else str(value)[:VALUE_LIMIT])


def _rows(rows: Iterable[tuple[Any, ...]]) -> list[str]:
    return ["| " + " | ".join(_line(c) if c is not None else "-" for c in row) + " |" for row in rows]


def render(ftj: dict, status: dict, dataset: Optional[dict], checks: list[dict], alias: str, now: str) -> str:
    meta, spec = ftj["metadata"], ftj["spec"]
    adapter = status.get("adapter") or {}
    base = spec.get("baseModel") or {}
    ds_spec = (dataset or {}).get("spec") or {}
    ds_status = (dataset or {}).get("status") or {}
    provenance = ds_spec.get("provenance") or {}
    gov = status.get("governance") or {}
    progress = status.get("progress") or {}
    method = spec.get("method", "lora")
    front = {
        "base_model": base.get("uri"),
        "library_name": "peft",
        "license": provenance.get("license") or "other",
        "tags": ["finetune-operator", "peft", method],
        "datasets": [f"{meta.get('namespace', 'default')}/{spec.get('datasetRef', {}).get('name', '')}"],
        "pipeline_tag": "text-generation",
    }
    lines = ["---"]
    for key, value in front.items():
        if isinstance(value, list):
            lines.append(f"{key}:")
            lines += [f"- {_yaml_scalar(v)}" for v in value]
        else:
            lines.append(f"{key}: {_yaml_scalar(value)}")
    lines += ["---", "", f"# {_line(meta['name'])} ({_line(alias)})", "",
              f"A {_line(method.upper())} adapter for `{_line(base.get('uri'))}`, trained and promoted by "
              "finetune-operator.", "", "## Model details", "",
              "| | |", "|---|---|"]
    lines += _rows([
        ("FineTuneJob", f"{meta.get('namespace', 'default')}/{meta['name']} (generation {meta.get('generation', 1)})"),
        ("Adapter", adapter.get("uri")), ("Adapter digest (sha256 of manifest.json)", adapter.get("digest")),
        ("Size (bytes)", adapter.get("sizeBytes")), ("Base model", base.get("uri")),
        ("Base model digest", base.get("digest") or "not pinned"), ("Method", method),
        ("LoRA", spec.get("lora")), ("Quantization", spec.get("quantization") or "none"),
        ("Promoted", f"{now} as alias {alias}"),
    ])
    lines += ["", "## Training data and provenance", "", "| | |", "|---|---|"]
    lines += _rows([
        ("Dataset", f"{meta.get('namespace', 'default')}/{spec.get('datasetRef', {}).get('name', '')}"),
        ("Dataset digest", status.get("datasetDigest")), ("Origin", provenance.get("origin")),
        ("License", provenance.get("license") or "none declared"), ("Collected by", provenance.get("collectedBy")),
        ("Consent", provenance.get("consent")), ("Contains personal data", provenance.get("containsPersonalData")),
        ("PII policy", (ds_spec.get("curation") or {}).get("piiPolicy")),
        ("PII findings at validation", ds_status.get("piiFindings") or {}),
        ("Examples (train / eval)", f"{(ds_status.get('stats') or {}).get('examples')} / "
                                    f"{(ds_status.get('stats') or {}).get('evalExamples')}"),
    ])
    lines += ["", "## Training", "", "| | |", "|---|---|"]
    lines += _rows([("Settings", spec.get("training") or "defaults"), ("Steps", progress.get("totalSteps")),
                    ("Final train loss", progress.get("loss")), ("Final eval loss", progress.get("evalLoss")),
                    ("GPU hours", status.get("gpuHours"))])
    lines += ["", "## Evaluation and governance", "",
              f"Governance run {_line(gov.get('runs') or 1)} under policy `{_line(gov.get('policyDigest'))}`; the "
              f"report `{_line(gov.get('reportURI'))}` is an in-toto Statement signed by platform key "
              f"`{_line(gov.get('signingKey'))}`.", "", "| Check | Passed | Value | Threshold | Result |",
              "|---|---|---|---|---|"]
    lines += _rows((c.get("name"), "yes" if c.get("passed") else "no", c.get("value"), c.get("threshold"),
                    c.get("message")) for c in checks)
    lines += ["", "## Lineage", "",
              f"Base model `{_line(base.get('uri'))}` → Dataset digest `{_line(status.get('datasetDigest'))}` → "
              f"adapter `{_line(adapter.get('digest'))}` → alias `{_line(alias)}`.", ""]
    chain = (status.get("lineage") or {}).get("chain") or []
    if chain:  # spec.initFrom: the adapters this one continues, newest first (docs/continual.md)
        lines += [f"Continues `{_line((status.get('lineage') or {}).get('source'))}`; the adapters below this one, "
                  "newest first (`ftctl lineage` walks them):", "", "| | Adapter digest | Dataset |", "|---|---|---|"]
        lines += _rows((f"{'parent' if i == 0 else f'ancestor {i + 1}'}", e.get("digest"),
                        e.get("datasetDigest") or e.get("datasetURI")) for i, e in enumerate(chain[:32]))
        lines.append("")
    return "\n".join(lines)
