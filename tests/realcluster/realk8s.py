"""The real control plane of ../shared/k8s (Kubernetes v1.36: etcd, kube-apiserver, controller-manager,
scheduler) and fakenode, its process kubelet: a small handle for tests.

Everything here talks to the real API server, over HTTPS, with kubectl v1.36 or the Python client:
no emulator and no re-implementation of the server's rules. Import as `from realcluster.realk8s
import ...` (tests/ is on sys.path).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Union

import yaml

REPO = Path(__file__).resolve().parent.parent.parent
K8S = REPO.parent / "shared" / "k8s"
CRDS = REPO / "crds"
#: Why the tier cannot run here, or None when it can.
ABSENT_REASON = None if (K8S / "up.sh").exists() else (
    f"real control plane absent: no {K8S} (a clone without ../shared); the realcluster tier is skipped")


def fakenode_args() -> list[str]:
    """fakenode's arguments: the same in every test (fakenode-up.sh refuses different ones while it runs).
    Pods run with this test run's interpreter prefix (the venv) as their "image", and the project's
    source stays visible where fakenode's private /tmp would hide it (CI clones live under /tmp)."""
    return ["--image-map", f"*={sys.prefix}", "--keep-host-path", str(REPO)]


class KubectlError(RuntimeError):
    def __init__(self, args: list[str], proc: subprocess.CompletedProcess):
        self.stderr, self.stdout, self.returncode = proc.stderr, proc.stdout, proc.returncode
        super().__init__(f"kubectl {' '.join(args)} -> {proc.returncode}: {proc.stderr.strip()[:2000]}")


@dataclass
class RealCluster:
    kubeconfig: str

    @property
    def kubectl_bin(self) -> str:
        return str(Path(self.kubeconfig).parent / "bin" / "kubectl")

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "KUBECONFIG": self.kubeconfig}

    def kubectl(self, *args: str, input: Optional[str] = None, check: bool = True,
                timeout: float = 120) -> subprocess.CompletedProcess:
        """Run kubectl v1.36 against the cluster; raises KubectlError on a non-zero exit when check."""
        argv = [self.kubectl_bin, "--request-timeout=30s", *args]
        proc = subprocess.run(argv, input=input, capture_output=True, text=True, env=self.env, timeout=timeout)
        if check and proc.returncode != 0:
            raise KubectlError(list(args), proc)
        return proc

    def apply(self, manifests: Union[dict, Iterable[dict], str, Path], *extra: str,
              check: bool = True) -> subprocess.CompletedProcess:
        """`kubectl apply --server-side` of manifests (dicts), YAML text or a file/folder path."""
        if isinstance(manifests, Path):
            return self.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(manifests), *extra,
                                check=check)
        if isinstance(manifests, dict):
            manifests = [manifests]
        text = manifests if isinstance(manifests, str) else yaml.safe_dump_all(list(manifests), sort_keys=False)
        return self.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-", *extra, input=text,
                            check=check)

    def get(self, kind: str, name: str, namespace: Optional[str] = None, check: bool = True) -> Optional[dict]:
        args = ["get", kind, name, "-o", "json"] + (["-n", namespace] if namespace else [])
        proc = self.kubectl(*args, check=False)
        if proc.returncode != 0:
            if not check and "NotFound" in proc.stderr:
                return None
            raise KubectlError(args, proc)
        return json.loads(proc.stdout)

    def list(self, kind: str, namespace: Optional[str] = None, selector: Optional[str] = None) -> list[dict]:
        args = ["get", kind, "-o", "json"] + (["-n", namespace] if namespace else ["-A"])
        if selector:
            args += ["-l", selector]
        return json.loads(self.kubectl(*args).stdout)["items"]

    def create_namespace(self, prefix: str = "t") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:8]}"
        self.kubectl("create", "namespace", name)
        return name

    def delete_namespace(self, name: str, wait: bool = False) -> None:
        self.kubectl("delete", "namespace", name, f"--wait={'true' if wait else 'false'}",
                     "--ignore-not-found", check=False)

    def python_client(self):
        """A kubernetes.client.ApiClient for this cluster (for calls kubectl makes awkward)."""
        import kubernetes

        return kubernetes.config.new_client_from_config(config_file=self.kubeconfig)


def wait_for(predicate: Callable[[], Any], timeout: float = 60, interval: float = 0.5,
             what: str = "condition") -> Any:
    """Poll until predicate() returns something truthy; that value is returned. On timeout the
    last value (or exception) is in the message, so a failure says what was seen."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
        except Exception as exc:  # noqa: BLE001 - polled again; shown if it never settles
            last = exc
        else:
            if last:
                return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; last seen: {str(last)[:2000]}")


def start_control_plane() -> str:
    """up.sh (idempotent; well under a second when up); returns the kubeconfig path."""
    out = subprocess.run([str(K8S / "up.sh")], check=True, stdout=subprocess.PIPE, text=True).stdout
    return out.strip().splitlines()[-1].split("=", 1)[1]


def start_fakenode() -> None:
    env = dict(os.environ)
    # fakenode needs only `kubernetes` and `yaml`: the test venv has both (no venv of its own to build).
    env.setdefault("FINETUNE_K8S_FAKENODE_PYTHON", sys.executable)
    subprocess.run([str(K8S / "fakenode-up.sh"), *fakenode_args()], check=True, stdout=subprocess.DEVNULL,
                   env=env)


def install_crds(cluster: RealCluster, folder: Path = CRDS) -> list[str]:
    """Apply every CRD in `folder` server-side and wait until each is Established; their names."""
    names = [yaml.safe_load(p.read_text())["metadata"]["name"] for p in sorted(folder.glob("*.yaml"))]
    cluster.apply(folder)
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s",
                    *[f"crd/{n}" for n in names])
    return names
