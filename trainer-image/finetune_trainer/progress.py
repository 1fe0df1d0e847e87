"""What the trainer tells the world while it runs: Prometheus metrics and {outputURI}/progress.json.

progress.json uses exactly the field names of finetune_operator.api.finetunejob.Progress;
the operator copies it into FineTuneJob status.progress.
"""

from __future__ import annotations

import json
import resource
import sys
import threading
import time
from datetime import datetime, timezone
from typing import Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from . import storage
from .logs import get_logger

log = get_logger("progress")

LABELS = ("namespace", "job")


def accelerator_memory_bytes() -> int:
    """Peak GPU memory allocated by torch; on CPU the process's peak RSS stands in for it."""
    import torch

    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def now_rfc3339() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class ProgressReporter:
    """Owns the trainer's metrics (in its own registry) and the progress record."""

    def __init__(self, *, output_uri: str, namespace: str, job: str, total_steps: int,
                 interval_seconds: float, metrics_port: int = 0):
        self.uri = storage.join(output_uri, "progress.json")
        self.total_steps = total_steps
        self.interval = interval_seconds
        self.registry = CollectorRegistry()
        labels = {"namespace": namespace, "job": job}

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, LABELS, registry=self.registry).labels(**labels)

        self.step = gauge("finetune_trainer_step", "Optimizer steps done")
        self.total = gauge("finetune_trainer_total_steps", "Optimizer steps planned")
        self.epoch = gauge("finetune_trainer_epoch", "Epochs done (fractional)")
        self.loss = gauge("finetune_trainer_loss", "Latest training loss")
        self.eval_loss = gauge("finetune_trainer_eval_loss", "Latest eval loss")
        self.lr = gauge("finetune_trainer_learning_rate", "Current learning rate")
        self.tps = gauge("finetune_trainer_tokens_per_second", "Real (non-padding) training tokens per second")
        self.memory = gauge("finetune_trainer_accelerator_memory_bytes",
                            "Peak accelerator memory (peak RSS on CPU)")
        self.tokens = Counter("finetune_trainer_tokens", "Real training tokens processed", LABELS,
                              registry=self.registry).labels(**labels)
        self.total.set(total_steps)
        self._server = None
        if metrics_port:
            try:
                self._server = start_http_server(metrics_port, registry=self.registry)
                log.info("metrics endpoint up", extra={"event": "metrics", "port": metrics_port})
            except OSError as exc:  # e.g. port taken by another local run: train anyway, without metrics
                log.warning(f"metrics endpoint not started on port {metrics_port}: {exc}",
                            extra={"event": "metrics_unavailable", "port": metrics_port})
        self._last_write = 0.0
        self.record: dict = {"step": 0, "totalSteps": total_steps, "epoch": 0.0, "percent": 0}
        self._lock = threading.Lock()  # guards the record
        self._write_lock = threading.Lock()  # orders the uploads
        self._closed = threading.Event()
        self._heartbeat: Optional[threading.Thread] = None

    def start_heartbeat(self) -> None:
        """Keep progress.json fresh while a single step, an eval or a checkpoint takes longer than the
        interval (big models): the operator reads updatedAt to tell a slow trainer from a dead one."""
        def beat() -> None:
            while not self._closed.wait(self.interval / 2):
                if time.monotonic() - self._last_write >= self.interval:
                    self.write()

        self._heartbeat = threading.Thread(target=beat, name="progress-heartbeat", daemon=True)
        self._heartbeat.start()

    def update(self, *, step: int, epoch: float, loss: Optional[float] = None, lr: Optional[float] = None,
               tokens: int = 0, tokens_per_second: Optional[float] = None, eta_seconds: Optional[int] = None,
               eval_loss: Optional[float] = None, force: bool = False) -> bool:
        """Record a step; writes progress.json when the interval has passed or `force` is set (returns
        whether it wrote)."""
        self.step.set(step)
        self.epoch.set(epoch)
        changes = {"step": step, "epoch": round(epoch, 4),
                   "percent": min(100, int(100 * step / self.total_steps)) if self.total_steps else 0}
        if loss is not None:
            self.loss.set(loss)
            changes["loss"] = round(loss, 6)
        if eval_loss is not None:
            self.eval_loss.set(eval_loss)
            changes["evalLoss"] = round(eval_loss, 6)
        if lr is not None:
            self.lr.set(lr)
        if tokens:
            self.tokens.inc(tokens)
        if tokens_per_second is not None:
            self.tps.set(tokens_per_second)
            changes["tokensPerSecond"] = round(tokens_per_second, 2)
        if eta_seconds is not None:
            changes["etaSeconds"] = int(eta_seconds)
        self.memory.set(accelerator_memory_bytes())
        with self._lock:  # the heartbeat thread may be serializing the record
            self.record.update(changes)
        if force or time.monotonic() - self._last_write >= self.interval:
            self.write()
            return True
        return False

    def write(self) -> None:
        # One write at a time (main loop or heartbeat), each serializing the record as it is when its
        # turn comes: a slow older write can never land after, and overwrite, a newer one.
        with self._write_lock:
            with self._lock:
                self.record["updatedAt"] = now_rfc3339()
                text = json.dumps(self.record, sort_keys=True)
            try:
                storage.write_text(self.uri, text)
            except Exception as exc:  # progress is best effort: a storage hiccup must not kill training
                log.warning(f"progress.json not written: {exc}", extra={"event": "progress_write_failed"})
            self._last_write = time.monotonic()

    def close(self) -> None:
        self._closed.set()
        if self._heartbeat is not None:
            self._heartbeat.join(timeout=5)
        if self._server is not None:
            server, thread = self._server if isinstance(self._server, tuple) else (None, None)
            if server is not None:
                server.shutdown()
                server.server_close()
            self._server = None
