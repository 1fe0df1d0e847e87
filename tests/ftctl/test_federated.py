"""`ftctl run examples/federated/`: Flower's deployment engine on 127.0.0.1 through the real command line.

A shortened copy of the example (two of its sites, one round of three steps, differential privacy on)
keeps it to well under a minute; tests/federated/test_federation.py runs the full three-site shape.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from finetune_trainer.federated import privacy

from .conftest import REPO, ftctl


NOISE = 0.05


def left_running(folder: Path) -> list[str]:
    """Command lines of live processes working in `folder` (every process of the run inherits it as cwd)."""
    found = []
    for cwd in Path("/proc").glob("[0-9]*/cwd"):
        try:
            if Path(os.readlink(cwd)).is_relative_to(folder):
                found.append((cwd.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()[:200])
        except OSError:
            continue
    return found


@pytest.fixture()
def federated_workdir(tmp_path, tiny_model_dir) -> Path:
    from finetune_operator.ftctl import models

    shutil.copytree(REPO / "examples" / "federated", tmp_path / "examples" / "federated")
    cached = tmp_path / ".finetune" / "models" / models.tiny_model_name()
    cached.parent.mkdir(parents=True)
    shutil.copytree(tiny_model_dir, cached)  # the example names the tiny model `ftctl run` builds
    path = tmp_path / "examples" / "federated" / "federation.yaml"
    doc = yaml.safe_load(path.read_text())
    doc["spec"]["participants"] = doc["spec"]["participants"][:2]
    doc["spec"].update(rounds=1, localSteps=8, minSites=2)
    # Noise small enough that the gate's verdict does not depend on its draw (fresh from os.urandom).
    doc["spec"]["privacy"]["differentialPrivacy"] = {"enabled": True, "clippingNorm": 0.5, "noiseMultiplier": NOISE,
                                                     "delta": 1e-5}
    path.write_text(yaml.safe_dump(doc))
    return tmp_path


# ~45 s: tests/federated/test_federation.py (the federation tests) already takes the budget's 3 minutes.
@pytest.mark.slow
def test_ftctl_runs_the_federated_example_locally(federated_workdir):
    proc = ftctl("run", "examples/federated/", cwd=federated_workdir, timeout=240)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    # Nothing the run started outlives it: Flower's SuperExec and ClientApps run in sessions of their own.
    # (A process SIGKILLed as ftctl exits may take a moment to go.)
    deadline = time.monotonic() + 20
    while left_running(federated_workdir) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left_running(federated_workdir), left_running(federated_workdir)
    assert "round 1: 2 of 2 sites reported" in out
    assert "FederatedFineTuneJob/ticket-router Succeeded" in out and "epsilon" in out
    # The operator's own gate, run locally: the example's policy (evaluation, bias, provenance, pii), the
    # sites' checks on their own data, and the alias record of the promotion.
    assert "Governance: passed" in out and "base model" in out
    for check in ("evaluation", "bias", "provenance", "pii"):
        assert re.search(rf"│ {check} +│ pass ", out), (check, out[-3000:])
    run = federated_workdir / ".finetune" / "runs" / "ticket-router"
    progress = json.loads((run / "federation" / "progress.json").read_text())
    assert progress["state"] == "Succeeded"
    assert progress["privacy"]["secureAggregation"] is False  # two sites: auto is off
    assert progress["privacy"]["epsilon"] == pytest.approx(privacy.epsilon(NOISE, 1, 1e-5))
    assert progress["privacy"]["delta"] == 1e-5
    adapter = Path(progress["adapter"]["uri"].removeprefix("file://"))
    alias = json.loads((run / "aliases" / "ticket-router.json").read_text())
    assert alias["adapterDigest"] == progress["adapter"]["digest"] and alias["governance"]["passed"] is True
    assert {s["name"] for s in alias["federation"]["sites"]} == {"north", "south"}
    assert {s["site"] for s in progress["siteChecks"]} == {"north", "south"}  # the policy's bias and pii ran there
    manifest = json.loads((adapter / "manifest.json").read_text())
    recorded = manifest["training"]["federation"]["privacy"]["differentialPrivacy"]
    assert recorded["enabled"] and recorded["epsilon"] == progress["privacy"]["epsilon"]
    sites = {s["site"]: s for s in manifest["dataset"]["federation"]}
    assert set(sites) == {"north", "south"}
    for site, entry in sites.items():  # the digest each site's validation wrote, and its license
        report = json.loads(next((federated_workdir / ".finetune" / "datasets" / f"desk-{site}").rglob(
            "report.json")).read_text())
        assert entry["datasetDigest"] == report["digest"] and entry["license"] == "CC0-1.0"
    # ffa-lora: A is still the shared initialisation, only B moved
    from safetensors.numpy import load_file

    final = load_file(adapter / "adapter_model.safetensors")
    init = load_file(run / "federation" / "rounds" / "round-0000.safetensors")
    a_names = [n for n in final if n.endswith("lora_A.weight")]
    assert a_names and all(np.array_equal(final[n], init[n]) for n in a_names)
    assert any(np.abs(final[n]).max() > 0 for n in final if n.endswith("lora_B.weight"))
