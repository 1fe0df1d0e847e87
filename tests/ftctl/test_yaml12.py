"""ftctl reads YAML the way kubectl does (sigs.k8s.io/yaml over go-yaml v2, then JSON), without a
cluster. tests/manifests/yaml12/tables.json is what kubectl v1.36 makes of plain scalars and map
keys; the realcluster tier (tests/realcluster/test_ftctl_yaml.py) feeds the same tables to kubectl
and requires the same answers, so they are not our opinion of kubectl but a record of it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from finetune_operator.ftctl.errors import FtctlError
from finetune_operator.ftctl.manifests import (MAX_VALUES, go_float32_key, json_number, load, parse_documents,
                                               read_documents)

from .conftest import REPO, ftctl

CORPUS = REPO / "tests" / "manifests" / "yaml12"
VALID = sorted(p for p in CORPUS.iterdir() if p.name[:2].isdigit())  # NN-*.yaml, NN-*.json
REJECTED = sorted(CORPUS.glob("reject-*.yaml"))

#: What kubectl v1.36 makes of plain scalars and of map keys: [text, value] rows, ints and floats
#: told apart (kubectl's JSON comes back as int64 when a number is written as an integer that fits).
TABLES = json.loads((CORPUS / "tables.json").read_text())
SCALARS = [tuple(row) for row in TABLES["scalars"]]
KEYS = [tuple(row) for row in TABLES["keys"]]


def scalar_document(cases) -> str:
    return "".join(f"k{i}: {text}\n" for i, (text, _) in enumerate(cases))


def key_document(cases) -> str:
    return "".join(f"{text}: k{i}\n" for i, (text, _) in enumerate(cases))


def same(a, b) -> bool:
    """Equal and of the same JSON type (True is not 1, 1.0 is not 1)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def test_plain_scalars_resolve_like_kubectl():
    [doc] = parse_documents(scalar_document(SCALARS))
    wrong = [(text, doc.value[f"k{i}"], want) for i, (text, want) in enumerate(SCALARS)
             if not same(doc.value[f"k{i}"], want)]
    assert not wrong, wrong


def test_map_keys_become_json_strings_like_kubectl():
    [doc] = parse_documents(key_document(KEYS))
    assert doc.value == {want: f"k{i}" for i, (_, want) in enumerate(KEYS)}


def test_values_are_plain_json_types():
    """No ruamel or datetime objects, no subclasses: what json.dumps and the API client expect."""
    [doc] = parse_documents("a: [1, 2.5, x, true, null, {b: 2024-01-01}]\nc: !!binary aGk=\n")

    def types(value):
        yield type(value)
        for child in (value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()):
            yield from types(child)

    assert set(types(doc.value)) <= {dict, list, str, int, float, bool, type(None)}


def test_merge_keys_follow_go_yaml():
    """A merge writes where it stands (so it overrides a key before it), the first map of a list wins,
    and a quoted "<<" is just a key."""
    [doc] = parse_documents("after:\n  a: 2\n  <<: {a: 1, b: 1}\nbefore:\n  <<: {a: 1, b: 1}\n  a: 2\n"
                            "list:\n  <<: [{a: 1, b: 1}, {a: 3, c: 3}]\nquoted:\n  '<<': {a: 1}\n")
    assert doc.value == {"after": {"a": 1, "b": 1}, "before": {"a": 2, "b": 1},
                         "list": {"a": 1, "b": 1, "c": 3}, "quoted": {"<<": {"a": 1}}}


def test_documents_empty_ones_and_lists():
    text = ("---\n---\n# only a comment\n---\nkind: A\n...\n---\n"
            "apiVersion: v1\nkind: List\nitems:\n- {kind: B}\n- {kind: C}\n---\n"
            "apiVersion: x/v1\nkind: DList\nitems:\n- metadata: {name: d}\n---\n"
            "kind: E\nitems: []\n---\nkind: F\nitems: ~\n")
    docs = parse_documents(text)
    assert [d.value for d in docs] == [{"kind": "A"}, {"kind": "B"}, {"kind": "C"},
                                      {"apiVersion": "x/v1", "kind": "D", "metadata": {"name": "d"}}]
    assert [d.line for d in docs] == [5, 11, 12, 17]


def test_field_lines_for_error_messages():
    [doc] = parse_documents("kind: X\nspec:\n  training:\n    maxSteps: 3\n  lora:\n    targetModules:\n"
                            "    - a\n    - b\n")
    assert doc.line_of("spec.training.maxSteps") == 4
    assert doc.line_of("spec.lora.targetModules[1]") == 8
    assert doc.line_of("spec.training.missing") == 3  # the nearest parent in the file
    assert doc.line_of("status") == 1


