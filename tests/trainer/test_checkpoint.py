"""Checkpoints: marker written last, the newest one that verifies wins, pruning keeps complete ones."""

from __future__ import annotations

import random

import torch

from finetune_trainer import checkpoint, storage


def save_at(output: str, step: int, weight: float) -> tuple[str, torch.Tensor]:
    param = torch.nn.Parameter(torch.full((2, 2), weight))
    optimizer = torch.optim.AdamW([param], lr=0.1)
    param.grad = torch.ones_like(param)
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    state = checkpoint.TrainState(step=step, epoch=1, batch_index=3, tokens_seen=100 * step, fingerprint="f")
    uri = checkpoint.save(output, state, adapter_state={"w": param.data}, optimizer=optimizer, scheduler=scheduler)
    return uri, param.data.clone()


def test_round_trip_restores_state_and_rng(bucket):
    output = f"s3://{bucket}/run"
    random.seed(5)
    torch.manual_seed(5)
    uri, weights = save_at(output, 4, 0.5)
    assert uri.endswith("checkpoints/step-00000004")
    expected_next = (random.random(), torch.rand(1).item())

    loaded = checkpoint.load_latest(output)
    assert (loaded.state.step, loaded.state.epoch, loaded.state.batch_index, loaded.state.tokens_seen) == (4, 1, 3, 400)
    assert torch.equal(loaded.adapter_state["w"], weights)
    assert loaded.optimizer["state"][0]["step"] == 1
    checkpoint.set_rng_state(loaded.rng)
    assert (random.random(), torch.rand(1).item()) == expected_next


def test_newest_verified_checkpoint_wins(bucket):
    output = f"s3://{bucket}/run"
    save_at(output, 2, 0.2)
    newest, _ = save_at(output, 4, 0.4)
    # a checkpoint whose files do not match its marker is skipped...
    storage.write_bytes(storage.join(newest, "adapter.safetensors"), b"garbage")
    assert checkpoint.load_latest(output).state.step == 2
    # ...and so is one without a marker (interrupted while uploading)
    storage.delete(storage.join(checkpoint.step_uri(output, 2), checkpoint.MARKER))
    assert checkpoint.load_latest(output) is None


def test_prune_keeps_the_newest_complete_checkpoints(bucket):
    output = f"s3://{bucket}/run"
    for step in (2, 4, 6, 8):
        save_at(output, step, step / 10)
    # step 3: debris of an interrupted write (no marker), older than what is kept
    storage.write_bytes(storage.join(checkpoint.step_uri(output, 3), "adapter.safetensors"), b"partial")
    # step 10: being written right now (no marker yet), newer than everything: must survive
    storage.write_bytes(storage.join(checkpoint.step_uri(output, 10), "adapter.safetensors"), b"in flight")

    checkpoint.prune(output, keep=2)

    folders = {name.split("/")[0] for name in storage.list_keys(checkpoint.checkpoints_uri(output))}
    assert folders == {"step-00000006", "step-00000008", "step-00000010"}
    assert checkpoint.list_steps(output) == [8, 6]


class _Payload:
    """What an attacker with write access to the checkpoint prefix would plant: unpickling it runs code."""

    def __init__(self, flag: str):
        self.flag = flag

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.flag}",))


def test_a_checkpoint_with_a_pickle_payload_is_refused_and_runs_nothing(bucket, tmp_path):
    """The marker's sha256 can be forged by whoever writes the files, so integrity is not the defence:
    every .pt file is read with weights_only=True, and one that needs a class is refused."""
    import json

    output = f"s3://{bucket}/run"
    save_at(output, 2, 0.25)
    uri, _ = save_at(output, 4, 0.5)
    flag = tmp_path / "pwned"
    evil = tmp_path / "optimizer.pt"
    torch.save({"state": {}, "param_groups": [], "x": _Payload(str(flag))}, evil)
    storage.upload_file(evil, storage.join(uri, "optimizer.pt"))
    marker = json.loads(storage.read_text(storage.join(uri, checkpoint.MARKER)))
    marker["files"]["optimizer.pt"] = {"sha256": storage.sha256_file(evil), "size": evil.stat().st_size}
    storage.write_text(storage.join(uri, checkpoint.MARKER), json.dumps(marker))

    loaded = checkpoint.load_latest(output)
    assert not flag.exists(), "the pickle payload ran"
    assert loaded is not None and loaded.state.step == 2  # the forged one is skipped, the older one resumes


def test_rng_state_holds_only_tensors_and_plain_values(tmp_path):
    import numpy as np

    np.random.seed(7)
    path = tmp_path / "rng.pt"
    torch.save(checkpoint.rng_state(), path)
    expected = np.random.rand()
    np.random.seed(99)
    checkpoint.set_rng_state(torch.load(path, weights_only=True))
    assert np.random.rand() == expected
