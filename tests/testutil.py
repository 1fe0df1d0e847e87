"""Helpers shared by test modules (import as `from testutil import ...`).

Test modules never import `conftest`: with several conftest.py files in the tree, the module
named `conftest` is whichever pytest loaded last.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


# --- signed governance reports (attestation.py) --------------------------------------------------

def make_keyring():
    """A fresh platform keyring (signing + trusted); one per call."""
    from finetune_operator import attestation

    return attestation.Keyring.from_files({attestation.SIGNING_KEY: attestation.private_pem(attestation.generate_key())})


def sign_report(predicate: dict, ring, adapter_uri: str = "s3://out/j/adapters/ab",
                adapter_digest: "str | None" = None) -> dict:
    """A DSSE envelope as the governance command writes it: subject = the adapter digest."""
    from finetune_operator import attestation

    digest = adapter_digest or predicate["adapterDigest"]
    return attestation.sign(attestation.statement(adapter_uri, digest, predicate), ring)
