"""Many ranks, one run: the launcher (torchrun inside the pod), the process group, the strategies
(DDP, FSDP2) and how one optimizer step's rows are split between ranks.

The operator renders torchrun's settings as PET_* variables (PET_NNODES, PET_NPROC_PER_NODE,
PET_NODE_RANK from the Indexed Job's completion index, PET_MASTER_ADDR = pod 0's DNS name,
PET_MASTER_PORT). `finetune-trainer train` in the pod sees them, is not a rank yet (no LOCAL_RANK),
and starts torch.distributed.run with `--nproc-per-node` ranks of itself; each rank then trains.

What a step means does not depend on the world size. One optimizer step takes the same rows
(batchSize x gradientAccumulationSteps of them, from the same seeded order) whatever the number of
ranks; rank r takes rows r, r+W, r+2W, ... in micro-batches of at most batchSize rows; every rank
divides its summed token losses by the step's *global* target count and the gradients are summed
across ranks. So the update equals the single-process one up to float summation order, and the
learning rate, the global batch and a checkpoint's data position mean the same at any world size.
"""

from __future__ import annotations

import datetime
import math
import os
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .errors import EXIT_CONFIG_ERROR, EXIT_PREEMPTED, ConfigError
from .logs import get_logger

log = get_logger("distributed")

#: Exit codes a rank may end with, most telling first: the pod's exit code is the first one any rank
#: had (a configuration error fails the Job at once; a preempted gang is not a failure).
EXIT_PRIORITY = (EXIT_CONFIG_ERROR, EXIT_PREEMPTED)


# ---------------------------------------------------------------- the launcher (pod level)


def launch_settings(env=os.environ) -> Optional[tuple[int, int]]:
    """(nodes, processes per node) when this pod must start ranks; None for a single process."""
    if "LOCAL_RANK" in env:  # already a rank started by torchrun
        return None
    try:
        nodes = int(env.get("PET_NNODES", "1") or 1)
        per_node = int(env.get("PET_NPROC_PER_NODE", "1") or 1)
    except ValueError:
        raise ConfigError("PET_NNODES and PET_NPROC_PER_NODE must be integers") from None
    if nodes < 1 or per_node < 1:
        raise ConfigError("PET_NNODES and PET_NPROC_PER_NODE must be at least 1")
    return (nodes, per_node) if nodes * per_node > 1 else None


def launch(command: str, config_path: str, nodes: int, per_node: int) -> int:
    """Run torch.distributed.run with `per_node` ranks of `finetune-trainer COMMAND --config ...`.

    Its own exit code hides the ranks' (any failure is 1): this returns the most telling rank exit
    code instead (EXIT_PRIORITY), and EXIT_PREEMPTED when the launcher itself got SIGTERM (it passed
    the signal on; the ranks checkpointed within TORCH_ELASTIC_SHUTDOWN_TIMEOUT)."""
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    argv = ["--nnodes", str(nodes), "--nproc-per-node", str(per_node)]
    if nodes > 1:
        # Static rendezvous at pod 0: every pod knows its rank (the completion index) and the address.
        argv += ["--rdzv-backend", "static", "--node-rank", os.environ.get("PET_NODE_RANK", "0"),
                 "--master-addr", os.environ.get("PET_MASTER_ADDR", "127.0.0.1"),
                 "--master-port", os.environ.get("PET_MASTER_PORT", "29500")]
    argv += ["--module", "finetune_trainer.cli", command, "--config", config_path]
    log.info("starting ranks", extra={"event": "launch", "nodes": nodes, "per_node": per_node,
                                       "node_rank": os.environ.get("PET_NODE_RANK", "0")})
    try:
        run(parse_args(argv))
    except ChildFailedError as exc:
        codes = [f.exitcode for f in exc.failures.values()]
        log.warning("a rank failed", extra={"event": "rank_failed", "exit_codes": codes})
        return next((c for c in EXIT_PRIORITY if c in codes), 1)
    except SignalException:
        return EXIT_PREEMPTED
    return 0


# ---------------------------------------------------------------- a rank's view of the world


