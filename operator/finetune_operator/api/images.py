"""Image-text Datasets: the optional standardisation of images (`spec.curation.images`) and the bounded
image stats the validation reports (`status.stats.images`)."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field

from .curation import CountEntry
from .meta import ApiModel

#: What the validation Job accepts, whatever the settings (trainer-image/finetune_trainer/images.py):
#: larger files or sides are refused before they are decoded (decompression bombs).
MAX_IMAGE_BYTES = 32 * 2**20
MAX_IMAGE_SIDE = 8192
MAX_IMAGE_PIXELS = 8192 * 8192 // 2
#: Upper bounds (longest side, pixels) of the resolution histogram's buckets.
SIDE_BUCKETS = (64, 128, 256, 512, 1024, 2048, 4096, MAX_IMAGE_SIDE)

ImageFormat = Literal["PNG", "JPEG", "WEBP"]


class ImageStandardisation(ApiModel):
    """Resized, re-encoded copies of the images written beside the validated JSONL (`images/<sha256>.<ext>`);
    the validated lines point at the copies, the source images are left as they are."""

    maxSide: Optional[int] = Field(
        None, ge=16, le=MAX_IMAGE_SIDE,
        description="Longest side in pixels of the copies (aspect ratio kept, never enlarged); unset: the size "
        "is kept.")
    format: ImageFormat = Field("PNG", description="Encoding of the copies: PNG, JPEG or WEBP (RGB; alpha "
                                "composited on white).")


class SideBucket(ApiModel):
    """Images whose longest side is at most `le` pixels (and above the previous bucket's)."""

    le: int = Field(..., ge=1, description="Upper bound of the bucket in pixels.")
    count: int = Field(0, ge=0, description="Images in the bucket.")


class ImageStats(ApiModel):
    """What the images of an image-text Dataset are (training and evaluation examples together)."""

    images: int = Field(0, ge=0, description="Image references validated (a picture used twice counts twice).")
    distinct: int = Field(0, ge=0, description="Distinct images by content (sha256).")
    bytes: int = Field(0, ge=0, description="Bytes of the distinct source images.")
    formats: list[CountEntry] = Field(default_factory=list, max_length=16,
                                      description="Distinct images per decoded format (PNG, JPEG, ...).")
    modes: list[CountEntry] = Field(default_factory=list, max_length=16,
                                    description="Distinct images per Pillow mode (RGB, RGBA, L, P, ...).")
    sideHistogram: list[SideBucket] = Field(default_factory=list, max_length=len(SIDE_BUCKETS),
                                            description="Distinct images by longest side in pixels.")
    standardised: Optional[str] = Field(None, max_length=64,
                                        description="The copies' format and longest side, when curation.images is set.")
