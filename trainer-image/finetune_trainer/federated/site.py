"""`finetune-trainer federation-site --config F`: one site's SuperNode, until the federation is over.

Flower's SuperNode connects out to the SuperLink (nothing connects in to a site) and starts the
ClientApp (`client_app.py`) for each message, with the site's config named in its node config. When
the server says the federation is done, the ClientApp leaves a marker and this command stops the
SuperNode and exits 0. Killed or restarted mid-round, the site reconnects as a new node; its next
round resumes from its newest checkpoint in scratchURI.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..errors import EXIT_OK, EXIT_TRANSIENT_ERROR
from ..logs import get_logger
from .client_app import DONE_FILE_KEY, SITE_CONFIG_KEY
from .config import SiteConfig
from .processes import flower_env, load

log = get_logger("federation.site")


def supernode_argv(cfg: SiteConfig, site_config: Path, done_file: Path) -> list[str]:
    node_config = f"{SITE_CONFIG_KEY}={json.dumps(str(site_config))} {DONE_FILE_KEY}={json.dumps(str(done_file))}"
    argv = [sys.executable, "-m", "finetune_trainer.federated.supernode", "--superlink", cfg.superlink,
            "--node-config", node_config, "--host", "127.0.0.1", "--port", str(cfg.runtimePort)]
    argv += ["--root-certificates", cfg.tls.caFile] if cfg.tls else ["--insecure"]
    if cfg.authPrivateKeyFile:
        argv += ["--auth-supernode-private-key", cfg.authPrivateKeyFile]
    if cfg.healthPort:
        argv += ["--health-server-address", f"0.0.0.0:{cfg.healthPort}"]
    if cfg.maxWaitSeconds:
        argv += ["--max-wait-time", str(cfg.maxWaitSeconds)]
    return argv


def stop_supernode(proc: subprocess.Popen) -> None:
    """TERM the SuperNode, then KILL what it started in sessions of its own (Flower's SuperExec and its
    ClientApps): outside a pod, where the container's end takes everything, they would outlive it."""
    from .localrun import descendants

    started = descendants(proc.pid)
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
    for pid in started:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run(config_path: str) -> int:
    cfg = load(config_path, SiteConfig)
    work = Path(tempfile.mkdtemp(prefix=f"federation-site-{cfg.site}-"))
    site_config = work / "site.json"  # the ClientApp reads it for every message: a local copy
    site_config.write_text(cfg.model_dump_json())
    done_file = work / "done.json"
    argv = supernode_argv(cfg, site_config, done_file)
    log.info("starting SuperNode", extra={"event": "start", "site": cfg.site, "superlink": cfg.superlink,
                                          "argv": shlex.join(argv)})
    proc = subprocess.Popen(argv, env=flower_env({"FINETUNE_FLOWER_POLL_SECONDS": str(cfg.pollSeconds),
                                                  "FLWR_HOME": str(work / "flwr-home")}))

    def stop(signum, _frame):
        if proc.poll() is None:
            proc.send_signal(signum)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while proc.poll() is None:
            if done_file.exists():
                log.info("federation over", extra={"event": "done", "site": cfg.site,
                                                   **json.loads(done_file.read_text() or "{}")})
                stop_supernode(proc)
                return EXIT_OK
            time.sleep(0.5)
        log.error("SuperNode exited", extra={"event": "exited", "site": cfg.site, "code": proc.returncode})
        return EXIT_TRANSIENT_ERROR if proc.returncode else EXIT_OK
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if proc.poll() is None:
            proc.kill()
        if not os.environ.get("FINETUNE_KEEP_SITE_WORKDIR"):
            import shutil

            shutil.rmtree(work, ignore_errors=True)
