"""Fine-tuning a vision-language model (Dataset format image-text), read top to bottom.

    config -> base model (AutoModelForImageTextToText) + AutoProcessor -> the parts: vision encoder,
    projector, language model -> LoRA on the language model (+ the encoder's / projector's settings of
    spec.multimodal, one optimizer parameter group per part) -> resume -> optimizer steps (eval,
    checkpoints, progress, SIGTERM) -> adapter (manifest records the parts trained) -> result.json

The text path (train.py) is left as it is; what this shares with it is the checkpoint format,
the progress record, the adapter publication and the resume rule (same fingerprint, same data order).

Collation goes through the model's own processor: each example's messages are rendered with the
processor's chat template, the images (verified against their validated sha256) are given to it,
and it expands the image placeholders into the model's image tokens. The loss is on assistant text
only: an assistant message's tokens are those between the rendering of the conversation before it
(with the generation prompt) and after it, so prompts, image tokens and padding are masked whatever
the template. Packing is off: an image's tokens must stay with its pixels.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import tempfile
import time
import uuid
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional

import torch

from . import adapter, checkpoint, data, formats, images, model_io
from .errors import EXIT_OK, EXIT_PREEMPTED, ConfigError, DataError
from .logs import get_logger
from .progress import ProgressReporter

log = get_logger("vision")

IGNORE = -100
#: Module names of the parts, by family (LLaVA / LLaVA-NeXT, Idefics3 / SmolVLM, Qwen2-VL); the
#: projector's names are looked for first (Qwen2-VL's merger sits inside `visual`).
PROJECTOR_NAMES = ("multi_modal_projector", "connector", "merger", "mm_projector")
VISION_NAMES = ("vision_tower", "vision_model", "visual")
PARTS = ("vision", "projector", "language")


def part_of(name: str) -> str:
    """Which part a module or parameter name belongs to."""
    pieces = name.split(".")
    if any(p in PROJECTOR_NAMES for p in pieces):
        return "projector"
    if any(p in VISION_NAMES for p in pieces):
        return "vision"
    return "language"


def settings_of(cfg):
    from finetune_operator.api.multimodal import Multimodal

    return cfg.multimodal or Multimodal()


def learning_rates(cfg) -> dict[str, float]:
    mm, lr = settings_of(cfg), cfg.training.learningRate
    return {"language": lr, "projector": mm.projectorLearningRate or lr,
            "vision": mm.visionLearningRate or lr / 10}


# ---------------------------------------------------------------------------------- the model


def load_base(path: Path, *, precision: str, device: torch.device, quantization=None):
    """(frozen model, processor) from a local folder: safetensors only, no remote code (as model_io)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor, BitsAndBytesConfig

    kwargs = {"local_files_only": True, "dtype": model_io.DTYPES[precision], "use_safetensors": True,
              "trust_remote_code": False}
    if quantization is not None:  # QLoRA: the language model in 4 bits; encoder, projector, head as they are
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=quantization.quantType,
            bnb_4bit_use_double_quant=quantization.doubleQuant,
            bnb_4bit_compute_dtype=model_io.COMPUTE_DTYPES[quantization.computeDtype],
            llm_int8_skip_modules=[*VISION_NAMES, *PROJECTOR_NAMES, "lm_head"])
        kwargs["device_map"] = {"": device}
    try:
        model = AutoModelForImageTextToText.from_pretrained(path, **kwargs)
        processor = AutoProcessor.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"baseModel: cannot load a vision-language model from {path} "
                          f"(AutoModelForImageTextToText / AutoProcessor): {exc}") from None
    if "device_map" not in kwargs:
        model.to(device)
    model.config.use_cache = False
    for p in model.parameters():
        p.requires_grad_(False)
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is None:
        raise ConfigError("baseModel: its processor has no tokenizer")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not getattr(processor, "chat_template", None):
        raise ConfigError("baseModel: its processor has no chat template (chat_template.jinja) to render image parts")
    return model, processor


def _module_root(model, part: str) -> Optional[str]:
    """The shortest module name of a part (e.g. model.multi_modal_projector)."""
    names = [n for n, _ in model.named_modules() if n and part_of(n) == part
             and n.split(".")[-1] in (PROJECTOR_NAMES if part == "projector" else VISION_NAMES)]
    return min(names, key=len) if names else None


