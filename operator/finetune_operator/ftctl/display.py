"""What ftctl shows: the live progress view, statuses as YAML, governance and job tables.

Everything here turns API objects (or plain dicts shaped like them) into rich
renderables, so `ftctl run` (local) and `ftctl watch` (cluster) look the same.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

import yaml
from pydantic import BaseModel
from rich.console import Group
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

PHASE_STYLES = {
    "Succeeded": "green", "Ready": "green", "Promoted": "green",
    "Failed": "red", "Invalid": "red", "Blocked": "red",
    "AwaitingApproval": "yellow", "Suspended": "yellow",
}


def _get(obj: Any, name: str) -> Any:
    """Field access that works on pydantic models and on dicts from the API server."""
    if obj is None:
        return None
    return obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)


def format_eta(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def format_number(value: Optional[float], digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


def phase_text(phase: Optional[str]) -> Text:
    return Text(phase or "-", style=PHASE_STYLES.get(phase or "", "cyan"))


def progress_view(name: str, phase: Optional[str], progress: Any, message: str = "") -> Panel:
    """The live view: phase, step/total with a bar, loss, eval loss, tokens/s and ETA."""
    step = _get(progress, "step") or 0
    total = _get(progress, "totalSteps") or 0
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    grid.add_row("phase", phase_text(phase))
    bar = ProgressBar(total=max(total, 1), completed=min(step, total) if total else 0, width=40)
    grid.add_row("step", Group(Text(f"{step}/{total or '?'}  ({_get(progress, 'percent') or 0}%)"), bar))
    grid.add_row("loss", format_number(_get(progress, "loss")))
    grid.add_row("eval loss", format_number(_get(progress, "evalLoss")))
    tps = _get(progress, "tokensPerSecond")
    grid.add_row("tokens/s", "-" if tps is None else f"{tps:,.0f}")
    grid.add_row("ETA", format_eta(_get(progress, "etaSeconds")))
    if message:
        grid.add_row("", Text(message, style="dim"))  # Text: a message is data, not markup
    return Panel(grid, title=f"FineTuneJob {name}", expand=False)


def status_yaml(kind: str, name: str, status: BaseModel | dict) -> str:
    """The status exactly as `kubectl get -o yaml` would show it (only set fields)."""
    body = status.model_dump(mode="json", exclude_none=True) if isinstance(status, BaseModel) else status
    return yaml.safe_dump({"kind": kind, "metadata": {"name": name}, "status": body},
                          sort_keys=False, default_flow_style=False, allow_unicode=True, width=10_000)


def governance_table(checks: Iterable[Any], passed: Optional[bool], required: Iterable[str] = ()) -> Table:
    """One row per check: pass/fail, value vs threshold, what was measured."""
    required = set(required)
    verdict = {True: "[green]passed[/]", False: "[red]BLOCKED[/]", None: "[yellow]not evaluated[/]"}[passed]
    table = Table(title=f"Governance: {verdict}", title_justify="left")
    table.add_column("check", style="bold")
    table.add_column("result")
    table.add_column("value", justify="right")
    table.add_column("threshold", justify="right")
    table.add_column("message", overflow="fold")
    for check in checks:
        name = _get(check, "name")
        ok = _get(check, "passed")
        result = "[green]pass[/]" if ok else "[red]FAIL[/]"
        if required and name not in required:
            result += " [dim](not required)[/]"
        # Text(): messages quote data (e.g. a "[EMAIL]" placeholder) that must not read as markup.
        table.add_row(Text(name or ""), result, format_number(_get(check, "value")),
                      format_number(_get(check, "threshold")), Text(_get(check, "message") or ""))
    return table


def failing_checks(governance: Any) -> list[str]:
    return [_get(c, "name") for c in (_get(governance, "checks") or []) if not _get(c, "passed")]


def governance_summary(governance: Any) -> str:
    if not governance or _get(governance, "passed") is None:
        return "-"
    if _get(governance, "passed"):
        return f"passed ({len(_get(governance, 'checks') or [])} checks)"
    return "failed: " + ", ".join(failing_checks(governance))


def jobs_table(jobs: Iterable[dict]) -> Table:
    """`ftctl status`: one row per FineTuneJob from its status."""
    table = Table(title="FineTuneJobs", title_justify="left")
    for col in ("name", "phase", "progress", "loss", "eval loss", "ETA", "governance", "promotion"):
        # Keep cells on one line (grep-able); only the governance summary may wrap.
        table.add_column(col, no_wrap=col != "governance", overflow="fold" if col == "governance" else "ellipsis")
    for job in jobs:
        status = job.get("status") or {}
        progress = status.get("progress") or {}
        promotion = status.get("promotion") or {}
        step, total = progress.get("step", 0), progress.get("totalSteps", 0)
        table.add_row(
            Text(job["metadata"]["name"]), phase_text(status.get("phase", "Pending")),
            f"{step}/{total} ({progress.get('percent', 0)}%)" if total else "-",
            format_number(progress.get("loss")), format_number(progress.get("evalLoss")),
            format_eta(progress.get("etaSeconds")), Text(governance_summary(status.get("governance"))),
            phase_text(promotion.get("state")) if promotion else Text("-"),
        )
    return table


def _verdict(score: Optional[dict]) -> Text:
    """'right' / 'wrong' with the ROUGE-L F1, under an answer (answers.score)."""
    if not score:
        return Text("")
    text = Text("\n")
    text.append("right" if score.get("right") else "wrong", style="bold green" if score.get("right") else "bold red")
    text.append(f"  ROUGE-L {score.get('rougeL', 0):.2f}", style="dim")
    return text


def samples_table(samples: Iterable[dict]) -> Table:
    """Held-out questions: the dataset's reference answer, and the greedy answers of the base model
    and of base + adapter, each marked right or wrong against the reference."""
    table = Table(title="What the adapter changed (held-out questions, greedy decoding)", title_justify="left",
                  show_lines=True)
    table.add_column("prompt", overflow="fold", ratio=2)
    table.add_column("reference (dataset)", overflow="fold", ratio=3, style="cyan")
    table.add_column("base model", overflow="fold", ratio=3)
    table.add_column("base + adapter", overflow="fold", ratio=3, style="green")
    for s in samples:
        before = Text(s["before"]) + _verdict(s.get("beforeScore"))
        after = Text(s["after"], style="green") + _verdict(s.get("afterScore"))
        table.add_row(Text(s["prompt"]), Text(s.get("reference", "")), before, after)
    return table


def timings_table(phases: Iterable[Any], total: Any, threads: Optional[str] = None) -> Table:
    """Where the time went: wall and CPU (user + sys) seconds per phase; parts indented below."""
    import os

    try:
        load = " / ".join(f"{x:.1f}" for x in os.getloadavg()[:2]) + " (1 / 5 min)"
    except OSError:
        load = "-"
    table = Table(title=f"Time per phase (torch threads: {threads or '-'}; load average now {load})",
                  title_justify="left")
    table.add_column("phase")
    table.add_column("wall s", justify="right")
    table.add_column("CPU s", justify="right")
    for p in phases:
        cpu = "-" if p.cpu is None else f"{p.cpu:.1f}"
        table.add_row(Text(("   " + p.name) if p.sub else p.name, style="dim" if p.sub else ""),
                      f"{p.wall:.1f}", "" if p.sub else cpu)
    table.add_row(Text(total.name, style="bold"), f"{total.wall:.1f}", f"{total.cpu:.1f}")
    return table


def plan_table(name: str, plan) -> Table:
    """`ftctl plan`: one job's memory per GPU by part (memory_plan.Plan)."""
    gib = 1024 ** 3
    where = f"{plan.world} rank(s), {plan.strategy}" + (f", {plan.gpu_product}" if plan.gpu_product else "")
    table = Table(title=f"{name}: per GPU ({where})", title_justify="left")
    table.add_column("part")
    table.add_column("GiB", justify="right")
    for part, size in plan.parts.items():
        table.add_row(part, f"{size / gib:.2f}")
    table.add_row("total", f"{plan.total / gib:.2f}")
    if plan.gpu_bytes:
        table.add_row(f"{plan.gpu_product} has", f"{plan.gpu_bytes / gib:.1f}")
    if plan.step_seconds is not None:
        table.add_row("step time (s, 35% MFU)", f"{plan.step_seconds:.2f}")
    return table
