"""Signed governance reports (attestation.py, governance.read_report): what a forger can try.

Every way of getting a report believed without the platform key: no signature, another key, an
edited payload or signature, a report of another adapter, policy, run, job or dataset, a
malformed or oversized envelope. None is trusted, each says why in one line, none raises.
"""

from __future__ import annotations

import base64
import json
import random

import pytest

from finetune_operator import attestation
from finetune_operator.governance import ReportBinding, policy_digest, promotion_decision, read_report
from testutil import make_keyring, sign_report

A = "sha256:" + "a" * 64
B = "sha256:" + "b" * 64
POLICY = {"required": ["provenance"]}
JOB = {"namespace": "team", "name": "j", "uid": "uid-1"}
BOUND = ReportBinding(adapter_digest=A, policy_digest=policy_digest(POLICY), run=2, job_uid="uid-1",
                      dataset_digest="sha256:data")


def predicate(**changes) -> dict:
    base = {"adapterDigest": A, "datasetDigest": "sha256:data", "policy": POLICY,
            "policyDigest": policy_digest(POLICY), "run": 2, "job": JOB, "passed": True,
            "checks": [{"name": "provenance", "passed": True, "message": "ok"}]}
    return {**base, **changes}


def rewrite(envelope: dict, change) -> dict:
    stmt = json.loads(base64.b64decode(envelope["payload"]))
    change(stmt)
    return {**envelope, "payload": base64.b64encode(json.dumps(stmt).encode()).decode()}


@pytest.fixture(scope="module")
def keys():
    return make_keyring()


def verdict(report, keys, bound: ReportBinding = BOUND):
    outcome = read_report(report, bound, attestation.Keyring(trusted=keys.trusted), required=["provenance"])
    decision = promotion_decision(outcome, {"mode": "auto"}, A, manifest_ok=True)
    return outcome, decision


def test_a_genuine_report_promotes_and_names_its_key(keys):
    outcome, decision = verdict(sign_report(predicate(), keys), keys)
    assert outcome.report_ok and outcome.passed and decision.promote
    assert outcome.key_id == keys.signing_key_id == attestation.key_id(keys.signing.public_key())


@pytest.mark.parametrize("forge, why", [
    (lambda k: {**predicate(), "sha256": "sha256:" + "0" * 64}, "no DSSE envelope"),
    (lambda k: sign_report(predicate(), make_keyring()), "signed by an untrusted key"),
    (lambda k: {**sign_report(predicate(), k), "signatures": []}, "no signature"),
    (lambda k: rewrite(sign_report(predicate(passed=False, checks=[
        {"name": "provenance", "passed": False}]), k), lambda s: s["predicate"]["checks"][0].update(passed=True)),
     "edited after signing"),
    (lambda k: {**sign_report(predicate(), k), "signatures": [
        {"keyid": k.signing_key_id, "sig": base64.b64encode(b"\0" * 64).decode()}]}, "edited after signing"),
    (lambda k: sign_report(predicate(adapterDigest=B), k, adapter_digest=B), "report is about adapter"),
    (lambda k: sign_report(predicate(run=1), k), "governance run 1, not run 2"),
    (lambda k: sign_report(predicate(policyDigest=policy_digest({"required": []}), policy={"required": []}), k),
     "another policy"),
    (lambda k: sign_report(predicate(policy={"required": []}), k), "does not hash to its policyDigest"),
    (lambda k: sign_report(predicate(job={**JOB, "uid": "uid-other"}), k), "another FineTuneJob"),
    (lambda k: sign_report(predicate(datasetDigest="sha256:other"), k), "computed on dataset"),
    (lambda k: {**sign_report(predicate(), k), "payloadType": "text/plain"}, "payloadType"),
])
def test_forged_reports_block_promotion_and_say_why(keys, forge, why):
    outcome, decision = verdict(forge(keys), keys)
    assert not outcome.report_ok and not outcome.passed and outcome.failing == ["provenance"]
    assert (decision.state, decision.reason, decision.promote) == ("Blocked", "ReportInvalid", False)
    assert why in decision.message and "\n" not in decision.message, decision.message


