"""The glue between a local run and the operator's own decisions.

`finetune_operator.decisions` decides every phase, condition, child Job and promotion
from observations of Jobs and pods. A local run feeds it the same observations, built
from subprocess results instead of the Kubernetes API: this module builds those
Kubernetes-shaped observations and the local objects (uid, namespace, generation).
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Optional

from .. import decisions
from ..config import OperatorConfig

#: Trainer exit codes (finetune_trainer.errors), as the operator's podFailurePolicy reads them.
EXIT_CONFIG_ERROR = 3
EXIT_PREEMPTED = 5
#: Where the operator's Job mounts its ConfigMap; a local run writes the file elsewhere.
CONFIG_MOUNT = "/etc/finetune/"


def operator_config(state_dir: Path) -> OperatorConfig:
    """The operator configuration of a local run: artifacts under .finetune/, progress every second,
    reports signed with a key of this state folder (made on first use)."""
    return OperatorConfig(artifact_store=f"file://{state_dir.resolve()}", progress_interval=1.0, standalone=True,
                          signing_keys_dir=str(local_signing_keys(state_dir)))


def local_signing_keys(state_dir: Path) -> Path:
    """The folder with this state folder's report signing key (0600), created once. Locally the user is
    the platform: the key signs the reports of `ftctl run`, as the platform key does in a cluster."""
    from .. import attestation

    folder = state_dir.resolve() / "signing"
    key = folder / attestation.SIGNING_KEY
    if not key.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{attestation.SIGNING_KEY}.tmp"
        tmp.write_bytes(attestation.private_pem(attestation.generate_key()))
        tmp.chmod(0o600)
        tmp.replace(key)
    return folder


def absolute_uri(uri: str, cwd: Path) -> str:
    """file://relative/path -> file:///cwd/relative/path; s3:// and absolute paths unchanged."""
    if uri.startswith("file://") and not uri.startswith("file:///"):
        return "file://" + str((cwd / uri[len("file://"):]).resolve())
    return uri


def absolute_uris(obj, cwd: Path):
    """Every file:// string of a manifest made absolute, so a subprocess anywhere finds it."""
    if isinstance(obj, dict):
        return {k: absolute_uris(v, cwd) for k, v in obj.items()}
    if isinstance(obj, list):
        return [absolute_uris(v, cwd) for v in obj]
    if isinstance(obj, str) and obj.startswith("file://"):
        return absolute_uri(obj, cwd)
    return obj


def local_object(manifest: dict, cwd: Path) -> dict:
    """The object as the API server would store it: namespace, uid and generation filled in."""
    obj = absolute_uris(json.loads(json.dumps(manifest)), cwd)
    meta = obj.setdefault("metadata", {})
    meta.setdefault("namespace", "default")
    meta.setdefault("generation", 1)
    meta.setdefault("uid", str(uuid.uuid5(uuid.NAMESPACE_URL, f"ftctl:{obj['kind']}:{meta['namespace']}:{meta['name']}")))
    obj.pop("status", None)
    return obj


def job_command(job: dict) -> tuple[str, str]:
    """(subcommand, config file name) of a child Job's `finetune-trainer <cmd> --config /etc/finetune/<file>`."""
    command = job["spec"]["template"]["spec"]["containers"][0]["command"]
    config = command[command.index("--config") + 1]
    if command[0] != "finetune-trainer" or not config.startswith(CONFIG_MOUNT):
        raise ValueError(f"unexpected Job command {command}")
    return command[1], config[len(CONFIG_MOUNT):]


def job_config(config_map: Optional[dict], filename: str, local: bool = True, job: Optional[dict] = None) -> dict:
    """The rendered config in a child ConfigMap (or, for a governance Job, in its pod template's
    annotation). Locally the trainer serves no metrics port: several runs (and tests) share one
    machine, and nothing scrapes it."""
    if config_map is None and job is not None:
        from ..children import CONFIG_ANNOTATION

        config = json.loads(job["spec"]["template"]["metadata"]["annotations"][CONFIG_ANNOTATION])
    else:
        config = json.loads(config_map["data"][filename])
    if local and "metricsPort" in config:
        config["metricsPort"] = 0
    return config


def observed_job(job: dict, exit_code: Optional[int], started: str, finished: Optional[str],
                 message: str = "") -> tuple[dict, list[dict]]:
    """Summaries of a child Job and its pod as the operator would observe them on a cluster.

    exit_code None means still running. A configuration error fails the Job through its
    podFailurePolicy (reason PodFailurePolicy), like the Job controller does.
    """
    name = job["metadata"]["name"]
    status: dict = {"startTime": started}
    if exit_code is None:
        status.update(active=1, ready=1)
        pod_phase, container = "Running", {"running": {"startedAt": started}}
    elif exit_code == 0:
        status.update(succeeded=1, completionTime=finished,
                      conditions=[{"type": "Complete", "status": "True"}])
        pod_phase, container = "Succeeded", {"terminated": {"exitCode": 0, "reason": "Completed"}}
    else:
        reason = "PodFailurePolicy" if exit_code == EXIT_CONFIG_ERROR else "BackoffLimitExceeded"
        status.update(failed=1, conditions=[{"type": "Failed", "status": "True", "reason": reason,
                                             "message": message or f"exit code {exit_code}"}])
        pod_phase, container = "Failed", {"terminated": {"exitCode": exit_code, "reason": "Error"}}
    pod = {"metadata": {"name": f"{name}-local"},
           "status": {"phase": pod_phase, "containerStatuses": [{"name": "main", "state": container}]}}
    return decisions.summarize_job({**job, "status": status}), [decisions.summarize_pod(pod)]


def should_retry(exit_code: int) -> bool:
    """What the Job controller retries: anything but success, a config error (FailJob) or a stop."""
    return exit_code not in (0, EXIT_CONFIG_ERROR, EXIT_PREEMPTED)


def verify_adapter(adapter_uri: str) -> tuple[bool, str]:
    """The trainer's manifest check (files vs manifest.json), as the operator runs it."""
    try:
        from finetune_trainer.adapter import verify
    except ImportError:
        return False, "finetune_trainer.adapter.verify is not available"
    return verify(adapter_uri)


def ignored_policy_settings(job: dict, policies: list[dict], config: OperatorConfig) -> list[str]:
    return decisions.effective_policy(job, policies, config)[1]
