"""A real federation on Flower's deployment engine, as local processes: SuperLink, three SuperNodes with
their ClientApps (our trainer's loop) and the ServerApp, 3 sites × 3 rounds on the tiny model, SecAgg+
on (auto, three sites), FedAvg. One run (module fixture) serves every test here:

* the aggregate after each round is the weighted mean of the updates the sites sent (each site keeps
  its own record of what it sent; the test averages them itself);
* the federated adapter beats every single-site adapter (the trainer alone, same steps) on the union
  of the sites' eval splits;
* the ServerApp never receives one site's update in the clear (every payload it received is on disk);
* the south site is killed mid-round 1 (after a checkpoint inside the round): the round completes with
  the other two, south comes back, rejoins in round 2 and resumes from its own checkpoint;
* at the final evaluation every site runs the bias and pii checks on the final adapter with its own data
  and sends numbers only (progress.json siteChecks, the manifest's metrics).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from finetune_operator.api import Dataset, FederatedFineTuneJob
from finetune_operator.api.validation import validate_manifest
from finetune_trainer import adapter as adapter_io
from finetune_trainer.federated import config as fc
from finetune_trainer.federated import wire
from finetune_trainer.federated.client_app import update_uri
from finetune_trainer.federated.localrun import LocalFederation, free_port

from .sites import tickets_dataset

REPO = Path(__file__).resolve().parents[2]
SITES = ("north", "south", "east")
ROUNDS, LOCAL_STEPS = 3, 20
KILLED = "south"
GENDERED_EVAL = 4  # eval tickets per site whose prompt is rewritten to name a gender (site checks' local pairs)


def _split_site_data(root: Path) -> dict[str, Path]:
    """Each site's validated folder: the first 54 of its 72 tickets train, the last 18 evaluate."""
    out = {}
    for site in SITES:
        lines = (REPO / "examples" / "federated" / "data" / f"{site}.jsonl").read_text().splitlines()
        folder = root / "data" / site
        folder.mkdir(parents=True)
        evals = [json.loads(line) for line in lines[54:]]
        for record in evals[:GENDERED_EVAL]:  # "Jia says the ..." -> "She says the ..." (the answer unchanged)
            record["input"] = "She says " + record["input"].split(" says ", 1)[1]
        (folder / "train.jsonl").write_text("\n".join(lines[:54]) + "\n")
        (folder / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in evals))
        out[site] = folder
    return out


def _job(model: Path, output: Path) -> FederatedFineTuneJob:
    doc = yaml.safe_load((REPO / "examples" / "federated" / "federation.yaml").read_text())
    doc["metadata"].update(namespace="coordinator", uid="uid-federation-test")
    doc["spec"]["baseModel"] = {"uri": f"file://{model}"}
    doc["spec"]["output"] = {"uri": f"file://{output}"}
    # How long each exchange of a round waits: for a dead site, and for live ones on a loaded machine
    # (a SecAgg+ round is four exchanges, each a new ClientApp process at every site).
    doc["spec"]["roundTimeoutSeconds"] = 30
    doc["spec"]["aggregation"] = "fedavg"  # the example trains ffa-lora; FedAvg is the claim checked here
    return FederatedFineTuneJob.model_validate(validate_manifest(doc))


def _dataset(site: str, folder: Path) -> Dataset:
    return tickets_dataset(site, folder, 54, f"{SITES.index(site) + 1:x}")


def _checkpoint_steps(scratch: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in (scratch / "checkpoints").glob("step-*"))


