"""The `ftctl` command line.

    ftctl run DIR_OR_FILES... [--tiny]      # the whole pipeline on this machine, no cluster
    ftctl submit -f FILES                   # validate locally, then create or update on the cluster
    ftctl status [NAME] | watch NAME | logs NAME [-f] | report NAME | approve NAME --digest D
    ftctl lineage NAME_OR_ALIAS             # the chain of adapters (spec.initFrom) down to the base model
    ftctl review NAME | --work-uri URI [--import FILE]   # accept / reject / edit synthetic examples

Every failure is one line on stderr (FTCTL_DEBUG=1 shows the traceback) and a non-zero exit.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from pathlib import Path
from typing import Callable, List, Optional

import typer
from rich.console import Console
from rich.live import Live
from rich.markup import escape

from . import display
from .errors import EXIT_BLOCKED, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_USAGE, FtctlError

app = typer.Typer(help=__doc__.splitlines()[0], no_args_is_help=True, add_completion=False,
                  pretty_exceptions_enable=False, rich_markup_mode=None)


def _width(stream) -> Optional[int]:
    """Terminals: their own width. Pipes and CI logs: wide, so table cells are not cut to 80 columns."""
    return None if stream.isatty() else int(os.environ.get("COLUMNS") or 200)


console = Console(highlight=False, width=_width(sys.stdout))
err_console = Console(stderr=True, highlight=False, width=_width(sys.stderr))

QUICKSTART = Path(__file__).resolve().parents[3] / "examples" / "quickstart"
#: Phases after which `watch` stops.
FINAL_PHASES = {"Succeeded", "Failed", "AwaitingApproval", "Suspended"}


def one_line_errors(fn: Callable) -> Callable:
    """Turn any failure into one clear line and an exit code, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from .executor import SIGNALS, interrupt_exit_code, signals_handled

        try:
            # SIGINT and SIGTERM both stop a running trainer with a checkpoint (executor.py).
            with signals_handled():
                return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except FtctlError as exc:
            if exc.exit_code == EXIT_INTERRUPTED and SIGNALS.killed:
                err_console.print(f"[yellow]warning:[/] {escape(SIGNALS.killed)}", soft_wrap=True)
            err_console.print(f"[red]error:[/] {escape(str(exc))}", soft_wrap=True)
            # An interruption exits 128 + the signal, as a shell reports it: 130 SIGINT, 143 SIGTERM.
            raise typer.Exit(interrupt_exit_code(exc.exit_code) if exc.exit_code == EXIT_INTERRUPTED
                             else exc.exit_code) from None
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM while no child was running
            err_console.print("[red]error:[/] interrupted")
            raise typer.Exit(interrupt_exit_code(EXIT_INTERRUPTED)) from None
        except Exception as exc:  # noqa: BLE001 - the promise is: no traceback for users
            if os.environ.get("FTCTL_DEBUG"):
                raise
            err_console.print(f"[red]error:[/] {type(exc).__name__}: {escape(str(exc))} (FTCTL_DEBUG=1 shows the traceback)",
                              soft_wrap=True)
            raise typer.Exit(EXIT_FAILED) from None

    return wrapper


# --- local runs -----------------------------------------------------------------------------------
class ConsoleReporter:
    """Prints each object's final status as YAML, the governance table, and the samples."""

    def dataset_done(self, name, status) -> None:
        console.print(display.status_yaml("Dataset", name, status), markup=False, soft_wrap=True)

    def synthetic_done(self, obj) -> None:
        status = obj.get("status") or {}
        console.print(display.status_yaml("SyntheticDataset", obj["metadata"]["name"], status), markup=False,
                      soft_wrap=True)

    def job_done(self, job, outcome) -> None:
        status = outcome.status
        console.print(display.status_yaml("FineTuneJob", outcome.name, status), markup=False, soft_wrap=True)
        if status.governance is not None:
            required = (status.governance.effectivePolicy or {}).get("required") or ()
            console.print(display.governance_table(status.governance.checks, status.governance.passed, required))
            from .heatmaps import heatmap_lines

            for line in heatmap_lines(status.governance.checks):  # a vision-language adapter's pictures
                console.print(line, markup=False, soft_wrap=True)
        if outcome.samples:
            console.print(display.samples_table(outcome.samples))
        if status.phase == "Succeeded":
            console.print(f"[green]FineTuneJob {outcome.name} succeeded:[/] {escape(status.message)}", soft_wrap=True)
        elif status.phase == "AwaitingApproval":
            console.print(f"[yellow]FineTuneJob {outcome.name} awaits approval:[/] {escape(status.message)}. "
                          f"Add spec.promotion.approval.digest: {status.adapter.digest} to the manifest and run again.",
                          soft_wrap=True)
        else:
            failing = display.failing_checks(status.governance) if status.governance else []
            detail = f" (failing checks: {', '.join(failing)})" if failing else ""
            err_console.print(f"[red]FineTuneJob {outcome.name} {status.phase}:[/] {escape(status.message + detail)}",
                              soft_wrap=True)


