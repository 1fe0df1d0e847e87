"""`ftctl review`: people decide about synthetic candidates one at a time, from any terminal.

Plain terminal I/O (termios single keys, rich for the text, the alternate screen): no mouse, no
terminal database beyond ANSI, so it works over SSH, in tmux/screen and in an 80x24 window.
Each decision is written to the work folder the moment its key is pressed (one object per
candidate, finetune_trainer.review): quitting, a dropped SSH session or a crash loses at most the
candidate on screen.

    a accept   r reject   e edit ($VISUAL / $EDITOR on the example's JSON, checked before it is saved)
    s skip     n / p next / previous   j / k (or arrows) scroll a long example   q quit
"""

from __future__ import annotations

import json
import os
import select
import shlex
import shutil
import subprocess
import sys
import tempfile
import termios
import textwrap
import tty
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

from rich.console import Console
from rich.text import Text

from finetune_operator.api.synthetic import ReviewDecision, ReviewSettings, SyntheticCandidate
from finetune_trainer import review as store
from finetune_trainer.errors import TrainerError

from .errors import EXIT_USAGE, FtctlError

KEYS_HELP = "a accept · r reject · e edit · s skip · n/p next/prev · j/k scroll · q quit"
#: Editors tried, in order, when neither $VISUAL nor $EDITOR is set.
FALLBACK_EDITORS = ("sensible-editor", "editor", "nano", "vim", "vi")
ANNOTATION = "finetune.dev/reviewed-at"


# --- the session: what is on screen and what was decided (no terminal here) ----------------------------

@dataclass
class Session:
    work_uri: str
    reviewer: str
    label: str
    candidates: dict
    items: list[SyntheticCandidate]  # the candidates pending when the session started, in file order
    decided: dict[str, ReviewDecision] = field(default_factory=dict)
    pos: int = 0
    scroll: int = 0
    message: str = ""
    error: bool = False
    written: dict[str, int] = field(default_factory=lambda: {"accepted": 0, "edited": 0, "rejected": 0})
    drafts: dict[str, str] = field(default_factory=dict)  # an edit that did not validate, to fix next time

    @property
    def current(self) -> SyntheticCandidate:
        return self.items[self.pos]

    @property
    def left(self) -> int:
        return sum(1 for c in self.items if c.id not in self.decided)

    def say(self, message: str, error: bool = False) -> None:
        self.message, self.error = message, error

    def move(self, to: int) -> None:
        to = max(0, min(len(self.items) - 1, to))
        if to != self.pos:
            self.pos, self.scroll = to, 0

    def advance(self) -> None:
        """To the next candidate without a decision (after this one, then from the start)."""
        n = len(self.items)
        for step in range(1, n + 1):
            i = (self.pos + step) % n
            if self.items[i].id not in self.decided:
                self.move(i)
                return

    def decide(self, verdict: str, example: Optional[dict] = None) -> None:
        cand = self.current
        decision = ReviewDecision(id=cand.id, verdict=verdict, example=example, reviewer=self.reviewer,
                                  at=store.now())
        try:
            recorded = store.record_decision(self.work_uri, decision, self.candidates)
        except (TrainerError, OSError) as exc:  # S3 down, a disk full: say it, keep the candidate on screen
            self.say(f"not saved: {exc}", error=True)
            return
        self.decided[cand.id] = recorded.decision
        self.drafts.pop(cand.id, None)
        if recorded.written:
            self.written[recorded.decision.verdict] += 1
            self.say(f"{recorded.decision.verdict}: {cand.id}")
        else:
            other = recorded.decision
            self.say(f"kept the later decision of {other.reviewer} ({other.verdict} at {other.at})", error=True)
        if self.left:
            self.advance()

    def edit_text(self) -> str:
        cand = self.current
        if cand.id in self.drafts:
            return self.drafts[cand.id]
        mine = self.decided.get(cand.id)
        example = mine.example if mine is not None and mine.example else cand.example
        return json.dumps(example, indent=2, ensure_ascii=False) + "\n"

    def edited(self, text: str) -> None:
        """What the editor saved: validated, then recorded as an edit (or an acceptance when unchanged)."""
        cand = self.current
        try:
            example = store.parse_edit_text(text, store.example_format(cand.example))
        except store.ReviewError as exc:
            self.drafts[cand.id] = text
            self.say(f"not saved: {exc} (e edits again)", error=True)
            return
        if example == cand.example:
            self.drafts.pop(cand.id, None)
            self.say("unchanged: nothing recorded (a accepts it as it is)")
            return
        self.decide("edited", example)

    def summary(self) -> str:
        counts = ", ".join(f"{n} {v}" for v, n in self.written.items())
        return f"{sum(self.written.values())} decision(s) recorded by {self.reviewer} ({counts})"


