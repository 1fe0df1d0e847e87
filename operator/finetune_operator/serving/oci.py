"""OCI: the adapter as an ORAS artifact (one layer per file, titled with its name) in a registry.

`oras pull <repo>:<alias>` gives back the adapter folder; the manifest's config (media type
application/vnd.finetune.adapter.config.v1+json) carries the adapter digest, alias and base model,
so a cluster that pulls adapters as artifacts (KAITO's adapter images, ORAS-based sync) knows what it
got. Two tags are pushed: the alias (moves with promotions and rollbacks) and sha256-<adapter hex>
(never moves). Files are checked against the adapter manifest after download and before the push:
the registry gets exactly what governance judged.
"""

from __future__ import annotations

import asyncio
import base64
import json
import tempfile
from pathlib import Path

from ..api.serving import PromotionTarget, ServedAdapter
from .context import Context, PublishError
from .plan import Outcome

CONFIG_MEDIA_TYPE = "application/vnd.finetune.adapter.config.v1+json"


def allowed_repository(repository: str, namespace: str, prefix_template: str) -> bool:
    """The repository lies under the platform's prefix for this namespace (path-segment aligned)."""
    if not prefix_template:
        return False
    prefix = prefix_template.replace("{namespace}", namespace).rstrip("/")
    return repository == prefix or repository.startswith(prefix + "/")


def _checked_folder(uri: str, digest: str, dest: Path) -> list[Path]:
    """Download the adapter and check it against its manifest; the files to push."""
    from finetune_trainer import adapter, storage

    try:
        return adapter.verify_folder(storage.download_folder(uri, dest), digest)
    except ValueError as exc:
        raise PublishError(f"{uri}: {exc}") from None


def _credentials(auth_file: str | None, registry: str) -> tuple[str, str] | None:
    if not auth_file:
        return None
    try:
        auths = json.loads(Path(auth_file).read_text()).get("auths") or {}
        entry = auths.get(registry) or auths.get(f"https://{registry}") or {}
        if entry.get("auth"):
            user, _, password = base64.b64decode(entry["auth"]).decode().partition(":")
            return user, password
        if entry.get("username"):
            return entry["username"], entry.get("password", "")
    except (OSError, ValueError):
        raise PublishError("the registry credentials file cannot be read (see serving.oci in the chart)") from None
    return None


def _push(ctx: Context, target: PromotionTarget, alias: str, served: ServedAdapter) -> str:
    import oras.client

    oci = target.oci
    registry = oci.repository.split("/", 1)[0]
    insecure = registry in ctx.config.oci_insecure_registries
    client = oras.client.OrasClient(hostname=registry, insecure=insecure)
    creds = _credentials(ctx.config.oci_auth_file, registry)
    if creds:
        client.login(username=creds[0], password=creds[1], hostname=registry, insecure=insecure)
    hexdigest = served.digest.split(":")[-1]
    with tempfile.TemporaryDirectory(prefix="finetune-oci-") as tmp:
        paths = _checked_folder(served.uri, served.digest, Path(tmp) / "adapter")
        config = Path(tmp) / "config.json"
        config.write_text(json.dumps({"adapterDigest": served.digest, "alias": alias, "adapterURI": served.uri,
                                      "job": {"namespace": ctx.namespace, "name": ctx.job}}, sort_keys=True))
        annotations = {"org.opencontainers.image.title": alias, "dev.finetune.adapter.digest": served.digest}
        manifest_digest = None
        for tag in dict.fromkeys([f"sha256-{hexdigest}", oci.tag or alias]):
            # Paths are pushed by their file name only (the folder is the artifact): cwd-relative names.
            response = client.push(target=f"{oci.repository}:{tag}", files=[str(p) for p in paths],
                                   manifest_config=f"{config}:{CONFIG_MEDIA_TYPE}",
                                   manifest_annotations=annotations, disable_path_validation=True, quiet=True)
            if response.status_code >= 300:
                raise PublishError(f"registry refused {oci.repository}:{tag}: HTTP {response.status_code}")
            manifest_digest = response.headers.get("Docker-Content-Digest") or manifest_digest
    return f"{oci.repository}@{manifest_digest}" if manifest_digest else f"{oci.repository}:{oci.tag or alias}"


async def publish(ctx: Context, target: PromotionTarget, alias: str, served: ServedAdapter) -> Outcome:
    oci = target.oci
    if not allowed_repository(oci.repository, ctx.namespace, ctx.config.oci_repository_prefix):
        where = (ctx.config.oci_repository_prefix.replace("{namespace}", ctx.namespace)
                 if ctx.config.oci_repository_prefix else "nowhere: the platform has not configured a registry")
        raise PublishError(f"spec.promotion.targets[{target.name}].oci.repository {oci.repository} is outside "
                           f"what namespace {ctx.namespace} may push to ({where})")
    if not served.digest:
        # Registries keep what was pushed; the alias tag keeps naming the last adapter (docs/serving.md).
        return Outcome(True, f"{oci.repository}: the alias has no adapter; tags left as they are", oci.repository)
    try:
        reference = await asyncio.to_thread(_push, ctx, target, alias, served)
    except PublishError:
        raise
    except Exception as exc:  # the registry or the store answered badly: retried with backoff
        raise PublishError(f"push to {oci.repository} failed: {type(exc).__name__}: {str(exc)[:300]}") from None
    return Outcome(True, f"pushed {alias} -> {served.digest} as {reference}", reference)
