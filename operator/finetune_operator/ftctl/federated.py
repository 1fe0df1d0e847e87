"""`ftctl run` for a FederatedFineTuneJob: the whole federation on this machine.

Flower's deployment engine on 127.0.0.1, as the pods would run it: a SuperLink, one SuperNode (and
its ClientApps) per participant, and the server, each a `finetune-trainer federation-*` process with
only its own config (rendered by the same functions the operator uses). Each site trains on its own
validated Dataset, from the manifests given to `ftctl run`, and keeps its checkpoints in its own
folder under .finetune/federations/<name>/.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Optional

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..api import Dataset, FederatedFineTuneJob
from . import logic, models
from .errors import EXIT_BLOCKED, EXIT_FAILED, EXIT_INTERRUPTED, FtctlError

#: Local rounds are short: the SuperNodes and the ServerApp poll every 0.2 s instead of Flower's 3 s.
LOCAL_POLL_SECONDS = 0.2
#: --tiny: the tiny model and a few short steps per round.
TINY_LOCAL_STEPS = 4


def prepare(manifest: dict, cwd: Path, state_dir: Path, tiny: bool) -> FederatedFineTuneJob:
    """The federation as it will run: absolute URIs; the tiny model built when the spec names it (or --tiny)."""
    obj = logic.local_object(manifest, cwd)
    spec = obj["spec"]
    base = models.local_path(spec["baseModel"]["uri"])
    tiny_path = state_dir / "models" / models.tiny_model_name()
    if tiny or (base is not None and base.resolve() == tiny_path.resolve()):
        spec["baseModel"] = {"uri": f"file://{models.tiny_model(state_dir).resolve()}"}
    elif base is not None and not base.exists():
        raise FtctlError(f"FederatedFineTuneJob {obj['metadata']['name']}: spec.baseModel.uri: folder {base} "
                         "does not exist")
    if tiny:
        spec["localSteps"] = min(spec.get("localSteps") or TINY_LOCAL_STEPS, TINY_LOCAL_STEPS)
        spec.setdefault("training", {})["maxSeqLength"] = min(spec["training"].get("maxSeqLength") or 128, 128)
    return FederatedFineTuneJob.model_validate(obj)


def site_datasets(job: FederatedFineTuneJob, datasets: dict[str, dict]) -> dict[str, Dataset]:
    """Each participant's Dataset, from the validated manifests: the one with its name in its namespace."""
    out, problems = {}, []
    for p in job.spec.participants:
        if p.remote is not None:
            problems.append(f"participant {p.name} is remote: ftctl run only runs sites on this machine")
            continue
        found = datasets.get(p.dataset)
        if found is None or found["metadata"].get("namespace", "default") != p.namespace:
            problems.append(f"participant {p.name}: Dataset {p.namespace}/{p.dataset} is not among the manifests")
            continue
        if found["status"].get("phase") != "Ready":
            problems.append(f"participant {p.name}: Dataset {p.namespace}/{p.dataset} is "
                            f"{found['status'].get('phase')}: {found['status'].get('message')}")
            continue
        out[p.name] = Dataset.model_validate(found)
    if problems:
        raise FtctlError(f"FederatedFineTuneJob {job.metadata.model_dump().get('name')}: " + "; ".join(problems))
    return out


def local_federation(job: FederatedFineTuneJob, datasets: dict[str, Dataset], workdir: Path, site_checks=None):
    """The three roles' configs, rendered as the operator renders them, with local addresses; `site_checks`
    (what the effective policy asks the sites to run) as the operator derives it."""
    from finetune_trainer.federated import config as fc
    from finetune_trainer.federated.localrun import LocalFederation, free_port

    port = free_port()
    address = f"127.0.0.1:{port}"
    superlink = fc.superlink_config(job).model_copy(update={"host": "127.0.0.1", "port": port, "healthPort": 0})
    server = fc.server_config(job, superlink=address, datasets=datasets, site_checks=site_checks).model_copy(
        update={"pollSeconds": LOCAL_POLL_SECONDS})
    sites = {p.name: fc.site_config(job, p, datasets[p.name], superlink=address,
                                    scratch_uri=f"file://{(workdir / 'sites' / p.name).resolve()}").model_copy(
        update={"pollSeconds": LOCAL_POLL_SECONDS, "healthPort": 0, "runtimePort": free_port()})
        for p in job.spec.participants}
    return LocalFederation(workdir, superlink, server, sites)