def _run(paths: List[Path], tiny: bool, samples: int, cwd: Optional[Path] = None) -> None:
    from .local import RunOptions, run_all
    from .manifests import load

    manifests = load(paths)  # an invalid manifest stops here, before any work
    options = RunOptions(tiny=tiny, samples=samples, **({"cwd": cwd} if cwd else {}))
    code = run_all(manifests, options, console, ConsoleReporter())
    if code:
        raise typer.Exit(code)


@app.command()
@one_line_errors
def run(
    paths: List[Path] = typer.Argument(..., help="Manifest files or folders (Dataset, FineTuneJob, GovernancePolicy)."),
    tiny: bool = typer.Option(False, "--tiny", help="Use a tiny model built from a config and a few steps (seconds)."),
    samples: int = typer.Option(3, "--samples", help="Eval prompts to answer before/after the adapter (0: none)."),
) -> None:
    """Run the pipeline locally: validate data, train, run governance checks, promote.

    Storage is file:// (relative paths resolve against the working directory; state goes to
    .finetune/) or s3:// with the AWS_* environment. Ctrl-C (or SIGTERM) checkpoints; run again
    to resume. Exit codes: 0 done (promoted or awaiting approval), 1 failed, 2 invalid manifest,
    3 promotion blocked by governance, 130 interrupted (SIGINT), 143 terminated (SIGTERM).
    """
    _run(paths, tiny, samples)


@app.command()
@one_line_errors
def quickstart(
    tiny: bool = typer.Option(False, "--tiny", help="A tiny model and a few steps instead of SmolLM2-135M."),
    samples: int = typer.Option(3, "--samples", help="Eval prompts to answer before/after the adapter."),
) -> None:
    """Run examples/quickstart/ from the repository root (converts SmolLM2-135M-Instruct on first use)."""
    if not QUICKSTART.is_dir():
        raise FtctlError(f"{QUICKSTART}: the quickstart folder is missing", EXIT_USAGE)
    # The quickstart's file:// paths are relative to the repository root, wherever ftctl runs.
    _run([QUICKSTART], tiny, samples, cwd=QUICKSTART.parents[1])


# --- cluster commands -------------------------------------------------------------------------------
def _cluster(ctx: typer.Context):
    from .cluster import Cluster

    opts = ctx.find_root().obj or {}
    return Cluster(opts.get("kubeconfig"), opts.get("context"), opts.get("namespace"))


@app.callback()
def global_options(
    ctx: typer.Context,
    kubeconfig: Optional[str] = typer.Option(None, "--kubeconfig", envvar="KUBECONFIG", help="Kubeconfig file."),
    context: Optional[str] = typer.Option(None, "--context", help="Kubeconfig context."),
    namespace: Optional[str] = typer.Option(None, "-n", "--namespace", help="Namespace (default: the context's)."),
) -> None:
    """ftctl: governed LLM fine-tuning, locally or on a cluster."""
    ctx.obj = {"kubeconfig": kubeconfig, "context": context, "namespace": namespace}


@app.command()
@one_line_errors
def submit(
    ctx: typer.Context,
    files: List[Path] = typer.Option(..., "-f", "--filename", help="Manifest files or folders."),
) -> None:
    """Validate manifests locally, then create or update them on the cluster."""
    from .manifests import load

    manifests = load(files)
    cluster = _cluster(ctx)
    for manifest in manifests.all():
        result = cluster.apply(manifest, "cluster")
        console.print(f"{manifest['kind'].lower()}.finetune.dev/{manifest['metadata']['name']} {result}")


