"""The one error type ftctl shows to users: a single clear line, never a traceback."""

from __future__ import annotations


class FtctlError(Exception):
    """A user-facing failure; `exit_code` is what the process exits with."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


#: Exit codes of ftctl (documented in docs/ftctl.md).
EXIT_FAILED = 1  # the job failed, a dataset is invalid, or a cluster call failed
EXIT_USAGE = 2  # bad arguments or manifests the API server would reject
EXIT_BLOCKED = 3  # training succeeded but promotion is blocked by governance
EXIT_INTERRUPTED = 130  # Ctrl-C: the trainer checkpointed; run again to resume
#: SIGTERM does the same and exits 143: an interruption exits 128 + its signal (executor.py).
EXIT_TERMINATED = 143