def _round_line(r: dict) -> str:
    sites = ", ".join(f"{s['site']} {s['examples']} ex loss {s['localLoss']:.3f}" for s in r["sites"]
                      if s.get("localLoss") is not None)
    return (f"round {r['round']}: {r['sitesReported']} of {r['sitesSelected']} sites reported in "
            f"{r.get('seconds') or 0:.1f}s ({sites})")


def local_gate(job: FederatedFineTuneJob, datasets: dict[str, dict], progress: dict, policies: list[dict],
               config, now: str) -> tuple[dict, object]:
    """The operator's own planner (federation.plan_federation) over the finished local federation, as
    on a cluster: the server Job done, progress.json read, the adapter's manifest verified, the
    GovernancePolicies given to `ftctl run`. Returns the final status and the plan (its alias record)."""
    from finetune_trainer import adapter as adapter_mod
    from finetune_trainer import storage

    from .. import federation as fed_mod

    fed = job.model_dump(mode="json", exclude_none=True)
    meta = fed["metadata"]
    meta.setdefault("generation", 1)
    ns, name = meta.get("namespace") or "default", meta["name"]
    server = {"metadata": {"name": fed_mod.server_name(name), "namespace": ns}}
    summary, pods = logic.observed_job(server, 0, now, now)
    observed = fed_mod.Observed(
        datasets={(p.namespace or "", p.dataset or ""): datasets[p.dataset or ""] for p in job.spec.participants
                  if p.remote is None and p.dataset in datasets},
        jobs={(ns, fed_mod.server_name(name)): summary}, pods={(ns, fed_mod.server_name(name)): pods},
        progress=progress, policies=policies)
    fed["status"] = {"phase": "Training", "startTime": now, "observedGeneration": meta["generation"]}
    plan = fed_mod.plan_federation(fed, job, observed, config, now)
    for _ in range(3):  # Training -> Evaluating (the manifest to verify) -> a verdict
        fed["status"] = plan.status if plan.status is not None else fed["status"]
        adapter_uri = (fed["status"].get("adapter") or {}).get("uri")
        if fed["status"].get("phase") != "Evaluating" or not adapter_uri:
            break
        observed.manifest_ok = adapter_mod.verify(adapter_uri)
        alias_uri = fed_mod.alias_uri_of(fed)
        try:
            current = json.loads(storage.read_text(alias_uri)) if alias_uri else None
        except (FileNotFoundError, ValueError):
            current = None
        observed.alias_current = current if isinstance(current, dict) else None
        plan = fed_mod.plan_federation(fed, job, observed, config, now)
    if plan.status is not None:
        fed["status"] = plan.status
    return fed["status"], plan


