"""The trainer's Prometheus endpoint and progress.json (read back as the operator's Progress model)."""

from __future__ import annotations

import urllib.request

from finetune_operator.api.finetunejob import Progress
from finetune_trainer import storage
from finetune_trainer.progress import ProgressReporter

from testutil import free_port
from .helpers import read_json


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return resp.read().decode()


def test_metrics_endpoint_and_progress_record(bucket):
    port = free_port()
    output = f"s3://{bucket}/runs/p"
    reporter = ProgressReporter(output_uri=output, namespace="team-a", job="ft-1", total_steps=40,
                                interval_seconds=30, metrics_port=port)
    try:
        reporter.update(step=1, epoch=0.1, loss=2.5, lr=1e-4, tokens=1000, tokens_per_second=500.0,
                        eta_seconds=78, force=True)
        wrote = reporter.update(step=2, epoch=0.2, loss=2.25, tokens=1200, tokens_per_second=600.0)
        assert not wrote  # inside the interval: metrics move, the record waits
        text = scrape(port)
        labels = '{job="ft-1",namespace="team-a"}'
        for line in (f"finetune_trainer_step{labels} 2.0", f"finetune_trainer_total_steps{labels} 40.0",
                     f"finetune_trainer_loss{labels} 2.25", f"finetune_trainer_tokens_total{labels} 2200.0",
                     f"finetune_trainer_tokens_per_second{labels} 600.0",
                     f"finetune_trainer_learning_rate{labels} 0.0001"):
            assert line in text, line
        assert f"finetune_trainer_accelerator_memory_bytes{labels}" in text
        assert f"finetune_trainer_epoch{labels}" in text and f"finetune_trainer_eval_loss{labels}" in text

        record = Progress.model_validate(read_json(storage.join(output, "progress.json")))
        assert (record.step, record.totalSteps, record.percent, record.loss, record.etaSeconds) == (1, 40, 2, 2.5, 78)

        reporter.update(step=4, epoch=0.4, eval_loss=2.0, force=True)
        record = Progress.model_validate(read_json(storage.join(output, "progress.json")))
        assert record.step == 4 and record.evalLoss == 2.0 and record.percent == 10
        assert record.updatedAt.endswith("Z") and "T" in record.updatedAt
    finally:
        reporter.close()


def test_heartbeat_keeps_the_record_fresh_between_steps(bucket):
    output = f"s3://{bucket}/runs/h"
    reporter = ProgressReporter(output_uri=output, namespace="ns", job="j", total_steps=10, interval_seconds=0.3)
    try:
        reporter.update(step=3, epoch=0.3, loss=1.0, force=True)
        storage.delete(storage.join(output, "progress.json"))
        reporter.start_heartbeat()
        import time

        deadline = time.time() + 10
        while not storage.exists(storage.join(output, "progress.json")) and time.time() < deadline:
            time.sleep(0.05)
        assert Progress.model_validate(read_json(storage.join(output, "progress.json"))).step == 3
    finally:
        reporter.close()


def test_a_taken_metrics_port_does_not_stop_training(bucket):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        reporter = ProgressReporter(output_uri=f"s3://{bucket}/runs/busy", namespace="ns", job="j", total_steps=2,
                                    interval_seconds=1, metrics_port=port)
        try:
            assert reporter._server is None  # no endpoint, but the run goes on
            assert reporter.update(step=1, epoch=0.5, loss=1.0, force=True)
            assert read_json(storage.join(f"s3://{bucket}/runs/busy", "progress.json"))["step"] == 1
        finally:
            reporter.close()