@app.command()
@one_line_errors
def plan(files: List[Path] = typer.Argument(..., help="Manifest files or folders with FineTuneJobs.")) -> None:
    """Each FineTuneJob's memory plan per GPU (and step time), from its base model's config.json;
    exits 1 when one does not fit its GPU. Nothing is submitted."""
    import json

    from finetune_trainer import storage

    from .. import memory_plan
    from .manifests import load

    jobs = load(files).jobs
    if not jobs:
        raise FtctlError("no FineTuneJob in " + ", ".join(map(str, files)), EXIT_USAGE)
    code = 0
    for job in jobs:
        name, spec = job["metadata"]["name"], job["spec"]
        uri = spec["baseModel"]["uri"].rstrip("/") + "/config.json"
        try:
            model_config = json.loads(storage.read_text(uri))
        except Exception as exc:  # missing, unreadable or not JSON: say which file
            raise FtctlError(f"{name}: cannot read {uri} ({type(exc).__name__}: {exc}); the plan needs the "
                             "base model's config.json", EXIT_USAGE) from None
        try:
            if int((spec.get("resources") or {}).get("gpusPerNode", 1)) < 1:
                estimate = memory_plan.estimate(model_config, spec, device="cpu")
                fits, message = None, f"a CPU job: about {estimate.total / memory_plan.GiB:.1f} GiB of host memory"
            else:
                fits, message, estimate = memory_plan.verdict(model_config, spec)
        except ValueError as exc:
            raise FtctlError(f"{name}: {uri}: {exc}", EXIT_USAGE) from None
        console.print(display.plan_table(name, estimate))
        console.print(("" if fits is not False else "does not fit: ") + message, markup=False)
        if fits is False:
            code = EXIT_FAILED
    raise typer.Exit(code)


@app.command()
@one_line_errors
def status(ctx: typer.Context, name: Optional[str] = typer.Argument(None, help="A FineTuneJob (default: all).")) -> None:
    """A table of FineTuneJobs: phase, progress, loss, ETA, governance, promotion."""
    cluster = _cluster(ctx)
    jobs = [cluster.get("FineTuneJob", name)] if name else cluster.list("FineTuneJob")
    if not jobs:
        console.print(f"No FineTuneJobs in namespace {cluster.namespace}.")
        return
    console.print(display.jobs_table(jobs))
    if name:
        message = (jobs[0].get("status") or {}).get("message")
        if message:
            console.print(message, markup=False)


@app.command()
@one_line_errors
def logs(ctx: typer.Context, name: str = typer.Argument(..., help="A FineTuneJob."),
         follow: bool = typer.Option(False, "-f", "--follow", help="Stream new log lines.")) -> None:
    """Logs of the FineTuneJob's trainer pod."""
    cluster = _cluster(ctx)
    pod = cluster.trainer_pod(name)
    for chunk in cluster.logs(pod, follow=follow):
        sys.stdout.write(chunk)
        sys.stdout.flush()