def _linear_names(model, part: str, targets: list[str]) -> list[str]:
    out = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or part_of(name) != part:
            continue
        if name.endswith("lm_head") and targets == ["all-linear"]:  # only when named, as peft's all-linear
            continue
        if targets == ["all-linear"] or name.split(".")[-1] in targets:
            out.append(name)
    return out


def build_peft(model, cfg):
    """LoRA on the language model; the encoder and projector as spec.multimodal says. Returns the peft model."""
    from peft import LoraConfig, get_peft_model

    mm, lora = settings_of(cfg), cfg.lora
    targets = _linear_names(model, "language", list(lora.targetModules))
    if not targets:
        raise ConfigError(f"lora.targetModules {lora.targetModules}: no linear layer of the language model matches")
    if mm.visionEncoder == "lora":
        vision = _linear_names(model, "vision", list(lora.targetModules)) or _linear_names(model, "vision", ["all-linear"])
        targets += vision
    to_save = []
    for part, wanted in (("projector", mm.projector == "train"), ("vision", mm.visionEncoder == "full")):
        if wanted:
            root = _module_root(model, part)
            if root is None:
                raise ConfigError(f"multimodal: this model has no {part} module to train "
                                  f"(looked for {', '.join(PROJECTOR_NAMES if part == 'projector' else VISION_NAMES)})")
            to_save.append(root.split(".")[-1])
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                        modules_to_save=to_save or None, use_dora=cfg.method == "dora", bias="none")
    peft_model = get_peft_model(model, config)
    for c in peft_model.peft_config.values():
        c.base_model_name_or_path = cfg.baseModel.uri
    return peft_model


def param_groups(model, cfg) -> list[dict]:
    """One optimizer group per trained part, at its learning rate (learning_rates)."""
    rates, groups = learning_rates(cfg), {p: [] for p in PARTS}
    for name, param in model.named_parameters():
        if param.requires_grad:
            groups[part_of(name)].append(param)
    return [{"params": ps, "lr": rates[part], "name": part} for part, ps in groups.items() if ps]


def trained_parts(model, cfg) -> dict:
    """What the manifest records: each part's mode, learning rate and trainable parameter count."""
    mm, rates = settings_of(cfg), learning_rates(cfg)
    counts = {p: 0 for p in PARTS}
    for name, param in model.named_parameters():
        if param.requires_grad:
            counts[part_of(name)] += param.numel()
    modes = {"language": cfg.method, "projector": "full" if mm.projector == "train" else "frozen",
             "vision": {"frozen": "frozen", "lora": cfg.method, "full": "full"}[mm.visionEncoder]}
    return {part: {"mode": modes[part], "trainableParams": counts[part],
                   **({"learningRate": rates[part]} if counts[part] else {})} for part in PARTS}


# ---------------------------------------------------------------------------------- the data


@dataclass
class Encoded:
    inputs: dict  # the processor's tensors for one example (batch dimension 1), input_ids truncated
    labels: torch.Tensor  # (1, length): IGNORE except on assistant tokens

    @property
    def n_targets(self) -> int:
        return int((self.labels != IGNORE).sum())


def chat_messages(example: formats.Example) -> list[dict]:
    """Messages for the processor's chat template (image parts as {"type": "image"})."""
    out = []
    for (role, content), parts in zip(example.messages, example.parts or [None] * len(example.messages)):
        if parts is None:
            out.append({"role": role, "content": content})
        else:
            out.append({"role": role, "content": [{"type": "image"} if p.type == "image" else
                                                  {"type": "text", "text": p.value} for p in parts]})
    return out


def _images(example: formats.Example, upto: int, folder: str) -> list:
    pictures = []
    for parts in (example.parts or ())[:upto]:
        for part in parts or ():
            if part.type == "image":
                try:
                    pictures.append(images.load_verified(part.value, part.sha256, folder))
                except images.ImageProblem as exc:
                    raise DataError(f"{folder}: {exc}") from None
    return pictures


