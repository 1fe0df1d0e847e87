"""The operator end to end on the real control plane: a harness for tests/realcluster/test_operator_*.py.

The operator runs as a SUBPROCESS (`finetune-operator run --standalone` from the venv), logged in
with the real API server's kubeconfig and configured through FINETUNE_* variables as the Helm chart
configures it, so a test can SIGKILL it and start another. Pods are run by fakenode as local
processes (the venv is their "image"): `finetune-trainer validate | train | governance`, with
AWS_ENDPOINT_URL pointing at moto on 127.0.0.1 (pods share the host network) and the S3
credentials from a Secret in the test namespace (secretKeyRef; the operator never sees them).

Each operator only watches namespaces named `ftop-<its run id>-*` (a Kopf glob): other tests on
the shared control plane (and other operators, e.g. another session's run of these tests) create
FineTuneJobs of their own, and two operators acting on one object would fight over it.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Iterator, Optional

from realcluster.realk8s import REPO, RealCluster, wait_for

API = "finetune.dev/v1alpha1"
SECRET = "s3-creds"
NS_PREFIX = "ftop"


def run_prefix() -> str:
    """A namespace prefix of one's own: `ftop-<6 hex>`."""
    return f"{NS_PREFIX}-{uuid.uuid4().hex[:6]}"
#: Seconds each optimizer step sleeps in the trainer pods (the trainer's fault-injection knob), so
#: a run of N steps lasts long enough to kill, delete or suspend it mid-way, whatever the host.
STEP_SLEEP = 0.25
BIN = Path(sys.prefix) / "bin"


