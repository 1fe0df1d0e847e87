"""Run the due publishers of one FineTuneJob and fold their outcomes into its status.

Called by the handler after the plan (and its alias write) was applied. A publisher's failure is an
outcome, never an exception out of here: the target goes to Retrying with backoff, the alias and the
job's phase stay as they are.
"""

from __future__ import annotations

import copy
import logging
from typing import Any, Optional

from .. import kube
from ..config import OperatorConfig
from . import kserve, oci, plan, vllm
from .context import Context, PublishError

log = logging.getLogger(__name__)

PUBLISHERS = {"vllm": vllm.publish, "kserve": kserve.publish, "oci": oci.publish}


async def run(client: Any, ftj: dict, status: dict, config: OperatorConfig,
              now: str) -> tuple[Optional[dict], list[tuple[str, str, str]]]:
    """(new status, events), or (None, []) when no target is due."""
    from ..decisions import promotion_targets

    targets = promotion_targets(ftj["spec"])
    todo = plan.due(targets, status, now)
    if not todo:
        return None, []
    meta = ftj["metadata"]
    generation = meta.get("generation") or 1
    status = copy.deepcopy(status)
    alias = (status.get("promotion") or {}).get("alias") or meta["name"]
    served = plan.served_of(status)
    ctx = Context(client=client, namespace=meta.get("namespace") or "default", job=meta["name"], config=config)
    results = []
    for target in todo:
        try:
            outcome = await PUBLISHERS[target.kind](ctx, target, alias, served)
        except PublishError as exc:
            outcome = plan.Outcome(False, str(exc))
        except kube.ApiError as exc:
            outcome = plan.Outcome(False, f"{exc.what or 'API'}: HTTP {exc.status}: {exc.message[:300]}")
        except Exception as exc:  # a publisher bug must not stop the others or the reconcile loop
            log.exception("publishing to target %s of %s/%s", target.name, ctx.namespace, ctx.job)
            outcome = plan.Outcome(False, f"{type(exc).__name__}: {str(exc)[:300]}")
        results.append((target, outcome))
    events = plan.fold(status, targets, results, generation, now)
    return status, events
