"""An attacker's stand-in for the governance pod: writes a forged report where the operator reads it.

    python forge.py MODE CONFIG [SOURCE_REPORT_URI]

It has what a team that owns the bucket has: the S3 credentials and the job's rendered config (the
report URI, the adapter digest, the policy, the run number) -- but not the platform's signing key.
Modes:
- unsigned: the pre-attestation report format, every check passed, with its own sha256;
- self-signed: a well-formed in-toto Statement in a DSSE envelope, bound to this adapter, policy,
  run, job and dataset, every check passed, signed with a key of its own;
- replay: a genuine signed report of another run (SOURCE_REPORT_URI) copied in place;
- edited: that genuine report with its predicate rebound to this job and every check passed,
  the original signature kept.
"""

from __future__ import annotations

import base64
import hashlib
import json
import sys

from finetune_operator import attestation
from finetune_operator.governance import policy_digest
from finetune_trainer import storage


def passing_predicate(cfg: dict, adapter_digest: str) -> dict:
    inputs, policy = cfg["governanceInputs"], cfg["governance"]
    return {"adapterDigest": adapter_digest, "datasetDigest": cfg["data"]["digest"],
            "baseModelDigest": inputs.get("baseModelDigest"), "policy": policy, "policyDigest": policy_digest(policy),
            "run": inputs["run"], "job": cfg["job"], "passed": True,
            "checks": [{"name": n, "passed": True, "message": "looks fine to me"} for n in policy["required"]],
            "createdAt": "2026-01-01T00:00:00Z", "trainerVersion": "0.1.0"}


def main(mode: str, config_path: str, source: str = "") -> None:
    cfg = json.loads(open(config_path, encoding="utf-8").read())
    inputs = cfg["governanceInputs"]
    adapter_uri = inputs["adapterURI"]
    digest = "sha256:" + hashlib.sha256(storage.read_bytes(storage.join(adapter_uri, "manifest.json"))).hexdigest()
    if mode == "unsigned":
        report = passing_predicate(cfg, digest)
        report["sha256"] = "sha256:" + hashlib.sha256(json.dumps(report, sort_keys=True).encode()).hexdigest()
    elif mode == "self-signed":
        own = attestation.Keyring.from_files({attestation.SIGNING_KEY: attestation.private_pem(
            attestation.generate_key())})
        report = attestation.sign(attestation.statement(adapter_uri, digest, passing_predicate(cfg, digest)), own)
    elif mode == "replay":
        report = json.loads(storage.read_text(source))
    elif mode == "edited":
        report = json.loads(storage.read_text(source))
        stmt = json.loads(base64.b64decode(report["payload"]))
        stmt["predicate"] = passing_predicate(cfg, digest)
        stmt["subject"] = [{"name": adapter_uri, "digest": {"sha256": digest.split(":", 1)[1]}}]
        report["payload"] = base64.b64encode(json.dumps(stmt).encode()).decode()
    else:
        raise SystemExit(f"unknown mode {mode}")
    storage.write_text(inputs["reportURI"], json.dumps(report))


if __name__ == "__main__":
    main(*sys.argv[1:])
