"""Named tensors as bytes (safetensors: no pickle, so a hostile peer cannot run code by sending one)."""

from __future__ import annotations

from typing import Optional

import numpy as np

from .aggregation import Arrays


def arrays_to_bytes(arrays: Arrays, metadata: Optional[dict[str, str]] = None) -> bytes:
    from safetensors.numpy import save

    return save({k: np.ascontiguousarray(v) for k, v in arrays.items()}, metadata=metadata)


def arrays_from_bytes(data: bytes) -> Arrays:
    from safetensors.numpy import load

    return dict(load(data))


def metadata_of(data: bytes) -> dict[str, str]:
    """The string metadata safetensors keeps in its JSON header."""
    import json
    import struct

    (size,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + size]).get("__metadata__", {})
