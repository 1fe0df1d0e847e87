"""SIGINT and SIGTERM to `ftctl run`: ftctl passes SIGTERM to the trainer (which checkpoints), waits
for it at most a grace period, exits 130 (SIGINT) or 143 (SIGTERM), leaves no process behind, and
the next run resumes from the checkpoint. Real processes throughout: ftctl's command line as a
subprocess, the real trainer under it, on the session's tiny model.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from finetune_operator.ftctl.errors import EXIT_TERMINATED
from finetune_operator.ftctl.executor import (SIGNALS, Interrupted, _exited, interrupt_exit_code, kill_group,
                                              signals_handled)

from .conftest import REPO, ftctl, write_manifests
from .test_run import fast_policy, quickstart_docs

STEPS = 24


def write_run(tmp_path: Path, tiny_model_dir: Path) -> Path:
    """A dataset and a job on the tiny model with no periodic checkpoint: the only checkpoint
    before the end is the one SIGTERM makes the trainer write."""
    dataset, job = quickstart_docs()
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "d.jsonl").write_text((REPO / "examples/quickstart/data/support-answers.jsonl").read_text())
    dataset["spec"]["source"]["uri"] = "file://data/d.jsonl"
    job["spec"]["baseModel"]["uri"] = f"file://{tiny_model_dir}"
    job["spec"]["lora"] = {"targetModules": ["all-linear"]}  # the quickstart adapts layers 22-29; tiny has 2
    job["spec"]["training"].update(maxSteps=STEPS, maxSeqLength=64, batchSize=2, evalEverySteps=1000,
                                   checkpointEverySteps=1000)
    write_manifests(tmp_path / "run.yaml", fast_policy("provenance"), dataset, job)
    return tmp_path / ".finetune" / "runs" / "support-assistant"


def start(tmp_path: Path, *, ignore_sigint: bool = False, step_sleep: float, env: dict | None = None):
    """`ftctl run` in the background. ignore_sigint: as a shell starts `ftctl run ... &`, with SIGINT
    ignored (Python then installs no KeyboardInterrupt of its own)."""
    def background():
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    return subprocess.Popen(
        [sys.executable, "-m", "finetune_operator.ftctl.main", "run", "run.yaml", "--samples", "0"], cwd=tmp_path,
        text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=background if ignore_sigint else None,
        env={**os.environ, "OMP_NUM_THREADS": "1", "FINETUNE_DEBUG_STEP_SLEEP": str(step_sleep), **(env or {})})


def progress_step(run_dir: Path) -> int:
    try:
        return json.loads((run_dir / "progress.json").read_text()).get("step", 0)
    except (OSError, ValueError):
        return 0


def wait_for_training(proc: subprocess.Popen, run_dir: Path, step: int) -> list[psutil.Process]:
    """Wait until the trainer has done `step` steps; returns every process under ftctl then."""
    deadline = time.monotonic() + 120
    while progress_step(run_dir) < step and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert proc.poll() is None, proc.communicate()
    assert progress_step(run_dir) >= step, "the trainer did not start in time"
    tree = psutil.Process(proc.pid).children(recursive=True)
    assert any("finetune_trainer.cli" in " ".join(p.cmdline()) for p in tree), [p.cmdline() for p in tree]
    return tree


def assert_nothing_left(tree: list[psutil.Process]) -> None:
    """No process that ran under ftctl is alive, nor anything else in their process groups."""
    alive = [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, [(p.pid, p.cmdline()) for p in alive]
    groups = {p.pid for p in tree}  # each child started its own session: its pid is its group's id
    stragglers = []
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) in groups and p.status() != psutil.STATUS_ZOMBIE:
                stragglers.append((p.pid, p.cmdline()))
        except (psutil.Error, ProcessLookupError):
            continue
    assert not stragglers, stragglers


def checkpoint_steps(run_dir: Path) -> list[int]:
    folder = run_dir / "checkpoints"
    return sorted(int(p.name.split("-")[1]) for p in folder.iterdir() if p.name.startswith("step-")) \
        if folder.is_dir() else []


def trainer_events(tmp_path: Path, event: str) -> list[dict]:
    log = (tmp_path / ".finetune" / "logs" / "support-assistant-train-1.log").read_text()
    entries = []
    for line in log.splitlines():
        try:
            entries.append(json.loads(line))
        except ValueError:  # a library's plain warning line between the JSON ones
            continue
    return [entry for entry in entries if isinstance(entry, dict) and entry.get("event") == event]


def assert_rerun_resumes(tmp_path: Path, run_dir: Path, stopped_at: int) -> None:
    second = ftctl("run", "run.yaml", "--samples", "0", cwd=tmp_path)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr
    assert f"resuming from the checkpoint at step {stopped_at}" in second.stdout
    assert trainer_events(tmp_path, "resume")[-1]["step"] == stopped_at
    assert progress_step(run_dir) == STEPS


@pytest.mark.parametrize("signum, code, ignore_sigint", [
    (signal.SIGTERM, 143, False),
    (signal.SIGINT, 130, True),  # a background job: SIGINT inherited as ignored, and still handled
], ids=["sigterm", "sigint-in-the-background"])
def test_a_signal_checkpoints_exits_128_plus_it_leaves_nothing_and_a_rerun_resumes(
        tmp_path, tiny_model_dir, signum, code, ignore_sigint):
    run_dir = write_run(tmp_path, tiny_model_dir)
    proc = start(tmp_path, ignore_sigint=ignore_sigint, step_sleep=0.3)
    tree = wait_for_training(proc, run_dir, step=2)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == code, out[-2000:] + err
    assert "interrupted: the trainer wrote a checkpoint" in err and "Traceback" not in err
    assert_nothing_left(tree)
    [stopped_at] = checkpoint_steps(run_dir)  # the SIGTERM checkpoint, the only one
    assert 2 <= stopped_at < STEPS
    assert trainer_events(tmp_path, "sigterm") and trainer_events(tmp_path, "preempted")[-1]["step"] == stopped_at
    if signum == signal.SIGTERM:  # what follows the signal is the same code for both: one rerun is enough
        assert_rerun_resumes(tmp_path, run_dir, stopped_at)


def test_a_trainer_that_does_not_stop_is_killed_after_the_grace_period(tmp_path, tiny_model_dir):
    """Each step sleeps 6 s, the grace period is 1 s: SIGTERM cannot be honoured in time, so the
    whole group is killed, ftctl says so, and still exits 143 with nothing left."""
    run_dir = write_run(tmp_path, tiny_model_dir)
    proc = start(tmp_path, step_sleep=6, env={"FTCTL_GRACE_SECONDS": "1"})
    tree = wait_for_training(proc, run_dir, step=1)
    signalled = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, out[-2000:] + err
    assert time.monotonic() - signalled < 4.5, "not killed at the end of the 1 s grace period"
    assert "did not stop within 1s of SIGTERM and was killed" in err and "Traceback" not in err
    assert_nothing_left(tree)
    assert checkpoint_steps(run_dir) == []  # killed in the middle of a step: no checkpoint


def test_a_second_ctrl_c_kills_without_waiting(tmp_path, tiny_model_dir):
    run_dir = write_run(tmp_path, tiny_model_dir)
    proc = start(tmp_path, step_sleep=6)
    tree = wait_for_training(proc, run_dir, step=1)
    signalled = time.monotonic()
    proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, out[-2000:] + err
    assert time.monotonic() - signalled < 4.5  # not the 6 s step, not the 30 s grace period
    assert "killed without waiting for its checkpoint" in err and "Traceback" not in err
    assert_nothing_left(tree)


def test_kill_group_takes_the_helpers_too():
    """A child in its own session with helpers of its own: killing the group ends all of them."""
    proc = subprocess.Popen(["sh", "-c", "sleep 60 & sleep 60 & wait"], start_new_session=True)
    deadline = time.monotonic() + 10
    while len(psutil.Process(proc.pid).children()) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children()]
    assert len(tree) == 3 and not _exited(proc)
    kill_group(proc.pid)
    deadline = time.monotonic() + 10
    while not _exited(proc) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _exited(proc) and proc.returncode is None  # exited, and not reaped by _exited
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    for helper in tree[1:]:
        try:
            helper.wait(timeout=10)  # the helpers were sh's children: gone once killed
        except psutil.NoSuchProcess:
            pass
        assert not helper.is_running() or helper.status() == psutil.STATUS_ZOMBIE


def test_a_signal_with_no_child_running_unwinds_with_its_exit_code():
    """Outside a child, SIGTERM raises Interrupted (a KeyboardInterrupt) and maps to 143; the
    handlers ftctl installed are taken back afterwards."""
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted) as err:
        with signals_handled():
            assert signal.getsignal(signal.SIGTERM) == SIGNALS.handle
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises before this ends
    assert err.value.signum == signal.SIGTERM and isinstance(err.value, KeyboardInterrupt)
    assert interrupt_exit_code() == EXIT_TERMINATED == 143
    assert signal.getsignal(signal.SIGTERM) == before
