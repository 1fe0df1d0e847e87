"""ftctl reads manifests the way kubectl v1.36 reads them, checked against kubectl itself.

For every file of tests/manifests/yaml12/ (and for the scalar and key tables of the unit test
tests/ftctl/test_yaml12.py), `kubectl create --dry-run=client -o json` and ftctl's parser must give
the same objects, field by field and JSON type by JSON type. The valid manifests then go through
`kubectl apply --dry-run=server`: what the API server makes of them after its defaulting must equal
what ftctl validated and defaulted. The rejected ones are rejected by kubectl or the API server too.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from finetune_operator.ftctl.errors import FtctlError
from finetune_operator.ftctl.manifests import json_number, load, parse_documents
from realcluster.realk8s import REPO

CORPUS = REPO / "tests" / "manifests" / "yaml12"
VALID = sorted(p for p in CORPUS.iterdir() if p.name[:2].isdigit())  # NN-*.yaml, NN-*.json
PARSED = VALID + sorted(CORPUS.glob("probe-*.yaml"))
TABLES = json.loads((CORPUS / "tables.json").read_text())  # also read by tests/ftctl/test_yaml12.py
INT64 = 2**63


def same(a, b) -> bool:
    """Equal and of the same JSON type (True is not 1, 1.0 is not 1)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def json_objects(text: str) -> list:
    """kubectl's -o json output (one object, or several one after another), with numbers read the
    way the API server reads them: an integer literal that fits in int64 is an int, else a float."""
    decoder = json.JSONDecoder(parse_int=lambda s: int(s) if -INT64 <= int(s) < INT64 else float(s))
    out, i, text = [], 0, text.strip()
    while i < len(text):
        obj, i = decoder.raw_decode(text, i)
        out.extend(obj["items"] if obj.get("kind") == "List" else [obj])
        while i < len(text) and text[i].isspace():
            i += 1
    return out


def kubectl_reads(cluster, path: Path) -> list:
    objects = json_objects(cluster.kubectl("create", "--dry-run=client", "-o", "json", "-f", str(path)).stdout)
    for obj in objects:  # kubectl fills in the context's namespace; ftctl leaves that to the cluster
        obj["metadata"].pop("namespace", None)
    return objects


def as_sent(value):
    """What goes over the wire: JSON cannot tell 0.0 from 0, so neither can the API server."""
    if isinstance(value, dict):
        return {k: as_sent(v) for k, v in value.items()}
    if isinstance(value, list):
        return [as_sent(v) for v in value]
    return json_number(value)


def first_difference(a, b, path="") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if key not in a or key not in b:
                return f"{path}.{key}: only in {'ftctl' if key in a else 'kubectl'}"
            if not same(a[key], b[key]):
                return first_difference(a[key], b[key], f"{path}.{key}")
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            if not same(x, y):
                return first_difference(x, y, f"{path}[{i}]")
    return f"{path}: ftctl {a!r} ({type(a).__name__}), kubectl {b!r} ({type(b).__name__})"


@pytest.mark.parametrize("path", PARSED, ids=[p.name for p in PARSED])
def test_ftctl_parses_each_file_like_kubectl(real_cluster, crds, path):
    theirs = kubectl_reads(real_cluster, path)
    ours = [doc.value for doc in parse_documents(path.read_text(), str(path))]
    assert len(ours) == len(theirs)
    for mine, kubectl in zip(ours, theirs):
        assert same(mine, kubectl), first_difference(mine, kubectl)


@pytest.mark.parametrize("table", ["scalars", "keys"])
def test_the_unit_tests_tables_are_what_kubectl_does(real_cluster, tmp_path, table):
    """tables.json, the truth of tests/ftctl/test_yaml12.py, fed to kubectl: so it records kubectl."""
    rows = TABLES[table]
    if table == "scalars":
        body, expected = "".join(f"  k{i}: {text}\n" for i, (text, _) in enumerate(rows)), {
            f"k{i}": want for i, (_, want) in enumerate(rows)}
    else:
        body, expected = "".join(f"  {text}: k{i}\n" for i, (text, _) in enumerate(rows)), {
            want: f"k{i}" for i, (_, want) in enumerate(rows)}
    path = tmp_path / "table.yaml"
    path.write_text(f"apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: table\nprobe:\n{body}")
    [theirs] = kubectl_reads(real_cluster, path)
    assert same(theirs["probe"], expected), first_difference(theirs["probe"], expected)
    [ours] = parse_documents(path.read_text())
    assert same(ours.value, theirs), first_difference(ours.value, theirs)


