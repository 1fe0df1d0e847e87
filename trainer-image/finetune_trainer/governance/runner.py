"""`finetune-trainer governance --config job.json`: run the required checks, write governance.json.

Exit codes: 0 whenever the checks ran, passed or not (a failed check is a result, written
to the report); 3 for a bad config or a missing adapter; 4 for transient errors (S3
unreachable), so the Job retries. A check that cannot run (an exception inside it) is a
failed check with the reason, never a silent pass.

governance.json (in the adapter folder) holds: adapterDigest, datasetDigest,
baseModelDigest, policy (the effective spec), run (the operator's run number: a policy
change runs the checks again), checks [{name, passed, value, threshold, message,
reportURI}], passed, createdAt, trainerVersion and sha256 = sha256 of the canonical JSON
of everything else (finetune_operator.governance.report_digest). The same report is also
written to governanceInputs.reportURI (governance/run-N.json), which later runs never
overwrite.
"""

from __future__ import annotations

import hashlib
import json
import math
import tempfile
import time
from pathlib import Path

from finetune_operator.api.governance import CheckResult
from finetune_operator.governance import report_digest

from .. import __version__, storage
from ..errors import ConfigError, TransientError
from ..logs import get_logger
from .base import CheckContext, failed
from .bias import BiasCheck
from .evaluation import EvaluationCheck
from .explainability import ExplainabilityCheck
from .pii_memorization import PIICheck
from .provenance import ProvenanceCheck

log = get_logger("governance")

CHECKS = {c.name: c for c in (EvaluationCheck(), BiasCheck(), ProvenanceCheck(), PIICheck(), ExplainabilityCheck())}
REPORT = "governance.json"


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


def build_report(ctx: CheckContext, results: list[CheckResult]) -> dict:
    cfg = ctx.config
    report = {
        "adapterDigest": ctx.adapter_digest,
        "datasetDigest": cfg.data.digest,
        "baseModelDigest": ctx.base_model_digest or cfg.governanceInputs.baseModelDigest or cfg.baseModel.digest,
        "policy": ctx.policy.model_dump(mode="json"),
        "run": ctx.inputs.run,
        "checks": [r.model_dump(mode="json") for r in results],
        "passed": all(r.passed for r in results),
        "createdAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "trainerVersion": __version__,
    }
    report["sha256"] = report_digest(report)
    return report


def run(config_path: str) -> int:
    cfg = load_config(config_path)
    adapter_uri, digest = resolve_adapter(cfg)
    required = list(cfg.governance.required)
    log.info("governance starting", extra={"event": "start", "job": cfg.job.name, "namespace": cfg.job.namespace,
                                           "adapter_digest": digest, "required": required})
    with tempfile.TemporaryDirectory(prefix="governance-") as tmp:
        ctx = CheckContext(config=cfg, policy=cfg.governance, inputs=cfg.governanceInputs,
                           adapter_uri=adapter_uri, adapter_dir=Path(tmp) / "adapter", adapter_digest=digest,
                           workdir=Path(tmp))
        ctx.adapter_dir = storage.download_folder(adapter_uri, ctx.adapter_dir)
        # Provenance first: it computes the base model digest the report records.
        order = sorted(required, key=lambda n: (n != "provenance", list(CHECKS).index(n)))
        by_name = {name: run_check(name, ctx) for name in order}
        results = [by_name[name] for name in required]
        report = build_report(ctx, results)
    text = json.dumps(report, indent=1, sort_keys=True)
    # This run's own report first (what the operator reads; kept when the policy changes and the
    # checks run again), then governance.json, the latest run's copy for people and tools.
    if cfg.governanceInputs.reportURI:
        storage.write_text(cfg.governanceInputs.reportURI, text)
    storage.write_text(storage.join(adapter_uri, REPORT), text)
    log.info("governance done", extra={"event": "done", "passed": report["passed"], "adapter_digest": digest,
                                       "failing": [r.name for r in results if not r.passed],
                                       "report_digest": report["sha256"]})
    return 0
