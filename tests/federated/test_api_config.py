"""The FederatedFineTuneJob API (schema + CEL) and the role configs the operator renders from it."""

from __future__ import annotations

import copy
import json

import pytest

from finetune_operator.api import Dataset, FederatedFineTuneJob
from finetune_operator.api.validation import ManifestError, validate_manifest
from finetune_trainer.federated import config as fc

JOB = {
    "apiVersion": "finetune.dev/v1alpha1", "kind": "FederatedFineTuneJob",
    "metadata": {"name": "triage", "namespace": "coord", "uid": "u-1"},
    "spec": {
        "baseModel": {"uri": "s3://models/tiny", "credentials": {"name": "model-creds"}},
        "lora": {"r": 4, "alpha": 8, "targetModules": ["q_proj", "v_proj"]},
        "participants": [
            {"name": "north", "namespace": "team-north", "dataset": "notes"},
            {"name": "south", "namespace": "team-south", "dataset": "notes"},
            {"name": "far", "remote": {"credentialsSecret": "far-key", "license": "CC-BY-4.0"}},
        ],
        "rounds": 3, "localSteps": 5, "minSites": 2,
        "output": {"uri": "s3://coord/fed", "credentials": {"name": "out-creds"}},
        "superlink": {"externalAddress": "fed.example.org:443", "tls": {"secretName": "triage-remote-tls"}},
    },
}


def _job(**spec) -> dict:
    doc = copy.deepcopy(JOB)
    doc["spec"].update(spec)
    return doc


def _errors(doc) -> str:
    with pytest.raises(ManifestError) as exc:
        validate_manifest(doc)
    return str(exc.value)


def test_valid_job_defaults():
    job = FederatedFineTuneJob.model_validate(validate_manifest(_job()))
    assert job.spec.aggregation == "ffa-lora" and job.spec.fractionFit == 1.0
    assert job.spec.privacy.secureAggregation == "auto" and job.secure_aggregation()  # 3 sites
    two = FederatedFineTuneJob.model_validate(validate_manifest(_job(participants=JOB["spec"]["participants"][:2])))
    assert not two.secure_aggregation()
    forced = _job(participants=JOB["spec"]["participants"][:2], privacy={"secureAggregation": "on"})
    assert FederatedFineTuneJob.model_validate(validate_manifest(forced)).secure_aggregation()


@pytest.mark.parametrize("spec, needle", [
    ({"participants": [{"name": "a", "namespace": "x", "dataset": "d"},
                       {"name": "a", "namespace": "y", "dataset": "d"}]}, "unique"),
    ({"participants": [{"name": "a", "namespace": "x", "dataset": "d"},
                       {"name": "b", "namespace": "x", "dataset": "d"}]}, "one participant only"),
    ({"participants": [{"name": "a", "namespace": "x"}, {"name": "b", "namespace": "y", "dataset": "d"}]},
     "either namespace and dataset"),
    ({"participants": [{"name": "a", "namespace": "x", "dataset": "d", "remote": {"credentialsSecret": "k"}},
                       {"name": "b", "namespace": "y", "dataset": "d"}]}, "either namespace and dataset"),
    ({"minSites": 4}, "minSites"),
    ({"superlink": {}}, "spec.superlink: Required value: a remote participant needs spec.superlink.tls"),
    ({"superlink": {"tls": {"secretName": "t"}}}, "spec.superlink.externalAddress"),
    ({"superlink": {"externalAddress": "fed.example.org", "tls": {"secretName": "t"}}}, "externalAddress"),
    ({"superlink": {"serviceType": "ExternalName"}}, "serviceType"),
    ({"superlink": {"externalAddress": "a:1", "tls": {"secretName": "t", "caBundle": "not a pem"}}}, "caBundle"),
    ({"training": {"maxSteps": 10}}, "rounds × spec.localSteps"),
    ({"aggregation": "median"}, "aggregation"),
    ({"participants": [{"name": "only", "namespace": "x", "dataset": "d"}]}, "participants"),
    ({"privacy": {"differentialPrivacy": {"enabled": True, "delta": 0}}}, "delta"),
])
def test_mistakes_are_refused_naming_the_field(spec, needle):
    assert needle in _errors(_job(**spec))


def _dataset(ns: str, phase: str = "Ready") -> Dataset:
    return Dataset.model_validate({
        "metadata": {"name": "notes", "namespace": ns},
        "spec": {"source": {"uri": f"s3://{ns}-raw/notes.jsonl", "credentials": {"name": "raw"}}, "format": "chat",
                 "provenance": {"origin": ns, "license": "Apache-2.0"}},
        "status": {"phase": phase, "validatedURI": f"s3://{ns}-data/validated",
                   "digest": "sha256:" + "ab" * 32}})


