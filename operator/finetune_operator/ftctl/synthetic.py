"""`ftctl run` for SyntheticDatasets: the operator's planner (synthesis_plan) with local processes.

Each call to `advance` does what the operator's reconciles do, until the object waits for people
(Reviewing) or is done: the generation Job, the review state read from the work folder, the
finalize Job, and the child Dataset's validation. A second `ftctl run` after `ftctl review` picks
up where the first stopped: the run's work folder (named by the run digest) already holds the
candidates, and the same planner sees them.
"""

from __future__ import annotations

from typing import Any, Optional

from .. import synthesis_plan
from ..api.synthetic import ReviewStats, SyntheticDataset
from ..conditions import now_iso
from . import logic, models
from .errors import EXIT_INTERRUPTED, FtctlError

#: Plan steps before giving up (each runs at most one Job): a loop here is a planner bug, not a wait.
MAX_STEPS = 12


def _read(uri: str) -> Optional[dict]:
    return models.read_json(uri)


class LocalSynthesis:
    """Advances the SyntheticDatasets of one `ftctl run` (`run` is the LocalRun)."""

    def __init__(self, run: Any):
        self.run = run
        self.jobs: dict[str, tuple[dict, int, str, str, str]] = {}  # Job name -> (job, exit, started, finished, msg)

    def inputs_known(self, obj: dict, jobs: dict[str, dict], pending_jobs: set[str]) -> bool:
        """Whether the seed and generator are settled in this run (else advance later)."""
        spec = obj["spec"]
        seed = self.run.datasets.get(spec["seed"]["dataset"])
        gen = (spec.get("generator") or {}).get("fineTuneJob")
        return seed is not None and (not gen or gen in jobs or gen not in pending_jobs)

    def advance(self, manifest: dict, jobs: dict[str, dict]) -> dict:
        """Run the object as far as it goes without people; returns it with its status."""
        obj = logic.local_object(manifest, self.run.options.cwd)
        name = obj["metadata"]["name"]
        sd = SyntheticDataset.model_validate(obj)
        for _ in range(MAX_STEPS):
            seed = self.run.datasets.get(sd.spec.seed.dataset)
            generator = jobs.get(sd.spec.generator.fineTuneJob or "")
            resolved = synthesis_plan.resolve(sd, seed, generator)
            observed = synthesis_plan.SyntheticInputs(seed=seed, generator_job=generator)
            if resolved[0] is not None:
                self._observe(sd, resolved[0], name, observed)
            plan = synthesis_plan.plan_synthetic(obj, observed, resolved, self.run.config, now_iso())
            self.run._events("SyntheticDataset", name, plan)
            if plan.status is not None:
                obj["status"] = plan.status
            if not plan.create and not plan.patches:
                return obj
            for manifest_ in plan.create:
                if manifest_["kind"] == "Dataset":
                    self._validate_child(manifest_)
            if any(m["kind"] == "Job" for m in plan.create):
                self._run_job(plan, name)
        raise FtctlError(f"SyntheticDataset {name}: no progress after {MAX_STEPS} steps (status "
                         f"{(obj.get('status') or {}).get('phase')})")

    def _observe(self, sd: SyntheticDataset, inputs, name: str, observed: synthesis_plan.SyntheticInputs) -> None:
        from finetune_trainer import storage

        work = synthesis_plan.work_uri(sd, inputs, self.run.config)
        for job_name in synthesis_plan.job_names(name, work.rsplit("-", 1)[-1]):
            if job_name in self.jobs:
                job, code, started, finished, message = self.jobs[job_name]
                summary, pods = logic.observed_job(job, code, started, finished, message)
                observed.jobs[job_name], observed.pods[job_name] = summary, pods
        observed.report = _read(storage.join(work, synthesis_plan.GENERATION_FILE))
        if not observed.report or not observed.report.get("kept"):
            return
        observed.finalized = _read(storage.join(work, synthesis_plan.REVIEW_FILE))
        if observed.finalized is not None:
            observed.review = ReviewStats.model_validate({k: v for k, v in observed.finalized.items()
                                                         if k in ReviewStats.model_fields})
            observed.dataset = self.run.datasets.get(name)
        else:
            from finetune_trainer import review

            observed.review = review.summarize(work, sd.spec.review)

    def _run_job(self, plan, name: str) -> None:
        job_name = next(m for m in plan.create if m["kind"] == "Job")["metadata"]["name"]
        what = "Generating candidates" if "-synth-" in job_name else "Writing the reviewed examples"
        with self.run.console.status(f"{what} for SyntheticDataset {name} ..."), \
                self.run.timings.phase(f"{'generate' if '-synth-' in job_name else 'finalize'} {name} (subprocess)"):
            job, result, started, finished = self.run.run_child(plan)
        if result.interrupted:
            raise FtctlError(f"interrupted while running {job_name}; run the same command again", EXIT_INTERRUPTED)
        self.jobs[job_name] = (job, result.exit_code, started, finished, result.error_message())

    def _validate_child(self, dataset: dict) -> None:
        """The child Dataset validates as any Dataset of the run (it then is the FineTuneJobs' data)."""
        self.run.validate_dataset(dataset)
