"""`finetune-trainer federation-server --config F`: start the federation's run and host its ServerApp.

1. write a Flower App Bundle that names our two components (finetune_trainer.federated.apps) and the
   ServerConfig (run config `server-config`): no code travels, the image has it;
2. start Flower's SuperExec against the SuperLink's runtime API: the SuperLink runs with
   `--isolation process`, so the ServerApp (`flwr-serverapp`) runs here, in this pod, with this pod's
   output credentials, and nowhere else;
3. submit the run with Flower's CLI (`flwr run`, over the SuperLink's Control API);
4. wait until the ServerApp's progress record says Succeeded or Failed (or the run ends without one).

Exit codes: 0 the adapter is written; 3 the federation failed for a reason a retry would not change
(FederationProgress.message says which); 4 the SuperLink was unreachable or the run vanished.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Optional

from .. import storage
from ..errors import EXIT_CONFIG_ERROR, EXIT_OK, EXIT_TRANSIENT_ERROR, ConfigError, TransientError
from ..logs import get_logger
from .config import FederationProgress, ServerConfig
from .processes import executable, flower_env, load

log = get_logger("federation.server")
CONNECTION = "federation"
APP_ID = "finetune-federation"


def write_app(folder: Path, config_path: str, audit_dir: Optional[str]) -> Path:
    """The App Bundle's folder: a pyproject.toml naming the components, and the run's configuration."""
    app = folder / "app"
    app.mkdir(parents=True, exist_ok=True)
    from .. import __version__

    version = __version__.split("+")[0]
    (app / "pyproject.toml").write_text(f'''[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "{APP_ID}"
version = "{version}"
description = "Federated fine-tuning of a LoRA adapter (finetune-operator)"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "finetune-dev"

[tool.flwr.app.components]
serverapp = "finetune_trainer.federated.apps:server_app"
clientapp = "finetune_trainer.federated.apps:client_app"

[tool.flwr.app.config]
server-config = {json.dumps(config_path)}
audit-dir = {json.dumps(audit_dir or "")}
''')
    return app


def write_connection(home: Path, cfg: ServerConfig) -> None:
    """Flower's CLI configuration ($FLWR_HOME/config.toml): one connection, to this federation's SuperLink."""
    home.mkdir(parents=True, exist_ok=True)
    tls = (f"root-certificates = {json.dumps(cfg.tls.caFile)}\n" if cfg.tls else "insecure = true\n")
    (home / "config.toml").write_text(f'[superlink]\ndefault = "{CONNECTION}"\n\n'
                                      f'[superlink.{CONNECTION}]\naddress = {json.dumps(cfg.superlink)}\n{tls}')


def _flwr(args: list[str], env: dict, timeout: float = 120) -> dict:
    proc = subprocess.run([executable("flwr"), *args, "--format", "json"], env=env, capture_output=True,
                          text=True, timeout=timeout)
    text = proc.stdout.strip()
    try:
        return json.loads(text[text.index("{"):]) if "{" in text else {}
    except ValueError:
        return {"success": False, "error-message": text[-500:] or proc.stderr[-500:]}


def submit(app: Path, env: dict, attempts: int = 30, wait: float = 2.0) -> int:
    """`flwr run` until the SuperLink answers (it may still be starting): the run's id."""
    last = ""
    for _ in range(attempts):
        out = _flwr(["run", str(app), CONNECTION], env)
        if out.get("success") and out.get("run-id"):
            return int(out["run-id"])
        last = str(out.get("error-message") or out)[:500]
        if "Invalid Flower App configuration" in last:
            raise ConfigError(f"the federation's app bundle was refused: {last}")
        time.sleep(wait)
    raise TransientError(f"could not start the run on the SuperLink: {last}")


def run_status(run_id: int, env: dict) -> str:
    out = _flwr(["ls", CONNECTION, "--run-id", str(run_id)], env, timeout=60)
    runs = out.get("runs") or []
    return str(runs[0].get("status", "")) if runs else ""


def read_progress(uri: str) -> Optional[FederationProgress]:
    try:
        return FederationProgress.model_validate_json(storage.read_text(uri))
    except (FileNotFoundError, ValueError):
        return None


