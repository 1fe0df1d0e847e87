"""`ftctl lineage`: the chain of adapters, walked through their manifests in the object store, with
what the cluster knows about each (job, governance verdict, promotion time)."""

from __future__ import annotations

import hashlib
import json

from kubernetes import client, config
from typer.testing import CliRunner

from finetune_operator.ftctl import lineage
from finetune_operator.ftctl.main import app
from finetune_trainer import storage

from .conftest import NS


def publish(root, name: str, dataset: str, parent: tuple[str, str] | None = None) -> tuple[str, str]:
    """A manifest as the trainer writes it (what lineage reads of it); returns (uri, digest)."""
    manifest = {"files": {}, "baseModel": {"uri": "s3://models/tiny", "digest": "sha256:" + "0" * 64},
                "dataset": {"uri": f"s3://data/{dataset}", "digest": "sha256:" + dataset[0] * 64, "format": "chat"}}
    if parent:
        manifest["lineage"] = {"parent": {"uri": parent[0], "digest": parent[1], "source": "adapter"}}
        manifest["replay"] = [{"name": "a", "uri": "s3://data/a"}]
    raw = json.dumps(manifest, sort_keys=True).encode()
    uri = f"file://{root}/{name}"
    storage.write_bytes(f"{uri}/manifest.json", raw)
    return uri, "sha256:" + hashlib.sha256(raw).hexdigest()


def chain(root):
    a = publish(root, "a", "a-data")
    b = publish(root, "b", "b-data", parent=a)
    c = publish(root, "c", "c-data", parent=b)
    return a, b, c


def test_walk_goes_from_the_adapter_to_the_base_model(tmp_path):
    a, b, c = chain(tmp_path)
    links = lineage.walk(c[0], c[1], jobs=[])
    assert [link.digest for link in links] == [c[1], b[1], a[1]]
    assert [link.dataset["uri"] for link in links] == ["s3://data/c-data", "s3://data/b-data", "s3://data/a-data"]
    text = "\n".join(lineage.render(links))
    assert text.splitlines()[-1].strip().startswith("base model sha256:000")
    assert "replayed: a  s3://data/a" in text and "no FineTuneJob" in text


def test_a_changed_manifest_stops_the_walk_and_says_so(tmp_path):
    a, b, c = chain(tmp_path)
    storage.write_text(f"{b[0]}/manifest.json", json.dumps({"files": {}, "dataset": {"uri": "s3://evil"}}))
    links = lineage.walk(c[0], c[1], jobs=[])
    assert len(links) == 2 and "it changed since it was named" in links[1].problem
    missing = lineage.walk(f"file://{tmp_path}/nowhere", a[1], jobs=[])
    assert missing[0].problem == "no manifest.json at this location"


def api(k8s) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(config.new_client_from_config(config_file=str(k8s.kubeconfig)))


def job(k8s, name: str, adapter: tuple[str, str], alias: str | None = None, alias_uri: str | None = None) -> None:
    body = {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": name, "namespace": NS},
            "spec": {"baseModel": {"uri": "s3://models/tiny"}, "datasetRef": {"name": "d"},
                     "output": {"uri": "s3://out/runs"}}}
    api(k8s).create_namespaced_custom_object("finetune.dev", "v1alpha1", NS, "finetunejobs", body)
    status = {"phase": "Succeeded", "adapter": {"uri": adapter[0], "digest": adapter[1]},
              "governance": {"passed": True}}
    if alias:
        status["promotion"] = {"state": "Promoted", "alias": alias, "aliasURI": alias_uri,
                               "promotedAt": f"2026-01-0{len(name)}T00:00:00Z"}
    api(k8s).patch_namespaced_custom_object_status("finetune.dev", "v1alpha1", NS, "finetunejobs", name,
                                                   {"status": status})


def test_ftctl_lineage_by_job_name_and_by_alias(k8s, tmp_path):
    a, b, c = chain(tmp_path)
    alias_uri = f"file://{tmp_path}/aliases/support.json"
    storage.write_text(alias_uri, json.dumps({"adapterURI": c[0], "adapterDigest": c[1]}))
    job(k8s, "first", a, alias="first", alias_uri=f"file://{tmp_path}/aliases/first.json")
    job(k8s, "third", c, alias="support", alias_uri=alias_uri)

    def run(*args):
        return CliRunner().invoke(app, ["--kubeconfig", str(k8s.kubeconfig), "lineage", *args])

    by_job = run("third")
    assert by_job.exit_code == 0, by_job.output
    lines = by_job.output.splitlines()
    assert lines[0] == "FineTuneJob third: 3 adapter(s)"
    assert lines[1].startswith(f"adapter {c[1]}") and "governance: passed  promoted: 2026-01-05" in lines[2]
    assert any(line.strip().startswith(f"parent  {b[1]}") for line in lines)
    assert any(line.strip().startswith(f"ancestor 2 {a[1]}") for line in lines)
    assert "job: first  governance: passed  promoted: 2026-01-05" in by_job.output  # len("first") == 5

    by_alias = run("support")
    assert by_alias.exit_code == 0 and by_alias.output.splitlines()[0].startswith("alias support (")
    assert by_alias.output.splitlines()[1:] == lines[1:]

    unknown = run("nobody")
    assert unknown.exit_code != 0 and "neither a FineTuneJob nor an alias" in unknown.output
