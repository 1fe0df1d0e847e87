"""The local executor: run one `finetune-trainer` command as a subprocess, the way a Job would.

Only this part differs from the operator: a subprocess instead of a Job, a log file
instead of pod logs, a SIGTERM from Ctrl-C instead of a pod deletion.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

#: How often the progress callback runs while a command is running (seconds).
POLL_SECONDS = 0.5


@dataclass
class CommandResult:
    exit_code: int
    log_path: Path
    interrupted: bool = False

    def error_message(self) -> str:
        """The last error the command logged (its JSON log lines name the file, field or line)."""
        return last_error(self.log_path) or f"exited with code {self.exit_code} (log: {self.log_path})"


def last_error(log_path: Path) -> Optional[str]:
    try:
        lines = log_path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return None
    plain: Optional[str] = None
    for line in reversed(lines):
        line = line.strip()
        if not line:
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            # A crash prints a traceback; its last line says what happened.
            plain = plain or line
            continue
        if isinstance(entry, dict) and entry.get("level") in ("error", "critical"):
            return str(entry.get("msg"))
    return plain


def trainer_command(command: str, config_path: Path) -> list[str]:
    """The container command of the operator's Jobs, run with this interpreter."""
    return [sys.executable, "-m", "finetune_trainer.cli", command, "--config", str(config_path)]


def run_command(
    command: str,
    config_path: Path,
    log_path: Path,
    on_poll: Optional[Callable[[], None]] = None,
    on_interrupt: Optional[Callable[[], None]] = None,
    env: Optional[dict[str, str]] = None,
) -> CommandResult:
    """Run `finetune-trainer <command>`; Ctrl-C sends SIGTERM (the trainer checkpoints) and waits.

    The child gets its own session so the terminal's SIGINT reaches only ftctl, which then
    stops the child the same way Kubernetes stops a pod.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(trainer_command(command, config_path), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, env={**os.environ, **(env or {})})
        interrupted = False
        while True:
            try:
                while proc.poll() is None:
                    if on_poll:
                        on_poll()
                    time.sleep(POLL_SECONDS)
                break
            except KeyboardInterrupt:
                if interrupted:  # a second Ctrl-C: stop waiting for the checkpoint
                    proc.kill()
                    proc.wait()
                    break
                interrupted = True
                proc.send_signal(signal.SIGTERM)
                if on_interrupt:
                    on_interrupt()
        if on_poll:
            on_poll()
    return CommandResult(proc.returncode, log_path, interrupted)
