"""Fixtures of the ftctl tests: a working folder with the quickstart, the CLI, the API emulator.

`k8s` runs kmock's KubernetesEmulator on a real HTTP port (in a background thread with its
own event loop) with our CRDs registered, and writes a kubeconfig pointing at it, so the
`kubernetes` client in ftctl talks to it over real connections.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest
import yaml

from finetune_operator.api import KINDS

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
@dataclass
class Emulator:
    kmock: object
    url: str
    kubeconfig: Path
    loop: asyncio.AbstractEventLoop

    def env(self) -> dict:
        return {"KUBECONFIG": str(self.kubeconfig)}


def _kubeconfig(path: Path, url: str, user: str = "alice") -> Path:
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "emulator",
        "clusters": [{"name": "emulator", "cluster": {"server": url}}],
        "users": [{"name": user, "user": {"token": "not-a-secret"}}],
        "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": user, "namespace": "team-a"}}],
    }))
    return path


@pytest.fixture()
def k8s(tmp_path):
    """kmock's KubernetesEmulator on 127.0.0.1 with the finetune.dev CRDs and the built-in resources."""
    import kmock

    started = threading.Event()
    holder: dict = {}

    async def serve() -> None:
        async with kmock.KubernetesEmulator() as emulator, kmock.Server(emulator) as server:
            emulator.resources.load_bundled()
            for res in KINDS:
                emulator.resources[f"finetune.dev/v1alpha1/{res.PLURAL}"] = kmock.ResourceInfo(
                    namespaced=res.SCOPE == "Namespaced", kind=res.KIND, singular=res.KIND.lower(),
                    shortnames=set(res.SHORT_NAMES), subresources={"status"},
                    verbs={"get", "list", "watch", "create", "update", "patch", "delete"})
            holder.update(emulator=emulator, url=str(server.url).rstrip("/"), stop=asyncio.Event())
            started.set()
            await holder["stop"].wait()

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    assert started.wait(30), "the Kubernetes emulator did not start"
    yield Emulator(holder["emulator"], holder["url"], _kubeconfig(tmp_path / "kubeconfig", holder["url"]), loop)
    loop.call_soon_threadsafe(holder["stop"].set)
    thread.join(10)
