"""`ftctl run`: the operator's pipeline on one machine.

The operator's planners (`decisions.plan_dataset`, `decisions.plan_finetunejob`) decide
everything: the child Jobs and their rendered configs, phases, conditions, governance and
promotion. This module plays the cluster: it runs each child Job's `finetune-trainer`
command as a subprocess (executor.py) and reports back what a Job controller would.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from rich.console import Console
from rich.live import Live
from rich.markup import escape

from .. import attestation, children, decisions
from ..api import DatasetStatus, FineTuneJobStatus
from ..conditions import now_iso
from . import answers, display, logic, models
from .errors import EXIT_BLOCKED, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_USAGE, FtctlError
from .executor import CommandResult, run_command
from .manifests import ManifestSet
from .timing import Timings, log_events

#: Local state folder (relative to the working directory), like the operator's artifact store.
STATE_DIR = Path(".finetune")
#: What `--tiny` shrinks a job to: a run of seconds on the tiny model.
TINY_TRAINING = {"maxSteps": 8, "maxSeqLength": 128, "batchSize": 4, "evalEverySteps": 4,
                 "checkpointEverySteps": 4, "gradientAccumulationSteps": 1}
TINY_FIXED = {"gradientCheckpointing": False, "precision": "fp32"}
TINY_SUFFIX = "-tiny"
#: Names of the parts of a phase in the timing table (the trainer's "done" log line, answers.py).
TRAIN_PARTS = {"load": "load model and data", "prefix_cache": "frozen layers once per example",
               "steps": "optimizer steps", "eval": "eval loss", "export": "write adapter"}
SAMPLE_PARTS = {"load": "load model + adapter", "base": "generate: base model", "adapter": "generate: + adapter"}


def choose_threads(env: dict, cpus: int, idle: Optional[float]) -> tuple[int, str]:
    """Torch threads for the run's subprocesses, and why.

    An explicit OMP_NUM_THREADS wins. Otherwise as many as there are idle cores (rounded, at least
    1): a CPU-bound neighbour makes a second thread a loss, not a gain (the quickstart trained at
    26 tokens/s with 2 threads beside one busy process, 124 tokens/s with 1).
    """
    given = (env.get("OMP_NUM_THREADS") or "").strip()
    if given:
        if given.isdigit() and int(given) > 0:
            return int(given), f"OMP_NUM_THREADS={given} from the environment"
        raise FtctlError(f"OMP_NUM_THREADS: must be a positive integer, got {given!r}")
    if idle is None:
        return 1, f"{cpus} CPUs, idle time unknown (no /proc/stat): 1 thread"
    threads = max(1, min(cpus, int(idle + 0.3)))
    return threads, (f"{idle:.1f} of {cpus} CPUs idle over the last 0.5 s: one thread per idle CPU, as a "
                     "busy one would slow every step; OMP_NUM_THREADS overrides")


def idle_cpus(seconds: float = 0.5) -> Optional[float]:
    """How many CPUs were idle over `seconds` (from /proc/stat), or None where it cannot be read."""
    import time

    def sample() -> tuple[int, int]:
        with open("/proc/stat", encoding="ascii") as fh:
            fields = [int(x) for x in fh.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return idle, sum(fields[:8])

    try:
        idle0, total0 = sample()
        time.sleep(seconds)
        idle1, total1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    if total1 <= total0:
        return None
    return (idle1 - idle0) / (total1 - total0) * (os.cpu_count() or 1)


def use_threads(console: Console) -> int:
    """Pick the thread count (choose_threads), say it, and apply it to this process and its children."""
    cpus = os.cpu_count() or 1
    idle = None if os.environ.get("OMP_NUM_THREADS") else idle_cpus()
    threads, why = choose_threads(dict(os.environ), cpus, idle)
    os.environ["OMP_NUM_THREADS"] = str(threads)  # the trainer subprocesses inherit it
    import sys

    if "torch" in sys.modules:  # already imported (e.g. by a test): it read the variable then
        sys.modules["torch"].set_num_threads(threads)
    console.print(f"torch threads: {threads} ({why})", markup=False, soft_wrap=True)
    return threads


@dataclass
class RunOptions:
    tiny: bool = False
    samples: int = 3
    cwd: Path = field(default_factory=Path.cwd)

    @property
    def state_dir(self) -> Path:
        return self.cwd / STATE_DIR


@dataclass
class JobOutcome:
    name: str
    status: FineTuneJobStatus
    exit_code: int
    #: Before/after answers ({prompt, reference, before, after, beforeScore, afterScore}) to show.
    samples: list[dict] = field(default_factory=list)
    #: answers.summarize over every held-out example: how many answers are right before and after.
    answers: dict = field(default_factory=dict)


def shrink_for_tiny(spec: dict, tiny_model: Path) -> dict:
    """--tiny: the cached tiny model instead of the base model, a handful of short steps, and its
    own output folder (`<output>-tiny`): tiny checkpoints must never be resumed by a real run, nor
    a tiny adapter take over the real run's alias."""
    spec = json.loads(json.dumps(spec))
    spec["baseModel"] = {"uri": f"file://{tiny_model.resolve()}"}
    spec["output"]["uri"] = spec["output"]["uri"].rstrip("/") + TINY_SUFFIX
    training = {k: v for k, v in (spec.get("training") or {}).items() if k != "epochs"}
    for key, limit in TINY_TRAINING.items():
        training[key] = min(training.get(key) or limit, limit)
    training.update(TINY_FIXED)
    spec["training"] = training
    if spec.get("quantization"):
        spec["quantization"]["computeDtype"] = "float32"
    lora = spec.get("lora") or {}
    if lora.get("layersToTransform"):
        # Only some layers adapted (the quickstart adapts SmolLM2's top 8 of 30): the tiny model's top
        # layer instead, so the tiny run takes the same frozen-prefix path.
        lora["layersToTransform"] = [models.TINY_SHAPE["layers"] - 1]
    return spec