@dataclass
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    strategy: str = "single"  # single | ddp | fsdp

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init(requested: str) -> World:
    """This process's rank, device and process group (gloo on CPU, NCCL on GPUs)."""
    import torch.distributed as dist

    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World(device=torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    # A lost peer must end this rank (and so the pod, and the gang restarts from the last checkpoint)
    # instead of hanging a collective forever.
    timeout = datetime.timedelta(seconds=float(os.environ.get("FINETUNE_DIST_TIMEOUT_SECONDS", "600")))
    dist.init_process_group(backend, timeout=timeout)
    return World(rank=rank, size=size, local_rank=local_rank, device=device,
                 strategy="fsdp" if requested == "fsdp" else "ddp")


def resolve_strategy(requested: str, model_bytes: int, device: torch.device) -> str:
    """auto: fsdp when the frozen base takes more than 40% of one GPU's memory (it would leave too
    little for activations), else ddp. On CPU, ddp."""
    if requested != "auto":
        return requested
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        return "fsdp" if model_bytes > 0.4 * total else "ddp"
    return "ddp"


def finish(world: World) -> None:
    import torch.distributed as dist

    if world.distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier(world: World) -> None:
    import torch.distributed as dist

    if world.distributed:
        dist.barrier()


def any_rank(world: World, flag: bool) -> bool:
    """True on every rank when it is True on one (a SIGTERM seen by one rank stops them all at the
    same step, so they checkpoint together)."""
    if not world.distributed:
        return flag
    import torch.distributed as dist

    t = torch.tensor([1.0 if flag else 0.0], device=world.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


# ---------------------------------------------------------------- the strategies


def decoder_layers(model):
    from .objective import causal_lm

    layers = getattr(causal_lm(model).get_decoder(), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ConfigError("distributed.strategy fsdp: the base model has no decoder.layers to shard "
                          "(Llama-, Qwen-, Mistral-shaped models do); use ddp")
    return layers


def shard(model, world: World):
    """FSDP2: each decoder layer becomes one fully_shard unit (its frozen base weights and its LoRA
    weights, sharded across all ranks, all-gathered for its forward and backward). The embeddings,
    final norm and output head stay whole on every rank: the training code calls them directly,
    they hold no trainable weight, and they are a small part of a large model."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(world.device.type, (world.size,))
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    return model


def is_dtensor(t) -> bool:
    return type(t).__name__ == "DTensor"


def full(t: torch.Tensor) -> torch.Tensor:
    """A whole tensor from a DTensor (a collective: every rank calls it) or the tensor itself."""
    return t.full_tensor() if is_dtensor(t) else t


def sum_gradients(params: Sequence[torch.nn.Parameter], world: World) -> None:
    """Sum the trainable gradients that FSDP did not already reduce, in one flat all-reduce: under
    ddp every trainable gradient (the LoRA weights, a few MB; the frozen base has none)."""
    if not world.distributed:
        return
    import torch.distributed as dist

    plain = [p for p in params if not is_dtensor(p)]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in plain]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for p, g in zip(plain, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(g).clone()
        offset += n


def loss_scale(world: World) -> float:
    """FSDP's reduce-scatter averages gradients over ranks; the step wants their sum."""
    return float(world.size) if world.strategy == "fsdp" else 1.0


# ---------------------------------------------------------------- checkpoint state at any world size


def whole_trainable(params_by_name: dict) -> dict:
    """The trainable weights as whole tensors on the host, keyed like model.state_dict() (a
    collective under FSDP: every rank calls it)."""
    return {name: full(p.detach()).cpu() for name, p in params_by_name.items()}


def trainable_state(model, params_by_name: dict) -> dict:
    """The adapter's weights as whole tensors, in peft's key names (what a checkpoint holds)."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(model, state_dict=whole_trainable(params_by_name))


def optimizer_state(optimizer) -> dict:
    """optimizer.state_dict() with every DTensor made whole: the same file whatever the world size
    or strategy (keyed by the trainable parameters' order, which sharding does not change)."""
    sd = optimizer.state_dict()
    sd["state"] = {k: {n: full(v).cpu() if torch.is_tensor(v) else v for n, v in s.items()}
                   for k, s in sd["state"].items()}
    return sd


def load_optimizer_state(optimizer, params: Sequence[torch.nn.Parameter], state: dict) -> None:
    """Load a whole-tensor optimizer state, resharding each moment like its parameter."""
    from torch.distributed.tensor import distribute_tensor

    out = dict(state)
    out["state"] = {}
    for k, s in state["state"].items():
        p = params[int(k)]
        entry = {}
        for n, v in s.items():
            if torch.is_tensor(v) and is_dtensor(p) and tuple(v.shape) == tuple(p.shape):
                v = distribute_tensor(v.to(p.device), p.device_mesh, p.placements)
            elif torch.is_tensor(v) and v.dim() > 0:
                v = v.to(p.device)
            entry[n] = v
        out["state"][k] = entry
    optimizer.load_state_dict(out)


# ---------------------------------------------------------------- one step's rows per rank


@dataclass
class StepShard:
    micro_batches: list  # this rank's collated micro-batches (a filler of weight 0 when it has none)
    n_targets: int  # the whole step's target tokens, over every rank
    n_tokens: int  # the whole step's real tokens
    sum_sq_lengths: int  # the whole step's attention FLOP term
    weights: list  # 1.0 per real micro-batch, 0.0 for a filler


def shard_step(batches: list, examples, pad_id: int, batch_size: int, world: World, *,
               micro_batches_per_rank: Optional[int] = None) -> StepShard:
    """This rank's part of one optimizer step (`batches`: the step's micro-batches as the
    single-process run would take them, rows of example indices)."""
    from .data import collate

    rows = [row for b in batches for row in b]
    mine = rows[world.rank::world.size]
    chunks = [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]
    # Under FSDP every rank must run as many forward/backward passes as the others (each one
    # all-gathers): a rank short of rows runs a filler micro-batch whose loss counts zero times.
    needed = micro_batches_per_rank
    if needed is None:
        most_rows = math.ceil(len(rows) / world.size)  # what the busiest rank holds
        needed = math.ceil(most_rows / batch_size) if world.strategy == "fsdp" else len(chunks)
    weights = [1.0] * len(chunks)
    while len(chunks) < needed:
        chunks.append([rows[0]])
        weights.append(0.0)
    n_targets = sum(examples[i].trainable_tokens for row in rows for i in row)
    n_tokens = sum(len(examples[i]) for row in rows for i in row)
    sum_sq = sum(len(examples[i]) ** 2 for row in rows for i in row)
    return StepShard([collate(c, examples, pad_id) for c in chunks], n_targets, n_tokens, sum_sq, weights)


class QuietProgress:
    """What ranks other than 0 report: nothing (rank 0 writes progress.json and serves metrics)."""

    record: dict = {}

    def update(self, **_) -> bool:
        return False

    def write(self) -> None:
        pass

    def start_heartbeat(self) -> None:
        pass

    def close(self) -> None:
        pass