@app.command()
@one_line_errors
def report(ctx: typer.Context, name: str = typer.Argument(..., help="A FineTuneJob.")) -> None:
    """The governance report of a FineTuneJob (from its status)."""
    job = _cluster(ctx).get("FineTuneJob", name)
    st = job.get("status") or {}
    governance = st.get("governance")
    if not governance or not governance.get("checks"):
        raise FtctlError(f"FineTuneJob {name} has no governance report yet (phase {st.get('phase', 'Pending')})")
    required = (governance.get("effectivePolicy") or {}).get("required") or ()
    console.print(display.governance_table(governance["checks"], governance.get("passed"), required))
    console.print(f"adapter: {governance.get('adapterDigest')}  report: {governance.get('reportURI') or '-'}",
                  markup=False)
    from .heatmaps import heatmap_lines

    for line in heatmap_lines(governance["checks"]):  # a vision-language adapter's pictures
        console.print(line, markup=False)
    runs = governance.get("runs") or 1
    signed = (f"signed by platform key {governance['signingKey'][:16]}" if governance.get("signingKey")
              else "not signed by a trusted key")
    console.print(f"run {runs} under policy {str(governance.get('policyDigest') or '-')[:19]}; {signed}", markup=False)
    for earlier in governance.get("history") or []:  # runs under earlier policies (a policy change re-ran them)
        outcome = {True: "passed", False: "failed", None: "unfinished"}[earlier.get("passed")]
        failing = f" ({', '.join(earlier['failing'])})" if earlier.get("failing") else ""
        console.print(f"  run {earlier.get('run')} under policy {str(earlier.get('policyDigest') or '-')[:19]}: "
                      f"{outcome}{failing}  report: {earlier.get('reportURI') or '-'}", markup=False)
    promotion = st.get("promotion") or {}
    if promotion:
        console.print(f"promotion: {promotion.get('state')}"
                      + (f" - {promotion.get('reason')}" if promotion.get("reason") else ""), markup=False)
        served = promotion.get("served")
        if served is not None and promotion.get("state") == "RolledBack":
            console.print(f"rolled back at {promotion.get('rolledBackAt')}; alias {promotion.get('alias')} -> "
                          f"{served.get('digest') or 'no adapter'}", markup=False)
        for target in promotion.get("targets") or []:
            published = next((c for c in target.get("conditions") or [] if c.get("type") == "Published"), {})
            console.print(f"  target {target.get('name')} ({target.get('kind')}): {target.get('state')}"
                          f" {target.get('adapterDigest') or ''} {published.get('message') or ''}".rstrip(),
                          markup=False)
        if promotion.get("approvalManager"):
            console.print(f"approval written by {promotion['approvalManager']} at {promotion.get('approvedAt')}",
                          markup=False)


@app.command()
@one_line_errors
def lineage(ctx: typer.Context, name: str = typer.Argument(..., help="A FineTuneJob or a promotion alias.")) -> None:
    """The chain of adapters behind a FineTuneJob or alias: digests, datasets, governance, promotion times."""
    import json as json_

    from finetune_trainer import storage

    from . import lineage as chain

    cluster = _cluster(ctx)
    jobs = cluster.list("FineTuneJob")
    uri, digest, what = chain.start_of(name, cluster.find("FineTuneJob", name), jobs,
                                       lambda u: json_.loads(storage.read_bytes_limited(u, 1 << 20)))
    links = chain.walk(uri, digest, jobs)
    console.print(f"{what}: {len(links)} adapter(s)", markup=False)
    for line in chain.render(links):
        console.print(line, markup=False, soft_wrap=True)
    if any(link.problem for link in links):
        raise typer.Exit(EXIT_FAILED)


@app.command()
@one_line_errors
def approve(ctx: typer.Context, name: str = typer.Argument(..., help="A FineTuneJob."),
            digest: str = typer.Option(..., "--digest", help="The adapter digest being approved (sha256:...)."),
            by: Optional[str] = typer.Option(None, "--by", help="Approver (default: the kubeconfig user).")) -> None:
    """Approve the promotion of an adapter (manual promotion mode)."""
    cluster = _cluster(ctx)
    who = by or cluster.user
    cluster.approve(name, digest, who)
    console.print(f"finetunejob.finetune.dev/{name} approved {digest}" + (f" by {who}" if who else ""))


@app.command()
@one_line_errors
def rollback(ctx: typer.Context, alias: str = typer.Argument(..., help="A promotion alias."),
             job: Optional[str] = typer.Option(None, "--job", help="Roll back this FineTuneJob instead of the one "
                                                                   "the alias points at.")) -> None:
    """Take the adapter an alias points at out of service: the alias goes back to the adapter it pointed
    at before, and every serving target follows (sets spec.promotion.revoked on the holding job)."""
    cluster = _cluster(ctx)
    holder = cluster.get("FineTuneJob", job) if job else cluster.alias_holder(alias)
    name = holder["metadata"]["name"]
    promotion = (holder.get("status") or {}).get("promotion") or {}
    if promotion.get("alias") != alias:
        raise FtctlError(f"FineTuneJob {name} did not promote alias {alias} (its alias: {promotion.get('alias')})")
    cluster.revoke(name)
    digest = ((holder.get("status") or {}).get("adapter") or {}).get("digest")
    console.print(f"finetunejob.finetune.dev/{name} revoked: alias {alias} leaves {digest}; "
                  f"`ftctl report {name}` shows where it went back to", markup=False)


