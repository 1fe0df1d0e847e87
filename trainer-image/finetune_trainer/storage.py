"""One small interface over s3:// and file:// locations.

Credentials and the endpoint come from the environment only (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3,
AWS_DEFAULT_REGION) -- never from a config file.

Writes are atomic from a reader's point of view: file:// writes go to a temp file
and are renamed; an S3 PUT is atomic per object. "Complete" multi-file artifacts are
marked by a manifest written last (see the trainer's checkpoint and adapter code).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional
from urllib.parse import urlparse

from .errors import ConfigError, TransientError


@dataclass(frozen=True)
class Location:
    scheme: str  # "s3" or "file"
    bucket: str  # s3 bucket ("" for file)
    key: str  # s3 key prefix, or an absolute/relative filesystem path

    @property
    def uri(self) -> str:
        if self.scheme == "s3":
            return f"s3://{self.bucket}/{self.key}" if self.key else f"s3://{self.bucket}"
        return f"file://{self.key}"

    def join(self, *parts: str) -> "Location":
        key = "/".join(p.strip("/") for p in (self.key, *parts) if p and p.strip("/"))
        if self.scheme == "file" and self.key.startswith("/"):
            key = "/" + key
        return Location(self.scheme, self.bucket, key)


def parse(uri: str) -> Location:
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise ConfigError(f"{uri}: an s3:// URI needs a bucket")
        return Location("s3", parsed.netloc, parsed.path.lstrip("/").rstrip("/"))
    if parsed.scheme == "file":
        path = uri[len("file://"):]
        if not path:
            raise ConfigError(f"{uri}: a file:// URI needs a path")
        return Location("file", "", path.rstrip("/") or "/")
    raise ConfigError(f"{uri}: unsupported URI scheme (use s3:// or file://)")


def join(uri: str, *parts: str) -> str:
    return parse(uri).join(*parts).uri


_S3_CLIENTS: dict[bool, Any] = {}


def s3_client(validate_checksums: bool = True):
    """A boto3 S3 client configured from the environment, with bounded retries.

    validate_checksums=False: a client that does not check S3's own CRC of what it serves, for
    readers that hash the bytes themselves against a digest they trust (iter_chunks' callers):
    that check is the stronger one, and moto (the S3 server of the tests) serves a wrong CRC for
    an object copied from a multipart upload, which boto3 would refuse at the end of the read."""
    if validate_checksums not in _S3_CLIENTS:
        import boto3
        from botocore.config import Config

        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        _S3_CLIENTS[validate_checksums] = boto3.client(
            "s3",
            endpoint_url=endpoint or None,
            region_name=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
            config=Config(
                retries={"max_attempts": int(os.environ.get("FINETUNE_S3_MAX_ATTEMPTS", "5")), "mode": "standard"},
                connect_timeout=float(os.environ.get("FINETUNE_S3_CONNECT_TIMEOUT", "5")),
                read_timeout=60,
                s3={"addressing_style": "path"},
                response_checksum_validation="when_supported" if validate_checksums else "when_required",
            ),
        )
    return _S3_CLIENTS[validate_checksums]


def reset_client() -> None:
    """Forget the cached clients (tests change the environment between runs)."""
    _S3_CLIENTS.clear()


def _s3_call(fn, *args, **kwargs):
    from botocore.exceptions import ClientError, EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError

    try:
        return fn(*args, **kwargs)
    except (EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError) as exc:
        raise TransientError(f"S3 unreachable: {exc}") from exc
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        if code in ("NoSuchKey", "404", "NoSuchBucket"):
            raise FileNotFoundError(str(exc)) from exc
        if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403"):
            raise ConfigError(f"S3 denied access: {code}") from exc
        if code.startswith("5") or code in ("SlowDown", "InternalError", "ServiceUnavailable"):
            raise TransientError(f"S3 error {code}") from exc
        raise


def read_bytes(uri: str) -> bytes:
    loc = parse(uri)
    if loc.scheme == "file":
        return Path(loc.key).read_bytes()
    body = _s3_call(s3_client().get_object, Bucket=loc.bucket, Key=loc.key)["Body"]
    return body.read()


#: Read size of the streaming helpers: memory stays at about one chunk whatever the object's size.
CHUNK_SIZE = 1 << 20


def iter_chunks(uri: str, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
    """The object's bytes as chunks of at most chunk_size, read as they are consumed (nothing is
    buffered beyond one chunk, nothing written to disk). Stop consuming and the read stops: close
    the generator (or let it go) and the S3 connection is closed rather than drained, so a caller
    that has seen enough never pulls the rest of a huge or endless object. FileNotFoundError for a
    missing object, TransientError when S3 drops the stream half-way.

    Meant for callers that hash what they read (sha256_stream) and compare it with a digest they
    trust: S3's own CRC is not checked (see s3_client)."""
    loc = parse(uri)
    if loc.scheme == "file":
        with open(loc.key, "rb") as fh:
            yield from iter(lambda: fh.read(chunk_size), b"")
        return
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from botocore.exceptions import IncompleteReadError, ReadTimeoutError, ResponseStreamingError

    body = _s3_call(s3_client(validate_checksums=False).get_object, Bucket=loc.bucket, Key=loc.key)["Body"]
    try:
        while True:
            try:
                chunk = body.read(chunk_size)
            except (ResponseStreamingError, IncompleteReadError, ReadTimeoutError, BotoConnectionError) as exc:
                raise TransientError(f"S3 stream of {uri} broke off: {exc}") from exc
            if not chunk:
                return
            yield chunk
    finally:
        body.close()


