"""What a publisher gets: the API client, the job's namespace and name, the operator's settings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..config import OperatorConfig


@dataclass
class Context:
    client: Any  # kube.Client
    namespace: str
    job: str
    config: OperatorConfig


class PublishError(Exception):
    """A target refused or failed; the message (no secrets) goes to status and an Event."""
