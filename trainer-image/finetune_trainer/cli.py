"""`finetune-trainer`: the commands the operator's Jobs (and `ftctl run`) execute.

    finetune-trainer validate   --config validation.json   # Dataset validation (no GPU)
    finetune-trainer train      --config job.json          # LoRA / QLoRA / DoRA training
    finetune-trainer governance --config job.json          # governance checks on the adapter
    finetune-trainer sync-adapters --config adapters.json  # beside vLLM: the promoted adapters, verified
    finetune-trainer synthesize --config synthesis.json    # SyntheticDataset: generate and filter candidates
    finetune-trainer synthesis-finalize --config synthesis.json  # reviewed candidates -> reviewed.jsonl
    finetune-trainer federation-superlink --config superlink.json  # Flower's SuperLink (coordinator)
    finetune-trainer federation-server --config server.json        # submits the run, runs the ServerApp
    finetune-trainer federation-site --config site.json            # a SuperNode training on one site's data
    finetune-trainer federation-keygen --out DIR                   # a remote site's SuperNode key pair

Every command maps errors to the exit codes in errors.py and logs JSON lines to stderr.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Optional

from .errors import EXIT_CONFIG_ERROR, TrainerError
from .logs import get_logger

# command -> module with `run(config_path: str) -> int`; imported lazily so `validate`
# never pays for importing torch.
COMMANDS = {
    "validate": "finetune_trainer.validate",
    "train": "finetune_trainer.train",
    "governance": "finetune_trainer.governance.runner",
    "sync-adapters": "finetune_trainer.sync_adapters",
    "synthesize": "finetune_trainer.synthesis.command",
    "synthesis-finalize": "finetune_trainer.review",
    # Federated fine-tuning (docs/federated.md): the three roles of a Flower federation.
    "federation-superlink": "finetune_trainer.federated.superlink",
    "federation-server": "finetune_trainer.federated.server",
    "federation-site": "finetune_trainer.federated.site",
}


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="finetune-trainer", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        p = sub.add_parser(name)
        p.add_argument("--config", required=True, help="Path (or file:// / s3:// URI) of the rendered JSON config")
    keygen = sub.add_parser("federation-keygen", help="A remote site's SuperNode key pair (docs/federated.md)")
    keygen.add_argument("--out", required=True, help="Folder for private-key (0600) and public-key")
    ns = parser.parse_args(argv)
    log = get_logger(ns.command)
    try:
        if ns.command == "federation-keygen":
            from .federated.keygen import keygen as make_keys

            private, public = make_keys(ns.out)
            print(f"private key (keep it at the site): {private}\npublic key (the credentialsSecret's "
                  f"public-key): {public}")
            sys.exit(0)
        ranks = _ranks_to_launch(ns.command)
        if ranks:  # a multi-GPU / multi-node pod: start torchrun's ranks, each runs this command
            from .distributed import launch

            code = launch(ns.command, ns.config, *ranks)
        else:
            module = importlib.import_module(COMMANDS[ns.command])
            code = int(module.run(ns.config) or 0)
    except TrainerError as exc:
        log.error(str(exc), extra={"event": "error", "exit_code": exc.exit_code, "error_type": type(exc).__name__})
        code = exc.exit_code
        termination_message(str(exc))
    except FileNotFoundError as exc:
        log.error(f"not found: {exc}", extra={"event": "error", "exit_code": EXIT_CONFIG_ERROR})
        code = EXIT_CONFIG_ERROR
        termination_message(f"not found: {exc}")
    sys.exit(code)


def _ranks_to_launch(command: str):
    """(nodes, ranks per node) for `train` in a pod the operator gave torchrun settings (PET_*)."""
    if command != "train" or not any(k.startswith("PET_") for k in os.environ):
        return None
    from .distributed import launch_settings

    return launch_settings()


def termination_message(message: str) -> None:
    """The error in the pod's termination message, where the operator reads it from the pod's status:
    it needs no access to pod logs to say which field or line is at fault."""
    path = os.environ.get("FINETUNE_TERMINATION_LOG", "/dev/termination-log")
    try:
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(message[:2048])
    except OSError:
        pass  # not in a pod (a local run): the log line above says it


if __name__ == "__main__":
    main()