def run_federation(manifest: dict, datasets: dict[str, dict], cwd: Path, state_dir: Path, console: Console,
                   tiny: bool = False, policies: Optional[list[dict]] = None, config=None) -> int:
    job = prepare(manifest, cwd, state_dir, tiny)
    name = job.metadata.model_dump()["name"]
    by_site = site_datasets(job, datasets)
    workdir = state_dir / "federations" / name
    shutil.rmtree(workdir, ignore_errors=True)  # a new federation: no site resumes a previous run's rounds
    from finetune_trainer.federated import config as fc

    from .. import federation as fed_mod

    config = config or logic.operator_config(state_dir)
    policy, _ = fed_mod.effective_policy(job.model_dump(mode="json", exclude_none=True), policies or [], config)
    federation = local_federation(job, by_site, workdir, site_checks=fc.site_checks_for(policy))
    progress_path = models.local_path(federation.server.progressURI)
    console.print(f"FederatedFineTuneJob/{name}: {len(by_site)} sites, {job.spec.rounds} rounds x "
                  f"{job.spec.localSteps} local steps, aggregation {job.spec.aggregation}, secure aggregation "
                  f"{'on' if job.secure_aggregation() else 'off'}, differential privacy "
                  f"{'on' if job.spec.privacy.differentialPrivacy.enabled else 'off'}; logs in {workdir / 'logs'}",
                  markup=False, soft_wrap=True)
    started = time.monotonic()
    shown = 0
    progress: dict = {}
    federation.start()
    try:
        while federation.procs["server"].poll() is None:
            progress = _read(progress_path) or progress
            for r in progress.get("rounds", [])[shown:]:
                console.print(_round_line(r), markup=False, soft_wrap=True)
            shown = len(progress.get("rounds", []))
            time.sleep(1.0)
        code = federation.wait(timeout=120)
    except KeyboardInterrupt:
        raise FtctlError(f"interrupted: federation {name} stopped", EXIT_INTERRUPTED) from None
    finally:
        federation.stop()
    progress = _read(progress_path) or progress
    for r in progress.get("rounds", [])[shown:]:
        console.print(_round_line(r), markup=False, soft_wrap=True)
    if code != 0 or progress.get("state") != "Succeeded":
        tail = federation.log_of("server")[-1500:]
        console.print(f"[red]FederatedFineTuneJob {escape(name)} failed:[/] {escape(progress.get('message', ''))}\n"
                      f"{escape(tail)}", soft_wrap=True)
        return EXIT_FAILED
    console.print(summary_table(progress))
    adapter = progress["adapter"]
    privacy = progress.get("privacy") or {}
    eps = f", epsilon {privacy['epsilon']:.2f} at delta {privacy['delta']:g}" if privacy.get("epsilon") is not None else ""
    console.print(f"FederatedFineTuneJob/{name}: {len(progress.get('rounds', []))} rounds aggregated in "
                  f"{time.monotonic() - started:.0f}s: adapter {adapter['digest']} at {adapter['uri']}{eps}",
                  markup=False, soft_wrap=True)
    return conclude(job, by_site_raw(job, datasets), progress, policies or [], config, console)


def by_site_raw(job: FederatedFineTuneJob, datasets: dict[str, dict]) -> dict[str, dict]:
    return {p.dataset or "": datasets[p.dataset or ""] for p in job.spec.participants if p.dataset in datasets}


def conclude(job: FederatedFineTuneJob, datasets: dict[str, dict], progress: dict, policies: list[dict], config,
             console: Console) -> int:
    """The gate's verdict, as the operator would reach it, and the alias record it writes."""
    from finetune_trainer import storage

    from ..conditions import now_iso
    from . import display

    name = job.metadata.model_dump()["name"]
    status, plan = local_gate(job, datasets, progress, policies, config, now_iso())
    gov = status.get("governance") or {}
    console.print(display.governance_table(gov.get("checks") or [], gov.get("passed"),
                                           (gov.get("effectivePolicy") or {}).get("required") or []))
    if plan.alias is not None:
        alias_uri, record = plan.alias
        storage.write_text(alias_uri, json.dumps(record, indent=2, sort_keys=True))  # one atomic write
    phase = status.get("phase")
    console.print(f"FederatedFineTuneJob/{name} {phase}: {status.get('message', '')}", markup=False, soft_wrap=True)
    if phase in ("Succeeded", "AwaitingApproval"):
        return 0
    return EXIT_BLOCKED if (status.get("promotion") or {}).get("state") == "Blocked" else EXIT_FAILED


def summary_table(progress: dict) -> Table:
    table = Table(title="Federated rounds")
    for col in ("round", "sites", "held-out loss", "seconds"):
        table.add_column(col)
    for r in progress.get("rounds", []):
        held = r.get("heldOutLoss")
        table.add_row(str(r["round"]), f"{r['sitesReported']}/{r['sitesSelected']}",
                      f"{held:.4f}" if held is not None else "-", f"{r.get('seconds') or 0:.1f}")
    return table


def _read(path: Optional[Path]) -> dict:
    try:
        return json.loads(path.read_text()) if path else {}
    except (OSError, ValueError):
        return {}
