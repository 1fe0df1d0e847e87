"""vLLM: a ConfigMap with `--lora-modules` entries for the promoted aliases, and the runtime LoRA API.

vLLM loads LoRA adapters from a local folder: the ConfigMap says which adapter each alias is
(`adapters.json`: object-store URI and digest, for the step that syncs the files to the server's
volume) and how vLLM should name it (`lora-modules` for `--lora-modules $(cat ...)` in a shell,
`lora-modules.json` with one JSON object per adapter, a form `--lora-modules` also accepts). A server
started with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True is also told at once through its
/v1/unload_lora_adapter and /v1/load_lora_adapter endpoints.
"""

from __future__ import annotations

import json
import re
from typing import Optional
from urllib.parse import urlsplit

import aiohttp

from .. import kube
from ..api.serving import PromotionTarget, ServedAdapter
from .context import Context, PublishError
from .plan import Outcome

LABEL = "finetune.dev/serving"
ADAPTERS_KEY, MODULES_KEY, MODULES_JSON_KEY = "adapters.json", "lora-modules", "lora-modules.json"
#: A ConfigMap holds at most 1 MiB; far fewer aliases than that fit in practice.
MAX_ALIASES = 200


def adapter_path(mount_path: str, alias: str, digest: str) -> str:
    """A folder per adapter version: a new adapter never overwrites files a running server reads."""
    return f"{mount_path.rstrip('/')}/{alias}/{digest.split(':')[-1][:16]}"


def render(adapters: dict[str, dict]) -> dict[str, str]:
    """The ConfigMap's data for {alias: {uri, digest, path, baseModelName?}} (sorted: stable writes)."""
    modules = []
    for alias in sorted(adapters):
        entry = {"name": alias, "path": adapters[alias]["path"]}
        if adapters[alias].get("baseModelName"):
            entry["base_model_name"] = adapters[alias]["baseModelName"]
        modules.append(entry)
    return {ADAPTERS_KEY: json.dumps(adapters, indent=1, sort_keys=True),
            MODULES_KEY: " ".join(f"{m['name']}={m['path']}" for m in modules),
            MODULES_JSON_KEY: "\n".join(json.dumps(m, sort_keys=True) for m in modules)}


def _adapters_in(configmap: dict) -> dict[str, dict]:
    raw = (configmap.get("data") or {}).get(ADAPTERS_KEY)
    if not raw:
        return {}
    try:
        adapters = json.loads(raw)
    except ValueError:
        adapters = None
    if not isinstance(adapters, dict) or not all(isinstance(v, dict) and isinstance(v.get("path"), str)
                                                 for v in adapters.values()):
        raise PublishError(f"ConfigMap {configmap['metadata']['name']}: data[{ADAPTERS_KEY}] is not what the "
                           "operator writes (an object of alias -> {uri, digest, path}); fix or delete it")
    return adapters


def updated(adapters: dict[str, dict], target: PromotionTarget, alias: str,
            served: ServedAdapter) -> dict[str, dict]:
    out = {k: v for k, v in adapters.items() if k != alias}
    if served.digest and served.uri:
        vllm = target.vllm
        entry = {"uri": served.uri, "digest": served.digest, "path": adapter_path(vllm.mountPath, alias, served.digest)}
        if vllm.baseModelName:
            entry["baseModelName"] = vllm.baseModelName
        out[alias] = entry
    if len(out) > MAX_ALIASES:
        raise PublishError(f"ConfigMap {target.vllm.configMap} would list more than {MAX_ALIASES} adapters")
    return out