class Operator:
    """One `finetune-operator run --standalone` process; its log goes to a file (read by tests)."""

    def __init__(self, env: dict[str, str], log_dir: Path):
        self.env = env
        self.log_dir = log_dir
        self.proc: Optional[subprocess.Popen] = None
        self.starts = 0

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"operator-{self.starts}.log"

    def start(self) -> "Operator":
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.starts += 1
        out = open(self.log_path, "wb")
        self.proc = subprocess.Popen([str(BIN / "finetune-operator"), "run", "--standalone"], env=self.env,
                                     stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        out.close()
        return self

    def kill(self) -> None:
        """SIGKILL: no cleanup handler runs, nothing is flushed (a crash, an OOM kill, a node loss)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # Kopf's graceful shutdown
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def logs(self) -> str:
        return "".join(p.read_text(errors="replace") for p in sorted(self.log_dir.glob("operator-*.log")))


def operator_env(kubeconfig: str, s3_endpoint: str, bucket: str, prefix: str, **extra: str) -> dict[str, str]:
    job_env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
               "TOKENIZERS_PARALLELISM": "false", "FINETUNE_DEBUG_STEP_SLEEP": str(STEP_SLEEP)}
    env = {k: v for k, v in os.environ.items() if not k.startswith("FINETUNE_")}
    env.update({
        "KUBECONFIG": kubeconfig,
        "FINETUNE_NAMESPACES": f"{prefix}-*",
        # Its own namespace (inside the glob, so Kopf watches it): governance Jobs and the signing key.
        "FINETUNE_NAMESPACE": operator_namespace(prefix),
        "FINETUNE_STANDALONE": "true",
        "FINETUNE_ARTIFACT_STORE": f"s3://{bucket}/store",
        "FINETUNE_S3_ENDPOINT": s3_endpoint,
        "FINETUNE_S3_CREDENTIALS_SECRET": SECRET,
        "FINETUNE_TRAINER_IMAGE": "ghcr.io/finetune-operator/trainer:realcluster",
        "FINETUNE_DEFAULT_GOVERNANCE": json.dumps({"required": []}),
        "FINETUNE_JOB_ENV": json.dumps(job_env),
        "FINETUNE_PROGRESS_INTERVAL": "1",
        "FINETUNE_METRICS_PORT": "0",
        "FINETUNE_HEALTH_PORT": "0",
        "FINETUNE_VALIDATION_MEMORY": "1Gi",
        "OMP_NUM_THREADS": "1",
    })
    env.update(extra)
    return env


def operator_namespace(prefix: str) -> str:
    return f"{prefix}-system"


class Stack:
    """What a module's tests share: the cluster, a bucket with the tiny model, one operator."""

    def __init__(self, cluster: RealCluster, bucket: str, model_uri: str, op: Operator, prefix: str):
        self.cluster, self.bucket, self.model_uri, self.op, self.prefix = cluster, bucket, model_uri, op, prefix
        self.operator_namespace = operator_namespace(prefix)


@contextlib.contextmanager
def operator_stack(cluster: RealCluster, s3_endpoint: str, model_dir: Path, log_dir: Path,
                   **extra_env: str) -> Iterator[Stack]:
    from finetune_trainer import storage
    from trainer.helpers import upload_folder

    bucket = f"t-{uuid.uuid4().hex[:12]}"
    storage.s3_client().create_bucket(Bucket=bucket)
    model_uri = f"s3://{bucket}/models/tiny"
    upload_folder(model_dir, model_uri)
    prefix = run_prefix()
    system = operator_namespace(prefix)
    cluster.kubectl("create", "namespace", system)
    add_credentials(cluster, system)  # the platform's S3 Secret, for the governance Jobs
    op = Operator(operator_env(cluster.kubeconfig, s3_endpoint, bucket, prefix, **extra_env), log_dir).start()
    try:
        yield Stack(cluster, bucket, model_uri, op, prefix)
    finally:
        op.stop()
        cluster.kubectl("delete", "jobs", "--all", "-n", system, "--wait=false", check=False)
        cluster.delete_namespace(system)


# --- namespaces, objects --------------------------------------------------------------------

def new_namespace(cluster: RealCluster, prefix: str) -> str:
    """A fresh `<prefix>-*` namespace (the operator with that prefix watches it) with the S3 credentials Secret."""
    ns = cluster.create_namespace(prefix)
    add_credentials(cluster, ns)
    return ns


def add_credentials(cluster: RealCluster, namespace: str) -> None:
    cluster.kubectl("create", "secret", "generic", SECRET, "-n", namespace,
                    "--from-literal=AWS_ACCESS_KEY_ID=testing", "--from-literal=AWS_SECRET_ACCESS_KEY=testing")


def delete_namespace(cluster: RealCluster, namespace: str, timeout: int = 60) -> None:
    """Delete a test namespace without leaving it Terminating on the shared control plane: our
    objects first, while the operator still runs to release their finalizers (it deletes the
    checkpoints); whatever still holds a finalizer after `timeout` is released by hand."""
    cluster.kubectl("delete", "finetunejobs,datasets", "--all", "-n", namespace, "--wait=true",
                    f"--timeout={timeout}s", check=False, timeout=timeout + 30)
    for kind in ("finetunejobs", "datasets"):
        for obj in cluster.list(kind, namespace):
            cluster.kubectl("patch", kind, obj["metadata"]["name"], "-n", namespace, "--type=merge",
                            "-p", '{"metadata": {"finalizers": null}}', check=False)
    cluster.delete_namespace(namespace)


def write_raw_dataset(bucket: str, n: int = 40, key: Optional[str] = None) -> str:
    from finetune_trainer import storage
    from trainer.helpers import synthetic_record

    rng = random.Random(1)
    uri = f"s3://{bucket}/{key or 'raw/' + uuid.uuid4().hex[:8] + '.jsonl'}"
    storage.write_text(uri, "\n".join(json.dumps(synthetic_record(rng, "chat")) for _ in range(n)) + "\n")
    return uri


def dataset_manifest(name: str, namespace: str, source: str, min_examples: int = 10) -> dict:
    return {"apiVersion": API, "kind": "Dataset", "metadata": {"name": name, "namespace": namespace},
            "spec": {"source": {"uri": source}, "format": "chat", "evaluation": {"fraction": 0.2},
                     "provenance": {"origin": "tests", "license": "CC0-1.0", "consent": "not-required"},
                     "curation": {"minExamples": min_examples, "maxInvalidLines": 0, "piiPolicy": "reject"}}}


def ready_dataset(cluster: RealCluster, bucket: str, namespace: str, name: str = "ready",
                  timeout: float = 90) -> dict:
    """A Dataset the operator has validated (a validation Job, ~2 s of pod time). On a real API
    server a status cannot be created with the object, and writing it afterwards races the
    operator's own validation: so the Dataset is validated for real."""
    cluster.apply(dataset_manifest(name, namespace, write_raw_dataset(bucket)))
    return wait_for(lambda: (d := cluster.get("dataset", name, namespace)).get("status", {}).get("phase") == "Ready"
                    and d, timeout=timeout, interval=0.5, what=f"Dataset {namespace}/{name} Ready")


def finetunejob_manifest(name: str, namespace: str, dataset: str, model_uri: str, output_uri: str,
                         **spec: Any) -> dict:
    training = {"maxSteps": 6, "batchSize": 4, "maxSeqLength": 96, "learningRate": 0.01, "warmupRatio": 0.0,
                "lrScheduler": "constant", "precision": "fp32", "gradientCheckpointing": False,
                "evalEverySteps": 100, "checkpointEverySteps": 2, "seed": 7}
    training.update(spec.pop("training", {}))
    resources = {"gpusPerNode": 0, "cpu": "1", "memory": "2Gi", **spec.pop("resources", {})}
    return {"apiVersion": API, "kind": "FineTuneJob", "metadata": {"name": name, "namespace": namespace},
            "spec": {"baseModel": {"uri": model_uri}, "datasetRef": {"name": dataset}, "method": "lora",
                     "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "targetModules": ["q_proj", "v_proj"]},
                     "training": training, "resources": resources, "output": {"uri": output_uri}, **spec}}


# --- observations ---------------------------------------------------------------------------

def ftj(cluster: RealCluster, namespace: str, name: str) -> dict:
    return cluster.get("finetunejob", name, namespace, check=False) or {}


def status(cluster: RealCluster, namespace: str, name: str) -> dict:
    return ftj(cluster, namespace, name).get("status") or {}


def wait_phase(cluster: RealCluster, namespace: str, name: str, phases: tuple[str, ...], timeout: float,
               op: Optional[Operator] = None) -> dict:
    """The status once its phase is one of `phases`; on timeout the last status and the operator's
    log tail are in the message."""
    try:
        return wait_for(lambda: (s := status(cluster, namespace, name)).get("phase") in phases and s,
                        timeout=timeout, interval=1, what=f"{namespace}/{name} in {phases}")
    except AssertionError as exc:
        tail = op.logs()[-3000:] if op is not None else ""
        raise AssertionError(f"{exc}\n--- operator log tail ---\n{tail}") from None


def jobs(cluster: RealCluster, namespace: str) -> dict[str, str]:
    """The Jobs in a namespace: name -> uid."""
    return {j["metadata"]["name"]: j["metadata"]["uid"] for j in cluster.list("jobs", namespace)}


def pods(cluster: RealCluster, namespace: str, job: str) -> list[dict]:
    return cluster.list("pods", namespace, selector=f"batch.kubernetes.io/job-name={job}")


def events(cluster: RealCluster, namespace: str, name: str) -> list[dict]:
    out = cluster.kubectl("get", "events", "-n", namespace, "-o", "json",
                          "--field-selector", f"involvedObject.name={name}").stdout
    return json.loads(out)["items"]


def pod_logs(cluster: RealCluster, namespace: str, pod: str, previous: bool = False) -> str:
    args = ["logs", "-n", namespace, pod] + (["--previous"] if previous else [])
    return cluster.kubectl(*args, check=False).stdout


def ftctl(cluster: RealCluster, namespace: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`ftctl -n NS ARGS...` against the real API server (KUBECONFIG from the cluster handle)."""
    return subprocess.run([str(BIN / "ftctl"), "-n", namespace, *args], capture_output=True, text=True,
                          env={**cluster.env, "NO_COLOR": "1", "COLUMNS": "200"}, timeout=timeout)


class Background:
    def __init__(self, proc: subprocess.Popen):
        self.proc = proc

    def finish(self, timeout: float) -> tuple[str, int]:
        """(stdout + stderr, exit code) once it exits within `timeout` seconds."""
        out, err = self.proc.communicate(timeout=timeout)
        return out + err, self.proc.returncode


def ftctl_background(cluster: RealCluster, namespace: str, *args: str) -> Background:
    """`ftctl -n NS ARGS...` started now (e.g. `watch`, which returns when the job is done)."""
    return Background(subprocess.Popen([str(BIN / "ftctl"), "-n", namespace, *args], stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True,
                                       env={**cluster.env, "NO_COLOR": "1", "COLUMNS": "200"}))


def stack_log_count(op: Operator, name: str, text: str) -> int:
    """How many of the operator's JSON log lines about object `name` contain `text`."""
    count = 0
    for line in op.logs().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if (record.get("object") or {}).get("name") == name and text in str(record.get("message")):
            count += 1
    return count


def poll(predicate, timeout: float, what: str, interval: float = 0.5):
    return wait_for(predicate, timeout=timeout, interval=interval, what=what)


def now() -> float:
    return time.monotonic()


__all__ = ["API", "SECRET", "Operator", "Stack", "operator_stack", "operator_env", "new_namespace", "write_raw_dataset", "dataset_manifest",
           "ready_dataset", "finetunejob_manifest", "run_prefix", "delete_namespace", "ftj", "status", "wait_phase", "jobs", "pods", "events",
           "pod_logs", "ftctl", "ftctl_background", "stack_log_count", "poll", "now", "REPO"]