class LocalRun:
    """One `ftctl run`: validates the Datasets, then runs each FineTuneJob to the end."""

    def __init__(self, manifests: ManifestSet, options: RunOptions, console: Console):
        # Policies carry file:// locations too (bias.probesURI, evaluation.evalSetURI): make them
        # absolute like the Dataset's and the job's, so the governance subprocess finds them.
        self.manifests = dataclasses.replace(
            manifests, policies=[logic.absolute_uris(p, options.cwd) for p in manifests.policies])
        self.options = options
        self.console = console
        self.config = logic.operator_config(options.state_dir)
        self.datasets: dict[str, dict] = {}  # name -> the Dataset object with its status
        self.timings = Timings()

    # --- the cluster's part: run a child Job -----------------------------------------------------
    def run_child(self, plan: decisions.Plan,
                  on_poll: Optional[Callable[[str, dict], None]] = None) -> tuple[dict, CommandResult, str, str]:
        """Run the Job in `plan.create` (with its ConfigMap) like the Job controller: retry failures up
        to the Job's backoffLimit, never a configuration error (its podFailurePolicy fails at once)."""
        config_map = next((o for o in plan.create if o["kind"] == "ConfigMap"), None)
        job = next(o for o in plan.create if o["kind"] == "Job")
        retries = int(job["spec"].get("backoffLimit", 0))
        command, filename = logic.job_command(job)
        name = job["metadata"]["name"]
        config_path = self.options.state_dir / "configs" / f"{name}.json"
        config_path.parent.mkdir(parents=True, exist_ok=True)
        config_path.write_text(json.dumps(logic.job_config(config_map, filename, job=job), indent=2), encoding="utf-8")
        log_path = self.options.state_dir / "logs" / f"{name}.log"
        started = now_iso()
        poll = (lambda: on_poll(started, job)) if on_poll else None
        interrupt = (lambda: on_poll(started, job, interrupted=True)) if on_poll else None
        env = {"FINETUNE_SIGNING_KEYS": self.config.signing_keys_dir or ""}
        result = run_command(command, config_path, log_path, on_poll=poll, on_interrupt=interrupt, env=env)
        while logic.should_retry(result.exit_code) and retries > 0 and not result.interrupted:
            retries -= 1
            self.console.print(f"[yellow]{name}: exit {result.exit_code} ({escape(result.error_message())}); "
                               "retrying[/]", soft_wrap=True)
            result = run_command(command, config_path, log_path, on_poll=poll, on_interrupt=interrupt, env=env)
        return job, result, started, now_iso()

    def keys(self) -> attestation.Keyring:
        """The keys this state folder's reports are verified with (the public half of its signing key)."""
        ring = attestation.Keyring.from_folder(Path(self.config.signing_keys_dir or ""))
        return attestation.Keyring(trusted=ring.trusted)

    def _events(self, kind: str, name: str, plan: decisions.Plan) -> None:
        for type_, reason, message in plan.events:
            style = "yellow" if type_ == "Warning" else "dim"
            self.console.print(f"[{style}]{kind}/{name} {type_} {reason}: {escape(message)}[/]", soft_wrap=True)

    # --- datasets ---------------------------------------------------------------------------------
    def validate_dataset(self, manifest: dict) -> DatasetStatus:
        dataset = logic.local_object(manifest, self.options.cwd)
        name = dataset["metadata"]["name"]
        plan = decisions.plan_dataset(dataset, None, [], None, self.config, now_iso())
        self._events("Dataset", name, plan)
        dataset["status"] = plan.status or {}
        if plan.create:
            with self.console.status(f"Validating Dataset {name} ..."), self.timings.phase(f"validate Dataset {name}"):
                job, result, started, finished = self.run_child(plan)
            if result.interrupted:
                raise FtctlError(f"interrupted while validating Dataset {name}", EXIT_INTERRUPTED)
            summary, pods = logic.observed_job(job, result.exit_code, started, finished, result.error_message())
            output = children.dataset_output_uri(dataset, self.config)
            report = models.read_json(f"{output}/report.json") if result.exit_code == 0 else None
            plan = decisions.plan_dataset(dataset, summary, pods, report, self.config, now_iso())
            self._events("Dataset", name, plan)
            if plan.status:
                dataset["status"] = plan.status
            if dataset["status"].get("phase") == "Failed" and result.exit_code:
                dataset["status"]["message"] += f": {result.error_message()}"
        self.datasets[name] = dataset
        return DatasetStatus.model_validate(dataset["status"])

    # --- jobs -------------------------------------------------------------------------------------
    def prepare_job(self, manifest: dict) -> dict:
        """The job as it will run: absolute URIs, and for --tiny the tiny model and few steps."""
        ftj = logic.local_object(manifest, self.options.cwd)
        if self.options.tiny:
            dataset = self.datasets.get(ftj["spec"]["datasetRef"]["name"]) or {}
            vlm = (dataset.get("spec") or {}).get("format") == "image-text"  # a tiny LLaVA instead
            with self.console.status("Building the tiny model (cached after the first run) ..."):
                tiny = models.tiny_vlm(self.options.state_dir) if vlm else models.tiny_model(self.options.state_dir)
            ftj["spec"] = shrink_for_tiny(ftj["spec"], tiny)
            return ftj
        base = models.local_path(ftj["spec"]["baseModel"]["uri"])
        if base is not None and models.is_quickstart_model(base, self.options.cwd):
            if not models.quickstart_model_ready(base):
                with self.console.status("Converting SmolLM2-135M-Instruct for the quickstart (once) ..."), \
                        self.timings.phase("convert SmolLM2 (once per wheel)"):
                    models.ensure_quickstart_model(base, self.options.state_dir / "logs" / "convert-smollm2.log")
        elif base is not None and not base.exists():
            raise FtctlError(f"FineTuneJob {ftj['metadata']['name']}: spec.baseModel.uri: "
                             f"folder {base} does not exist")
        return ftj

    def _plan(self, ftj: dict, inputs: decisions.JobInputs) -> decisions.Plan:
        plan = decisions.plan_finetunejob(ftj, inputs, self.config, now_iso())
        self._events("FineTuneJob", ftj["metadata"]["name"], plan)
        if plan.status:
            ftj["status"] = plan.status
        return plan

    # A local status store: what the API server keeps for the operator between reconciles.
    def _status_path(self, ftj: dict) -> Path:
        meta = ftj["metadata"]
        return self.options.state_dir / "status" / meta["namespace"] / f"{meta['name']}.json"

    def _spec_digest(self, ftj: dict, dataset: dict) -> str:
        """What the adapter depends on: the spec except promotion, and the data it trained on."""
        spec = {k: v for k, v in ftj["spec"].items() if k != "promotion"}
        text = json.dumps([spec, dataset["status"].get("digest")], sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    def _save_status(self, ftj: dict, dataset: dict) -> None:
        path = self._status_path(ftj)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"specDigest": self._spec_digest(ftj, dataset), "status": ftj.get("status")},
                                   indent=2), encoding="utf-8")

    def _awaiting_approval(self, ftj: dict, dataset: dict) -> Optional[dict]:
        """The saved status of a run that waits for approval of this very adapter, if any."""
        try:
            saved = json.loads(self._status_path(ftj).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        status = saved.get("status") or {}
        if (status.get("phase") != "AwaitingApproval" or not status.get("adapter")
                or saved.get("specDigest") != self._spec_digest(ftj, dataset)):
            return None
        return status

    def run_job(self, manifest: dict) -> JobOutcome:
        ftj = self.prepare_job(manifest)
        dataset = self.datasets.get(ftj["spec"]["datasetRef"]["name"])
        inputs = decisions.JobInputs(dataset=dataset, policies=self.manifests.policies)
        waiting = self._awaiting_approval(ftj, dataset)
        try:
            if waiting is None:
                return self._run_job(ftj, dataset, inputs)
            # Like the operator after a spec change: the adapter and its governance Job are done;
            # only the promotion decision is taken again (with the approval now in the spec).
            # A changed policy is a new governance run: its checks run now, as in the operator.
            ftj["status"] = waiting
            adapter = waiting["adapter"]
            run = decisions.governance_run(ftj, waiting.get("governance") or {}, adapter["uri"], adapter["digest"],
                                           self.manifests.policies, self.config)
            if run.new:
                return self._govern(ftj, dataset, inputs, self._plan(ftj, inputs))
            stub = {"metadata": {"name": run.job_name, "annotations": {}}, "spec": {}}
            now = now_iso()
            inputs.governance_job, inputs.governance_pods = logic.observed_job(stub, 0, now, now)
            inputs.report = models.read_json(run.report_uri)
            inputs.keys = self.keys()
            inputs.manifest_ok = logic.verify_adapter(adapter["uri"])
            return self._conclude(ftj, dataset, self._plan(ftj, inputs))
        finally:
            if ftj.get("status"):
                self._save_status(ftj, dataset)

    def _run_job(self, ftj: dict, dataset: dict, inputs: decisions.JobInputs) -> JobOutcome:
        plan = self._plan(ftj, inputs)  # -> Queued: the trainer Job and its config
        if not plan.create:
            return self._outcome(ftj)
        output_uri = ftj["spec"]["output"]["uri"].rstrip("/")
        resume_step = models.newest_checkpoint_step(output_uri)
        if resume_step is not None:  # the trainer resumes by itself; say so, as it changes what the user sees
            self.console.print(f"FineTuneJob/{ftj['metadata']['name']}: resuming from the checkpoint at step "
                               f"{resume_step} in {output_uri}/checkpoints", markup=False, soft_wrap=True)
        with self.timings.phase(f"train {ftj['metadata']['name']} (trainer subprocess)"):
            job, result, started, finished = self._train(ftj, plan, inputs, output_uri)
        done = log_events(result.log_path, "done")
        self.timings.parts((done[-1].get("seconds") or {}) if done else {}, TRAIN_PARTS)
        if result.interrupted:
            step = (ftj.get("status") or {}).get("progress", {}).get("step")
            at = f" at step {step}" if step is not None else ""
            raise FtctlError(f"interrupted: the trainer wrote a checkpoint{at} in {output_uri}/checkpoints; "
                             "run the same command again to resume from it", EXIT_INTERRUPTED)
        inputs.trainer_job, inputs.trainer_pods = logic.observed_job(job, result.exit_code, started, finished,
                                                                     result.error_message())
        inputs.progress = models.read_json(f"{output_uri}/progress.json")
        inputs.result = models.read_json(f"{output_uri}/result.json") if result.exit_code == 0 else None
        plan = self._plan(ftj, inputs)  # -> Evaluating (governance Job) or Failed
        if ftj["status"].get("phase") == "Failed" and result.exit_code:
            ftj["status"]["message"] = f"{ftj['status']['message']}: {result.error_message()}"
        if not plan.create:
            return self._outcome(ftj)
        return self._govern(ftj, dataset, inputs, plan)

    def _govern(self, ftj: dict, dataset: dict, inputs: decisions.JobInputs, plan: decisions.Plan) -> JobOutcome:
        """Run the governance Job the plan created, then take the promotion decision."""
        digest = ftj["status"]["adapter"]["digest"]
        with self.console.status(f"Running governance checks on adapter {digest[:19]}... "), \
                self.timings.phase(f"governance {ftj['metadata']['name']} (subprocess)"):
            job, gov, started, finished = self.run_child(plan)
        checks = log_events(gov.log_path, "check")
        # The checks of this attempt (a retried Job logs each attempt's checks again); the first
        # check to need the model also pays for loading it.
        last = checks[-len({c.get("check") for c in checks}):] if checks else []
        self.timings.parts({f"check {c.get('check')}": float(c.get("seconds") or 0) for c in last})
        if gov.interrupted:
            raise FtctlError("interrupted during the governance checks; run again to redo them", EXIT_INTERRUPTED)
        inputs.governance_job, inputs.governance_pods = logic.observed_job(job, gov.exit_code, started, finished,
                                                                           gov.error_message())
        adapter_uri = ftj["status"]["adapter"]["uri"]
        report_uri = ftj["status"]["governance"]["reportURI"]
        inputs.report = models.read_json(report_uri) if gov.exit_code == 0 else None
        inputs.keys = self.keys()
        inputs.manifest_ok = logic.verify_adapter(adapter_uri)
        plan = self._plan(ftj, inputs)  # -> Succeeded | AwaitingApproval | Failed
        if ftj["status"].get("phase") == "Failed" and gov.exit_code:
            ftj["status"]["message"] = f"{ftj['status']['message']}: {gov.error_message()}"
        return self._conclude(ftj, dataset, plan)

    def _conclude(self, ftj: dict, dataset: dict, plan: decisions.Plan) -> JobOutcome:
        """Apply the last plan (the alias record) and show what the adapter changed."""
        if plan.alias is not None:
            from finetune_trainer import storage

            if plan.model_card is not None:
                storage.write_text(*plan.model_card)
            alias_uri, record = plan.alias
            storage.write_text(alias_uri, json.dumps(record, indent=2, sort_keys=True))  # one atomic write
        outcome = self._outcome(ftj)
        if outcome.status.phase != "Failed":
            outcome.samples, outcome.answers = self._samples(ftj, dataset)
        return outcome

    def _train(self, ftj: dict, plan: decisions.Plan, inputs: decisions.JobInputs, output_uri: str):
        """Run the trainer Job with the live view; status comes from the planner, like on a cluster."""
        name = ftj["metadata"]["name"]
        state = {"last_step": -1, "note": ""}
        live: Optional[Live] = None

        def poll(started: str, job: dict, interrupted: bool = False) -> None:
            if interrupted:
                state["note"] = "Ctrl-C: stopping the trainer after a checkpoint (Ctrl-C again to kill it)"
            inputs.trainer_job, inputs.trainer_pods = logic.observed_job(job, None, started, None)
            inputs.progress = models.read_json(f"{output_uri}/progress.json")
            self._plan(ftj, inputs)
            status = ftj.get("status") or {}
            progress = status.get("progress")
            if live is not None:
                live.update(display.progress_view(name, status.get("phase"), progress,
                                                  state["note"] or status.get("message", "")))
            elif progress and progress.get("step") != state["last_step"]:
                # Not a terminal (CI, a pipe): one line per new step instead of a redrawn panel.
                state["last_step"] = progress.get("step")
                self.console.print(
                    f"{name}: step {progress.get('step')}/{progress.get('totalSteps')} "
                    f"loss {display.format_number(progress.get('loss'))} "
                    f"eval loss {display.format_number(progress.get('evalLoss'))} "
                    f"tokens/s {display.format_number(progress.get('tokensPerSecond'))} "
                    f"ETA {display.format_eta(progress.get('etaSeconds'))}", markup=False)

        if self.console.is_terminal:
            live = Live(display.progress_view(name, "Queued", None, "starting the trainer ..."),
                        console=self.console, refresh_per_second=4)
            live.start()
        try:
            return self.run_child(plan, on_poll=poll)
        finally:
            if live is not None:
                live.stop()

    def _outcome(self, ftj: dict) -> JobOutcome:
        status = FineTuneJobStatus.model_validate(ftj.get("status") or {})
        code = 0
        if status.phase == "Failed":
            code = EXIT_BLOCKED if (status.promotion and status.promotion.state == "Blocked") else EXIT_FAILED
        elif status.phase not in ("Succeeded", "AwaitingApproval", "Suspended"):
            code = EXIT_FAILED  # e.g. still WaitingForDataset: nothing more will happen locally
        return JobOutcome(ftj["metadata"]["name"], status, code)

    def _samples(self, ftj: dict, dataset: dict) -> tuple[list[dict], dict]:
        """Every held-out example answered before and after, scored against its reference; the first
        `samples` are shown. (--samples 0 skips it all.)"""
        if self.options.samples <= 0:
            return [], {}
        if dataset["spec"]["format"] == "image-text":  # text-only answers say nothing about an image model
            return [], {}
        try:
            with self.console.status("Answering the held-out questions before and after the adapter ..."), \
                    self.timings.phase("answers before/after (held-out split)"):
                result = answers.before_after(ftj["spec"]["baseModel"]["uri"], ftj["status"]["adapter"]["uri"],
                                              f"{dataset['status']['validatedURI']}/eval.jsonl",
                                              dataset["spec"]["format"])
            self.timings.parts(result["seconds"], SAMPLE_PARTS, rest="import torch / transformers / peft, score")
            return result["samples"][:self.options.samples], result["summary"]
        except Exception as exc:  # a sample is a nicety: never turn a good run into a failure
            self.console.print(f"[yellow]warning:[/] could not generate before/after samples: {escape(str(exc))}")
            return [], {}


class Reporter:
    """What the command line shows as each object finishes (main.py prints; tests may collect)."""

    def dataset_done(self, name: str, status: DatasetStatus) -> None: ...

    def job_done(self, job: dict, outcome: JobOutcome) -> None: ...

    def synthetic_done(self, obj: dict) -> None: ...


def run_all(manifests: ManifestSet, options: RunOptions, console: Console, reporter: Reporter) -> int:
    """Validate the Datasets, then run every FineTuneJob; returns the exit code of the worst outcome.

    A Dataset that is not Ready stops the run before any training, with its reasons.
    """
    for job in manifests.jobs:
        spec = job.get("spec") or {}
        if spec.get("initFrom") or (spec.get("training") or {}).get("replay"):
            # The operator resolves and verifies the parent and the replay Datasets (lineage.py); a
            # local run would otherwise train from the base model without saying so.
            raise FtctlError(f"FineTuneJob {job['metadata']['name']}: spec.initFrom and training.replay are "
                             "resolved by the operator; ftctl run does not support them yet (use ftctl submit)",
                             EXIT_USAGE)
    use_threads(console)
    run = LocalRun(manifests, options, console)
    for dataset in manifests.datasets:
        status = run.validate_dataset(dataset)
        reporter.dataset_done(dataset["metadata"]["name"], status)
    synthetic_names = {s["metadata"]["name"] for s in manifests.synthetic}
    problems = []
    for job in manifests.jobs:
        ds_name = job["spec"]["datasetRef"]["name"]
        if ds_name not in run.datasets and ds_name not in synthetic_names:
            problems.append(f"FineTuneJob {job['metadata']['name']}: spec.datasetRef.name: Dataset {ds_name} "
                            "is not among the manifests given to ftctl run")
        elif ds_name in run.datasets and run.datasets[ds_name]["status"].get("phase") != "Ready":
            ds = run.datasets[ds_name]
            problems.append(f"Dataset {ds_name} is {ds['status'].get('phase')}: {ds['status'].get('message')}")
    if not manifests.jobs and not manifests.synthetic:
        problems += [f"Dataset {n} is {d['status'].get('phase')}: {d['status'].get('message')}"
                     for n, d in run.datasets.items() if d["status"].get("phase") != "Ready"]
    if problems:
        raise FtctlError("; ".join(dict.fromkeys(problems)))
    return _run_in_order(run, manifests, console, reporter)


def _run_in_order(run: LocalRun, manifests: ManifestSet, console: Console, reporter: Reporter) -> int:
    """FineTuneJobs whose Dataset is Ready, and SyntheticDatasets whose seed and generator are, until
    nothing more can move: a generator job trains first, its SyntheticDataset grows data, and a job on
    that data trains once its review passed. What waits for people is said, with the command."""
    from .synthetic import LocalSynthesis

    synthesis = LocalSynthesis(run)
    jobs_done: dict[str, dict] = {}
    waiting: list[str] = []
    pending_jobs = list(manifests.jobs)
    pending_synthetic = list(manifests.synthetic)
    worst = 0
    moved = True
    while moved:
        moved = False
        for job in list(pending_jobs):
            dataset = run.datasets.get(job["spec"]["datasetRef"]["name"])
            if dataset is None or dataset["status"].get("phase") != "Ready":
                continue
            pending_jobs.remove(job)
            moved = True
            worst = max(worst, _run_one_job(run, job, console, reporter, jobs_done))
        pending_names = {j["metadata"]["name"] for j in pending_jobs}
        for syn in list(pending_synthetic):
            if not synthesis.inputs_known(syn, jobs_done, pending_names):
                continue
            pending_synthetic.remove(syn)
            moved = True
            obj = synthesis.advance(syn, jobs_done)
            status = obj.get("status") or {}
            reporter.synthetic_done(obj)
            if status.get("phase") == "Reviewing":
                waiting.append(f"SyntheticDataset {obj['metadata']['name']} waits for review: review with "
                               f"ftctl review {obj['metadata']['name']} --work-uri {status.get('workURI')} "
                               "(or --import a decisions file), then run ftctl run again")
            elif status.get("phase") != "Ready":
                worst = max(worst, EXIT_FAILED)
    for job in pending_jobs:
        console.print(f"[yellow]FineTuneJob {escape(job['metadata']['name'])} did not run:[/] its Dataset "
                      f"{escape(job['spec']['datasetRef']['name'])} is not Ready", soft_wrap=True)
    for line in waiting:
        console.print(f"[yellow]{escape(line)}[/]", soft_wrap=True)
    for federation in manifests.federations:  # ftctl/federated.py: Flower's deployment engine on 127.0.0.1
        from .federated import run_federation

        with run.timings.phase(f"federation {federation['metadata']['name']}"):
            worst = max(worst, run_federation(federation, run.datasets, run.options.cwd, run.options.state_dir,
                                              console, tiny=run.options.tiny, policies=run.manifests.policies,
                                              config=run.config))
    console.print(display.timings_table(run.timings.phases, run.timings.total(), os.environ.get("OMP_NUM_THREADS")))
    if pending_jobs and not waiting:
        worst = max(worst, EXIT_FAILED)
    return worst


def _run_one_job(run: LocalRun, job: dict, console: Console, reporter: Reporter, jobs_done: dict) -> int:
    for message in logic.ignored_policy_settings(job, run.manifests.policies, run.config):
        console.print(f"[yellow]warning:[/] FineTuneJob {job['metadata']['name']}: {escape(message)}",
                      soft_wrap=True)
    outcome = run.run_job(job)
    reporter.job_done(job, outcome)
    # What a SyntheticDataset's generator reference resolves to: the job as it ran, with its status.
    jobs_done[job["metadata"]["name"]] = {**run.prepare_job(job),
                                          "status": outcome.status.model_dump(mode="json", exclude_none=True)}
    line = answers.right_line(outcome.answers)
    if line:
        console.print(line, markup=False, soft_wrap=True)
    return outcome.exit_code
