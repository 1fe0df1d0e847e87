"""Flower's own executables (flower-superlink, flower-supernode, flower-superexec) as child processes.

They are console scripts beside our interpreter. The SuperLink and SuperNode start `flower-superexec`
(and it `flwr-serverapp` / `flwr-clientapp`) by name, so the interpreter's bin folder goes first on
PATH: a pod or a venv that was not activated still finds them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Optional, Type, TypeVar

from pydantic import BaseModel, ValidationError

from .. import storage
from ..errors import ConfigError
from ..logs import get_logger

log = get_logger("federation")
M = TypeVar("M", bound=BaseModel)


def load(config_path: str, model: Type[M]) -> M:
    """The role's config, or a ConfigError naming the file and the field."""
    try:
        text = storage.read_text(config_path) if "://" in config_path else Path(config_path).read_text()
    except FileNotFoundError:
        raise ConfigError(f"{config_path}: config file not found") from None
    try:
        return model.model_validate_json(text)
    except ValidationError as exc:
        raise ConfigError(f"{config_path}: invalid {model.__name__}: {exc}") from None


def bin_dir() -> Path:
    return Path(sys.executable).parent


def flower_env(extra: Optional[dict[str, str]] = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{bin_dir()}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # nothing leaves the cluster unasked
    env.setdefault("FLWR_HOME", str(Path(os.environ.get("TMPDIR", "/tmp")) / "flwr-home"))
    env.update(extra or {})
    return env


def executable(name: str) -> str:
    path = bin_dir() / name
    if not path.exists():
        raise ConfigError(f"{name} not found beside {sys.executable}: is flwr installed (hack/setup-venv.sh)?")
    return str(path)


def run_foreground(argv: list[str], env: Optional[dict[str, str]] = None) -> int:
    """Run a Flower process until it exits; SIGTERM / SIGINT are passed on so it shuts down cleanly."""
    log.info("starting", extra={"event": "start", "argv": json.dumps(argv)})
    proc = subprocess.Popen(argv, env=flower_env(env))

    def forward(signum, _frame):
        if proc.poll() is None:
            proc.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        return proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
