"""`finetune-trainer train`: LoRA / QLoRA / DoRA fine-tuning, read top to bottom.

    config -> base model (cached, digest-checked) -> tokenized, packed data -> peft model
    -> resume from the newest verified checkpoint -> optimizer steps (eval, checkpoints,
    progress, SIGTERM) -> adapter (content-addressed, manifest last) -> result.json

A plain loop instead of HF Trainer: packed rows without padding waste, logits only where
there is a target, and a data order that is a pure function of (seed, epoch) so that a
resumed run replays exactly what an uninterrupted run would have done.
"""

from __future__ import annotations

import math
import os
import random
import signal
import time
import uuid
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from . import adapter, balance, checkpoint, continual, data, distributed, model_io, storage
from .errors import EXIT_OK, EXIT_PREEMPTED, ConfigError
from .logs import get_logger
from .objective import PrefixCache, cached_loss_sum, evaluate, loss_sum
from .progress import ProgressReporter

log = get_logger("train")


def load_config(config_path: str):
    from pydantic import ValidationError

    from finetune_operator.api.trainer_config import TrainerConfig

    try:
        text = storage.read_text(config_path) if "://" in config_path else Path(config_path).read_text()
    except FileNotFoundError:
        raise ConfigError(f"{config_path}: config file not found") from None
    try:
        return TrainerConfig.model_validate_json(text)
    except ValidationError as exc:
        raise ConfigError(f"{config_path}: invalid trainer config: {exc}") from None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class StopFlag:
    """Set by SIGTERM: finish the current step, checkpoint, exit EXIT_PREEMPTED."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def install(self) -> None:
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True
        log.info("SIGTERM received: stopping after this step", extra={"event": "sigterm"})

    def uninstall(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


class DataStream:
    """Micro-batches in (epoch, batch index) order; the position is all a checkpoint needs."""

    def __init__(self, examples, *, seed: int, batch_size: int, max_len: int, packing: bool, pad_id: int,
                 mix: "continual.ReplayMix | None" = None):
        self.examples, self.seed, self.batch_size, self.mix = examples, seed, batch_size, mix
        self.max_len, self.packing, self.pad_id = max_len, packing, pad_id
        self.lengths = [len(e) for e in examples]
        self._cache: dict[int, list] = {}
        self.batches_per_epoch = len(self.epoch(0))

    def epoch(self, epoch: int) -> list:
        if epoch not in self._cache:
            batches = self.mix.epoch_batches if self.mix is not None else data.epoch_batches
            self._cache = {epoch: batches(
                self.lengths, epoch=epoch, seed=self.seed, batch_size=self.batch_size,
                max_len=self.max_len, packing=self.packing)}
        return self._cache[epoch]

    def next_rows(self, state: checkpoint.TrainState, accumulation: int) -> list:
        """Up to `accumulation` micro-batches (rows of example indices) for one optimizer step; a step
        never spans two epochs."""
        if state.batch_index >= len(self.epoch(state.epoch)):  # replay: epochs may pack into more or fewer rows
            state.epoch, state.batch_index = state.epoch + 1, 0
        batches = self.epoch(state.epoch)[state.batch_index:state.batch_index + accumulation]
        state.batch_index += len(batches)
        return batches

    def next_step(self, state: checkpoint.TrainState, accumulation: int) -> list[dict]:
        return [data.collate(b, self.examples, self.pad_id) for b in self.next_rows(state, accumulation)]


def total_steps(settings, steps_per_epoch: int) -> int:
    if settings.maxSteps:
        return settings.maxSteps
    return max(1, math.ceil((settings.epochs or 1.0) * steps_per_epoch))


def quantization_of(cfg):
    """The 4-bit settings to load the base with: qlora always (defaults if unset), dora when given (QDoRA)."""
    from finetune_operator.api.finetunejob import Quantization

    if cfg.method == "qlora":
        return cfg.quantization or Quantization()
    if cfg.method == "dora":
        return cfg.quantization
    if cfg.quantization is not None:
        log.warning("quantization is ignored for method lora", extra={"event": "quantization_ignored"})
    return None


def run_fingerprint(cfg) -> str:
    """What a checkpoint must match to be resumed: everything but the reporting cadence."""
    import hashlib
    import json

    # initFrom / replayData only when set: the fingerprints of other runs stay what they were.
    relevant = cfg.model_dump(mode="json", include={"baseModel", "data", "method", "lora", "quantization", "training"}
                              | ({"initFrom"} if cfg.initFrom else set()) | ({"replayData"} if cfg.replayData else set()))
    for cadence in ("evalEverySteps", "checkpointEverySteps", "keepCheckpoints"):
        relevant["training"].pop(cadence, None)
    relevant["baseModel"].pop("credentials", None)  # which Secret holds the keys does not change the model
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def run(config_path: str) -> int:
    # Everything comes from the config's URIs; never reach for the Hugging Face Hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    cfg = load_config(config_path)
    # Catch SIGTERM from the start: one arriving while the model loads still ends in an orderly exit.
    stop = StopFlag()
    stop.install()
    try:
        world = distributed.init(cfg.distributed.strategy)
        code = _run(cfg, stop, world)
        distributed.finish(world)  # every rank done (rank 0 may still have been exporting)
        return code
    finally:
        stop.uninstall()


def run_local_round(cfg, fed) -> int:
    """One federated round at a site (federated/local_round.py): this same loop, from the global adapter
    the server sent, for `fed.local_steps` more steps; the weights go back to `fed`, not to an adapter."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    stop = StopFlag()
    stop.install()
    try:
        return _run(cfg, stop, distributed.init("ddp"), fed)
    finally:
        stop.uninstall()


