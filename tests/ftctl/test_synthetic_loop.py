"""The whole loop on a laptop: seed set -> SyntheticDataset -> `ftctl review` in tmux -> FineTuneJob on it.

`ftctl run` trains nothing the first time: it generates candidates and stops, saying which command
reviews them. A person reviews them in a real terminal (tmux: keys sent, the screen read back). The
second `ftctl run` finds the same candidates (same run digest), writes the reviewed Dataset, validates
it and trains on it; the adapter manifest names that Dataset's digest and the provenance report
verifies the synthetic chain.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import sys

import pytest
from tmux_pane import Pane

from finetune_trainer import review, storage

from .conftest import QUICKSTART, ftctl, write_manifests

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None,
                                reason="needs tmux (hack/test.sh installs Debian's package)")


def manifests(workdir, generator_dir) -> None:
    synthetic = {
        "apiVersion": "finetune.dev/v1alpha1", "kind": "SyntheticDataset", "metadata": {"name": "grown"},
        "spec": {"seed": {"dataset": "support-answers"},
                 "generator": {"baseModel": {"uri": f"file://{generator_dir}"}},
                 "examples": 5, "format": "instruction",
                 "sampling": {"maxNewTokens": 40, "seed": 3},
                 "review": {"fraction": 0.5, "minAcceptanceRate": 0.5},
                 "curation": {"minExamples": 3}, "evaluation": {"fraction": 0.2}}}
    job = {
        "apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "on-grown"},
        "spec": {"baseModel": {"uri": "file://unused"}, "datasetRef": {"name": "grown"}, "method": "lora",
                 "lora": {"r": 4, "alpha": 8, "targetModules": ["q_proj", "v_proj"]},
                 "training": {"maxSteps": 2}, "resources": {"gpusPerNode": 0},
                 "output": {"uri": "file://.finetune/runs/on-grown"}, "promotion": {"mode": "auto"}}}
    policy = {"apiVersion": "finetune.dev/v1alpha1", "kind": "GovernancePolicy", "metadata": {"name": "chain"},
              "spec": {"required": ["provenance"]}}
    write_manifests(workdir / "loop.yaml", synthetic, job, policy)


def test_seed_to_synthetic_to_tmux_review_to_trained_adapter(tiny_workdir, memorized_generator_dir, tmp_path):
    workdir = tiny_workdir
    manifests(workdir, memorized_generator_dir)
    paths = [str(QUICKSTART.relative_to(QUICKSTART.parents[1]) / "dataset.yaml"), "loop.yaml"]

    first = ftctl("run", *paths, "--tiny", "--samples", "0", cwd=workdir)
    assert first.returncode == 0, first.stdout + first.stderr
    out = " ".join(first.stdout.split())
    assert "SyntheticDataset grown waits for review" in out, out
    assert "FineTuneJob on-grown did not run" in out
    work = re.search(r"--work-uri (\S+)", out).group(1)
    pending = review.pending(work)
    assert pending, "nothing sampled for review"

    env = {"PYTHONPATH": ":".join(sys.path), "FTCTL_REVIEWER": "rui@laptop", "TERM": "tmux-256color",
           "LANG": "C.UTF-8"}
    pane = Pane(tmp_path, f"{shlex.quote(sys.executable)} -m finetune_operator.ftctl.main review --work-uri {work}",
                env, cwd=workdir)
    try:
        shown = pane.wait_for(f"1 of {len(pending)} pending", timeout=60)
        assert pending[0].example["instruction"][:30] in " ".join(shown.split()), shown
        for k in range(len(pending)):
            pane.keys("a")
            if k + 1 < len(pending):
                pane.wait_for(f"{k + 2} of {len(pending)} pending")
        pane.keys("q")
        pane.wait_for("[exit 0]")
    finally:
        pane.close()
    decisions, problems = review.load_decisions(work)
    assert not problems and {c.id for c in pending} <= set(decisions)
    assert {d.verdict for d in decisions.values()} == {"accepted"} and decisions[pending[0].id].reviewer == "rui@laptop"

    second = ftctl("run", *paths, "--tiny", "--samples", "0", cwd=workdir)
    assert second.returncode == 0, second.stdout + second.stderr
    status = json.loads((workdir / ".finetune" / "status" / "default" / "on-grown.json").read_text())["status"]
    assert status["phase"] == "Succeeded", status
    reviewed = storage.read_text(storage.join(work, "reviewed.jsonl")).splitlines()
    assert {json.loads(line)["metadata"]["synthetic.reviewer"] for line in reviewed} <= {"rui@laptop", ""}
    manifest = json.loads(storage.read_text(storage.join(status["adapter"]["uri"], "manifest.json")))
    assert manifest["dataset"]["digest"] == status["datasetDigest"]
    provenance = next(c for c in status["governance"]["checks"] if c["name"] == "provenance")
    report = json.loads(storage.read_text(provenance["reportURI"]))
    findings = {f["rule"]: f for f in report["findings"]}
    assert provenance["passed"] and all(findings[r]["passed"] for r in (
        "syntheticCandidates", "syntheticReview", "syntheticLineage", "syntheticExamples")), findings
    assert report["declared"]["synthetic"]["syntheticDataset"] == "grown"
