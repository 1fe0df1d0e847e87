"""A support desk's validated Dataset, as the operator would hand it to the site config renderer."""

from __future__ import annotations

from pathlib import Path

from finetune_operator.api import Dataset


def tickets_dataset(site: str, folder: Path, examples: int, digest_char: str) -> Dataset:
    return Dataset.model_validate({
        "metadata": {"name": "tickets", "namespace": f"desk-{site}"},
        "spec": {"source": {"uri": f"file://{folder}/train.jsonl"}, "format": "instruction",
                 "provenance": {"origin": f"{site} desk", "license": "CC0-1.0"}},
        "status": {"phase": "Ready", "validatedURI": f"file://{folder}", "stats": {"examples": examples},
                   "digest": "sha256:" + digest_char * 64}})
