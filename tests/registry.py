"""A real OCI registry for tests: Debian's docker-registry (CNCF distribution v2.8) on a free port.

hack/install-registry.sh installs it; without it the tests that need a registry skip and say why.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Iterator

CONFIG = """version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: {root}
  delete:
    enabled: true
http:
  addr: 127.0.0.1:{port}
"""


def binary() -> str | None:
    return shutil.which("docker-registry")


@contextlib.contextmanager
def running_registry(workdir: Path, port: int) -> Iterator[str]:
    """Yields host:port of a fresh registry (plain HTTP, no auth)."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "config.yml"
    config.write_text(CONFIG.format(root=workdir / "data", port=port))
    log = open(workdir / "registry.log", "wb")
    proc = subprocess.Popen([binary(), "serve", str(config)], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"docker-registry did not start: {(workdir / 'registry.log').read_text()[-2000:]}")
            time.sleep(0.2)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
