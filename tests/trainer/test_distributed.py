"""Data parallelism on CPU (gloo): two ranks, DDP and FSDP2, train what one rank trains, and a
2-rank checkpoint resumes on 1 and on 3 ranks.

The trainer runs as in its pod: `finetune-trainer train` with the PET_* variables the operator
renders, so the command itself starts torchrun's ranks. Losses are read from the checkpoints
(one per step), adapters from the published peft folder.

Tolerance: the per-step loss of 2 ranks is within 1e-4 (relative) of 1 rank's and the adapter
weights within 1e-4 (absolute): the only difference is float summation order (each rank sums its
rows, then the ranks' sums are added), which in fp32 over 6 steps moves the 5th digit at most.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from finetune_trainer import checkpoint, storage

from testutil import free_port

from .helpers import read_json, run_trainer, trainer_command, trainer_config, write_config, write_dataset

STEPS = 6
REL_TOL = 1e-4
ABS_TOL = 1e-4


def step_losses(output_uri: str) -> dict[int, float]:
    out = {}
    for step in checkpoint.list_steps(output_uri):
        state = json.loads(storage.read_text(storage.join(checkpoint.step_uri(output_uri, step), "state.json")))
        out[step] = state["last_loss"]
    return dict(sorted(out.items()))


def adapter_tensors(output_uri: str) -> dict[str, torch.Tensor]:
    result = read_json(storage.join(output_uri, "result.json"))
    local = Path(storage.parse(result["adapterURI"]).key)
    return load_file(str(local / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def dataset_uri(tmp_path_factory):
    return write_dataset(f"file://{tmp_path_factory.mktemp('data')}", n_train=40, n_eval=8)


def make_config(tmp_path: Path, model_dir: Path, data_uri: str, name: str, strategy: str = "auto", **training):
    settings = {"maxSteps": STEPS, "batchSize": 2, "gradientAccumulationSteps": 2, "checkpointEverySteps": 1,
                "keepCheckpoints": 100, "evalEverySteps": 3, **training}
    cfg = trainer_config(model_uri=f"file://{model_dir}", data_uri=data_uri, output_uri=f"file://{tmp_path / name}",
                         training=settings, distributed={"strategy": strategy})
    return cfg, write_config(cfg, tmp_path / f"{name}.json")


def launch_env(ranks: int, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PET_")}
    if ranks > 1:
        env.update(PET_NPROC_PER_NODE=str(ranks), PET_NNODES="1")
    # torchrun's single-node rendezvous binds a free port itself; nothing else to set
    return {**env, **extra}


def train(path: Path, ranks: int, timeout: float = 300, **extra):
    proc = run_trainer(path, env=launch_env(ranks, **extra), timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def single_rank(tmp_path_factory, tiny_model_dir, dataset_uri):
    tmp = tmp_path_factory.mktemp("single")
    cfg, path = make_config(tmp, tiny_model_dir, dataset_uri, "one")
    train(path, 1)
    return cfg.outputURI


def assert_same_run(reference: str, other: str) -> None:
    ref, got = step_losses(reference), step_losses(other)
    assert list(got) == list(range(1, STEPS + 1)) == list(ref)
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=REL_TOL), (step, ref, got)
    a, b = adapter_tensors(reference), adapter_tensors(other)
    assert sorted(a) == sorted(b)
    for key in a:
        assert torch.allclose(a[key], b[key], atol=ABS_TOL, rtol=0), (key, (a[key] - b[key]).abs().max())
    # and the adapter did train: it is not the initial one (lora_B starts at zero)
    assert any(float(b[k].abs().max()) > 0 for k in b if "lora_B" in k)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, tiny_model_dir, dataset_uri):
    """{strategy: output URI} of 2-rank runs, trained once for the module."""
    runs = {}

    def get(strategy: str) -> str:
        if strategy not in runs:
            tmp = tmp_path_factory.mktemp(f"two-{strategy}")
            cfg, path = make_config(tmp, tiny_model_dir, dataset_uri, strategy, strategy=strategy)
            proc = train(path, 2)
            assert '"world_size": 2' in proc.stderr and f'"strategy": "{strategy}"' in proc.stderr
            runs[strategy] = cfg.outputURI
        return runs[strategy]

    return get


def test_two_ranks_ddp_match_one_rank(single_rank, two_ranks):
    output = two_ranks("ddp")
    assert_same_run(single_rank, output)
    state = json.loads(storage.read_text(storage.join(checkpoint.step_uri(output, STEPS), "state.json")))
    assert state["worldSize"] == 2


def test_two_ranks_fsdp_match_one_rank(single_rank, two_ranks):
    assert_same_run(single_rank, two_ranks("fsdp"))


RESUME_AT = 3


def copy_checkpoints_up_to(source_uri: str, dest: Path, last_step: int) -> None:
    """A run folder as a 2-rank run left it when stopped after `last_step`: its checkpoints so far."""
    src = Path(storage.parse(checkpoint.checkpoints_uri(source_uri)).key)
    for step in range(1, last_step + 1):
        shutil.copytree(src / f"step-{step:08d}", dest / "checkpoints" / f"step-{step:08d}")


@pytest.mark.parametrize("strategy,ranks", [("ddp", 1), ("ddp", 3), ("fsdp", 3), ("fsdp", 1)])
def test_a_two_rank_checkpoint_resumes_at_another_world_size(two_ranks, tmp_path, tiny_model_dir, dataset_uri,
                                                            strategy, ranks):
    reference = two_ranks(strategy)
    cfg, path = make_config(tmp_path, tiny_model_dir, dataset_uri, "resumed", strategy=strategy)
    copy_checkpoints_up_to(reference, tmp_path / "resumed", RESUME_AT)
    proc = train(path, ranks)
    resumed = [json.loads(line) for line in proc.stderr.splitlines() if '"event": "resume"' in line]
    assert resumed and resumed[0]["step"] == RESUME_AT  # same step
    # same next batches and the loss continues: steps 4..6 as the uninterrupted 2-rank run had them
    assert_same_run(reference, cfg.outputURI)


def test_two_pods_of_one_rank_each_rendezvous_at_pod_zero(single_rank, tmp_path, tiny_model_dir, dataset_uri):
    """What an Indexed Job's two pods do: each runs `finetune-trainer train` with its node rank
    (PET_NODE_RANK, from the completion index) and pod 0's address; torchrun's static rendezvous
    joins them into one world of 2."""
    cfg, path = make_config(tmp_path, tiny_model_dir, dataset_uri, "nodes", strategy="ddp")
    port = str(free_port())
    procs = [subprocess.Popen(trainer_command(path), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              env={**launch_env(1), "PET_NNODES": "2", "PET_NPROC_PER_NODE": "1",
                                   "PET_NODE_RANK": str(rank), "PET_MASTER_ADDR": "127.0.0.1",
                                   "PET_MASTER_PORT": port})
             for rank in (0, 1)]
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e[-3000:] for e in errs]
    assert all('"world_size": 2' in e for e in errs)
    assert_same_run(single_rank, cfg.outputURI)