def sha256_stream(chunks: Iterable[bytes], limit: Optional[int] = None) -> tuple[str, int]:
    """(sha256 hex, bytes read) of a chunk stream, hashed while reading. With `limit`, reading stops
    at the first chunk that takes the count past it: a count > limit then means "longer than
    limit" (the true length is unknown, the hash is of the part read), and at most limit + one
    chunk was ever read."""
    h, n = hashlib.sha256(), 0
    for chunk in chunks:
        h.update(chunk)
        n += len(chunk)
        if limit is not None and n > limit:
            break
    return h.hexdigest(), n


def read_bytes_limited(uri: str, limit: int) -> bytes:
    """The whole object when it holds at most `limit` bytes; ValueError (naming the limit) when it
    is longer -- after reading at most limit + one chunk, whatever the store serves."""
    parts, n = [], 0
    gen = iter_chunks(uri)
    try:
        for chunk in gen:
            parts.append(chunk)
            n += len(chunk)
            if n > limit:
                raise ValueError(f"{uri}: longer than {limit} bytes")
    finally:
        gen.close()
    return b"".join(parts)


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def exists(uri: str) -> bool:
    loc = parse(uri)
    if loc.scheme == "file":
        return Path(loc.key).exists()
    try:
        _s3_call(s3_client().head_object, Bucket=loc.bucket, Key=loc.key)
        return True
    except FileNotFoundError:
        return False


def write_bytes(uri: str, data: bytes) -> None:
    """Write one object atomically (temp file + rename, or a single PUT)."""
    loc = parse(uri)
    if loc.scheme == "file":
        path = Path(loc.key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return
    _s3_call(s3_client().put_object, Bucket=loc.bucket, Key=loc.key, Body=data)


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def upload_file(path: Path, uri: str) -> None:
    loc = parse(uri)
    if loc.scheme == "file":
        dest = Path(loc.key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}"
        shutil.copyfile(path, tmp)
        os.replace(tmp, dest)
        return
    _s3_call(s3_client().upload_file, str(path), loc.bucket, loc.key)


def list_keys(uri: str) -> list[str]:
    """Relative names of every object under a folder URI (recursive), sorted."""
    loc = parse(uri)
    if loc.scheme == "file":
        root = Path(loc.key)
        if not root.is_dir():
            return []
        return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    prefix = loc.key + "/" if loc.key else ""
    names: list[str] = []
    paginator = s3_client().get_paginator("list_objects_v2")
    pages: Iterator = _s3_call(lambda: list(paginator.paginate(Bucket=loc.bucket, Prefix=prefix)))
    for page in pages:
        for obj in page.get("Contents", []):
            names.append(obj["Key"][len(prefix):])
    return sorted(names)


def delete_prefix(uri: str) -> None:
    loc = parse(uri)
    if loc.scheme == "file":
        shutil.rmtree(loc.key, ignore_errors=True)
        return
    keys = [loc.join(k).key for k in list_keys(uri)]
    for i in range(0, len(keys), 1000):
        batch = [{"Key": k} for k in keys[i:i + 1000]]
        _s3_call(s3_client().delete_objects, Bucket=loc.bucket, Delete={"Objects": batch})


def download_file(uri: str, dest: Path) -> None:
    """Copy one object (or local file) to dest; FileNotFoundError when it does not exist."""
    loc = parse(uri)
    if loc.scheme == "file":
        shutil.copyfile(loc.key, dest)
        return
    if not exists(uri):
        raise FileNotFoundError(uri)
    _s3_call(s3_client().download_file, loc.bucket, loc.key, str(dest))


def download_folder(uri: str, dest: Path) -> Path:
    """Copy every file under a folder URI into dest (file:// folders are used in place)."""
    loc = parse(uri)
    if loc.scheme == "file":
        src = Path(loc.key)
        if not src.is_dir():
            raise ConfigError(f"{uri}: folder not found")
        return src
    names = list_keys(uri)
    if not names:
        raise ConfigError(f"{uri}: nothing found at this location")
    dest.mkdir(parents=True, exist_ok=True)
    for name in names:
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        _s3_call(s3_client().download_file, loc.bucket, loc.join(name).key, str(target))
    return dest


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def folder_digest(path: Path, exclude: Optional[set[str]] = None) -> str:
    """sha256 over the sorted file list with each file's sha256: the digest of a model folder."""
    h = hashlib.sha256()
    for p in sorted(q for q in path.rglob("*") if q.is_file()):
        rel = str(p.relative_to(path))
        if rel.startswith(".") or (exclude and rel in exclude):
            continue
        h.update(f"{rel}\0{sha256_file(p)}\n".encode())
    return "sha256:" + h.hexdigest()


def delete(uri: str) -> None:
    """Delete one object / file (no error when it is already gone)."""
    loc = parse(uri)
    if loc.scheme == "file":
        Path(loc.key).unlink(missing_ok=True)
        return
    _s3_call(s3_client().delete_object, Bucket=loc.bucket, Key=loc.key)


def copy(src_uri: str, dst_uri: str) -> None:
    """Copy one object (server-side within S3; atomic rename for file://)."""
    src, dst = parse(src_uri), parse(dst_uri)
    if src.scheme == "s3" and dst.scheme == "s3":
        _s3_call(s3_client().copy_object, Bucket=dst.bucket, Key=dst.key,
                 CopySource={"Bucket": src.bucket, "Key": src.key})
        return
    if src.scheme == "file":
        upload_file(Path(src.key), dst_uri)
        return
    write_bytes(dst_uri, read_bytes(src_uri))
