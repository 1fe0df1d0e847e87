"""Exit codes that mean something to the operator's Job podFailurePolicy.

CONFIG_ERROR is permanent (bad spec, bad data, wrong digest): the Job fails at once.
TRANSIENT_ERROR (S3 unreachable after retries, ...) lets the Job retry.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_CONFIG_ERROR = 3
EXIT_TRANSIENT_ERROR = 4
#: The trainer was asked to stop (SIGTERM / suspend) and wrote a checkpoint first.
EXIT_PREEMPTED = 5


class TrainerError(Exception):
    """Base of errors that map to an exit code; the message names the file, field or line at fault."""

    exit_code = 1


class ConfigError(TrainerError):
    """Permanent: retrying will not help."""

    exit_code = EXIT_CONFIG_ERROR


class DataError(ConfigError):
    """A malformed dataset (message carries line numbers)."""


class TransientError(TrainerError):
    """Temporary: the Job should retry."""

    exit_code = EXIT_TRANSIENT_ERROR