# --- the screen ------------------------------------------------------------------------------------------

def _short(digest: Optional[str]) -> str:
    return digest.split(":", 1)[-1][:12] if digest else "-"


def example_lines(example: dict, width: int) -> list[Text]:
    """The example as labelled, wrapped blocks: role (or field) in colour, its text indented."""
    if "messages" in example:
        blocks = [(str(m.get("role", "?")), str(m.get("content", ""))) for m in example.get("messages") or []]
    else:
        blocks = [(k, str(example[k])) for k in ("system", "instruction", "input", "output", "prompt", "completion")
                  if k in example]
    out: list[Text] = []
    styles = {"user": "bold cyan", "assistant": "bold green", "system": "bold magenta", "output": "bold green",
              "completion": "bold green"}
    for label, content in blocks:
        out.append(Text(f"{label} ›", style=styles.get(label, "bold cyan")))
        for paragraph in content.split("\n"):
            for line in textwrap.wrap(paragraph, width=max(10, width - 2), replace_whitespace=False,
                                      drop_whitespace=True) or [""]:
                out.append(Text("  " + line))
        out.append(Text(""))
    return out[:-1] if out else [Text("(empty example)", style="dim")]


def screen(session: Session, width: int, height: int) -> list[Text]:
    """Exactly `height` lines, none wider than `width`."""
    cand = session.current
    n = len(session.items)
    # what must never be cut first: a long label (a work folder's URI) loses its end instead
    top = [Text.assemble((f"{session.pos + 1} of {n} pending", "bold"), f" · {session.left} left · "
                         f"{session.reviewer} · ", (session.label, "bold"))]
    scores = " · ".join(f"{k} {v:g}" for k, v in sorted(cand.scores.items())) or "no scores"
    mine = session.decided.get(cand.id)
    state = (Text(f"decided: {mine.verdict} by {mine.reviewer}", style="yellow") if mine
             else Text("pending", style="dim"))
    top.append(Text.assemble(state, f" · candidate {cand.id} · {scores}"))
    top.append(Text("─" * width, style="dim"))
    lin = cand.lineage
    bottom = [
        Text("─" * width, style="dim"),
        Text(f"seed {_short(lin.seedDigest)} · base {_short(lin.baseModelDigest)} · adapter "
             f"{_short(lin.generatorAdapterDigest)} · template {_short(lin.templateDigest)}", style="dim"),
        Text(session.message, style="bold red" if session.error else "green"),
        Text(KEYS_HELP, style="bold"),
    ]
    room = max(1, height - len(top) - len(bottom))
    edit = mine.example if mine is not None and mine.verdict == "edited" else None
    body = example_lines(edit or cand.example, width)  # an edited candidate shows its edit
    session.scroll = max(0, min(session.scroll, max(0, len(body) - room)))
    shown = body[session.scroll:session.scroll + room]
    hidden = len(body) - session.scroll - len(shown)
    if hidden > 0:
        shown[-1] = Text(f"  ↓ {hidden + 1} more line(s): j/k or arrows scroll", style="yellow")
    shown += [Text("")] * (room - len(shown))
    lines = (top + shown + bottom)[:height]
    for line in lines:
        line.truncate(width, overflow="ellipsis")
    return lines


# --- the terminal ----------------------------------------------------------------------------------------

@contextmanager
def cbreak(fd: int) -> Iterator[None]:
    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


_ARROWS = {"A": "up", "B": "down", "C": "right", "D": "left"}


