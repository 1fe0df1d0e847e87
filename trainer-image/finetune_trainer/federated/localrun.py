"""A whole federation as local processes on 127.0.0.1 (`ftctl run`, the tests): the same three
commands the pods run, each in its own process group, each with only its own config.

    federation = LocalFederation(workdir, superlink, server, sites)
    federation.start()            # SuperLink, then every site's SuperNode, then the server
    code = federation.wait()      # the server's exit code; the sites exit when it says done
    federation.kill_site("north") # a site's whole process group, as a node dying would
    federation.start_site("north")
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .config import ServerConfig, SiteConfig, SuperLinkConfig


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f}s")


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (from /proc), children first found first."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


@dataclass
class LocalFederation:
    workdir: Path
    superlink: SuperLinkConfig
    server: ServerConfig
    sites: dict[str, SiteConfig]
    env: dict[str, str] = field(default_factory=dict)
    #: Extra environment of one role, by process name (superlink, server, site-<name>).
    role_env: dict[str, dict[str, str]] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    starts: dict[str, int] = field(default_factory=dict)

    def _config(self, name: str, cfg) -> Path:
        path = self.workdir / "configs" / f"{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(cfg.model_dump_json(indent=1))
        return path

    def _start(self, name: str, command: str, cfg) -> subprocess.Popen:
        self.starts[name] = self.starts.get(name, 0) + 1
        log = self.workdir / "logs" / f"{name}.{self.starts[name]}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **self.env, **self.role_env.get(name, {})}
        with open(log, "wb") as out:  # its own session: killing it takes its children with it
            proc = subprocess.Popen([sys.executable, "-m", "finetune_trainer.cli", command,
                                     "--config", str(self._config(name, cfg))],
                                    stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.procs[name] = proc
        return proc

    def log_of(self, name: str) -> str:
        return "".join(p.read_text(errors="replace") for p in sorted((self.workdir / "logs").glob(f"{name}.*.log")))

    def start(self) -> None:
        self._start("superlink", "federation-superlink", self.superlink)
        wait_for_port(self.superlink.port)
        for name in self.sites:
            self.start_site(name)
        self.start_server()

    def start_site(self, name: str) -> subprocess.Popen:
        return self._start(f"site-{name}", "federation-site", self.sites[name])

    def start_server(self) -> subprocess.Popen:
        return self._start("server", "federation-server", self.server)

    def kill_site(self, name: str) -> None:
        self.kill_role(f"site-{name}")

    def kill_role(self, name: str) -> None:
        """SIGKILL a role (superlink, server, site-<name>) and every process under it, as a node dying takes
        its pod: Flower's SuperExec, ServerApp and ClientApps start sessions of their own, so the process
        group alone would leave them running."""
        proc = self.procs.get(name)
        if proc is None or proc.poll() is not None:
            return
        for pid in [proc.pid, *descendants(proc.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(timeout=30)

    def _kill(self, name: str, sig: int) -> None:
        proc = self.procs.get(name)
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass
            proc.wait(timeout=30)

    def wait(self, timeout: Optional[float] = None) -> int:
        """The server's exit code (the sites are then told to stop, and do)."""
        code = self.procs["server"].wait(timeout=timeout)
        for name in [n for n in self.procs if n.startswith("site-")]:
            try:
                self.procs[name].wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        return code

    def stop(self) -> None:
        """Everything still running: TERM, then KILL; then whatever they started in sessions of their own
        (a SuperNode's ClientApps, a server's ServerApp), which a process group does not reach."""
        started = [pid for proc in self.procs.values() if proc.poll() is None for pid in descendants(proc.pid)]
        for name in reversed(list(self.procs)):
            proc = self.procs[name]
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                    proc.wait(timeout=15)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    self._kill(name, signal.SIGKILL)
        for pid in started:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