def test_rendered_configs_carry_no_credentials_and_only_the_sites_own_data():
    job = FederatedFineTuneJob.model_validate(validate_manifest(_job()))
    north, south, far = job.spec.participants
    datasets = {"north": _dataset("team-north"), "south": _dataset("team-south"), "far": None}
    server = fc.server_config(job, superlink="triage-superlink.coord.svc:9092", datasets=datasets)
    assert server.secureAggregation and server.minSites == 2 and server.rounds == 3
    assert server.progressURI == "s3://coord/fed/federation/progress.json"
    assert [s.site for s in server.sites] == ["north", "south", "far"]
    assert server.sites[0].datasetDigest == "sha256:" + "ab" * 32 and server.sites[0].license == "Apache-2.0"
    assert server.sites[2].license == "CC-BY-4.0" and server.sites[2].namespace is None
    site = fc.site_config(job, north, datasets["north"], superlink="triage-superlink.coord.svc:9092",
                          scratch_uri="s3://team-north-data/federations/triage")
    assert site.data.uri == "s3://team-north-data/validated" and site.site == "north"
    text = server.model_dump_json() + site.model_dump_json()
    for secret in ("AWS_", "secretKeyRef"):
        assert secret not in text
    assert "team-south" not in site.model_dump_json()  # a site's config names no other site's data
    # The configs round-trip through JSON as the pods read them.
    assert fc.SiteConfig.model_validate_json(site.model_dump_json()) == site
    assert fc.ServerConfig.model_validate(json.loads(server.model_dump_json())) == server
    sl = fc.superlink_config(job)  # a remote site comes in through the remote Fleet port, with its key
    assert sl.port == fc.SUPERLINK_PORT and sl.remoteFleet is not None
    assert [(k.site, k.publicKeyFile) for k in sl.remoteFleet.sites] == [("far", fc.remote_key_file("far"))]
    assert sl.remoteFleet.certFile == f"{fc.REMOTE_TLS_DIR}/tls.crt" and sl.remoteFleet.port == fc.REMOTE_FLEET_PORT
    assert [s.remote for s in server.sites] == [False, False, True]
    from finetune_trainer.federated.superlink import superlink_argv

    local = fc.superlink_config(FederatedFineTuneJob.model_validate(
        validate_manifest(_job(participants=JOB["spec"]["participants"][:2]))))
    assert "--insecure" in superlink_argv(local) and "--isolation" in superlink_argv(local)
    assert local.remoteFleet is None
    with pytest.raises(fc.NotReady, match="team-south/notes"):
        fc.site_config(job, south, _dataset("team-south", phase="Validating"), superlink="x:1", scratch_uri="s3://b/x")
    with pytest.raises(ValueError, match="remote"):
        fc.site_config(job, far, datasets["north"], superlink="x:1", scratch_uri="s3://b/x")


def test_a_remote_sites_template_holds_what_the_coordinator_knows_and_nothing_of_the_site():
    job = FederatedFineTuneJob.model_validate(validate_manifest(_job()))
    far = job.spec.participants[2]
    template = fc.remote_site_template(job, far, address="fed.example.org:443", ca_file="ca.crt")
    assert template["superlink"] == "fed.example.org:443" and template["tls"] == {"caFile": "ca.crt"}
    assert template["site"] == "far" and template["secureAggregation"] is True
    for own in fc.REMOTE_SITE_OWN_FIELDS:
        assert own not in template
    assert "credentials" not in template["model"]["baseModel"]  # the coordinator namespace's Secret name
    # The site's team adds its own three fields and has a config its pod loads.
    filled = {**template, "data": {"uri": "s3://far-data/validated", "format": "chat"},
              "scratchURI": "s3://far-data/scratch", "authPrivateKeyFile": "/keys/node"}
    site = fc.SiteConfig.model_validate_json(json.dumps(filled))
    assert site.superlink == "fed.example.org:443" and site.tls and site.tls.caFile == "ca.crt"
    with pytest.raises(ValueError, match="not remote"):
        fc.remote_site_template(job, job.spec.participants[0], address="x:1", ca_file=None)


def test_the_operator_can_import_the_render_functions_without_torch_or_flower():
    import subprocess
    import sys

    code = ("import sys, finetune_trainer.federated.config\n"
            "bad = [m for m in ('torch', 'flwr', 'transformers', 'peft') if m in sys.modules]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True)