def encode(example: formats.Example, processor, folder: str, max_len: int) -> Optional[Encoded]:
    """Processor inputs and labels of one example; None when no assistant token fits in max_len (or
    an image's tokens would be cut)."""
    msgs = chat_messages(example)
    render = lambda upto, gen: processor.apply_chat_template(msgs[:upto], tokenize=False,  # noqa: E731
                                                             add_generation_prompt=gen)
    all_images = _images(example, len(msgs), folder)

    def ids(upto: int, gen: bool) -> list[int]:
        pictures = _images(example, upto, folder) if upto < len(msgs) else all_images
        batch = processor(text=[render(upto, gen)], images=pictures or None, return_tensors="pt")
        return batch["input_ids"][0].tolist()

    full = processor(text=[render(len(msgs), False)], images=all_images or None, return_tensors="pt")
    full_ids = full["input_ids"][0]
    labels = torch.full_like(full_ids, IGNORE)
    for i, (role, _) in enumerate(example.messages):
        if role != "assistant":
            continue
        start, end = ids(i, True), ids(i + 1, False)
        if full_ids[:len(end)].tolist() != end or end[:len(start)] != start:
            raise ConfigError("the processor's chat template does not render a conversation as the prefix of a "
                              "longer one; the assistant tokens cannot be found")
        labels[len(start):len(end)] = full_ids[len(start):len(end)]
    image_token = getattr(processor, "image_token_id", None)
    if image_token is not None:
        labels[full_ids == image_token] = IGNORE  # never a target, whatever the template
        where = (full_ids == image_token).nonzero()
        if len(where) and int(where[-1]) >= max_len:
            return None
    inputs = {k: v for k, v in full.items()}
    if full_ids.numel() > max_len:
        inputs["input_ids"] = inputs["input_ids"][:, :max_len]
        inputs["attention_mask"] = inputs["attention_mask"][:, :max_len]
        labels = labels[:max_len]
    encoded = Encoded(inputs, labels[None])
    return encoded if encoded.n_targets else None


def collate(batch: list[Encoded], pad_id: int) -> dict:
    """Right-padded input_ids / attention_mask / labels; every other tensor (pixel_values, image sizes
    or grids) concatenated along its first dimension, as the LLaVA and Qwen2-VL families take them."""
    length = max(e.inputs["input_ids"].shape[1] for e in batch)
    def pad(t: torch.Tensor, value: int) -> torch.Tensor:  # noqa: E306
        return torch.nn.functional.pad(t, (0, length - t.shape[1]), value=value)
    out = {"input_ids": torch.cat([pad(e.inputs["input_ids"], pad_id) for e in batch]),
           "attention_mask": torch.cat([pad(e.inputs["attention_mask"], 0) for e in batch]),
           "labels": torch.cat([pad(e.labels, IGNORE) for e in batch])}
    for key in batch[0].inputs:
        if key not in out and isinstance(batch[0].inputs[key], torch.Tensor):
            out[key] = torch.cat([e.inputs[key] for e in batch])
    return out


def loss_sum(model, batch: dict, device: torch.device, amp_dtype=None) -> torch.Tensor:
    """Summed cross-entropy over the assistant tokens (the caller divides by the step's target count)."""
    labels = batch["labels"].to(device)
    inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        logits = model(**inputs).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(),
                                             ignore_index=IGNORE, reduction="sum")


#: Encoded examples kept per split: their pixel tensors are the memory (336 px RGB in fp32: 1.35 MB each,
#: so 256 hold ~350 MB); the rest are encoded again when their batch comes.
ENCODED_CACHE = 256


class Examples:
    """The encoded examples of one split, encoded when first asked for and kept (bounded)."""

    def __init__(self, examples, processor, folder: str, max_len: int):
        self.examples, self.processor, self.folder, self.max_len = examples, processor, folder, max_len
        self.get = lru_cache(maxsize=ENCODED_CACHE)(self._encode)
        self.usable = [i for i in range(len(examples)) if self.get(i) is not None]

    def _encode(self, index: int) -> Optional[Encoded]:
        return encode(self.examples[index], self.processor, self.folder, self.max_len)

    def __len__(self) -> int:
        return len(self.usable)


def epoch_batches(n: int, *, epoch: int, seed: int, batch_size: int) -> list[list[int]]:
    """Positions into the usable examples, shuffled by (seed, epoch) only: a resumed run replays them."""
    order = list(range(n))
    random.Random(f"{seed}:{epoch}").shuffle(order)
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


