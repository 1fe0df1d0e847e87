"""Run one governance check's real code on an adapter folder, without the governance command around it.

The checks (`EvaluationCheck`, `BiasCheck`) run exactly as the command runs them: the same
CheckContext, the same loaders (model_io + peft), reports written beside the adapter. What
is left out is only the command's envelope (report signing, the run record), which the
command's own tests cover.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from finetune_operator.api.trainer_config import TrainerConfig
from finetune_trainer import storage
from finetune_trainer.governance.base import CheckContext


def context(cfg: TrainerConfig, adapter_uri: str, workdir: Path, **policy) -> CheckContext:
    """A CheckContext as the command builds it; `policy` replaces sections of cfg.governance
    (e.g. bias={"probesURI": ...}), validated by the API model."""
    spec = cfg.governance.model_validate({**cfg.governance.model_dump(), **policy})
    ctx = CheckContext(config=cfg, policy=spec, inputs=cfg.governanceInputs, adapter_uri=adapter_uri,
                       adapter_dir=workdir / "adapter", adapter_digest="sha256:" + "0" * 64, workdir=workdir)
    ctx.adapter_dir = storage.download_folder(adapter_uri, ctx.adapter_dir)
    return ctx


def run(check, cfg: TrainerConfig, adapter_uri: str, **policy) -> tuple[dict, dict]:
    """(the CheckResult as JSON, its detailed report) of `check` on the adapter at `adapter_uri`."""
    with tempfile.TemporaryDirectory(prefix="check-") as tmp:
        result = check.run(context(cfg, adapter_uri, Path(tmp), **policy)).model_dump(mode="json")
    return result, json.loads(storage.read_text(result["reportURI"]))