def run(config_path: str) -> int:
    cfg = load(config_path, ServerConfig)
    work = Path(tempfile.mkdtemp(prefix="federation-server-"))
    env = flower_env({"FLWR_HOME": str(work / "flwr-home")})
    local_config = config_path if "://" not in config_path else str(work / "server.json")
    if local_config != config_path:
        Path(local_config).write_text(cfg.model_dump_json())
    app = write_app(work, str(Path(local_config).resolve()), os.environ.get("FINETUNE_FEDERATION_AUDIT_DIR"))
    write_connection(work / "flwr-home", cfg)
    previous = read_progress(cfg.progressURI)
    mine = previous is not None and previous.jobUID == cfg.job.uid
    if mine and previous.state == "Succeeded":  # restarted after the adapter was written: nothing to do
        shutil.rmtree(work, ignore_errors=True)
        return EXIT_OK
    if not mine or previous.state == "Failed":
        # A record of this federation's earlier server (Starting/Training) stays: the ServerApp resumes
        # after its last round (server_app.Federation.resume).
        storage.write_text(cfg.progressURI, FederationProgress(totalRounds=cfg.rounds, message="starting",
                                                               jobUID=cfg.job.uid).model_dump_json())
    superexec_argv = [executable("flower-superexec"), "--runtime-api-address", cfg.superlink]
    superexec_argv += ["--root-certificates", cfg.tls.caFile] if cfg.tls else ["--insecure"]
    superexec = subprocess.Popen(superexec_argv, env=env)
    logs = None
    try:
        run_id = submit(app, env)
        log.info("run started", extra={"event": "run_started", "run_id": run_id, "superlink": cfg.superlink})
        # The ServerApp's own log lines reach the SuperLink's log store, not this process: stream them
        # here, into this pod's log.
        logs = subprocess.Popen([executable("flwr"), "log", str(run_id), CONNECTION, "--stream"], env=env,
                                stdin=subprocess.DEVNULL)
        return _wait(cfg, run_id, env, superexec)
    finally:
        if logs is not None and logs.poll() is None:
            time.sleep(1.5)  # the last lines
            logs.terminate()
        from .localrun import descendants

        leftovers = descendants(superexec.pid) if superexec.poll() is None else []
        if superexec.poll() is None:
            superexec.terminate()
            try:
                superexec.wait(timeout=20)
            except subprocess.TimeoutExpired:
                superexec.kill()
        _stop_leftovers(leftovers)
        shutil.rmtree(work, ignore_errors=True)


def finish(run_id: int, env: dict, timeout: float = 150.0) -> None:
    """After the adapter is written the ServerApp still tells every site it is over (up to 30 s to find
    them and 60 s for their answers): let it, so the sites stop, before this pod ends."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not run_status(run_id, env).startswith("finished"):
        time.sleep(1.0)


def _stop_leftovers(started: list[int]) -> None:
    """Flower's ServerApp runs in a session of its own under the SuperExec: outside a pod, where the
    container's end takes everything, it would outlive this command."""
    import os
    import signal

    for pid in started:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _wait(cfg: ServerConfig, run_id: int, env: dict, superexec: subprocess.Popen) -> int:
    checked = 0.0
    while True:
        progress = read_progress(cfg.progressURI)
        if progress is not None and progress.state == "Succeeded":
            log.info("federation done", extra={"event": "done", "adapter": progress.adapter.digest
                                               if progress.adapter else None})
            finish(run_id, env)
            return EXIT_OK
        if progress is not None and progress.state == "Failed":
            raise ConfigError(f"the federation failed: {progress.message}")
        if superexec.poll() is not None:
            raise TransientError(f"flower-superexec exited with {superexec.returncode}")
        if time.monotonic() - checked > 15:  # a ServerApp that died before writing its record
            checked = time.monotonic()
            status = run_status(run_id, env)
            if status.startswith("finished"):
                time.sleep(2)  # its last progress write may be a moment behind the run's end
                progress = read_progress(cfg.progressURI)
                if progress is not None and progress.state == "Succeeded":
                    return EXIT_OK
                raise ConfigError(f"the run ended ({status}) without a finished federation: "
                                  f"{progress.message if progress else 'no progress record'}")
        time.sleep(1.0)


__all__ = ["run", "EXIT_CONFIG_ERROR", "EXIT_TRANSIENT_ERROR"]