@pytest.mark.parametrize("where", ["values", "keys"])
def test_random_plain_scalars_read_like_kubectl(real_cluster, tmp_path, where):
    """A differential check beyond the hand-written tables: 3000 random plain scalars made of the
    characters that matter to go-yaml's resolver (same seed every run), as values or as map keys."""
    rng = random.Random(11)
    alphabet = "0123456789" * 3 + ".eE+-_xXoObB:~yYnNtTfFaAlsuLS"
    rows: dict[str, str] = {}  # our reading of a candidate -> the candidate (keys must not collide)
    while len(rows) < (3000 if where == "values" else 1000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 7)))
        try:  # only what YAML allows as a plain scalar there
            [doc] = parse_documents(f"k: {text}\n" if where == "values" else f"{text}: v\n")
        except FtctlError:
            continue
        rows.setdefault(text if where == "values" else next(iter(doc.value)), text)
    texts = sorted(rows.values())
    lines = [f"  k{i}: {t}\n" if where == "values" else f"  {t}: k{i}\n" for i, t in enumerate(texts)]
    path = tmp_path / "random.yaml"
    path.write_text("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: random\nprobe:\n" + "".join(lines))
    [theirs] = kubectl_reads(real_cluster, path)
    [ours] = parse_documents(path.read_text())
    assert len(theirs["probe"]) == len(texts)
    assert same(ours.value["probe"], theirs["probe"]), first_difference(ours.value["probe"], theirs["probe"])


@pytest.mark.parametrize("path", VALID, ids=[p.name for p in VALID])
def test_the_api_server_defaults_what_ftctl_validated_to_the_same_objects(real_cluster, crds, namespace, path):
    server = json_objects(real_cluster.kubectl("apply", "--dry-run=server", "-n", namespace, "-o", "json",
                                               "-f", str(path)).stdout)
    by_name = {(o["kind"], o["metadata"]["name"]): o for o in server}
    ours = load([path]).all()
    assert len(ours) == len(server)
    for obj in ours:
        theirs = by_name[(obj["kind"], obj["metadata"]["name"])]
        assert same(as_sent(obj["spec"]), theirs["spec"]), first_difference(as_sent(obj["spec"]), theirs["spec"])
        for field in ("labels", "annotations"):
            mine = (obj["metadata"].get(field) or {})
            server_side = {k: v for k, v in (theirs["metadata"].get(field) or {}).items()
                           if not k.startswith("kubectl.kubernetes.io/")}
            assert mine == server_side


@pytest.mark.parametrize("name, field", [("reject-beyond-int64.yaml", "spec.training.maxSteps"),
                                         ("reject-string-learning-rate.yaml", "spec.training.learningRate")])
def test_what_ftctl_rejects_for_a_field_the_api_server_rejects_for_it(real_cluster, crds, namespace, name, field):
    proc = real_cluster.kubectl("apply", "--dry-run=server", "-n", namespace, "-f", str(CORPUS / name), check=False)
    assert proc.returncode != 0 and f"{field} in body must be of type" in proc.stderr, proc.stderr
    with pytest.raises(FtctlError) as err:
        load([CORPUS / name])
    ours = str(err.value).split(" is invalid: ", 1)[1].split(" (and ")[0]
    assert ours.startswith(field) and ours in proc.stderr, (ours, proc.stderr)  # the API server's very words


@pytest.mark.parametrize("name, says", [("reject-infinity.yaml", "unsupported value: +Inf"),
                                        ("reject-null-key.yaml", "unsupported map key"),
                                        ("reject-recursive-anchor.yaml", "anchor 'loop' value contains itself"),
                                        ("reject-yaml-directive.yaml", "error converting YAML to JSON"),
                                        ("reject-timestamp-tag.yaml", "cannot decode !!str `2023-02-29` as a !!timestamp")])
def test_what_ftctl_cannot_parse_kubectl_cannot_either(real_cluster, crds, name, says):
    proc = real_cluster.kubectl("create", "--dry-run=client", "-o", "json", "-f", str(CORPUS / name), check=False)
    assert proc.returncode != 0 and says in proc.stderr, proc.stderr


@pytest.mark.parametrize("name, resource", [
    ("reject-duplicate-key.yaml", "/apis/finetune.dev/v1alpha1/namespaces/{ns}/finetunejobs"),
    ("reject-booleans-collide.yaml", "/api/v1/namespaces/{ns}/configmaps"),
])
def test_duplicate_keys_the_api_server_rejects_and_kubectl_hides(real_cluster, crds, namespace, name, resource):
    """kubectl's own YAML-to-JSON keeps the last of two equal keys; the API server reading the YAML
    itself (fieldValidation=Strict, kubectl's default) rejects them, as ftctl does."""
    path = CORPUS / name
    [kept] = kubectl_reads(real_cluster, path)
    assert kept  # kubectl: no error, the last value silently wins
    client = real_cluster.python_client()
    response = client.call_api("POST", f"{client.configuration.host}{resource.format(ns=namespace)}"
                               "?fieldValidation=Strict&dryRun=All", body=path.read_text(),
                               header_params={"Content-Type": "application/yaml", "Accept": "application/json"})
    response.read()
    assert response.status == 400 and b"already set in map" in response.data, response.data
    with pytest.raises(FtctlError, match="already set in this map"):
        load([path])