@app.command()
@one_line_errors
def review(ctx: typer.Context,
           name: Optional[str] = typer.Argument(None, help="A SyntheticDataset on the cluster."),
           work_uri: Optional[str] = typer.Option(None, "--work-uri", help="Review this work folder directly "
                                                  "(file:// or s3://; what `ftctl run` wrote) instead."),
           import_file: Optional[str] = typer.Option(None, "--import", help="Import decisions from a JSONL file "
                                                     "(ours or an Argilla export) instead of reviewing."),
           reviewer: Optional[str] = typer.Option(None, "--reviewer", help="Who decides (default: "
                                                  "$FTCTL_REVIEWER, else user@host).")) -> None:
    """Review a SyntheticDataset's candidates one by one (a accept, r reject, e edit, s skip, n/p, q quit),
    or import decisions from a file. Each decision is saved in the work folder as it is made."""
    from finetune_trainer.review import default_reviewer

    from .review import find_target, review_command

    target = find_target(name, work_uri, lambda: _cluster(ctx))
    review_command(target, default_reviewer(reviewer), import_file, console)


def watch_exit_code(job: dict) -> int:
    st = job.get("status") or {}
    if st.get("phase") != "Failed":
        return 0
    return EXIT_BLOCKED if (st.get("promotion") or {}).get("state") == "Blocked" else EXIT_FAILED


def watch_done(job: dict) -> bool:
    """Whether the operator has nothing more to do until someone acts.

    A status older than the spec (observedGeneration behind), or AwaitingApproval while the
    spec already approves this adapter, means the operator is about to move on.
    """
    st = job.get("status") or {}
    if st.get("phase") not in FINAL_PHASES:
        return False
    generation = (job.get("metadata") or {}).get("generation")
    if generation and st.get("observedGeneration") and st["observedGeneration"] < generation:
        return False
    if st.get("phase") == "AwaitingApproval":
        approved = (((job.get("spec") or {}).get("promotion") or {}).get("approval") or {}).get("digest")
        return not approved or approved != (st.get("adapter") or {}).get("digest")
    return True


@app.command()
@one_line_errors
def watch(ctx: typer.Context, name: str = typer.Argument(..., help="A FineTuneJob."),
          interval: float = typer.Option(2.0, "--interval", help="Seconds between refreshes."),
          timeout: Optional[float] = typer.Option(None, "--timeout", help="Give up after this many seconds.")) -> None:
    """The live progress view of a FineTuneJob on the cluster, until it finishes."""
    cluster = _cluster(ctx)
    deadline = time.monotonic() + timeout if timeout else None

    def view(job: dict):
        st = job.get("status") or {}
        return display.progress_view(name, st.get("phase", "Pending"), st.get("progress"), st.get("message", ""))

    job = cluster.get("FineTuneJob", name)
    live = Live(view(job), console=console, refresh_per_second=4) if console.is_terminal else None
    last_line = None
    if live is not None:
        live.start()
    try:
        while True:
            st = job.get("status") or {}
            if live is not None:
                live.update(view(job))
            else:  # a pipe or CI log: one line per change instead of a redrawn panel
                progress = st.get("progress") or {}
                line = f"{name}: {st.get('phase', 'Pending')} step {progress.get('step', 0)}/{progress.get('totalSteps', 0)}"
                if line != last_line:
                    console.print(line, markup=False)
                    last_line = line
            if watch_done(job):
                break
            if deadline and time.monotonic() > deadline:
                raise FtctlError(f"FineTuneJob {name} is still {st.get('phase', 'Pending')} after {timeout:g}s")
            time.sleep(interval)
            job = cluster.get("FineTuneJob", name)
    finally:
        if live is not None:
            live.stop()
    st = job.get("status") or {}
    if (st.get("governance") or {}).get("checks"):
        required = (st["governance"].get("effectivePolicy") or {}).get("required") or ()
        console.print(display.governance_table(st["governance"]["checks"], st["governance"].get("passed"), required))
    console.print(f"{name}: {st.get('phase')} {st.get('message', '')}", markup=False, soft_wrap=True)
    code = watch_exit_code(job)
    if code:
        raise typer.Exit(code)


if __name__ == "__main__":
    app()
