"""`finetune-trainer federation-keygen --out DIR`: the key pair of a remote site's SuperNode.

    DIR/private-key   OpenSSH private key (mode 0600): `flower-supernode --auth-supernode-private-key`,
                      SiteConfig.authPrivateKeyFile; it never leaves the remote site
    DIR/public-key    OpenSSH public key: the coordinator's credentialsSecret, key `public-key`

ECDSA on P-384. Existing files are never overwritten (a key already handed out would stop working).
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import ConfigError

PRIVATE_KEY_FILE = "private-key"
PUBLIC_KEY_FILE = "public-key"


def keygen(out: str | Path) -> tuple[Path, Path]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    folder = Path(out)
    private, public = folder / PRIVATE_KEY_FILE, folder / PUBLIC_KEY_FILE
    for path in (private, public):
        if path.exists():
            raise ConfigError(f"{path} already exists: refusing to overwrite a key pair")
    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private_bytes = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                      serialization.NoEncryption())
    public_bytes = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    try:
        fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ConfigError(f"{private} already exists: refusing to overwrite a key pair") from None
    with os.fdopen(fd, "wb") as fh:
        fh.write(private_bytes)
    os.chmod(private, 0o600)  # whatever the umask
    with open(public, "xb") as fh:
        fh.write(public_bytes + b" finetune-federation-site\n")
    return private, public
