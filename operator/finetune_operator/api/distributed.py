"""spec.distributed: how the ranks of a multi-GPU / multi-node trainer split the work."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field

from .meta import ApiModel

Strategy = Literal["auto", "ddp", "fsdp"]


class DistributedSettings(ApiModel):
    """Data parallelism across every GPU the job holds (resources.nodes x resources.gpusPerNode ranks)."""

    strategy: Strategy = Field(
        "auto", description="ddp: every rank holds the whole base model and only the trainable (LoRA) gradients "
        "are all-reduced; fsdp: the base model's decoder layers are sharded across the ranks (FSDP2 "
        "fully_shard), for bases that do not fit one GPU; auto: fsdp when the base model's weights take "
        "more than 40% of one GPU's memory, else ddp (decided by the trainer, in its plan log line).")
    rendezvousPort: int = Field(29500, ge=1024, le=65535,
                                description="TCP port of the rendezvous store on the first pod (multi-node jobs).")


class MemoryPlanStatus(ApiModel):
    """The pre-flight plan of one GPU's memory (operator/finetune_operator/memory_plan.py)."""

    perGPUGiB: float = Field(0, ge=0, description="Estimated peak memory of one GPU.")
    partsGiB: dict[str, float] = Field(default_factory=dict, description="weights, adapter (with gradients and "
                                       "AdamW states), activations, logits, cudaContext, fragmentation.")
    worldSize: int = Field(1, ge=1, description="Ranks (nodes x gpusPerNode).")
    strategy: str = Field("single", description="single, ddp or fsdp: what auto resolves to (ddp unless only a "
                                                "sharded base fits the GPU); the trainer is told the same.")
    gpuProduct: Optional[str] = Field(None, description="resources.gpuNodeSelector['nvidia.com/gpu.product'].")
    gpuGiB: Optional[float] = Field(None, description="Memory of that GPU product.")
    fits: Optional[bool] = Field(None, description="Whether the estimate fits the GPU (unset: unknown product).")
    stepSeconds: Optional[float] = Field(None, description="Estimated seconds per optimizer step (35% MFU assumed).")
    terminationGracePeriodSeconds: Optional[int] = Field(
        None, ge=0, description="The trainer pod's grace period: the step in flight plus twice the checkpoint's "
                                "upload time and a minute, never below the operator's jobPods setting.")
