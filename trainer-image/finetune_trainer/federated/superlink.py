"""`finetune-trainer federation-superlink --config F`: Flower's SuperLink in the coordinator namespace.

It only relays messages between the ServerApp and the SuperNodes: it holds no credentials and no data.
The ServerApp runs elsewhere (`--isolation process`: the federation-server pod), so the SuperLink pod
never imports the trainer or sees an adapter it could write anywhere.

With remote participants (`remoteFleet`), Flower's app runs in this process instead, on two ports:
remote_fleet.py.
"""

from __future__ import annotations

from .config import SuperLinkConfig
from .processes import executable, flower_env, load, run_foreground


def superlink_argv(cfg: SuperLinkConfig) -> list[str]:
    argv = [executable("flower-superlink"), "--isolation", "process", "--host", cfg.host, "--port", str(cfg.port),
            # The image carries every dependency: never `uv sync` an app at run time.
            "--disable-runtime-dependency-installation"]
    if cfg.tls is None:
        argv.append("--insecure")
    else:
        argv += ["--ssl-ca-certfile", cfg.tls.caFile, "--ssl-certfile", cfg.tls.certFile or "",
                 "--ssl-keyfile", cfg.tls.keyFile or ""]
    if cfg.healthPort:
        argv += ["--health-server-address", f"{cfg.host}:{cfg.healthPort}"]
    if cfg.databasePath:
        argv += ["--database", cfg.databasePath]
    return argv


def run(config_path: str) -> int:
    cfg = load(config_path, SuperLinkConfig)
    if cfg.remoteFleet is None:
        return run_foreground(superlink_argv(cfg))
    import os

    os.environ.update(flower_env())  # what the subprocess would get: telemetry off, FLWR_HOME
    from .remote_fleet import serve

    return serve(cfg, superlink_argv(cfg))
