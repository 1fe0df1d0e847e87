"""A real terminal for tests: a tmux server of our own running one command in an 80x24 pane."""

from __future__ import annotations

import shlex
import subprocess
import time
from pathlib import Path

from testutil import REPO


class Pane:
    """One tmux server of our own (its own socket) with one 80x24 pane running a command."""

    def __init__(self, tmp: Path, command: str, env: dict, cwd: Path = REPO):
        self.socket = str(tmp / "tmux.sock")
        exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
        # After ftctl exits, the pane stays up a while so its last words can be read.
        shell = f"cd {shlex.quote(str(cwd))} && env {exports} {command}; echo \"[exit $?]\"; sleep 60"
        self.tmux("-f", "/dev/null", "new-session", "-d", "-s", "review", "-x", "80", "-y", "24", shell)

    def tmux(self, *args: str) -> str:
        return subprocess.run(["tmux", "-S", self.socket, *args], check=True, capture_output=True, text=True,
                              timeout=10).stdout

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p", "-t", "review")

    def wait_for(self, text: str, timeout: float = 20) -> str:
        deadline = time.monotonic() + timeout
        while True:
            shown = self.screen()
            if text in shown:
                return shown
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} never appeared; the screen:\n{shown}")
            time.sleep(0.1)

    def keys(self, *keys: str) -> None:
        self.tmux("send-keys", "-t", "review", *keys)

    def close(self) -> None:
        subprocess.run(["tmux", "-S", self.socket, "kill-server"], capture_output=True, timeout=10)