def test_a_statement_not_ours_is_refused_even_when_signed(keys):
    other_type = rewrite(sign_report(predicate(), keys), lambda s: s.update(predicateType="https://slsa.dev/provenance/v1"))
    # Re-signed by the platform key after the change: the signature holds, the type does not.
    stmt = json.loads(base64.b64decode(other_type["payload"]))
    resigned = attestation.sign(stmt, keys)
    outcome, _ = verdict(resigned, keys)
    assert not outcome.report_ok and "predicateType" in outcome.message


def test_duplicate_keys_in_a_signed_payload_are_refused(keys):
    # JSON with a key twice can mean two things to two parsers: signed or not, it is not evidence.
    from securesystemslib.dsse import Envelope
    from securesystemslib.signer import CryptoSigner

    body = json.dumps({"_type": attestation.STATEMENT_TYPE, "predicateType": attestation.PREDICATE_TYPE,
                       "subject": [{"name": "a", "digest": {"sha256": "a" * 64}}], "predicate": predicate()})
    payload = body[:-1] + ', "predicate": {"passed": false}}'
    env = Envelope(payload=payload.encode(), payload_type=attestation.PAYLOAD_TYPE, signatures={})
    env.sign(CryptoSigner(keys.signing, attestation._ssl_key(keys.signing.public_key())))
    outcome, _ = verdict(env.to_dict(), keys)
    assert not outcome.report_ok and "twice" in outcome.message


def test_garbage_is_never_a_crash(keys):
    rng = random.Random(7)
    genuine = sign_report(predicate(), keys)
    samples = [None, [], "x", 3, {}, {"payload": None, "payloadType": attestation.PAYLOAD_TYPE, "signatures": [{}]},
               {"payload": "!!!", "payloadType": attestation.PAYLOAD_TYPE, "signatures": [{"keyid": "k", "sig": "s"}]}]
    for _ in range(300):
        env = json.loads(json.dumps(genuine))
        field = rng.choice(["payload", "payloadType", "signatures"])
        env[field] = rng.choice([None, 1, "", "a" * rng.randint(1, 99), [], [{"keyid": 1}], {"x": 1},
                                 base64.b64encode(rng.randbytes(rng.randint(0, 200))).decode()])
        samples.append(env)
    for sample in samples:
        outcome, decision = verdict(sample, keys)
        assert not outcome.report_ok and decision.reason == "ReportInvalid"


def test_rotation_old_reports_still_verify_new_ones_are_signed_by_the_new_key(keys):
    files = {attestation.SIGNING_KEY: attestation.private_pem(keys.signing)}
    old_report = sign_report(predicate(), keys)
    rotated = attestation.Keyring.from_files(attestation.rotated_files(files))
    assert rotated.signing_key_id != keys.signing_key_id and keys.signing_key_id in rotated.trusted
    assert verdict(old_report, rotated)[0].report_ok  # signed before the rotation: still valid
    new = verdict(sign_report(predicate(), rotated), rotated)[0]
    assert new.report_ok and new.key_id == rotated.signing_key_id
    # Retiring the old key (dropping it from trusted.pem) makes its reports untrusted.
    retired = attestation.Keyring.from_files({attestation.SIGNING_KEY: attestation.private_pem(rotated.signing)})
    assert not verdict(old_report, retired)[0].report_ok


def test_secret_data_round_trip_and_bad_keys_are_named():
    ring = make_keyring()
    data = {attestation.SIGNING_KEY: base64.b64encode(attestation.private_pem(ring.signing)).decode()}
    assert attestation.Keyring.from_secret_data(data).signing_key_id == ring.signing_key_id
    with pytest.raises(attestation.AttestationError, match="signing.key"):
        attestation.Keyring.from_files({attestation.SIGNING_KEY: b"-----BEGIN PRIVATE KEY-----\nnope\n"})
    with pytest.raises(attestation.AttestationError, match="base64"):
        attestation.Keyring.from_secret_data({attestation.SIGNING_KEY: "%%%"})
    # No trusted key at all: nothing verifies (never "no keys, so anything goes").
    outcome = read_report(sign_report(predicate(), ring), BOUND, attestation.Keyring(), required=["provenance"])
    assert not outcome.report_ok and "no trusted signing keys" in outcome.message
