"""The pre-flight memory and time plan: what one GPU of a FineTuneJob will hold, before any is requested.

Per GPU, from the base model's config.json and the spec (formulas below, bytes):

* base weights: every parameter at the precision's width (bf16/fp16 2, fp32 4); with 4-bit
  quantization the decoder's linear weights take 0.5 byte + their block scales (fp32 per 64
  weights: 1/16 byte; double quant: an 8-bit scale per 64 and fp32 per 256 of those), the
  embeddings, norms and output head stay at the compute width. FSDP divides the decoder layers by
  the world size and adds two unsharded layers (the all-gathered one and the prefetched next).
* adapter: LoRA A (r x in) and B (out x r) per adapted module, DoRA's magnitude (out); fp32
  weights + gradients + AdamW's two moments = 16 bytes per trainable parameter (FSDP: / world size).
* activations of one micro-batch (batchSize x maxSeqLength tokens, D = the compute width): per
  decoder layer and token (2h + h + 2h_kv + h + h + h + 4f + h) x D = (7h + 2h_kv + 4f) x D (norm
  input and output, q/k/v, attention output, o_proj output, MLP norm, gate/up/act/product, down);
  with gradient checkpointing one h x D input per layer plus one layer's full set (the layer being
  recomputed in backward). Dropout masks (1 byte per adapted
  module input) when lora.dropout > 0, and the block-causal boolean mask (rows x L^2 bytes). GPU
  attention (SDPA's memory-efficient kernel) keeps no L^2 scores; `math_attention` adds them
  (heads x L^2 x 4 bytes per row and layer) for kernels that do.
* logits at target positions only (our loss): targets x vocab x 4 bytes, twice (the fp32
  log-softmax the cross-entropy keeps, and its gradient in backward); the plan assumes every token
  is a target (an upper bound; `target_fraction` when the data's share is known).
* the CUDA context (0.5 GiB) and a fragmentation margin (10% of the rest).

Step time: 6 N FLOPs per token (8 N with gradient checkpointing: the forward runs twice) over
world size x the GPU product's dense bf16 peak x an assumed MFU of 35%.

Pure functions; `check` is what the operator runs before it creates a trainer Job, `ftctl plan`
prints the same table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

GiB = 1024 ** 3
CUDA_CONTEXT = int(0.5 * GiB)
FRAGMENTATION = 0.10
ASSUMED_MFU = 0.35
WIDTH = {"bf16": 2, "fp16": 2, "fp32": 4}

#: nvidia.com/gpu.product -> (memory GiB, dense bf16 TFLOP/s). Names as the GPU feature discovery labels them.
GPU_PRODUCTS: dict[str, tuple[float, float]] = {
    "NVIDIA-H200": (141, 989), "NVIDIA-H100-80GB-HBM3": (80, 989), "NVIDIA-H100-SXM5-80GB": (80, 989),
    "NVIDIA-H100-PCIe": (80, 756), "NVIDIA-H100-NVL": (94, 835), "NVIDIA-A100-SXM4-80GB": (80, 312),
    "NVIDIA-A100-SXM4-40GB": (40, 312), "NVIDIA-A100-PCIE-40GB": (40, 312), "NVIDIA-L40S": (48, 362),
    "NVIDIA-L4": (24, 121), "NVIDIA-A10G": (24, 125), "Tesla-T4": (16, 65),
}
PRODUCT_LABEL = "nvidia.com/gpu.product"
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class Shape:
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool

    @classmethod
    def from_config(cls, cfg: dict) -> "Shape":
        try:
            heads = int(cfg["num_attention_heads"])
            return cls(hidden=int(cfg["hidden_size"]), layers=int(cfg["num_hidden_layers"]),
                       intermediate=int(cfg["intermediate_size"]), heads=heads,
                       kv_heads=int(cfg.get("num_key_value_heads") or heads), vocab=int(cfg["vocab_size"]),
                       tied=bool(cfg.get("tie_word_embeddings", False)))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"config.json lacks a Llama-style shape ({exc})") from None

    @property
    def kv_dim(self) -> int:
        return self.hidden * self.kv_heads // self.heads

    def modules(self) -> dict[str, tuple[int, int]]:
        """name -> (in, out) of each linear layer of one decoder layer."""
        h, kv, f = self.hidden, self.kv_dim, self.intermediate
        return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
                "gate_proj": (h, f), "up_proj": (h, f), "down_proj": (f, h)}

    def layer_linear_params(self) -> int:
        return sum(i * o for i, o in self.modules().values())

    def params(self) -> int:
        embed = self.vocab * self.hidden
        per_layer = self.layer_linear_params() + 2 * self.hidden
        return embed * (1 if self.tied else 2) + self.layers * per_layer + self.hidden


@dataclass
class Plan:
    parts: dict[str, int]  # bytes per GPU
    total: int
    world: int
    strategy: str
    step_seconds: Optional[float] = None
    gpu_product: Optional[str] = None
    gpu_bytes: Optional[int] = None
    notes: list[str] = field(default_factory=list)

    @property
    def fits(self) -> Optional[bool]:
        return None if self.gpu_bytes is None else self.total <= self.gpu_bytes


def _adapted(shape: Shape, lora: dict) -> list[str]:
    targets = lora.get("targetModules") or ["q_proj", "v_proj"]
    if targets == ["all-linear"]:
        return list(ALL_LINEAR)
    return [m for m in ALL_LINEAR if any(t == m or t.endswith("." + m) or m in t for t in targets)]


def estimate(model_config: dict, spec: dict, *, device: str = "cuda", strategy: Optional[str] = None,
             target_fraction: float = 1.0, math_attention: bool = False) -> Plan:
    """Bytes per GPU for a FineTuneJob spec (a dict as in the API, defaults applied or not)."""
    shape = Shape.from_config(model_config)
    training, lora = spec.get("training") or {}, spec.get("lora") or {}
    res = spec.get("resources") or {}
    method = spec.get("method", "lora")
    precision = training.get("precision", "bf16")
    if device == "cpu" and precision == "fp16":
        precision = "fp32"
    width = WIDTH[precision]
    quant = spec.get("quantization") or ({} if method == "qlora" else None)
    world = max(1, int(res.get("nodes", 1) or 1)) * max(1, int(res.get("gpusPerNode", 1) or 1))
    strategy = strategy or (spec.get("distributed") or {}).get("strategy", "auto")
    if strategy == "auto":
        strategy = choose_strategy(model_config, spec)
    sharded = strategy == "fsdp" and world > 1
    h, L = shape.hidden, shape.layers

    # base weights
    linear = shape.layer_linear_params()
    if quant is not None:
        scale = (1 / 64 + 4 / (64 * 256)) if quant.get("doubleQuant", True) else 4 / 64
        layer_bytes = linear * (0.5 + scale) + 2 * h * width
    else:
        layer_bytes = (linear + 2 * h) * width
    outside = shape.vocab * h * (1 if shape.tied else 2) * width + h * width
    layers_bytes = L * layer_bytes
    if sharded:
        layers_bytes = layers_bytes / world + 2 * layer_bytes

    # adapter: params + grads + 2 AdamW moments, fp32
    r = int(lora.get("r", 16))
    adapted = _adapted(shape, lora)
    layers_adapted = len(lora.get("layersToTransform") or []) or L
    dora = method == "dora"
    per_layer_trainable = sum(r * (i + o) + (o if dora else 0) for m, (i, o) in shape.modules().items() if m in adapted)
    trainable = per_layer_trainable * layers_adapted
    adapter_bytes = trainable * 16 / (world if sharded else 1)

    # activations of one micro-batch
    rows, seq = int(training.get("batchSize", 4)), int(training.get("maxSeqLength", 2048))
    tokens = rows * seq
    per_token_layer = (7 * h + 2 * shape.kv_dim + 4 * shape.intermediate) * width
    if float(lora.get("dropout", 0.05) or 0) > 0:
        per_token_layer += sum(i for m, (i, _) in shape.modules().items() if m in adapted)
    scores = shape.heads * seq * seq * 4 * rows if math_attention else 0  # math-kernel attention keeps them
    if training.get("gradientCheckpointing", True):
        activations = tokens * (L * h * width + per_token_layer) + scores
    else:
        activations = tokens * L * per_token_layer + L * scores
    activations += rows * seq * seq  # the block-causal boolean mask
    # the log-softmax cross-entropy keeps (fp32) and, in backward, its gradient
    logits = tokens * target_fraction * shape.vocab * 4 * 2

    parts = {"weights": int(layers_bytes + outside), "adapter": int(adapter_bytes),
             "activations": int(activations), "logits": int(logits)}
    if device == "cuda":
        parts["cudaContext"] = CUDA_CONTEXT
        parts["fragmentation"] = int(FRAGMENTATION * sum(parts.values()))
    plan = Plan(parts=parts, total=sum(parts.values()), world=world, strategy=strategy if world > 1 else "single")

    product = (res.get("gpuNodeSelector") or {}).get(PRODUCT_LABEL)
    if device == "cuda" and product in GPU_PRODUCTS:
        memory, tflops = GPU_PRODUCTS[product]
        plan.gpu_product, plan.gpu_bytes = product, int(memory * GiB)
        flops = (8 if training.get("gradientCheckpointing", True) else 6) * shape.params() * tokens
        flops *= int(training.get("gradientAccumulationSteps", 1))
        plan.step_seconds = flops / (world * tflops * 1e12 * ASSUMED_MFU)
    elif device == "cuda":
        plan.notes.append(f"no known GPU product in resources.gpuNodeSelector[{PRODUCT_LABEL!r}]: "
                          "the plan cannot say whether it fits")
    return plan


def choose_strategy(model_config: dict, spec: dict) -> str:
    """What `auto` means: ddp (no communication beyond the adapter's gradients) unless a replicated
    base does not fit the GPU and a sharded one does. Unknown GPU or one rank: ddp."""
    res = spec.get("resources") or {}
    world = max(1, int(res.get("nodes", 1) or 1)) * max(1, int(res.get("gpusPerNode", 1) or 1))
    if world < 2:
        return "ddp"
    replicated = estimate(model_config, spec, strategy="ddp")
    if replicated.fits is not False:
        return "ddp"
    return "fsdp" if estimate(model_config, spec, strategy="fsdp").fits else "ddp"


#: What a checkpoint write is assumed to sustain to the object store (conservative for S3 from a GPU node).
CHECKPOINT_BYTES_PER_SECOND = 50 * 1024 ** 2


def grace_seconds(plan: Plan, floor: int) -> int:
    """terminationGracePeriodSeconds for the trainer pod: finish the step in flight, write the checkpoint
    (adapter + AdamW moments, fp32) twice over for safety, and a minute of margin; never below `floor`."""
    adapter_state = plan.parts.get("adapter", 0) * 3 / 4 * max(1, plan.world if plan.strategy == "fsdp" else 1)
    needed = (plan.step_seconds or 0) + 2 * adapter_state / CHECKPOINT_BYTES_PER_SECOND + 60
    return max(floor, int(needed + 0.999))


def _gib(n: float) -> str:
    return f"{n / GiB:.1f} GiB"


def alternatives(model_config: dict, spec: dict, gpu_bytes: int) -> list[str]:
    """Changes that would make an infeasible spec fit, each checked with the same estimate."""
    import copy

    out = []

    def fits(changed: dict) -> Optional[int]:
        p = estimate(model_config, changed)
        return p.total if p.total <= gpu_bytes else None

    if spec.get("method", "lora") == "lora":
        s = copy.deepcopy(spec)
        s["method"], s["quantization"] = "qlora", {"quantType": "nf4", "doubleQuant": True}
        if (t := fits(s)) is not None:
            out.append(f"method qlora ({_gib(t)})")
    res = spec.get("resources") or {}
    nodes = int(res.get("nodes", 1) or 1)
    for more in (nodes * 2, nodes * 4):
        s = copy.deepcopy(spec)
        s.setdefault("resources", {})["nodes"] = more
        s["distributed"] = {**(s.get("distributed") or {}), "strategy": "fsdp"}
        if (t := fits(s)) is not None:
            out.append(f"nodes: {more} with distributed.strategy fsdp ({_gib(t)})")
            break
    training = spec.get("training") or {}
    if not training.get("gradientCheckpointing", True):
        s = copy.deepcopy(spec)
        s.setdefault("training", {})["gradientCheckpointing"] = True
        if (t := fits(s)) is not None:
            out.append(f"training.gradientCheckpointing: true ({_gib(t)})")
    batch = int(training.get("batchSize", 4))
    while batch > 1:
        batch //= 2
        s = copy.deepcopy(spec)
        s.setdefault("training", {})["batchSize"] = batch
        if (t := fits(s)) is not None:
            out.append(f"training.batchSize {batch} (with more gradientAccumulationSteps; {_gib(t)})")
            break
    return out


def verdict(model_config: dict, spec: dict) -> tuple[Optional[bool], str, Plan]:
    """(fits or None when unknown, a one-line message with the numbers, the plan)."""
    plan = estimate(model_config, spec)
    per_gpu = _gib(plan.total)
    if plan.fits is None:
        return None, f"needs about {per_gpu} per GPU; " + "; ".join(plan.notes), plan
    have = _gib(plan.gpu_bytes)
    if plan.fits:
        return True, f"needs about {per_gpu} per GPU of the {have} an {plan.gpu_product} has", plan
    fixes = alternatives(model_config, spec, plan.gpu_bytes)
    parts = ", ".join(f"{k} {_gib(v)}" for k, v in plan.parts.items())
    advice = ": use " + ", or ".join(fixes) if fixes else "; nothing the plan tried fits one GPU"
    return False, f"needs {per_gpu} per GPU ({parts}), an {plan.gpu_product} has {have}{advice}", plan


def status_record(plan: Plan, fits: Optional[bool]) -> dict:
    """status.plan: GiB per part (one decimal), the total, the GPU and the step-time estimate."""
    rec: dict = {"perGPUGiB": round(plan.total / GiB, 2),
                 "partsGiB": {k: round(v / GiB, 3) for k, v in plan.parts.items()},
                 "worldSize": plan.world, "strategy": plan.strategy}
    if plan.gpu_product:
        rec.update(gpuProduct=plan.gpu_product, gpuGiB=round(plan.gpu_bytes / GiB, 1), fits=bool(fits))
    if plan.step_seconds is not None:
        rec["stepSeconds"] = round(plan.step_seconds, 3)
    return rec


INFEASIBLE = "Infeasible"
CONDITION = "Feasible"


def check(spec: dict, model_config: Optional[dict],
          grace_floor: int = 0) -> Optional[tuple[Optional[bool], str, dict]]:
    """(fits, message, status.plan) for a GPU job whose base model's config.json was read; None when
    there is nothing to plan (a CPU job, or no config)."""
    if not model_config or int((spec.get("resources") or {}).get("gpusPerNode", 1)) < 1:
        return None
    try:
        fits, message, plan = verdict(model_config, spec)
    except ValueError as exc:
        return None, f"no plan: the base model's {exc}", {}
    record = status_record(plan, fits)
    if plan.step_seconds is not None:
        record["terminationGracePeriodSeconds"] = grace_seconds(plan, grace_floor)
    return fits, message, record


def apply(plan: Optional[dict], spec: dict, train_cfg: dict) -> None:
    """What the plan decided, into the trainer's config: the strategy `auto` resolved to."""
    if not plan or (spec.get("distributed") or {}).get("strategy", "auto") != "auto":
        return
    if plan.get("strategy") in ("ddp", "fsdp"):
        train_cfg["distributed"] = {**(train_cfg.get("distributed") or {}), "strategy": plan["strategy"]}


def apply_to_job(plan: Optional[dict], job: dict) -> None:
    """... and the pod's grace period (time to checkpoint when preempted)."""
    if plan and plan.get("terminationGracePeriodSeconds"):
        job["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = plan["terminationGracePeriodSeconds"]
