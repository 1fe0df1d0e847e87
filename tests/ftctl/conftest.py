"""Fixtures of the ftctl tests: a working folder with the quickstart, the CLI, the API emulator.

`k8s` is the operator tests' emulated API server (tests/operator/kube_emulator.py: kmock's
KubernetesEmulator over HTTP with our CRDs registered) plus a kubeconfig pointing at it, so
the `kubernetes` client in ftctl talks to it over real connections.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "examples" / "quickstart"


def ftctl(*args: str, cwd: Path, env: Optional[dict] = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the real `ftctl` command line in a subprocess."""
    return subprocess.run([sys.executable, "-m", "finetune_operator.ftctl.main", *args], cwd=cwd, text=True,
                          capture_output=True, timeout=timeout, env={**os.environ, **(env or {})})


@pytest.fixture(scope="session")
def tiny_workdir(tmp_path_factory, tiny_model_dir) -> Path:
    """A working folder holding a copy of examples/quickstart and the cached `--tiny` model
    (the session's tiny model, so the runs of this session build it once)."""
    from finetune_operator.ftctl import models

    work = tmp_path_factory.mktemp("ftctl-work")
    shutil.copytree(QUICKSTART, work / "examples" / "quickstart")
    cached = work / ".finetune" / "models" / models.tiny_model_name()
    cached.parent.mkdir(parents=True)
    shutil.copytree(tiny_model_dir, cached)
    return work


def write_manifests(path: Path, *docs: dict) -> Path:
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False), encoding="utf-8")
    return path


# --- the Kubernetes API emulator ---------------------------------------------------------------
# The operator tests' emulator (tests/operator/kube_emulator.py): one emulator for the project.
sys.path.insert(0, str(REPO / "tests" / "operator"))
sys.path.insert(0, str(REPO / "tests"))
from kube_emulator import Cluster  # noqa: E402

#: The namespace of the kubeconfig context ftctl uses in these tests (not "default", on purpose).
NS = "team-a"


@dataclass
class Emulator:
    cluster: Cluster
    kubeconfig: Path

    @property
    def kmock(self):
        return self.cluster.emulator

    @property
    def url(self) -> str:
        return self.cluster.url

    def requests(self) -> list:
        """Every request the API server received (kmock's history, as Cluster.write_requests reads it)."""
        return list(self.cluster.emulator._requests)


def write_kubeconfig(path: Path, url: str, user: str = "alice", namespace: str = NS) -> Path:
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "emulator",
        "clusters": [{"name": "emulator", "cluster": {"server": url}}],
        "users": [{"name": user, "user": {"token": "not-a-secret"}}],
        "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": user, "namespace": namespace}}],
    }))
    return path


@pytest.fixture()
def k8s(tmp_path):
    """The emulated API server (kmock's KubernetesEmulator over HTTP, our CRDs registered) and a
    kubeconfig for it whose context names user `alice` and namespace `team-a`."""
    cluster = Cluster()
    try:
        yield Emulator(cluster, write_kubeconfig(tmp_path / "kubeconfig", cluster.url))
    finally:
        cluster.close()
