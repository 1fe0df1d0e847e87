"""KServe: the alias in an LLMInferenceService's `spec.model.lora.adapters`, by server-side apply.

Only the adapter list is written, with field manager `finetune-operator`: the rest of the object stays
its owner's. KServe's CRD leaves the list schemaless (x-kubernetes-preserve-unknown-fields), so
server-side apply treats it as one atomic value: the operator reads it, replaces only the entries of
the aliases it published (recorded in an annotation), keeps everyone else's, and applies the result.
"""

from __future__ import annotations

import json

from .. import kube
from ..api.serving import PromotionTarget, ServedAdapter
from .context import Context, PublishError
from .plan import Outcome

API_VERSION = "serving.kserve.io/v1alpha1"
#: alias -> adapter digest, for the entries this operator wrote.
ANNOTATION = "finetune.dev/lora-adapters"
MAX_ADAPTERS = 100


def _ours(obj: dict) -> dict[str, str]:
    raw = ((obj.get("metadata") or {}).get("annotations") or {}).get(ANNOTATION)
    try:
        value = json.loads(raw) if raw else {}
    except ValueError:
        value = {}
    return {k: v for k, v in value.items() if isinstance(k, str) and isinstance(v, str)} if isinstance(value, dict) else {}


def adapters_of(obj: dict) -> list:
    adapters = (((obj.get("spec") or {}).get("model") or {}).get("lora") or {}).get("adapters")
    if adapters is None:
        return []
    if not isinstance(adapters, list):
        raise PublishError(f"LLMInferenceService {obj['metadata']['name']}: spec.model.lora.adapters is not a list")
    return adapters


def updated(obj: dict, alias: str, served: ServedAdapter) -> tuple[list, dict[str, str]]:
    """The new adapter list and annotation: this alias's entry replaced (or removed), others kept."""
    ours = _ours(obj)
    adapters = [a for a in adapters_of(obj) if not (isinstance(a, dict) and a.get("name") == alias)]
    ours.pop(alias, None)
    if served.digest and served.uri:
        adapters.append({"name": alias, "uri": served.uri})
        ours[alias] = served.digest
    if len(adapters) > MAX_ADAPTERS:
        raise PublishError(f"LLMInferenceService {obj['metadata']['name']} would list more than {MAX_ADAPTERS} adapters")
    return adapters, ours


async def publish(ctx: Context, target: PromotionTarget, alias: str, served: ServedAdapter) -> Outcome:
    name = target.kserve.name
    try:
        current = await ctx.client.get(API_VERSION, "LLMInferenceService", ctx.namespace, name)
    except kube.ApiError as exc:
        if exc.status == 404:  # the CRD itself is not installed
            raise PublishError("the LLMInferenceService API (serving.kserve.io/v1alpha1) is not installed") from None
        raise PublishError(f"cannot read LLMInferenceService {name}: {exc.message[:300]}") from None
    if current is None:
        raise PublishError(f"LLMInferenceService {name} not found in namespace {ctx.namespace}")
    adapters, ours = updated(current, alias, served)
    manifest = {"apiVersion": API_VERSION, "kind": "LLMInferenceService",
                "metadata": {"name": name, "namespace": ctx.namespace,
                             "annotations": {ANNOTATION: json.dumps(ours, sort_keys=True)}},
                "spec": {"model": {"lora": {"adapters": adapters}}}}
    try:
        await ctx.client.apply(manifest)
    except kube.ApiError as exc:
        raise PublishError(f"cannot apply the adapter list of LLMInferenceService {name}: {exc.message[:300]}") from None
    verb = f"{alias} -> {served.uri}" if served.digest else f"{alias} removed"
    return Outcome(True, f"LLMInferenceService {name}: {verb}", f"LLMInferenceService {name}")
