"""spec.distributed: how the ranks of a multi-GPU / multi-node trainer split the work."""

from __future__ import annotations

from typing import Literal

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