async def _write_configmap(ctx: Context, target: PromotionTarget, alias: str, served: ServedAdapter) -> str:
    name = target.vllm.configMap
    for _ in range(5):  # optimistic concurrency: another job may write the same ConfigMap at once
        current = await ctx.client.get("v1", "ConfigMap", ctx.namespace, name)
        if current is None:
            body = {"apiVersion": "v1", "kind": "ConfigMap",
                    "metadata": {"name": name, "namespace": ctx.namespace,
                                 "labels": {LABEL: "vllm", "app.kubernetes.io/managed-by": "finetune-operator"}},
                    "data": render(updated({}, target, alias, served))}
            try:
                await ctx.client.request("POST", kube.path_of("v1", "ConfigMap", ctx.namespace), body, parse=False)
                return f"ConfigMap {name}"
            except kube.ApiError as exc:
                if exc.status == 409:
                    continue
                raise PublishError(f"cannot create ConfigMap {name}: {exc.message[:300]}") from None
        if ((current.get("metadata") or {}).get("labels") or {}).get(LABEL) != "vllm":
            # Only a ConfigMap made for this (by us, or labelled by its owner) is written: a job must not
            # overwrite some other ConfigMap in its namespace through the operator's permissions.
            raise PublishError(f"ConfigMap {name} exists without the label {LABEL}=vllm; label it to let the "
                               "operator keep its adapter list")
        data = dict(current.get("data") or {})
        data.update(render(updated(_adapters_in(current), target, alias, served)))
        if data == (current.get("data") or {}):
            return f"ConfigMap {name}"
        patch = {"metadata": {"resourceVersion": current["metadata"]["resourceVersion"]}, "data": data}
        try:
            # With resourceVersion in the patch, the server refuses (409) if someone wrote since we read.
            await ctx.client.patch("v1", "ConfigMap", ctx.namespace, name, patch)
            return f"ConfigMap {name}"
        except kube.ApiError as exc:
            if exc.status != 409:
                raise PublishError(f"cannot update ConfigMap {name}: {exc.message[:300]}") from None
    raise PublishError(f"ConfigMap {name} kept changing under the operator; trying again later")


def allowed_host(url: str, namespace: str, extra: tuple[str, ...]) -> bool:
    """A Service in the job's own namespace, or a host the platform allows. The operator's network
    position (cluster DNS, perhaps cloud metadata) must not become every user's HTTP client."""
    host = (urlsplit(url).hostname or "").lower()
    if re.fullmatch(rf"[a-z0-9]([-a-z0-9]*[a-z0-9])?\.{re.escape(namespace)}(\.svc(\.cluster\.local)?)?", host):
        return True
    return any(re.fullmatch(pattern, host) for pattern in extra)


async def _runtime_update(ctx: Context, target: PromotionTarget, alias: str, served: ServedAdapter) -> str:
    base = target.vllm.loadURL.rstrip("/")
    if not allowed_host(base, ctx.namespace, ctx.config.vllm_load_hosts):
        raise PublishError(f"spec.promotion.targets[{target.name}].vllm.loadURL: host not allowed (a Service in "
                           f"namespace {ctx.namespace}, <name>.{ctx.namespace}.svc, or a host the platform allows)")
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        try:
            # Unload first: vLLM refuses to load a name it already serves. "Not loaded" is fine.
            async with session.post(f"{base}/v1/unload_lora_adapter", json={"lora_name": alias},
                                    allow_redirects=False) as resp:
                await resp.read()
            if not served.digest:
                return f"unloaded from {base}"
            body = {"lora_name": alias, "lora_path": adapter_path(target.vllm.mountPath, alias, served.digest)}
            async with session.post(f"{base}/v1/load_lora_adapter", json=body, allow_redirects=False) as resp:
                text = (await resp.content.read(2000)).decode("utf-8", "replace")
                if resp.status >= 300:
                    raise PublishError(f"vLLM at {base} refused to load {alias}: HTTP {resp.status} "
                                       f"{' '.join(text.split())[:300]}")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise PublishError(f"vLLM at {base}: {type(exc).__name__}: {str(exc)[:200]}") from None
    return f"loaded at {base}"


async def publish(ctx: Context, target: PromotionTarget, alias: str, served: ServedAdapter) -> Outcome:
    reference = await _write_configmap(ctx, target, alias, served)
    if target.vllm.loadURL:
        reference += f"; {await _runtime_update(ctx, target, alias, served)}"
    verb = f"{alias} -> {served.digest}" if served.digest else f"{alias} removed"
    return Outcome(True, f"{reference}: {verb}", reference)


def entry_for(configmap: Optional[dict], alias: str) -> Optional[dict]:
    """What a ConfigMap says about one alias (tests, ftctl)."""
    return _adapters_in(configmap).get(alias) if configmap else None
