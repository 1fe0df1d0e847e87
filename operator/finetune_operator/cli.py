"""`finetune-operator run`: start the operator (a thin wrapper over `kopf run`).

`finetune-operator release-finalizers` is the chart's pre-delete hook (see uninstall.py).

Peering is on by default (two replicas: one acts, the other waits), the liveness endpoint
is served for the kubelet's probe, and namespaces and ports come from the configuration
(FINETUNE_* variables / FINETUNE_CONFIG), so the Helm chart sets everything in one place.
"""

from __future__ import annotations

import argparse
import random
import sys
from typing import Optional

from . import config as config_mod


def kopf_args(cfg: config_mod.OperatorConfig, standalone: Optional[bool] = None, verbose: bool = False) -> list[str]:
    """The `kopf run` arguments for a configuration (a plain function, so it is testable)."""
    args = ["run", "--module", "finetune_operator.handlers", "--log-format", "json"]
    if cfg.namespaces:
        # Its own namespace too: the governance Jobs run there.
        for ns in dict.fromkeys((*cfg.namespaces, cfg.namespace)):
            args += ["--namespace", ns]
    else:
        args.append("--all-namespaces")
    if standalone if standalone is not None else cfg.standalone:
        args.append("--standalone")
    else:
        # Kopf pauses all peers that share a priority: give this replica its own.
        priority = cfg.peering_priority or random.SystemRandom().randint(1, 1_000_000)
        args += ["--peering", cfg.peering_name, "--priority", str(priority)]
    if cfg.health_port:
        args += ["--liveness", f"http://0.0.0.0:{cfg.health_port}/healthz"]
    if verbose:
        args.append("--verbose")
    return args


def build_parser() -> argparse.ArgumentParser:
    """The command line (a function of its own: the chart's tests parse the arguments it renders)."""
    parser = argparse.ArgumentParser(prog="finetune-operator", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the operator")
    run.add_argument("--standalone", action="store_true", default=None,
                     help="no peering (a single replica; e.g. for local development)")
    run.add_argument("--verbose", action="store_true")
    run.add_argument("--print-args", action="store_true", help="print the kopf arguments and exit")
    rel = sub.add_parser("release-finalizers",
                         help="before the operator is removed: clean up and remove its finalizers from FineTuneJobs")
    rel.add_argument("--namespace", action="append", dest="namespaces", metavar="NS",
                     help="a namespace to release (repeatable); default: the configured namespaces (all if none)")
    rel.add_argument("--stop-deployment", metavar="NAMESPACE/NAME",
                     help="first scale the operator's Deployment to 0 and wait for its pods to go")
    rel.add_argument("--stop-timeout", type=float, default=120.0, metavar="SECONDS")
    rel.add_argument("--delete-all-checkpoints", action="store_true",
                     help="also delete the checkpoints of FineTuneJobs that are not being deleted "
                          "(checkpointsOnDelete: Delete); by default they are kept")
    return parser


def main(argv: Optional[list[str]] = None) -> None:
    ns = build_parser().parse_args(argv)
    if ns.command == "release-finalizers":
        from . import uninstall

        sys.exit(uninstall.main(tuple(ns.namespaces) if ns.namespaces else None, ns.stop_deployment,
                                ns.stop_timeout, ns.delete_all_checkpoints))
    cfg = config_mod.load()
    args = kopf_args(cfg, standalone=ns.standalone, verbose=ns.verbose)
    if ns.print_args:
        print(" ".join(args))
        return
    from kopf.cli import main as kopf_main

    sys.exit(kopf_main(args=args, prog_name="finetune-operator"))


if __name__ == "__main__":
    main()
