"""`finetune-trainer governance --config job.json`: run the required checks, write governance.json.

Exit codes: 0 whenever the checks ran, passed or not (a failed check is a result, written
to the report); 3 for a bad config or a missing adapter; 4 for transient errors (S3
unreachable), so the Job retries. A check that cannot run (an exception inside it) is a
failed check with the reason, never a silent pass.

The report is a signed attestation (finetune_operator.attestation): an in-toto Statement
whose subject is the adapter (its manifest digest) and whose predicate holds adapterDigest,
datasetDigest, baseModelDigest, policy (the effective spec) and policyDigest, run (the
operator's run number: a policy change runs the checks again), job (namespace, name, uid),
checks [{name, passed, value, threshold, message, reportURI}], passed, createdAt and
trainerVersion; wrapped in a DSSE envelope signed with the platform key mounted at
$FINETUNE_SIGNING_KEYS (the operator runs this command in its own namespace, so that key never
reaches the user's namespace). It goes to governanceInputs.reportURI (governance/run-N.json,
what the operator verifies; later runs never overwrite it) and to governance.json, the latest
run's copy for people and tools.

The adapter is fetched file by file from its manifest, each file's sha256 checked, and only
safetensors weights are loaded: a pickle (.bin, .pt, ...) in an adapter is refused, so
evaluating a hostile adapter cannot run code next to the signing key.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Optional

from finetune_operator import attestation
from finetune_operator.api.governance import CheckResult
from finetune_operator.governance import policy_digest

from .. import __version__, storage
from ..errors import ConfigError, TransientError
from ..logs import get_logger
from .base import CheckContext, failed
from .bias import BiasCheck
from .evaluation import EvaluationCheck
from .explainability import ExplainabilityCheck
from .pii_memorization import PIICheck
from .provenance import ProvenanceCheck
from .retention import RetentionCheck

log = get_logger("governance")

CHECKS = {c.name: c for c in (EvaluationCheck(), BiasCheck(), ProvenanceCheck(), PIICheck(), ExplainabilityCheck(),
                               RetentionCheck())}
REPORT = "governance.json"
#: The folder with signing.key (the Secret volume of the governance Job).
SIGNING_KEYS_ENV = "FINETUNE_SIGNING_KEYS"
DEFAULT_SIGNING_KEYS = "/var/run/finetune/signing"
#: Weight formats that torch unpickles: never loaded from an adapter.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def load_keyring() -> attestation.Keyring:
    folder = Path(os.environ.get(SIGNING_KEYS_ENV) or DEFAULT_SIGNING_KEYS)
    try:
        ring = attestation.Keyring.from_folder(folder)
    except (OSError, attestation.AttestationError) as exc:
        raise ConfigError(f"signing key in {folder}: {exc}") from None
    if ring.signing is None:
        raise ConfigError(f"no {attestation.SIGNING_KEY} in {folder} (${SIGNING_KEYS_ENV}): "
                          "the governance command signs every report")
    return ring


def load_config(config_path: str):
    from ..train import load_config as load_trainer_config

    cfg = load_trainer_config(config_path)
    if cfg.governance is None or cfg.governanceInputs is None:
        raise ConfigError(f"{config_path}: the governance command needs governance and governanceInputs")
    return cfg


def resolve_adapter(cfg) -> tuple[str, str]:
    """(adapter URI, adapter digest = sha256 of its manifest.json)."""
    from ..adapter import MANIFEST, RESULT

    uri = cfg.governanceInputs.adapterURI
    if not uri:
        try:
            uri = json.loads(storage.read_text(storage.join(cfg.outputURI, RESULT)))["adapterURI"]
        except FileNotFoundError:
            raise ConfigError(f"{cfg.outputURI}/{RESULT} not found and governanceInputs.adapterURI not set") from None
    try:
        manifest = storage.read_bytes(storage.join(uri, MANIFEST))
    except FileNotFoundError:
        raise ConfigError(f"{uri}: no {MANIFEST}; not a complete adapter") from None
    return uri, "sha256:" + hashlib.sha256(manifest).hexdigest()


class AdapterRefused(ConfigError):
    """The adapter is not what its manifest says (or carries a pickle): every check fails with this."""


def fetch_adapter(uri: str, dest: Path, expected_digest: Optional[str] = None) -> Path:
    """The adapter's manifest-listed files only, each hashed while it streams to disk and never read
    past its manifest size (a hostile bucket may serve a huge or endless object). With
    `expected_digest`, the manifest itself must hash to it (a pinned adapter, e.g. a parent)."""
    from ..adapter import MANIFEST

    try:
        raw = storage.read_bytes_limited(storage.join(uri, MANIFEST), 4 << 20)
        if expected_digest is not None and "sha256:" + hashlib.sha256(raw).hexdigest() != expected_digest:
            raise AdapterRefused(f"{uri}/{MANIFEST}: digest sha256:{hashlib.sha256(raw).hexdigest()} is not the "
                                 f"expected {expected_digest} (the adapter changed after it was named)")
        manifest = json.loads(raw)
        (dest / MANIFEST).parent.mkdir(parents=True, exist_ok=True)
        (dest / MANIFEST).write_bytes(raw)  # the bytes that were hashed: lineage is read from this copy
        files = manifest["files"]
        assert isinstance(files, dict)
    except FileNotFoundError:
        raise ConfigError(f"{uri}: no {MANIFEST}; not a complete adapter") from None
    except (ValueError, KeyError, TypeError, AssertionError, RecursionError):
        raise AdapterRefused(f"{uri}/{MANIFEST}: not a valid manifest") from None
    for name, meta in sorted(files.items()):
        shown = name[:200]
        if not name or Path(name).is_absolute() or ".." in Path(name).parts or name != Path(name).as_posix():
            raise AdapterRefused(f"{uri}/{MANIFEST}: file name {shown!r} leaves the adapter folder")
        if name.lower().endswith(PICKLE_SUFFIXES):
            raise AdapterRefused(f"{uri}/{shown}: a pickle file; adapters are loaded from safetensors only")
        size = meta.get("size") if isinstance(meta, dict) else None
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise AdapterRefused(f"{uri}/{MANIFEST}: entry {shown!r} has no byte size")
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        h, n = hashlib.sha256(), 0
        chunks = storage.iter_chunks(storage.join(uri, name))
        try:
            with open(target, "wb") as fh:
                for chunk in chunks:
                    n += len(chunk)
                    if n > size:
                        break
                    h.update(chunk)
                    fh.write(chunk)
        except FileNotFoundError:
            raise AdapterRefused(f"{uri}/{shown}: listed in the manifest but missing") from None
        finally:
            chunks.close()
        if n != size or h.hexdigest() != meta.get("sha256"):
            raise AdapterRefused(f"{uri}/{shown}: does not match the manifest (changed after training?)")
    return dest


def run_check(name: str, ctx: CheckContext) -> CheckResult:
    started = time.monotonic()
    try:
        result = CHECKS[name].run(ctx)
    except TransientError:
        raise
    except Exception as exc:  # noqa: BLE001 - a check that cannot run fails with its reason
        log.warning("check could not run", extra={"event": "check_error", "check": name,
                                                    "error_type": type(exc).__name__})
        result = failed(name, f"check could not run: {type(exc).__name__}: {exc}")
    for field in ("value", "threshold"):
        number = getattr(result, field)
        if number is not None and not math.isfinite(number):  # NaN has no canonical JSON
            result = result.model_copy(update={field: None, "passed": False,
                                               "message": f"{result.message} ({field} is {number})"})
    log.info("check done", extra={"event": "check", "check": name, "passed": result.passed,
                                  "value": result.value, "threshold": result.threshold,
                                  "seconds": round(time.monotonic() - started, 2)})
    return result


def build_predicate(ctx: CheckContext, results: list[CheckResult]) -> dict:
    """What the signed statement says about the adapter (its subject)."""
    cfg = ctx.config
    policy = ctx.policy.model_dump(mode="json")
    return {
        "adapterDigest": ctx.adapter_digest,
        "datasetDigest": cfg.data.digest,
        "baseModelDigest": ctx.base_model_digest or cfg.governanceInputs.baseModelDigest or cfg.baseModel.digest,
        "policy": policy,
        "policyDigest": policy_digest(policy),
        "run": ctx.inputs.run,
        "job": {"namespace": cfg.job.namespace, "name": cfg.job.name, "uid": cfg.job.uid},
        "checks": [r.model_dump(mode="json") for r in results],
        "passed": all(r.passed for r in results),
        "createdAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "trainerVersion": __version__,
    }


def build_report(ctx: CheckContext, results: list[CheckResult], ring: attestation.Keyring) -> dict:
    """The DSSE envelope of the signed in-toto statement."""
    stmt = attestation.statement(ctx.adapter_uri, ctx.adapter_digest, build_predicate(ctx, results))
    return attestation.sign(stmt, ring)


def run(config_path: str) -> int:
    cfg = load_config(config_path)
    ring = load_keyring()  # before any work: without the key no report can be trusted
    adapter_uri, digest = resolve_adapter(cfg)
    required = list(cfg.governance.required)
    log.info("governance starting", extra={"event": "start", "job": cfg.job.name, "namespace": cfg.job.namespace,
                                           "adapter_digest": digest, "required": required})
    with tempfile.TemporaryDirectory(prefix="governance-") as tmp:
        ctx = CheckContext(config=cfg, policy=cfg.governance, inputs=cfg.governanceInputs,
                           adapter_uri=adapter_uri, adapter_dir=Path(tmp) / "adapter", adapter_digest=digest,
                           workdir=Path(tmp))
        try:
            ctx.adapter_dir = fetch_adapter(adapter_uri, ctx.adapter_dir)
        except AdapterRefused as exc:
            # A verdict, not a crash: signed, every check failed with the reason (provenance's is the
            # manifest), so the FineTuneJob says why it was blocked.
            log.warning("adapter refused", extra={"event": "adapter_refused", "error": str(exc)[:500]})
            results = [failed(n, f"adapterManifest: {exc}" if n == "provenance" else f"not run: {exc}")
                       for n in required]
        else:
            # Provenance first: it computes the base model digest the report records.
            order = sorted(required, key=lambda n: (n != "provenance", list(CHECKS).index(n)))
            by_name = {name: run_check(name, ctx) for name in order}
            results = [by_name[name] for name in required]
        report = build_report(ctx, results, ring)
    text = json.dumps(report, indent=1, sort_keys=True)
    # This run's own report first (what the operator reads; kept when the policy changes and the
    # checks run again), then governance.json, the latest run's copy for people and tools.
    if cfg.governanceInputs.reportURI:
        storage.write_text(cfg.governanceInputs.reportURI, text)
    storage.write_text(storage.join(adapter_uri, REPORT), text)
    log.info("governance done", extra={"event": "done", "passed": all(r.passed for r in results),
                                       "adapter_digest": digest, "failing": [r.name for r in results if not r.passed],
                                       "key_id": ring.signing_key_id})
    return 0
