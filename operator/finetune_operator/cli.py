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
    rot = sub.add_parser("rotate-signing-key",
                         help="sign governance reports with a new key; earlier keys keep verifying earlier reports")
    rot.add_argument("--namespace", help="the operator's namespace (default: the configured one)")
    rot.add_argument("--secret", help="the signing Secret (default: the configured one)")
    rot.add_argument("--retire-old", action="store_true",
                     help="trust only the new key: reports signed before stop verifying (after a key leak)")
    return parser


def rotate_signing_key(namespace: str, secret: str, retire_old: bool) -> int:
    """Replace signing.key in the Secret; the old public key moves to trusted.pem (unless retired).
    Governance Jobs that start afterwards sign with the new key; the operator re-reads the Secret
    within a minute and verifies both. Prints key ids, never key material."""
    import base64

    import kubernetes

    from . import attestation

    kubernetes.config.load_config()
    api = kubernetes.client.CoreV1Api()
    current = api.read_namespaced_secret(secret, namespace)
    files = {k: base64.b64decode(v) for k, v in (current.data or {}).items()}
    old = attestation.Keyring.from_files(files)
    new_key = attestation.generate_key()
    rotated = ({attestation.SIGNING_KEY: attestation.private_pem(new_key), attestation.TRUSTED_KEYS: b""}
               if retire_old else attestation.rotated_files(files, new_key))
    body = {"metadata": {"resourceVersion": current.metadata.resource_version},  # no lost update
            "data": {k: base64.b64encode(v).decode() for k, v in rotated.items()}}
    api.patch_namespaced_secret(secret, namespace, body)
    print(f"signing key {attestation.key_id(new_key.public_key())} (was {old.signing_key_id}); "
          f"trusted: {', '.join(sorted(attestation.Keyring.from_files(rotated).trusted))}")
    return 0


def main(argv: Optional[list[str]] = None) -> None:
    ns = build_parser().parse_args(argv)
    if ns.command == "release-finalizers":
        from . import uninstall

        sys.exit(uninstall.main(tuple(ns.namespaces) if ns.namespaces else None, ns.stop_deployment,
                                ns.stop_timeout, ns.delete_all_checkpoints))
    cfg = config_mod.load()
    if ns.command == "rotate-signing-key":
        sys.exit(rotate_signing_key(ns.namespace or cfg.namespace, ns.secret or cfg.signing_secret, ns.retire_old))
    args = kopf_args(cfg, standalone=ns.standalone, verbose=ns.verbose)
    if ns.print_args:
        print(" ".join(args))
        return
    from kopf.cli import main as kopf_main

    sys.exit(kopf_main(args=args, prog_name="finetune-operator"))


if __name__ == "__main__":
    main()
