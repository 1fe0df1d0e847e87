"""A trainer that spans GPUs and nodes: torchrun's settings, the Indexed Job, its headless Service and
the NetworkPolicy that lets its pods talk to each other.

One pod per node, `gpusPerNode` ranks in each (torchrun inside: finetune_trainer.distributed). For
`nodes: M > 1` the trainer Job is an Indexed Job (completions = parallelism = M): pod i is node
rank i (JOB_COMPLETION_INDEX), and every pod finds the rendezvous at pod 0's stable DNS name
`<job>-0.<service>`, which the headless Service (the pods' subdomain) gives it. The gang is one
Job, so Kueue admits (and preempts) it as one Workload with one queue label.

A lost pod ends the gang: the other pods' collectives fail (the peer closed its socket, or the
FINETUNE_DIST_TIMEOUT_SECONDS timeout), their ranks exit non-zero, and the Job controller recreates
the failed indexes, which rendezvous again and resume from the last checkpoint. A deleted or
evicted pod (DisruptionTarget) and a preempted rank (exit 5) do not spend the backoff; the
surviving pods' failures do, so the backoff is per gang restart: backoffLimit x nodes pod failures.
Pure functions, like children.py.
"""

from __future__ import annotations

from typing import Optional

from . import children
from .config import OperatorConfig

#: The annotation the Job controller puts on an Indexed Job's pods, read through the downward API.
COMPLETION_INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
RENDEZVOUS_PORT_NAME = "rendezvous"
#: The trainer's ranks get SIGTERM from torchrun when the pod does; torchrun waits this much less
#: than the grace period before it kills them (they checkpoint in between).
SHUTDOWN_MARGIN_SECONDS = 10


def shape(spec: dict) -> tuple[int, int]:
    """(pods, ranks per pod) of a FineTuneJob spec; a CPU pod (gpusPerNode 0) runs one rank."""
    res = spec.get("resources") or {}
    return int(res.get("nodes", 1) or 1), max(1, int(res.get("gpusPerNode", 1)))


def is_gang(spec: dict) -> bool:
    return shape(spec)[0] > 1


def service_name(job_name: str) -> str:
    """The headless Service (the pods' DNS subdomain) is named like the Job; a Service name must
    start with a letter."""
    return job_name if job_name[:1].isalpha() else f"t{job_name}"[:63].rstrip("-")


def rendezvous_host(job_name: str, namespace: str, config: OperatorConfig) -> str:
    """Pod 0's stable DNS name, or the operator's override (a test cluster whose pods share one
    network namespace, like fakenode's, has no cluster DNS: 127.0.0.1 there)."""
    if config.rendezvous_host:
        return config.rendezvous_host
    return f"{job_name}-0.{service_name(job_name)}.{namespace}.svc"


def port(spec: dict) -> int:
    return int((spec.get("distributed") or {}).get("rendezvousPort", 29500))


def torchrun_env(job_name: str, namespace: str, spec: dict, config: OperatorConfig) -> list[dict]:
    """torchrun's arguments as the PET_* variables it reads (Kubeflow's convention too)."""
    nodes, per_node = shape(spec)
    if nodes * per_node == 1:
        return []
    env = [{"name": "PET_NNODES", "value": str(nodes)}, {"name": "PET_NPROC_PER_NODE", "value": str(per_node)},
           {"name": "TORCH_ELASTIC_SHUTDOWN_TIMEOUT",
            "value": str(max(5, config.termination_grace_seconds - SHUTDOWN_MARGIN_SECONDS))}]
    if nodes > 1:
        env += [
            {"name": "PET_NODE_RANK", "valueFrom": {"fieldRef": {
                "fieldPath": f"metadata.annotations['{COMPLETION_INDEX_ANNOTATION}']"}}},
            {"name": "PET_MASTER_ADDR", "value": rendezvous_host(job_name, namespace, config)},
            {"name": "PET_MASTER_PORT", "value": str(port(spec))},
        ]
    return env


def apply(job: dict, ftj: dict, config: OperatorConfig) -> dict:
    """Make the rendered trainer Job (children.trainer_children) the gang the spec asks for."""
    spec, meta = ftj["spec"], job["metadata"]
    nodes, _ = shape(spec)
    env = torchrun_env(meta["name"], meta["namespace"], spec, config)
    container = job["spec"]["template"]["spec"]["containers"][0]
    container["env"] = [e for e in container["env"] if not e["name"].startswith("PET_")] + env
    if nodes == 1:
        return job
    job["spec"].update(completionMode="Indexed", completions=nodes, parallelism=nodes,
                       backoffLimit=int(spec.get("backoffLimit", 3)) * nodes)
    pod = job["spec"]["template"]["spec"]
    pod["subdomain"] = service_name(meta["name"])
    container.setdefault("ports", []).append(
        {"name": RENDEZVOUS_PORT_NAME, "containerPort": port(spec), "protocol": "TCP"})
    return job


def gang_selector(job: dict) -> dict:
    labels = job["spec"]["template"]["metadata"]["labels"]
    return {k: labels[k] for k in (children.MANAGED_BY, children.JOB_LABEL, children.ATTEMPT_LABEL)}


def service(job: dict, ftj: dict) -> dict:
    """Headless, and publishing not-ready pods: the rendezvous happens before any pod is Ready."""
    meta = job["metadata"]
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": service_name(meta["name"]), "namespace": meta["namespace"],
                         "labels": dict(job["spec"]["template"]["metadata"]["labels"]),
                         "ownerReferences": [children.owner_reference(ftj)]},
            "spec": {"clusterIP": "None", "publishNotReadyAddresses": True, "selector": gang_selector(job),
                     "ports": [{"name": RENDEZVOUS_PORT_NAME, "port": port(ftj["spec"]),
                                "targetPort": port(ftj["spec"]), "protocol": "TCP"}]}}


def network_policy(job: dict, ftj: dict) -> dict:
    """The namespace's Job policy (children.job_network_policy) lets no pod reach another; this one
    adds, for this gang only, traffic between its own pods. On every TCP port: after the rendezvous
    port, gloo and NCCL connect on ephemeral ports (NCCL cannot be pinned to a range)."""
    meta = job["metadata"]
    peers = [{"podSelector": {"matchLabels": gang_selector(job)}}]
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": children.child_name(meta["name"], "gang"), "namespace": meta["namespace"],
                         "labels": {children.MANAGED_BY: children.OPERATOR},
                         "ownerReferences": [children.owner_reference(ftj)]},
            "spec": {"podSelector": {"matchLabels": gang_selector(job)}, "policyTypes": ["Ingress", "Egress"],
                     "ingress": [{"from": peers, "ports": [{"protocol": "TCP"}]}],
                     "egress": [{"to": peers, "ports": [{"protocol": "TCP"}]}]}}


def gang_objects(job: dict, ftj: dict, config: OperatorConfig) -> list[dict]:
    """What a multi-node trainer Job needs beside it (nothing for one pod)."""
    if not is_gang(ftj["spec"]):
        return []
    objects = [service(job, ftj)]
    if config.job_network_policy:
        objects.append(network_policy(job, ftj))
    return objects


def pods_held(job: Optional[dict]) -> int:
    """Pods a trainer Job runs at once (its parallelism; 1 for a plain Job)."""
    return int((job or {}).get("parallelism") or 1)
