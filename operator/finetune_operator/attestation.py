"""Signed governance reports: in-toto Statements in DSSE envelopes, signed with Ed25519.

The governance Job (run by the operator, in the operator's namespace, with the platform's
image) signs its report with the platform key; the operator verifies the signature with the
keys it trusts before it reads a single check. A report written by anyone else (a user's own
image, whoever can write the bucket) has no valid signature, and one copied from another run
is bound to another adapter, policy, run or job (see governance.read_report).

Shared by both images (no torch): the operator verifies, the governance command signs.
Crypto is securesystemslib's DSSE (pre-authentication encoding, signature over it) on top of
`cryptography`'s Ed25519; the Statement is checked with in-toto-attestation's own validator.

Keys are PEM files, the same layout in a folder (the governance pod's Secret volume, a local
run) and in a Secret's data:
- `signing.key`: the current private key (PKCS#8 PEM); its public key is trusted too;
- `trusted.pem`: zero or more public keys (SubjectPublicKeyInfo PEM, concatenated) that still
  verify: the keys of earlier rotations, so reports signed before a rotation stay valid.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://finetune.dev/attestations/governance/v1"

SIGNING_KEY = "signing.key"
TRUSTED_KEYS = "trusted.pem"

#: A report is a few KB; anything far larger is not ours and is not parsed.
MAX_ENVELOPE_BYTES = 4 * 1024 * 1024

_PEM_PUBLIC = re.compile(rb"-----BEGIN PUBLIC KEY-----.+?-----END PUBLIC KEY-----", re.S)


class AttestationError(ValueError):
    """The envelope or its statement cannot be trusted; the message says why (one line)."""


def key_id(public_key: Ed25519PublicKey) -> str:
    """sha256 of the raw public key: the same id on every side, printable in docs and Events."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def _ssl_key(public_key: Ed25519PublicKey):
    from securesystemslib.signer import SSlibKey

    return SSlibKey.from_crypto(public_key, keyid=key_id(public_key))


@dataclass
class Keyring:
    """The private key that signs (None on the verifying side) and every public key that verifies."""

    signing: Optional[Ed25519PrivateKey] = None
    trusted: dict[str, Ed25519PublicKey] = field(default_factory=dict)

    @property
    def signing_key_id(self) -> Optional[str]:
        return key_id(self.signing.public_key()) if self.signing else None

    @classmethod
    def from_files(cls, files: Mapping[str, bytes]) -> "Keyring":
        """From `signing.key` / `trusted.pem` contents (a Secret's decoded data, a folder's files)."""
        ring = cls()
        pem = files.get(SIGNING_KEY)
        if pem:
            try:
                key = serialization.load_pem_private_key(pem, password=None)
            except (ValueError, TypeError) as exc:
                raise AttestationError(f"{SIGNING_KEY}: not a PEM private key ({exc})") from None
            if not isinstance(key, Ed25519PrivateKey):
                raise AttestationError(f"{SIGNING_KEY}: not an Ed25519 key")
            ring.signing = key
            ring.trusted[key_id(key.public_key())] = key.public_key()
        for block in _PEM_PUBLIC.findall(files.get(TRUSTED_KEYS) or b""):
            try:
                public = serialization.load_pem_public_key(block)
            except ValueError as exc:
                raise AttestationError(f"{TRUSTED_KEYS}: a key is not valid PEM ({exc})") from None
            if isinstance(public, Ed25519PublicKey):
                ring.trusted[key_id(public)] = public
        return ring

    @classmethod
    def from_folder(cls, folder: Path) -> "Keyring":
        files = {name: (folder / name).read_bytes() for name in (SIGNING_KEY, TRUSTED_KEYS)
                 if (folder / name).is_file()}
        return cls.from_files(files)

    @classmethod
    def from_secret_data(cls, data: Mapping[str, str]) -> "Keyring":
        """From a Secret's `data` (base64 values)."""
        try:
            files = {k: base64.b64decode(v, validate=True) for k, v in (data or {}).items()}
        except (binascii.Error, ValueError):
            raise AttestationError("signing Secret: a value is not base64") from None
        return cls.from_files(files)


def generate_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def private_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def public_pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def rotated_files(files: Mapping[str, bytes], new_key: Optional[Ed25519PrivateKey] = None) -> dict[str, bytes]:
    """The key files after a rotation: a new signing key; the old one's public key joins trusted.pem."""
    old = Keyring.from_files(files)
    new_key = new_key or generate_key()
    trusted = [public_pem(k) for kid, k in sorted(old.trusted.items())]
    return {SIGNING_KEY: private_pem(new_key), TRUSTED_KEYS: b"".join(trusted)}


# --- statements and envelopes ------------------------------------------------------------------

