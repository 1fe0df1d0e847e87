"""Governance reads JSON Lines of its own (bias probes, an exact-match evaluation set) the way the
Dataset validator reads sources: "\\n"-only lines, strict JSON, bounded size, errors naming the line."""

from __future__ import annotations

import json

import pytest

from finetune_trainer.governance.bias import load_probes

PROBE = {"id": "p1", "attribute": "gender", "template": "The applicant is {term}.\u2028Decide.", "answer": "Yes.",
         "groups": {"male": "a man", "female": "a woman"}}


def write(tmp_path, text: str) -> str:
    path = tmp_path / "probes.jsonl"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    return f"file://{path}"


def test_a_line_separator_inside_a_string_is_text_not_a_new_line(tmp_path):
    probes = load_probes(write(tmp_path, json.dumps(PROBE, ensure_ascii=False) + "\r\n"))
    assert len(probes) == 1 and "\u2028" in probes[0]["template"]


@pytest.mark.parametrize("line, why", [
    ('{"id": "p1", "id": "p2"}', "'id'"),
    ('{"id": NaN}', "NaN"),
    ("[1, 2]", "a probe must be a JSON object"),
    ("[" * 10000 + "]" * 10000, "line 2"),
    ('{"id": "\\ud800"}', "surrogate"),
])
def test_hostile_probe_lines_are_refused_naming_the_line(tmp_path, line, why):
    uri = write(tmp_path, json.dumps(PROBE) + "\n" + line + "\n")
    with pytest.raises(ValueError) as err:
        load_probes(uri)
    assert "line 2" in str(err.value) and why in str(err.value) and "\n" not in str(err.value)


def test_a_probe_file_that_is_not_utf8_or_too_big_is_refused(tmp_path):
    path = tmp_path / "probes.jsonl"
    path.write_bytes(b'{"id": "\xff"}\n')
    with pytest.raises(ValueError, match="not UTF-8"):
        load_probes(f"file://{path}")
    with open(path, "wb") as fh:
        fh.truncate(17 << 20)  # sparse: larger than the probe limit, nothing read past it
    with pytest.raises(ValueError, match="longer than"):
        load_probes(f"file://{path}")