def read_key(fd: int, timeout: float = 0.5) -> Optional[str]:
    """One key, or None after `timeout` (the caller redraws on a resize); arrows as up/down/left/right."""
    ready, _, _ = select.select([fd], [], [], timeout)
    if not ready:
        return None
    ch = os.read(fd, 1)
    if ch == b"\x1b":
        seq = b""
        while select.select([fd], [], [], 0.05)[0] and len(seq) < 8:
            seq += os.read(fd, 1)
            if seq[-1:].isalpha() or seq[-1:] == b"~":
                break
        return _ARROWS.get(seq[-1:].decode("ascii", "replace"), "escape") if seq[:1] in (b"[", b"O") else "escape"
    if ch in (b"\x03", b"\x04"):  # Ctrl-C / Ctrl-D in cbreak mode with ISIG off on some systems
        return "q"
    return ch.decode("utf-8", "replace")


def editor_command() -> list[str]:
    for var in ("VISUAL", "EDITOR"):
        value = os.environ.get(var, "").strip()
        if value:
            return shlex.split(value)
    for name in FALLBACK_EDITORS:
        path = shutil.which(name)
        if path:
            return [path]
    raise FtctlError("no editor: set $EDITOR (or $VISUAL)")


class Terminal:
    def __init__(self) -> None:
        self.fd = sys.stdin.fileno()
        self.console = Console(file=sys.stdout, force_terminal=True, highlight=False)

    def draw(self, session: Session) -> None:
        size = shutil.get_terminal_size((80, 24))
        lines = screen(session, size.columns, size.lines)
        self.console.file.write("\x1b[H\x1b[2J")
        with self.console.capture() as capture:
            for i, line in enumerate(lines):
                self.console.print(line, end="" if i == len(lines) - 1 else "\n", no_wrap=True, overflow="crop",
                                   crop=False, soft_wrap=True)
        self.console.file.write(capture.get())
        self.console.file.flush()

    def edit(self, session: Session) -> None:
        try:
            command = editor_command()
        except FtctlError as exc:
            session.say(str(exc), error=True)
            return
        with tempfile.TemporaryDirectory(prefix="ftctl-review-") as tmp:
            path = Path(tmp) / f"{session.current.id}.json"
            path.write_text(session.edit_text(), encoding="utf-8")
            self.alt_screen(False)
            termios.tcsetattr(self.fd, termios.TCSADRAIN, self.saved)
            try:
                code = subprocess.call([*command, str(path)])
            except OSError as exc:
                code, problem = -1, f"cannot start {command[0]}: {exc}"
            else:
                problem = f"{command[0]} exited with {code}"
            finally:
                tty.setcbreak(self.fd)
                self.alt_screen(True)
            if code != 0:
                session.say(f"{problem}: nothing recorded", error=True)
                return
            session.edited(path.read_text(encoding="utf-8", errors="replace"))

    def alt_screen(self, on: bool) -> None:
        self.console.file.write("\x1b[?1049h\x1b[?25l" if on else "\x1b[?25h\x1b[?1049l")
        self.console.file.flush()

    def run(self, session: Session) -> None:
        self.saved = termios.tcgetattr(self.fd)
        self.alt_screen(True)
        try:
            with cbreak(self.fd):
                last_size = None
                self.draw(session)
                while True:
                    key = read_key(self.fd)
                    if key is None:
                        if shutil.get_terminal_size((80, 24)) != last_size:
                            last_size = shutil.get_terminal_size((80, 24))
                            self.draw(session)
                        continue
                    if key in ("q", "Q"):
                        return
                    handle_key(session, key, self)
                    self.draw(session)
        finally:
            self.alt_screen(False)


def handle_key(session: Session, key: str, terminal: Optional[Terminal] = None) -> None:
    if key == "a":
        session.decide("accepted")
    elif key == "r":
        session.decide("rejected")
    elif key == "e" and terminal is not None:
        terminal.edit(session)
    elif key == "s":
        session.say(f"skipped {session.current.id}: still pending")
        session.advance()
    elif key in ("n", "right"):
        session.move(session.pos + 1)
        session.say("")
    elif key in ("p", "left"):
        session.move(session.pos - 1)
        session.say("")
    elif key in ("j", "down", " "):
        session.scroll += 1 if key != " " else 10
    elif key in ("k", "up"):
        session.scroll = max(0, session.scroll - 1)
    elif key not in ("escape",):
        session.say(f"{key!r} is not a key here: the keys are on the line below", error=True)