@pytest.mark.parametrize("text, message", [
    ("a:\n  b: 1\n  b: 2\n", 'f.yaml:3: key "b" already set in this map at line 2'),
    ("yes: 1\non: 2\n", 'f.yaml:2: key "on (read as true)" already set in this map at line 1'),
    ('{"a": 1, "a": 2}', 'f.yaml:1: key "a" already set in this map at line 1'),
    ("a: .inf\n", "f.yaml:1: .inf: JSON has no infinity or NaN"),
    ("a: [1, .nan]\n", "f.yaml:1: .nan: JSON has no infinity or NaN"),
    ("~: 1\n", "f.yaml:1: unsupported map key '~': null cannot be a JSON key"),
    ("18446744073709551615: a\n", "f.yaml:1: unsupported map key '18446744073709551615': an integer beyond int64"),
    ("? [a]\n: 1\n", "f.yaml:1: a map key must be a scalar"),
    ("a: &x [*x]\n", "f.yaml:1: anchor 'x' value contains itself"),
    ("a: *nope\n", "f.yaml:1: not valid YAML: found undefined alias 'nope'"),
    ("a: !!int abc\n", "f.yaml:1: cannot decode !!str `abc` as a !!int"),
    ("a: !!binary '%%%'\n", "f.yaml:1: !!binary value contains invalid base64 data"),
    ("a: !!timestamp 2023-02-29\n", "f.yaml:1: cannot decode !!str `2023-02-29` as a !!timestamp"),
    ("a: !!timestamp 2024-01-01T10:00:00\n", "f.yaml:1: cannot decode !!str `2024-01-01T10:00:00` as a !!timestamp"),
    ("<<: 5\n", "f.yaml:1: map merge requires map or sequence of maps"),
    ("kind: [unclosed\n", "f.yaml:2: not valid YAML: while parsing a flow sequence at line 1: expected ',' or ']'"),
    ("a: 1\n\tb: 2\n", "f.yaml:2: not valid YAML:"),
    ("a: 1\nb: \x07\n", "f.yaml:2: not valid YAML: unacceptable character"),
    ("[" * 3000, "f.yaml: not valid YAML: nested too deeply"),
    ("a: 1\n---\n%YAML 1.1\n---\nb: 2\n", "f.yaml:3: %YAML directive: kubectl cannot read a file with one"),
])
def test_bad_yaml_is_one_line_naming_the_file_and_line(text, message):
    with pytest.raises(FtctlError) as err:
        parse_documents(text, "f.yaml")
    assert str(err.value).startswith(message), str(err.value)
    assert "\n" not in str(err.value) and err.value.exit_code == 2


def test_an_alias_bomb_stops_with_a_clear_error():
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, "
              f"*a{i - 1}, *a{i - 1}, *a{i - 1}]" for i in range(1, 9)]
    with pytest.raises(FtctlError, match=f"more than {MAX_VALUES} values once aliases are expanded"):
        parse_documents("\n".join(lines) + "\n", "bomb.yaml")


def test_numbers_as_kubectl_sends_them():
    assert same(json_number(8.0), 8) and same(json_number(-0.0), 0) and same(json_number(0.5), 0.5)
    assert same(json_number(2**63), float(2**63)) and same(json_number(2.0**60), 1152921504606847000)
    assert same(json_number(1e21), 1e21) and json_number(True) is True
    with pytest.raises(ValueError):
        json_number(math.inf)
    assert [go_float32_key(v) for v in (2.5, 0.1, 1e20, 1e-5, 1e300, -0.0, math.nan)] == [
        "2.5", "0.1", "1e+20", "1e-05", ".inf", "-0", ".nan"]


@pytest.mark.parametrize("path", VALID, ids=[p.name for p in VALID])
def test_the_valid_corpus_loads(path):
    manifests = load([path])
    assert manifests.all()


def test_numbers_in_the_corpus_are_what_kubectl_sends():
    [job] = load([CORPUS / "01-numbers.yaml"]).jobs
    training, lora = job["spec"]["training"], job["spec"]["lora"]
    assert same(training["learningRate"], 0.001) and same(training["maxSteps"], 1000)
    assert same(training["batchSize"], 8) and same(training["maxSeqLength"], 1024)
    assert same(training["evalEverySteps"], 100) and same(training["seed"], 42)
    assert same(lora["r"], 8) and same(lora["alpha"], 32) and same(lora["dropout"], 0.05)
    [dataset] = load([CORPUS / "02-booleans-and-strings.yaml"]).datasets
    assert dataset["spec"]["provenance"]["containsPersonalData"] is False
    assert dataset["spec"]["curation"]["deduplicate"] is True
    assert dataset["metadata"]["labels"] == {"reviewed": "yes", "version": "1.10"}
    assert dataset["metadata"]["annotations"]["collected-on"] == "2024-01-01"
    assert same(dataset["spec"]["evaluation"]["seed"], 34)  # 042 is octal to kubectl


@pytest.mark.parametrize("path", REJECTED, ids=[p.name for p in REJECTED])
def test_the_rejected_corpus_names_file_line_and_field(path):
    expected = path.read_text().splitlines()[0].removeprefix("# expect:").strip()
    with pytest.raises(FtctlError) as err:
        load([path])
    assert expected in str(err.value) and str(err.value).startswith(str(path))
    assert err.value.exit_code == 2


def test_read_documents_gives_what_submit_sends():
    docs = read_documents(CORPUS / "04-lists.yaml")
    assert [d["metadata"]["name"] for d in docs] == ["from-a-list", "typed-list-item"]
    assert docs[1]["kind"] == "GovernancePolicy" and docs[1]["apiVersion"] == "finetune.dev/v1alpha1"


def test_ftctl_run_reads_1e_minus_3_as_a_number(tmp_path: Path):
    """The bug of issue 11: `learningRate: 1e-3` made `ftctl run` fail with "must be of type number".
    Through the command line, with a broken dataset so that nothing trains: the manifest passes,
    and the failure is the dataset's, not the learning rate's."""
    (tmp_path / "run.yaml").write_text(
        (CORPUS / "02-booleans-and-strings.yaml").read_text() + "---\n" + (CORPUS / "01-numbers.yaml").read_text()
        .replace("s3://models/smollm2-135m", f"file://{tmp_path}/no-model"))
    proc = ftctl("run", "run.yaml", "--samples", "0", cwd=tmp_path, timeout=120)
    assert "learningRate" not in proc.stderr and "must be of type" not in proc.stderr, proc.stderr
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "Dataset support-answers" in proc.stderr or "support-answers.jsonl" in proc.stderr, proc.stderr