def statement(adapter_uri: str, adapter_digest: str, predicate: dict) -> dict:
    """The in-toto Statement: the adapter (by its manifest digest) is the subject.

    in-toto-attestation validates the shape; the dict is built here because its protobuf Struct
    would turn every integer of the predicate into a float."""
    from in_toto_attestation.v1.resource_descriptor import ResourceDescriptor
    from in_toto_attestation.v1.statement import Statement

    algorithm, _, hexdigest = adapter_digest.partition(":")
    subject = {"name": adapter_uri, "digest": {algorithm: hexdigest}}
    Statement([ResourceDescriptor(**subject).pb], PREDICATE_TYPE, predicate).validate()
    return {"_type": STATEMENT_TYPE, "subject": [subject], "predicateType": PREDICATE_TYPE, "predicate": predicate}


def sign(stmt: dict, ring: Keyring) -> dict:
    """A DSSE envelope around the canonical JSON of `stmt`, signed with the ring's signing key."""
    from securesystemslib.dsse import Envelope
    from securesystemslib.signer import CryptoSigner

    if ring.signing is None:
        raise AttestationError("no signing key")
    payload = json.dumps(stmt, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()
    envelope = Envelope(payload=payload, payload_type=PAYLOAD_TYPE, signatures={})
    envelope.sign(CryptoSigner(ring.signing, _ssl_key(ring.signing.public_key())))
    return envelope.to_dict()


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise AttestationError(f"statement has the key {key!r} twice")
        seen[key] = value
    return seen


def verify(envelope: Any, ring: Keyring) -> tuple[dict, str]:
    """(the statement, the id of the key that signed it), or AttestationError saying why not.

    Nothing of the payload is read before a trusted key has verified the signature over it.
    """
    from securesystemslib.dsse import Envelope
    from securesystemslib.exceptions import VerificationError

    if not isinstance(envelope, dict) or "payload" not in envelope or "payloadType" not in envelope:
        raise AttestationError("not a signed report (no DSSE envelope: unsigned or written by something "
                               "other than the governance Job)")
    if not envelope.get("signatures"):
        raise AttestationError("the report carries no signature")
    if envelope.get("payloadType") != PAYLOAD_TYPE:
        raise AttestationError(f"payloadType {str(envelope.get('payloadType'))[:80]!r} is not {PAYLOAD_TYPE}")
    if not ring.trusted:
        raise AttestationError("no trusted signing keys are configured")
    try:
        parsed = Envelope.from_dict(json.loads(json.dumps(envelope)))  # from_dict consumes its argument
    except Exception as exc:  # noqa: BLE001 - any malformed envelope is untrusted, never a crash
        raise AttestationError(f"malformed DSSE envelope ({type(exc).__name__})") from None
    if len(parsed.payload) > MAX_ENVELOPE_BYTES:
        raise AttestationError("payload too large to be a governance report")
    keys = [_ssl_key(k) for k in ring.trusted.values()]
    signed_by = sorted({s.keyid for s in parsed.signatures.values()})
    try:
        accepted = parsed.verify(keys, 1)
    except VerificationError:
        known = [k for k in signed_by if k in ring.trusted]
        why = ("the signature does not match the content (edited after signing)" if known else
               f"signed by an untrusted key ({', '.join(k[:16] for k in signed_by)[:120]})")
        raise AttestationError(why) from None
    except ValueError as exc:
        raise AttestationError(f"cannot verify: {exc}") from None
    try:
        stmt = json.loads(parsed.payload, object_pairs_hook=_no_duplicates)
    except AttestationError:
        raise
    except ValueError as exc:
        raise AttestationError(f"signed payload is not JSON ({exc})") from None
    if not isinstance(stmt, dict) or stmt.get("_type") != STATEMENT_TYPE:
        raise AttestationError(f"signed payload is not an in-toto {STATEMENT_TYPE} statement")
    if stmt.get("predicateType") != PREDICATE_TYPE:
        raise AttestationError(f"predicateType {str(stmt.get('predicateType'))[:80]!r} is not {PREDICATE_TYPE}")
    if not isinstance(stmt.get("predicate"), dict) or not isinstance(stmt.get("subject"), list):
        raise AttestationError("statement without a predicate or subject")
    return stmt, next(iter(accepted))


def subject_digests(stmt: dict) -> list[str]:
    """Every subject digest as "algorithm:hex"."""
    out = []
    for subject in stmt.get("subject") or []:
        for algorithm, value in ((subject or {}).get("digest") or {}).items() if isinstance(subject, dict) else ():
            out.append(f"{algorithm}:{value}")
    return out


def unverified_predicate(envelope: Any) -> Optional[dict]:
    """The predicate WITHOUT checking the signature: for display (ftctl, people), never for decisions."""
    try:
        stmt = json.loads(base64.b64decode(envelope["payload"]))
        return stmt["predicate"] if isinstance(stmt.get("predicate"), dict) else None
    except Exception:  # noqa: BLE001
        return None