@pytest.fixture(scope="module")
def federation(tiny_model_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("federation")
    folders = _split_site_data(work)
    job = _job(tiny_model_dir, work / "out")
    datasets = {s: _dataset(s, folders[s]) for s in SITES}
    port = free_port()
    address = f"127.0.0.1:{port}"
    superlink = fc.superlink_config(job).model_copy(update={"host": "127.0.0.1", "port": port, "healthPort": 0})
    server = fc.server_config(job, superlink=address, datasets=datasets,
                              site_checks=fc.SiteChecks(checks=["bias", "pii"])).model_copy(
        update={"pollSeconds": 0.2, "connectTimeoutSeconds": 120})
    sites = {p.name: fc.site_config(job, p, datasets[p.name], superlink=address,
                                    scratch_uri=f"file://{work}/scratch/{p.name}").model_copy(
        update={"pollSeconds": 0.2, "healthPort": 0, "runtimePort": free_port()}) for p in job.spec.participants}
    audit = work / "audit"
    run = LocalFederation(work, superlink, server, sites,
                          env={"FINETUNE_FEDERATION_AUDIT_DIR": str(audit), "OMP_NUM_THREADS": "1"},
                          # South's steps are slowed so that round 1 can be interrupted inside the round.
                          role_env={f"site-{KILLED}": {"FINETUNE_DEBUG_STEP_SLEEP": "0.25"}})
    started = time.monotonic()
    killed_after = None
    run.start()
    try:
        scratch = work / "scratch" / KILLED
        deadline = time.monotonic() + 240
        # Kill south once it has checkpointed inside round 1 (a step before the round's last).
        while not any(0 < s < LOCAL_STEPS for s in _checkpoint_steps(scratch)):
            assert time.monotonic() < deadline, run.log_of(f"site-{KILLED}")[-3000:]
            assert run.procs["server"].poll() is None, run.log_of("server")[-3000:]
            time.sleep(0.1)
        run.kill_site(KILLED)
        killed_after = max(_checkpoint_steps(scratch))
        run.role_env.pop(f"site-{KILLED}")  # back at full speed
        run.start_site(KILLED)
        # The server's pod dies as soon as round 1 is recorded (before round 2 trains anywhere); its
        # restart resumes after round 1 instead of starting the rounds again.
        progress_file = Path(server.progressURI.removeprefix("file://"))
        while not (progress_file.exists() and json.loads(progress_file.read_text()).get("currentRound", 0) >= 1):
            assert time.monotonic() < deadline, run.log_of("server")[-3000:]
            assert run.procs["server"].poll() is None, run.log_of("server")[-3000:]
            time.sleep(0.05)
        run.kill_role("server")
        run.start_server()
        code = run.wait(timeout=400)
    finally:
        run.stop()
    seconds = time.monotonic() - started
    progress = json.loads(Path(server.progressURI.removeprefix("file://")).read_text())
    return {"work": work, "code": code, "progress": progress, "server": server, "sites": sites, "audit": audit,
            "folders": folders, "job": job, "run": run, "killed_after": killed_after, "seconds": seconds,
            "model": tiny_model_dir}


def _sent_update(site_cfg, round_: int) -> tuple[dict, float]:
    data = Path(update_uri(site_cfg, round_).removeprefix("file://")).read_bytes()
    return wire.arrays_from_bytes(data), float(wire.metadata_of(data)["weight"])


def _global(federation, round_: int) -> dict:
    from safetensors.numpy import load_file

    return load_file(federation["work"] / "out" / "federation" / "rounds" / f"round-{round_:04d}.safetensors")


def test_a_restarted_server_resumes_after_its_last_round(federation):
    first, second = (federation["work"] / "logs" / f"server.{i}.log" for i in (1, 2))
    assert '"event": "init"' in first.read_text() or "initial adapter" in first.read_text()
    resumed = [json.loads(line) for line in second.read_text().splitlines() if '"event": "resumed"' in line]
    assert resumed and resumed[0]["after_round"] >= 1, second.read_text()[-3000:]
    text = second.read_text()
    assert "initial adapter" not in text  # the initialisation is not redone: round 1's aggregate carries on
    # Every round once, in order, the rounds count never started again.
    assert [r["round"] for r in federation["progress"]["rounds"]] == [1, 2, 3]
    assert federation["progress"]["jobUID"] == federation["server"].job.uid


def test_the_federation_finishes_with_a_complete_status(federation):
    assert federation["code"] == 0, federation["run"].log_of("server")[-4000:]
    p = federation["progress"]
    assert p["state"] == "Succeeded" and p["currentRound"] == ROUNDS
    assert [r["round"] for r in p["rounds"]] == [1, 2, 3]
    assert all(r["sitesSelected"] == 3 for r in p["rounds"])
    assert all(r["heldOutLoss"] is not None and r["seconds"] > 0 for r in p["rounds"])
    for r in p["rounds"]:
        for s in r["sites"]:
            assert s["examples"] == 54 and s["localLoss"] > 0 and s["evalLoss"] > 0
    assert p["privacy"]["secureAggregation"] is True
    # The final adapter against the base model at every site (both measured there), and over the union.
    final = p["finalEvaluation"]
    assert sorted(s["site"] for s in final["sites"]) == sorted(SITES)
    assert all(s["evalExamples"] == 18 and s["baseEvalLoss"] > s["evalLoss"] > 0 for s in final["sites"]), final
    assert final["heldOutLoss"] == pytest.approx(p["rounds"][-1]["heldOutLoss"])
    # The base model's loss is what every site reported for the seeded initialisation (B = 0) in round 1.
    first = {s["site"]: s["evalLoss"] for s in p["rounds"][0]["sites"]}
    for s in final["sites"]:
        if s["site"] in first:
            assert s["baseEvalLoss"] == pytest.approx(first[s["site"]], rel=1e-4)
    ok, why = adapter_io.verify(p["adapter"]["uri"])
    assert ok, why
    manifest = json.loads(Path(p["adapter"]["uri"].removeprefix("file://"), "manifest.json").read_text())
    recorded = {s["site"]: (s["datasetDigest"], s["license"]) for s in manifest["dataset"]["federation"]}
    assert recorded == {s: ("sha256:" + f"{SITES.index(s) + 1:x}" * 64, "CC0-1.0") for s in SITES}
    assert manifest["dataset"]["digest"].startswith("sha256:")
    assert manifest["training"]["federation"]["privacy"]["secureAggregation"] is True
    # The result.json a FineTuneJob's trainer writes: the governance Job finds the adapter the same way.
    result = json.loads((federation["work"] / "out" / "result.json").read_text())
    assert result["digest"] == p["adapter"]["digest"]


def test_each_aggregate_is_the_weighted_mean_of_the_updates_the_sites_sent(federation):
    p = federation["progress"]
    for entry in p["rounds"]:
        r = entry["round"]
        reported = [s["site"] for s in entry["sites"]]
        updates, weights = zip(*(_sent_update(federation["sites"][s], r) for s in reported))
        mean = {n: sum(w * u[n].astype(np.float64) for u, w in zip(updates, weights)) / sum(weights)
                for n in updates[0]}
        before, after = _global(federation, r - 1), _global(federation, r)
        assert set(mean) == set(after)  # fedavg: every tensor, A and B
        for name, expected in mean.items():
            got = after[name].astype(np.float64) - before[name].astype(np.float64)
            # SecAgg+ quantizes each entry to 2 * range / 2**29 (and the tensors are float32).
            assert np.allclose(got, expected, atol=2e-6, rtol=1e-4), (r, name, np.max(np.abs(got - expected)))
        assert max(np.max(np.abs(v)) for v in mean.values()) > 1e-3  # the sites did change the adapter


def _union_eval_loss(model_dir: Path, adapter_dir: Path, folders: dict) -> float:
    import torch
    from peft import PeftModel

    from finetune_trainer import data, model_io
    from finetune_trainer.objective import evaluate

    tokenizer = model_io.load_tokenizer(model_dir)
    data.ensure_chat_template(tokenizer, None)
    examples = []
    for folder in folders.values():
        examples += data.tokenize_all(data.read_examples(f"file://{folder}", "eval.jsonl", "instruction"),
                                      tokenizer, 128)
    base = model_io.load_base_model(model_dir, precision="fp32", device=torch.device("cpu"))
    model = PeftModel.from_pretrained(base, str(adapter_dir))
    return evaluate(model, examples, batch_size=8, max_len=128, packing=True, pad_id=tokenizer.pad_token_id,
                    device=torch.device("cpu"))


def _single_site_adapters(federation) -> dict[str, Path]:
    """The trainer alone on each site's data (three trainers at once), the same model, shape and steps."""
    job = federation["job"]
    cfg = {"baseModel": {"uri": f"file://{federation['model']}"},
           "lora": job.spec.lora.model_dump(mode="json"),
           "training": {**job.spec.training.model_dump(mode="json", exclude_none=True),
                        "maxSteps": ROUNDS * LOCAL_STEPS, "evalEverySteps": 1000},
           "metricsPort": 0}
    procs = {}
    for site in SITES:
        out = federation["work"] / "single" / site
        out.mkdir(parents=True)
        (out / "config.json").write_text(json.dumps({
            **cfg, "job": {"name": f"single-{site}"}, "outputURI": f"file://{out}",
            "data": {"uri": f"file://{federation['folders'][site]}", "format": "instruction"}}))
        with open(out / "train.log", "wb") as log:
            procs[site] = subprocess.Popen([sys.executable, "-m", "finetune_trainer.cli", "train", "--config",
                                            str(out / "config.json")], stdout=log, stderr=subprocess.STDOUT)
    adapters = {}
    for site, proc in procs.items():
        proc.wait(timeout=300)
        assert proc.returncode == 0, (federation["work"] / "single" / site / "train.log").read_text()[-3000:]
        result = federation["work"] / "single" / site / "result.json"
        adapters[site] = Path(json.loads(result.read_text())["adapterURI"].removeprefix("file://"))
    return adapters


def test_the_federated_adapter_beats_every_single_site_adapter_on_the_union_of_eval_splits(federation):
    folders, model = federation["folders"], federation["model"]
    federated = _union_eval_loss(model, Path(federation["progress"]["adapter"]["uri"].removeprefix("file://")),
                                 folders)
    singles = {s: _union_eval_loss(model, path, folders) for s, path in _single_site_adapters(federation).items()}
    print(f"union eval loss: federated {federated:.4f}, single sites {singles}")
    for site, loss in singles.items():
        assert federated < loss, (site, federated, singles)
    # and the status' held-out loss of the last round is the same union, as the sites computed it
    assert federation["progress"]["rounds"][-1]["heldOutLoss"] == pytest.approx(federated, rel=1e-3)


def _contains(received: np.ndarray, update: np.ndarray) -> bool:
    """Whether an array the server received carries this update: equal, or (quantized) proportional."""
    if received.size != update.size or received.size < 8:
        return False
    a, b = received.astype(np.float64).ravel(), update.astype(np.float64).ravel()
    if np.allclose(a, b, atol=1e-6):
        return True
    a, b = a - a.mean(), b - b.mean()
    denom = np.linalg.norm(a) * np.linalg.norm(b)
    return bool(denom > 0 and abs(a @ b) / denom > 0.5)


def test_with_secagg_the_server_app_never_receives_a_site_update_in_the_clear(federation):
    received = []
    for path in sorted(federation["audit"].glob("*.npz")):
        with np.load(path) as npz:
            received += [(path.name, npz[k]) for k in npz.files]
    assert any("train" in name for name, _ in received)  # the fit replies (masked vectors) were recorded
    updates = [(s, r["round"], u) for r in federation["progress"]["rounds"] for s in (x["site"] for x in r["sites"])
               for u in [_sent_update(federation["sites"][s], r["round"])[0]]]
    checked = 0
    for site, round_, update in updates:
        for tensor in update.values():
            assert _contains(tensor, tensor)  # the detector does find an update where there is one
            for name, arr in received:
                checked += 1
                assert not _contains(arr, tensor), f"{name} carries {site}'s round-{round_} update in the clear"
    assert checked > 1000
    # What arrived in the fit replies is integers modulo 2**32 (masked, quantized), never floats.
    fit_arrays = [arr for name, arr in received if "-train-" in name and arr.size > 8]
    assert fit_arrays and all(arr.dtype.kind in "iu" for arr in fit_arrays)


def test_a_site_killed_mid_round_the_round_completes_and_the_site_rejoins(federation):
    rounds = {r["round"]: r for r in federation["progress"]["rounds"]}
    assert sorted(s["site"] for s in rounds[1]["sites"]) == ["east", "north"]  # completed without south
    assert rounds[1]["sitesReported"] == 2
    assert all(KILLED in [s["site"] for s in rounds[r]["sites"]] for r in (2, 3))  # back from the next round on
    killed_after = federation["killed_after"]
    assert 0 < killed_after < LOCAL_STEPS
    # The second south process resumed from the checkpoint the first one wrote inside round 1.
    log = (federation["work"] / "logs" / f"site-{KILLED}.2.log").read_text()
    resumed = [json.loads(line)["step"] for line in log.splitlines() if '"event": "resume"' in line]
    assert resumed and resumed[0] >= killed_after
    # and trained its round from there: its round-2 update exists, its round-1 one never did
    assert Path(update_uri(federation["sites"][KILLED], 2).removeprefix("file://")).exists()
    assert not Path(update_uri(federation["sites"][KILLED], 1).removeprefix("file://")).exists()
    # What the operator's SiteDropout Event is made of (federation.dropped_rounds): selected, not reported.
    # (The server's own dropout log line may be lost: its pod is killed right after round 1, below.)
    assert rounds[1]["sitesSelected"] - rounds[1]["sitesReported"] == 1


def test_every_site_ran_its_checks_on_its_own_data_and_sent_numbers_only(federation):
    p = federation["progress"]
    reports = {r["site"]: r for r in p["siteChecks"]}
    assert sorted(reports) == sorted(SITES)
    for site, r in reports.items():
        assert r["error"] is None, (site, r)
        bias = r["bias"]
        assert bias["probes"] == 35 and bias["localExamples"] == GENDERED_EVAL  # the built-in set; its own tickets
        for model in ("adapter", "base"):
            assert bias[model]["gap"] > 0 and bias[model]["localGap"] >= 0, (site, bias)
        assert bias["adapter"] != bias["base"]  # the final adapter (trained) is not the base model
        assert r["pii"] == {"findings": {}, "probed": 0, "memorized": 0, "memorizationRate": 0.0}  # no PII in them
    manifest = json.loads(Path(p["adapter"]["uri"].removeprefix("file://"), "manifest.json").read_text())
    assert manifest["metrics"]["siteChecks"] == [fc.SiteCheckReport.model_validate(r).model_dump(
        mode="json", exclude_none=True) for r in p["siteChecks"]]
    # Nothing of any site's data in what the server wrote: no prompt, no answer, no name.
    written = (Path(federation["server"].progressURI.removeprefix("file://")).read_text()
               + json.dumps(manifest["metrics"]))
    for site, folder in federation["folders"].items():
        for line in (folder / "eval.jsonl").read_text().splitlines():
            record = json.loads(line)
            for text in (record["input"], record["output"]):
                assert text not in written, (site, text)