# --- the command -----------------------------------------------------------------------------------------

@dataclass
class Target:
    work_uri: str
    label: str
    settings: ReviewSettings
    cluster: object = None  # a ftctl Cluster when the SyntheticDataset is on one
    name: Optional[str] = None


def find_target(name: Optional[str], work_uri: Optional[str], cluster_factory) -> Target:
    """The work folder: --work-uri as given (a local `ftctl run`), else the SyntheticDataset's status.workURI."""
    if work_uri:
        store.decision_uri(work_uri, "0" * 16)  # a bad URI fails here, not half-way
        return Target(work_uri, name or work_uri, ReviewSettings())
    if not name:
        raise FtctlError("name a SyntheticDataset, or give --work-uri URI", EXIT_USAGE)
    cluster = cluster_factory()
    obj = cluster.get("SyntheticDataset", name)
    status = obj.get("status") or {}
    if not status.get("workURI"):
        raise FtctlError(f"SyntheticDataset {name} has no work folder yet (phase {status.get('phase', 'Pending')})")
    settings = ReviewSettings.model_validate((obj.get("spec") or {}).get("review") or {})
    return Target(status["workURI"], f"{cluster.namespace}/{name}", settings, cluster, name)


def annotate(target: Target, console: Console) -> None:
    """finetune.dev/reviewed-at on the SyntheticDataset: the operator reconciles now instead of at its next poll."""
    if target.cluster is None:
        return
    from ..api import GROUP, VERSION

    cluster = target.cluster
    body = {"metadata": {"annotations": {ANNOTATION: store.now()}}}
    try:
        cluster._call(cluster.custom.patch_namespaced_custom_object, GROUP, VERSION, cluster.namespace,
                      "syntheticdatasets", target.name, body, what=f"SyntheticDataset {target.name}")
    except FtctlError as exc:  # the decisions are saved; the operator's poll finds them
        console.print(f"warning: could not annotate {target.label}: {exc}", markup=False, soft_wrap=True)


def standing(target: Target) -> str:
    stats = store.summarize(target.work_uri, target.settings)
    return store.review_outcome(stats, target.settings)[1]


def review_command(target: Target, reviewer: str, import_path: Optional[str], console: Console) -> None:
    try:
        candidates = store.load_candidates(target.work_uri)
    except FileNotFoundError:
        raise FtctlError(f"{target.work_uri}: no candidates.jsonl (has the generation finished?)") from None
    if import_path:
        try:
            result = store.import_file(target.work_uri, import_path, reviewer, candidates)
        except FileNotFoundError:
            raise FtctlError(f"{import_path}: no such file", EXIT_USAGE) from None
        console.print(f"{import_path}: {result.summary()}", markup=False, soft_wrap=True)
        if sum(result.imported.values()):
            annotate(target, console)
        console.print(standing(target), markup=False, soft_wrap=True)
        return
    decisions, problems = store.load_decisions(target.work_uri)
    for problem in problems[:store.MAX_LISTED]:
        console.print(f"warning: {problem}", markup=False, soft_wrap=True)
    items = store.pending(target.work_uri, candidates, decisions)
    if not items:
        console.print(f"nothing to review in {target.label}: {standing(target)}", markup=False, soft_wrap=True)
        return
    if not sys.stdin.isatty() or not sys.stdout.isatty():
        raise FtctlError("ftctl review reads single keys from a terminal; --import FILE imports decisions "
                         "without one", EXIT_USAGE)
    session = Session(target.work_uri, reviewer, target.label, candidates, items)
    try:
        Terminal().run(session)
    except KeyboardInterrupt:
        pass
    finally:
        console.print(session.summary(), markup=False, soft_wrap=True)
        if sum(session.written.values()):
            annotate(target, console)
    console.print(standing(target), markup=False, soft_wrap=True)
