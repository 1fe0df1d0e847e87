"""Where a local run's time goes: wall and CPU time (user + sys) per phase.

CPU time is this process's plus its finished children's (getrusage), so a phase that runs a
trainer subprocess is charged the subprocess's CPU time. Sub-phases come from the trainer's and
the governance Job's own log lines (the seconds they report), shown indented under their phase.
"""

from __future__ import annotations

import json
import os
import resource
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional


def cpu_seconds() -> float:
    """user + sys of this process and of its children that have exited."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


@dataclass
class Phase:
    name: str
    wall: float
    cpu: Optional[float] = None
    #: A part of the phase before it (reported by the child itself: no CPU time of its own).
    sub: bool = False


@dataclass
class Timings:
    phases: list[Phase] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)
    cpu_started: float = field(default_factory=cpu_seconds)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        wall, cpu = time.perf_counter(), cpu_seconds()
        try:
            yield
        finally:
            self.phases.append(Phase(name, time.perf_counter() - wall, cpu_seconds() - cpu))

    def sub(self, name: str, seconds: Optional[float]) -> None:
        if seconds is not None:
            self.phases.append(Phase(name, float(seconds), None, sub=True))

    def parts(self, parts: dict[str, float], names: Optional[dict[str, str]] = None,
              rest: str = "start-up, imports, the rest") -> None:
        """Sub-rows for the phase just ended, plus what its parts do not cover (a subprocess's
        interpreter start and imports, mostly)."""
        if not self.phases:
            return
        whole = self.phases[-1]
        for key, seconds in parts.items():
            self.sub((names or {}).get(key, key), seconds)
        if parts:
            self.sub(rest, max(0.0, whole.wall - sum(float(v) for v in parts.values())))

    def total(self) -> Phase:
        return Phase("total", time.perf_counter() - self.started, cpu_seconds() - self.cpu_started)


def log_events(log_path: Path, event: str) -> list[dict]:
    """The JSON log lines of one event in a child's log (the latest attempt's are last)."""
    out = []
    try:
        lines = log_path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return out
    for line in lines:
        if f'"event": "{event}"' not in line:
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict):
            out.append(entry)
    return out


def load_average() -> str:
    try:
        one, five, _ = os.getloadavg()
    except OSError:
        return "-"
    return f"{one:.2f} (1 min), {five:.2f} (5 min)"
