"""The local executor: run one `finetune-trainer` command as a subprocess, the way a Job would.

Only this part differs from the operator: a subprocess instead of a Job, a log file
instead of pod logs, a SIGTERM from Ctrl-C (or from a SIGTERM to ftctl) instead of a pod deletion.

Signals: ftctl handles SIGINT and SIGTERM itself (`signals_handled`). While a child runs, either
one is passed on as SIGTERM to the child, as the kubelet stops a container: the trainer finishes
its step, writes a checkpoint and exits. ftctl waits for it at most the grace period of a pod,
then kills what is left of the child's process group (its own session, so a terminal's Ctrl-C
reaches only ftctl); nothing outlives ftctl. The exit code is 128 + the signal: 130 or 143.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

#: How often the progress callback runs while a command is running (seconds).
POLL_SECONDS = 0.5
#: How long a stopped child may take to checkpoint and exit before it is killed: a pod's default
#: terminationGracePeriodSeconds (the operator's trainer pods keep that default).
GRACE_SECONDS = 30.0


def grace_seconds() -> float:
    """GRACE_SECONDS, or FTCTL_GRACE_SECONDS from the environment (a slow disk may need more)."""
    raw = os.environ.get("FTCTL_GRACE_SECONDS")
    try:
        return max(float(raw), 0.0) if raw else GRACE_SECONDS
    except ValueError:
        return GRACE_SECONDS


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived while ftctl itself was working (no child running): it unwinds
    like Ctrl-C does, and ftctl exits 128 + signum."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class _SignalState:
    """What the handler knows: the first signal (it decides the exit code) and the running child."""

    def __init__(self) -> None:
        self.received: Optional[int] = None
        self.in_child = False  # between the start of a child and its end: signals go to the child
        self.child: Optional[subprocess.Popen] = None
        self.pending: list[int] = []  # signals that came while the child was being started
        self.forwarded = 0  # signals passed on to the current child
        self.killed = ""  # why a stopped child was killed instead of exiting by itself, if it was

    def handle(self, signum: int, frame) -> None:
        if self.received is None:
            self.received = signum
        if not self.in_child:
            raise Interrupted(signum)
        if self.child is None:
            self.pending.append(signum)
        else:
            self.forward()

    def forward(self) -> None:
        """First signal: SIGTERM to the child (it checkpoints). Another one: kill its whole group."""
        assert self.child is not None
        self.forwarded += 1
        if self.forwarded == 1:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.child.pid, signal.SIGTERM)
        else:
            self.killed = "a second signal: the trainer was killed without waiting for its checkpoint"
            kill_group(self.child.pid)


SIGNALS = _SignalState()


def interrupt_exit_code(default: int = 130) -> int:
    """128 + the signal that interrupted ftctl (130 SIGINT, 143 SIGTERM); `default` if none did."""
    return 128 + SIGNALS.received if SIGNALS.received else default


@contextlib.contextmanager
def signals_handled() -> Iterator[None]:
    """Handle SIGINT and SIGTERM while a command runs, then put back what was there.

    Explicitly, because a process started in the background by a shell inherits SIGINT as
    ignored (Python then installs no KeyboardInterrupt for it) and SIGTERM would kill ftctl at
    once, leaving its trainer running on. Outside the main thread nothing can be installed."""
    SIGNALS.received, SIGNALS.killed = None, ""
    try:
        previous = {sig: signal.signal(sig, SIGNALS.handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def kill_group(pgid: int) -> None:
    """SIGKILL to every process of a child's process group (the child, its helpers, their children)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _exited(proc: subprocess.Popen) -> bool:
    """Whether the child exited, without reaping it: while it is an unreaped zombie its pid, and
    so its process group id, cannot be reused, so kill_group afterwards hits only its own group."""
    if not hasattr(os, "waitid"):  # macOS has no waitid: reap (a pid comes back only once pids wrap around)
        return proc.poll() is not None
    try:
        return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:  # already reaped
        return True


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
    """Run `finetune-trainer <command>`; SIGINT or SIGTERM sends it SIGTERM (the trainer checkpoints)
    and waits for it, at most grace_seconds(); a second signal, or the end of the grace period,
    kills it. Whatever happens, no process of the child's group is left when this returns.

    The child gets its own session so the terminal's SIGINT reaches only ftctl, which then
    stops the child the same way Kubernetes stops a pod.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    state = SIGNALS
    with open(log_path, "ab") as log:
        # From here on a signal is not raised in ftctl but passed to the child (queued until it exists).
        state.in_child, state.child, state.pending, state.forwarded = True, None, [], 0
        proc: Optional[subprocess.Popen] = None
        try:
            proc = subprocess.Popen(trainer_command(command, config_path), stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True, env={**os.environ, **(env or {})})
            state.child = proc
            for _ in state.pending:
                state.forward()
            deadline: Optional[float] = None
            while not _exited(proc):
                if state.forwarded and deadline is None:
                    deadline = time.monotonic() + grace_seconds()
                    if on_interrupt:
                        on_interrupt()
                if deadline is not None and time.monotonic() >= deadline:
                    kill_group(proc.pid)  # the grace period is over, as for a pod
                    state.killed = (f"the trainer did not stop within {grace_seconds():g}s of SIGTERM and was "
                                    "killed: a rerun resumes from its last periodic checkpoint, if any")
                    break
                if on_poll:
                    on_poll()
                time.sleep(POLL_SECONDS)
        finally:
            if proc is not None:
                kill_group(proc.pid)  # helpers the child left behind go with it, as in a container
                proc.wait()
            state.in_child, state.child = False, None
        if on_poll:
            on_poll()
    return CommandResult(proc.returncode, log_path, state.forwarded > 0)
