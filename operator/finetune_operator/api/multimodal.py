"""spec.multimodal: which parts of a vision-language model train, and at what learning rate.

A LLaVA-style model is a vision encoder, a projector from its features into the language model's
embedding space, and the language model. LoRA always adapts the language model (spec.lora); these
settings say what happens to the other two. Each trained part is its own optimizer parameter group.
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field

from .meta import ApiModel

VisionEncoderMode = Literal["frozen", "lora", "full"]
ProjectorMode = Literal["train", "frozen"]


class Multimodal(ApiModel):
    """Per-part settings of a vision-language fine-tune (Dataset format image-text)."""

    visionEncoder: VisionEncoderMode = Field(
        "frozen", description="frozen: the vision encoder's weights stay bit-identical; lora: LoRA on its linear "
        "layers too (spec.lora's rank); full: every weight of the encoder trains (saved with the adapter).")
    visionLearningRate: Optional[float] = Field(
        None, gt=0, le=1, description="Learning rate of the vision encoder's parameters; unset: a tenth of "
        "training.learningRate (a pretrained encoder is nudged, not retrained).")
    projector: ProjectorMode = Field(
        "train", description="train: the vision-language projector trains fully (saved with the adapter); frozen: "
        "it stays as it is.")
    projectorLearningRate: Optional[float] = Field(
        None, gt=0, le=1, description="Learning rate of the projector; unset: training.learningRate.")