@torch.no_grad()
def evaluate(model, split: Examples, *, batch_size: int, pad_id: int, device: torch.device, amp_dtype=None) -> float:
    """Mean cross-entropy per assistant token over a split."""
    was_training = model.training
    model.eval()
    total, targets = 0.0, 0
    for start in range(0, len(split), batch_size):
        batch = [split.get(i) for i in split.usable[start:start + batch_size]]
        total += float(loss_sum(model, collate(batch, pad_id), device, amp_dtype))
        targets += sum(e.n_targets for e in batch)
    if was_training:
        model.train()
    return total / max(targets, 1)


# ---------------------------------------------------------------------------------- the run


def fingerprint(cfg) -> str:
    from .train import run_fingerprint

    extra = json.dumps(settings_of(cfg).model_dump(mode="json"), sort_keys=True)
    return hashlib.sha256(f"{run_fingerprint(cfg)}:{extra}".encode()).hexdigest()[:16]


def run(cfg, stop) -> int:
    from transformers import get_scheduler

    from .train import quantization_of, seed_everything, total_steps

    t = cfg.training
    log.info("vision-language training run starting", extra={
        "event": "start", "job": cfg.job.name, "namespace": cfg.job.namespace, "method": cfg.method,
        "output": cfg.outputURI, "multimodal": settings_of(cfg).model_dump(mode="json")})
    if cfg.initFrom is not None or cfg.replayData or t.balance is not None:
        raise ConfigError("spec.initFrom, training.replay and training.balance are not supported for image-text "
                          "data yet")
    if t.packing:
        log.info("packing is off for image examples (an image's tokens stay with its pixels)",
                 extra={"event": "packing_off"})
    seed_everything(t.seed)
    device = model_io.pick_device()
    precision = model_io.effective_precision(t.precision, device)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    started_load = time.perf_counter()
    model_dir = model_io.fetch_model(cfg.baseModel.uri, cfg.baseModel.digest)
    base_digest = cfg.baseModel.digest or model_io.model_digest(model_dir)
    base, processor = load_base(model_dir, precision=precision, device=device, quantization=quantization_of(cfg))
    pad_id = processor.tokenizer.pad_token_id
    train_set = Examples(data.read_examples(cfg.data.uri, "train.jsonl", "image-text"), processor, cfg.data.uri,
                         t.maxSeqLength)
    eval_set = Examples(data.read_examples(cfg.data.uri, "eval.jsonl", "image-text"), processor, cfg.data.uri,
                        t.maxSeqLength)
    if not len(train_set):
        raise ConfigError(f"{cfg.data.uri}/train.jsonl: no example has an assistant token within maxSeqLength")
    model = build_peft(base, cfg)
    groups = param_groups(model, cfg)
    params = [p for g in groups for p in g["params"]]
    optimizer = torch.optim.AdamW(groups, lr=t.learningRate, weight_decay=t.weightDecay)
    per_epoch = math.ceil(len(train_set) / t.batchSize)
    n_steps = total_steps(t, math.ceil(per_epoch / t.gradientAccumulationSteps))
    scheduler = get_scheduler(t.lrScheduler, optimizer, num_warmup_steps=int(t.warmupRatio * n_steps),
                              num_training_steps=n_steps)
    state = checkpoint.TrainState(fingerprint=fingerprint(cfg))
    loaded = checkpoint.load_latest(cfg.outputURI)
    if loaded is not None and loaded.state.fingerprint != state.fingerprint:
        raise ConfigError(f"{loaded.uri} was written by a run with a different configuration; use a new outputURI")
    if loaded is not None:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, {k: v.to(device) for k, v in loaded.adapter_state.items()})
        optimizer.load_state_dict(loaded.optimizer)
        scheduler.load_state_dict(loaded.scheduler)
        checkpoint.set_rng_state(loaded.rng)
        state = loaded.state
        log.info("resumed from checkpoint", extra={"event": "resume", "step": state.step, "uri": loaded.uri})
    parts = trained_parts(model, cfg)
    log.info("plan", extra={"event": "plan", "total_steps": n_steps, "train_examples": len(train_set),
                            "eval_examples": len(eval_set), "parts": parts, "device": device.type,
                            "load_seconds": round(time.perf_counter() - started_load, 2)})
    progress = ProgressReporter(output_uri=cfg.outputURI, namespace=cfg.job.namespace, job=cfg.job.name,
                                total_steps=n_steps, interval_seconds=cfg.progressIntervalSeconds,
                                metrics_port=cfg.metricsPort)
    progress.update(step=state.step, epoch=state.epoch, loss=state.last_loss, eval_loss=state.last_eval_loss,
                    force=True)
    progress.start_heartbeat()

    def next_step() -> list[dict]:
        batches = epoch_batches(len(train_set), epoch=state.epoch, seed=t.seed, batch_size=t.batchSize)
        if state.batch_index >= len(batches):
            state.epoch, state.batch_index = state.epoch + 1, 0
            batches = epoch_batches(len(train_set), epoch=state.epoch, seed=t.seed, batch_size=t.batchSize)
        chosen = batches[state.batch_index:state.batch_index + t.gradientAccumulationSteps]
        state.batch_index += len(chosen)
        return [[train_set.get(train_set.usable[i]) for i in b] for b in chosen]

    def run_eval() -> float:
        return evaluate(model, eval_set if len(eval_set) else train_set, batch_size=t.batchSize, pad_id=pad_id,
                        device=device, amp_dtype=amp_dtype)

    def save_checkpoint() -> None:
        from peft import get_peft_model_state_dict

        checkpoint.save(cfg.outputURI, state, adapter_state=get_peft_model_state_dict(model), optimizer=optimizer,
                        scheduler=scheduler, extra={"totalSteps": n_steps})
        checkpoint.prune(cfg.outputURI, t.keepCheckpoints)

    try:
        model.train()
        started_step, started = state.step, time.monotonic()
        while state.step < n_steps:
            if stop.requested and state.step == started_step:
                return EXIT_PREEMPTED
            micro = next_step()
            n_targets = sum(e.n_targets for b in micro for e in b)
            step_loss, tokens = 0.0, 0
            for b in micro:
                batch = collate(b, pad_id)
                loss = loss_sum(model, batch, device, amp_dtype) / n_targets
                loss.backward()
                step_loss += float(loss.detach())
                tokens += int(batch["attention_mask"].sum())
            torch.nn.utils.clip_grad_norm_(params, t.maxGradNorm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            state.tokens_seen += tokens
            state.last_loss = step_loss
            is_last = state.step == n_steps
            eval_loss = None
            if state.step % t.evalEverySteps == 0 or is_last:
                eval_loss = state.last_eval_loss = run_eval()
                log.info("eval", extra={"event": "eval", "step": state.step, "eval_loss": eval_loss})
            per_step = (time.monotonic() - started) / (state.step - started_step)
            progress.update(step=state.step, epoch=state.epoch + state.batch_index / per_epoch, loss=step_loss,
                            lr=scheduler.get_last_lr()[0], tokens=tokens, eval_loss=eval_loss,
                            eta_seconds=int(per_step * (n_steps - state.step)), force=eval_loss is not None)
            if state.step % t.checkpointEverySteps == 0 or is_last or stop.requested:
                save_checkpoint()
            if stop.requested and not is_last:
                progress.write()
                log.info("preempted: checkpoint written", extra={"event": "preempted", "step": state.step})
                return EXIT_PREEMPTED
        if state.last_eval_loss is None:
            state.last_eval_loss = run_eval()
        metrics = {"trainLoss": state.last_loss, "evalLoss": state.last_eval_loss, "tokens": state.tokens_seen,
                   "steps": state.step}
        result = export(model, cfg, precision, metrics, base_digest, parts)
        progress.update(step=state.step, epoch=state.epoch, eval_loss=state.last_eval_loss, force=True)
        log.info("training done", extra={"event": "done", "digest": result["digest"], "metrics": metrics})
        return EXIT_OK
    finally:
        progress.close()


def export(model, cfg, precision: str, metrics: dict, base_digest: str, parts: dict) -> dict:
    training = cfg.model_dump(mode="json", include={"method", "lora", "quantization", "training"})
    training["effectivePrecision"] = precision
    training["multimodal"] = {**settings_of(cfg).model_dump(mode="json"), "parts": parts}
    with tempfile.TemporaryDirectory(prefix="adapter-") as tmp:
        folder = Path(tmp)
        adapter.save_peft_files(model, folder, cfg.baseModel.uri)
        manifest = adapter.build_manifest(
            folder, base_model={"uri": cfg.baseModel.uri, "digest": base_digest},
            dataset={"uri": cfg.data.uri, "digest": cfg.data.digest, "format": cfg.data.format},
            training=training, metrics=metrics)
        return adapter.publish(folder, manifest, cfg.outputURI, run_id=uuid.uuid4().hex[:12], metrics=metrics)