def _run(cfg, stop: StopFlag, world: distributed.World, fed=None) -> int:
    if fed is not None and (world.distributed or cfg.data.format == "image-text"):
        raise ConfigError("a federated site trains on one rank, on text data (chat, instruction or completion)")
    if cfg.data.format == "image-text":  # a vision-language model: its own loop (vision.py)
        from . import vision

        if world.distributed:
            raise ConfigError("image-text training runs one rank: set resources.nodes 1 and gpusPerNode 1 "
                              "(multi-GPU vision-language training is not supported yet)")
        return vision.run(cfg, stop)
    if cfg.multimodal is not None:
        raise ConfigError(f"spec.multimodal needs a Dataset of format image-text; this one is {cfg.data.format}")
    t = cfg.training
    log.info("training run starting", extra={"event": "start", "job": cfg.job.name, "namespace": cfg.job.namespace,
                                              "method": cfg.method, "output": cfg.outputURI,
                                              "rank": world.rank, "world_size": world.size})
    seed_everything(t.seed)  # the same on every rank: the adapters start identical
    device = world.device
    precision = model_io.effective_precision(t.precision, device)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    # ---- 1. inputs: base model (cached, digest-checked) and the validated data
    # Where this process's time goes, in the "done" log line (ftctl run prints it per phase).
    seconds: dict[str, float] = {}
    load_started = time.perf_counter()
    # The parent first: a tampered or missing parent stops the run before anything else is loaded.
    parent = continual.fetch_parent(cfg.initFrom) if cfg.initFrom is not None else None
    model_dir = model_io.fetch_model(cfg.baseModel.uri, cfg.baseModel.digest)
    base_digest = cfg.baseModel.digest or model_io.model_digest(model_dir)  # recorded in the adapter manifest
    tokenizer = model_io.load_tokenizer(model_dir)
    data.ensure_chat_template(tokenizer, log)
    # training.balance: group-balanced re-sampling (balance.py); counts go to the manifest and result.json.
    train_examples, balanced = balance.rebalance(data.read_examples(cfg.data.uri, "train.jsonl", cfg.data.format),
                                                 t.balance, t.seed)
    if balanced:
        log.info("training data balanced", extra={"event": "balanced", **balanced.model_dump(mode="json")})
    train_set = data.tokenize_all(train_examples, tokenizer, t.maxSeqLength)
    eval_set = data.tokenize_all(data.read_examples(cfg.data.uri, "eval.jsonl", cfg.data.format),
                                 tokenizer, t.maxSeqLength)
    log.info("data tokenized", extra={"event": "data", "train_examples": len(train_set),
                                       "eval_examples": len(eval_set), "train_tokens": sum(map(len, train_set))})
    if not train_set:
        raise ConfigError(f"{cfg.data.uri}/train.jsonl: no example has a response token within maxSeqLength")
    pad_id = tokenizer.pad_token_id
    # training.replay: the pool follows the new examples in one list; ReplayMix picks each epoch's share.
    if t.replay and not cfg.replayData:
        raise ConfigError("training.replay is set but the config has no replayData (the operator fills it in "
                          "from the replay Datasets)")
    pool = continual.replay_pool(cfg, tokenizer) if cfg.replayData else []
    mix = continual.ReplayMix(len(train_set), len(pool), t.replay.fraction, t.seed) if pool and t.replay else None
    if mix is not None:
        log.info("replay", extra={"event": "replay", **mix.stats([d.name for d in cfg.replayData])})
    train_set = train_set + pool
    stream = DataStream(train_set, seed=t.seed, batch_size=t.batchSize, max_len=t.maxSeqLength, packing=t.packing,
                        pad_id=pad_id, mix=mix)
    steps_per_epoch = math.ceil(stream.batches_per_epoch / t.gradientAccumulationSteps)
    n_steps = total_steps(t, steps_per_epoch)

    # ---- 2. model: frozen base (+4-bit) with LoRA / DoRA adapters; only adapters train
    quantization = quantization_of(cfg)
    if world.distributed:
        world.strategy = distributed.resolve_strategy(cfg.distributed.strategy, model_io.weights_bytes(model_dir),
                                                      device)
    sharded = world.strategy == "fsdp"
    # FSDP: the whole base lands on the host first and each layer moves to the GPU as it is sharded.
    base = model_io.load_base_model(model_dir, precision=precision,
                                    device=torch.device("cpu") if sharded and quantization is None else device,
                                    quantization=quantization, gradient_checkpointing=t.gradientCheckpointing,
                                    quant_storage_as_compute=sharded)
    model = model_io.build_peft_model(base, cfg.method, cfg.lora, cfg.baseModel.uri)
    if fed is not None:
        fed.prepare(model)  # ffa-lora: A frozen before the optimizer sees the parameters
    anchor = None
    if parent is not None:
        try:
            continual.load_parent_weights(model, parent)
            lineage = continual.lineage_record(parent)
        finally:
            parent.cleanup()
        if cfg.initFrom.l2 > 0:  # the parent's weights, before a checkpoint below replaces the live ones
            if sharded:
                raise ConfigError("spec.initFrom.l2 needs whole adapter weights on every rank: use "
                                  "spec.distributed.strategy ddp, or l2: 0, with fsdp")
            anchor = continual.ParentAnchor([p for p in model.parameters() if p.requires_grad], cfg.initFrom.l2)
    # A checkpoint's adapter goes in before sharding (whole tensors, whatever world size wrote it).
    loaded = checkpoint.load_latest(cfg.outputURI)
    if loaded is not None and loaded.state.fingerprint != run_fingerprint(cfg):
        raise ConfigError(f"{loaded.uri} was written by a run with a different configuration (base model, data, "
                          "method, lora, quantization or training settings); use a new outputURI")
    if loaded is not None:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, {k: v.to(device) for k, v in loaded.adapter_state.items()})
    if fed is not None:
        fed.load_global(model, device)  # this round starts from the aggregate, with the site's own optimizer state
    if sharded:
        distributed.shard(model, world)
        model.to(device)
    named_params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    params = list(named_params.values())
    optimizer = torch.optim.AdamW(params, lr=t.learningRate, weight_decay=t.weightDecay,
                                  fused=device.type == "cuda")
    from transformers import get_scheduler

    # A federated site's schedule spans the federation's rounds, not its step budget (local_round.py).
    schedule_steps = fed.schedule_steps if fed is not None and fed.schedule_steps else n_steps
    scheduler = get_scheduler(t.lrScheduler, optimizer, num_warmup_steps=int(t.warmupRatio * schedule_steps),
                              num_training_steps=schedule_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    # ---- 3. resume from the newest checkpoint that verifies
    state = checkpoint.TrainState(fingerprint=run_fingerprint(cfg))
    if loaded is not None:
        if sharded:
            distributed.load_optimizer_state(optimizer, params, loaded.optimizer)
        else:
            optimizer.load_state_dict(loaded.optimizer)
        scheduler.load_state_dict(loaded.scheduler)
        checkpoint.set_rng_state(loaded.rng)  # rank 0's generators
        state = loaded.state
        log.info("resumed from checkpoint", extra={"event": "resume", "step": state.step, "uri": loaded.uri})
    if fed is not None:
        fed.begin(state.step, n_steps, len(train_set), len(eval_set), scheduler)
    if world.rank > 0:
        # Dropout differs per rank (as it would per example in one big batch); reproducible per (seed, rank, step).
        torch.manual_seed(t.seed * 1_000_003 + world.rank * 7919 + state.step)
    log.info("plan", extra={"event": "plan", "total_steps": n_steps, "steps_per_epoch": steps_per_epoch,
                            "train_examples": len(train_set), "eval_examples": len(eval_set),
                            "trainable_params": sum(p.numel() for p in params), "device": device.type,
                            "precision": precision, "world_size": world.size, "strategy": world.strategy})
    if world.distributed and t.batchSize * t.gradientAccumulationSteps < world.size:
        log.warning("fewer rows per step (batchSize x gradientAccumulationSteps) than ranks: some ranks idle",
                    extra={"event": "ranks_idle", "world_size": world.size})

    # Layers below the lowest adapted one hold nothing to train: run them once per example now
    # instead of in every step (objective.PrefixCache; same loss and gradients).
    # FINETUNE_PREFIX_CACHE=0 takes the ordinary path (benchmarks and the equivalence test compare both).
    seconds["load"] = time.perf_counter() - load_started
    cache_started = time.perf_counter()
    use_cache = (state.step < (fed.until_step if fed is not None else n_steps)
                 and os.environ.get("FINETUNE_PREFIX_CACHE", "1") != "0")
    prefix = PrefixCache.build(model, train_set, max_len=t.maxSeqLength, pad_id=tokenizer.pad_token_id,
                               device=device, amp_dtype=amp_dtype) if use_cache else None
    seconds["prefix_cache"] = time.perf_counter() - cache_started
    if prefix is not None:
        log.info("frozen layers run once per example", extra={
            "event": "prefix_cache", "layers": prefix.layers, "seconds": round(time.perf_counter() - cache_started, 2)})

    def step_loss_sum(batch: dict) -> torch.Tensor:
        if prefix is not None:
            return cached_loss_sum(model, prefix, batch, device, amp_dtype)
        return loss_sum(model, batch, device, amp_dtype)

    progress = ProgressReporter(output_uri=cfg.outputURI, namespace=cfg.job.namespace, job=cfg.job.name,
                                total_steps=n_steps, interval_seconds=cfg.progressIntervalSeconds,
                                metrics_port=cfg.metricsPort) if world.is_main else distributed.QuietProgress()
    progress.update(step=state.step, epoch=state.epoch + state.batch_index / stream.batches_per_epoch,
                    loss=state.last_loss, eval_loss=state.last_eval_loss, force=True)
    progress.start_heartbeat()

    def run_eval() -> float:
        eval_started = time.perf_counter()
        try:
            return evaluate(model, eval_set or train_set, batch_size=t.batchSize, max_len=t.maxSeqLength,
                            packing=t.packing, pad_id=pad_id, device=device, amp_dtype=amp_dtype)
        finally:
            seconds["eval"] = seconds.get("eval", 0.0) + time.perf_counter() - eval_started

    def save_checkpoint() -> None:
        from peft import get_peft_model_state_dict

        if sharded:  # whole tensors (a collective): the checkpoint does not depend on the world size
            adapter_state = distributed.trainable_state(model, named_params)
            optimizer_state = distributed.optimizer_state(optimizer)
        else:  # ddp ranks hold identical copies: rank 0's is the checkpoint
            adapter_state, optimizer_state = get_peft_model_state_dict(model), optimizer
        if world.is_main:
            checkpoint.save(cfg.outputURI, state, adapter_state=adapter_state, optimizer=optimizer_state,
                            scheduler=scheduler, extra={"totalSteps": n_steps, "worldSize": world.size})
            checkpoint.prune(cfg.outputURI, t.keepCheckpoints)
        distributed.barrier(world)  # no rank exits (or goes on) before the checkpoint is complete

    def epoch_done() -> float:
        return state.epoch + state.batch_index / stream.batches_per_epoch

    scale = distributed.loss_scale(world)

    def train_step(micro_batches: list[dict], n_targets: Optional[int] = None,
                   weights: Optional[list[float]] = None) -> float:
        """Forward + backward over this rank's micro-batches of the step, then one optimizer update."""
        if n_targets is None:
            n_targets = sum(b["n_targets"] for b in micro_batches)
        step_loss = torch.zeros((), device=device)
        for k, batch in enumerate(micro_batches):
            # Normalized by the whole step's target count (over every rank), so accumulation and
            # data parallelism both equal one big batch.
            loss = step_loss_sum(batch) / n_targets
            weight = 1.0 if weights is None else weights[k]
            if weight != 1.0 or scale != 1.0:
                loss = loss * (weight * scale)
            scaler.scale(loss).backward()
            step_loss += loss.detach() / scale
        distributed.sum_gradients(params, world)
        if anchor is not None:  # after the all-reduce: every rank adds the same penalty gradient, once
            scaler.scale(anchor.penalty()).backward()
        if world.distributed:
            import torch.distributed as dist

            dist.all_reduce(step_loss, op=dist.ReduceOp.SUM)
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, t.maxGradNorm)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return float(step_loss)  # waits for the GPU: step timings below are real

    if fed is not None:  # the aggregate the site received, on the site's eval split
        fed.eval_loss = run_eval()
        if fed.evaluate_base:  # and the base model alone (peft switches the adapter off), for the gate
            with model.disable_adapter():
                fed.base_eval_loss = run_eval()

    # ---- 4. the loop: one iteration = one optimizer step
    # Fault-injection tests slow steps down so they can signal a run mid-training; 0 in real runs.
    debug_sleep = float(os.environ.get("FINETUNE_DEBUG_STEP_SLEEP", "0"))
    try:
        model.train()
        started_step, started = state.step, time.monotonic()
        window_tokens, window_start = 0, time.monotonic()  # for tokens/s between progress records
        # This process's time in optimizer steps (no eval, checkpoint, progress), real tokens and the
        # attention FLOP term: the benchmark's tokens/s and MFU.
        train_seconds, tokens_this_run, sum_sq_lengths = 0.0, 0, 0
        while state.step < (fed.until_step if fed is not None else n_steps):
            if state.step == started_step and distributed.any_rank(world, stop.requested):
                # asked to stop before a step: nothing new to save
                log.info("preempted before the first step", extra={"event": "preempted", "step": state.step})
                return EXIT_PREEMPTED
            step_start = time.perf_counter()
            if world.distributed:
                part = distributed.shard_step(stream.next_rows(state, t.gradientAccumulationSteps), train_set,
                                              pad_id, t.batchSize, world)
                step_loss = train_step(part.micro_batches, part.n_targets, part.weights)
                step_tokens, step_sq = part.n_tokens, part.sum_sq_lengths
            else:
                micro_batches = stream.next_step(state, t.gradientAccumulationSteps)
                step_loss = train_step(micro_batches)
                step_tokens = sum(b["n_tokens"] for b in micro_batches)
                step_sq = sum(b["sum_sq_lengths"] for b in micro_batches)
            train_seconds += time.perf_counter() - step_start
            if debug_sleep:
                time.sleep(debug_sleep)

            tokens_this_run += step_tokens
            sum_sq_lengths += step_sq
            state.step += 1
            state.tokens_seen += step_tokens
            state.last_loss = step_loss
            is_last = state.step == n_steps
            if fed is not None:
                fed.losses.append(step_loss)
            round_done = fed is not None and state.step >= fed.until_step

            eval_loss = None
            if (state.step % t.evalEverySteps == 0 or is_last) and fed is None:
                eval_loss = state.last_eval_loss = run_eval()
                log.info("eval", extra={"event": "eval", "step": state.step, "eval_loss": eval_loss})

            window_tokens += step_tokens
            per_step = (time.monotonic() - started) / (state.step - started_step)
            written = progress.update(
                step=state.step, epoch=epoch_done(), loss=step_loss, lr=scheduler.get_last_lr()[0],
                tokens=step_tokens, tokens_per_second=window_tokens / max(time.monotonic() - window_start, 1e-9),
                eta_seconds=int(per_step * (n_steps - state.step)), eval_loss=eval_loss, force=eval_loss is not None)
            if written:  # a record went out: log it too, and start a new tokens/s window
                log.info("step", extra={"event": "step", "step": state.step, "loss": step_loss,
                                        "tokens_per_second": progress.record.get("tokensPerSecond")})
                window_tokens, window_start = 0, time.monotonic()

            stopping = distributed.any_rank(world, stop.requested)
            if state.step % t.checkpointEverySteps == 0 or is_last or stopping or round_done:
                save_checkpoint()
            if round_done:
                break
            if stopping and not is_last:
                progress.write()
                log.info("preempted: checkpoint written", extra={"event": "preempted", "step": state.step})
                return EXIT_PREEMPTED

        if fed is not None:  # a federated round: the weights go to the server, not into an adapter
            fed.finish(model)
            progress.update(step=state.step, epoch=epoch_done(), loss=state.last_loss, force=True)
            log.info("local round done", extra={"event": "round_done", "step": state.step,
                                                "steps": state.step - started_step, "eval_loss": fed.eval_loss})
            return EXIT_OK

        # ---- 5. the adapter: content-addressed, manifest last; then result.json for the operator
        if state.last_eval_loss is None:  # defensive: every finished run evaluates at its last step
            state.last_eval_loss = run_eval()
        metrics = {"trainLoss": state.last_loss, "evalLoss": state.last_eval_loss,
                   "tokens": state.tokens_seen, "steps": state.step}
        if mix is not None:
            metrics["replay"] = mix.stats([d.name for d in cfg.replayData])
        export_started = time.perf_counter()
        whole = distributed.whole_trainable(named_params) if sharded else None
        if not world.is_main:  # rank 0 publishes the adapter (the same peft folder at any world size)
            return EXIT_OK
        result = export_adapter(model, cfg, precision, metrics, base_digest, balanced,
                                lineage=lineage if parent is not None else None, state_dict=whole)
        seconds.update(steps=train_seconds, export=time.perf_counter() - export_started)
        progress.update(step=state.step, epoch=epoch_done(), eval_loss=state.last_eval_loss, force=True)
        log.info("training done", extra={"event": "done", "digest": result["digest"], "metrics": metrics,
                                          "train_seconds": round(train_seconds, 3), "sum_sq_lengths": sum_sq_lengths,
                                          "tokens_this_run": tokens_this_run,
                                          "peak_memory_bytes": int(torch.cuda.max_memory_allocated(device))
                                          if device.type == "cuda" else None,
                                          "seconds": {k: round(v, 2) for k, v in seconds.items()}})
        return EXIT_OK
    finally:
        progress.close()


def export_adapter(model, cfg, precision: str, metrics: dict, base_digest: str, balanced=None, lineage=None,
                   state_dict: Optional[dict] = None) -> dict:
    import tempfile

    training = cfg.model_dump(mode="json", include={"method", "lora", "quantization", "training"})
    training["effectivePrecision"] = precision
    with tempfile.TemporaryDirectory(prefix="adapter-") as tmp:
        folder = Path(tmp)
        adapter.save_peft_files(model, folder, cfg.baseModel.uri, state_dict=state_dict)
        manifest = adapter.build_manifest(
            folder,
            base_model={"uri": cfg.baseModel.uri, "digest": base_digest},
            dataset={"uri": cfg.data.uri, "digest": cfg.data.digest, "format": cfg.data.format,
                     **({"balance": balanced.model_dump(mode="json")} if balanced else {})},
            training=training, metrics=metrics, lineage=lineage,
            replay=[d.model_dump(mode="json", exclude_none=True) for d in cfg.replayData] or None)
        return adapter.publish(folder, manifest, cfg.outputURI, run_id=uuid.uuid4().hex[:12], metrics=metrics,
                               balance=balanced.model_dump(mode="json") if balanced else None)
