"""The ServerApp's view of the SuperLink: Flower's Grid, polled faster, and an audit of what arrives.

Flower's HTTP Grid waits 3 s between polls for replies; a SecAgg+ round is four exchanges, so that is
most of a short round. `PollingGrid` keeps every call Flower's (push, pull, nodes) and only polls at
its own interval. Every message the ServerApp receives passes through `pull_messages`: with an audit
folder set, each one's tensors and bytes are written there as they arrived (tests assert on them: with
SecAgg+ the server never holds one site's update in the clear).
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
from flwr.app import Message
from flwr.serverapp import Grid

_seq = itertools.count()


def _payload(msg: Message) -> dict[str, np.ndarray]:
    """Every tensor and every byte string in a message, by where it sits in the content."""
    out: dict[str, np.ndarray] = {}
    if not msg.has_content():
        return out
    from flwr.common import bytes_to_ndarray

    for rname, record in msg.content.array_records.items():
        for aname, arr in record.items():
            out[f"arrays/{rname}/{aname}"] = arr.numpy()
    for rname, record in msg.content.config_records.items():
        for key, value in record.items():
            values = value if isinstance(value, list) else [value]
            for i, v in enumerate(values):
                if isinstance(v, bytes):
                    try:
                        out[f"configs/{rname}/{key}/{i}"] = bytes_to_ndarray(v)
                    except Exception:  # noqa: BLE001 - not an ndarray: keep the raw bytes
                        out[f"configs/{rname}/{key}/{i}"] = np.frombuffer(v, dtype=np.uint8)
    return out


class PollingGrid(Grid):
    def __init__(self, inner: Grid, poll_seconds: float, audit_dir: Optional[str] = None):
        self.inner, self.poll_seconds = inner, poll_seconds
        self.audit_dir = Path(audit_dir) if audit_dir else None
        if self.audit_dir:
            self.audit_dir.mkdir(parents=True, exist_ok=True)

    # Grid's interface, Flower's implementation
    def set_run(self, run) -> None:
        self.inner.set_run(run)

    @property
    def run(self):
        return self.inner.run

    def create_message(self, *args, **kwargs) -> Message:
        return self.inner.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self.inner.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        messages = list(self.inner.pull_messages(message_ids))
        if self.audit_dir:
            for msg in messages:
                self._audit(msg)
        return messages

    def send_and_receive(self, messages: Iterable[Message], *, timeout: Optional[float] = None) -> Iterable[Message]:
        pending = set(self.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while pending:
            got = list(self.pull_messages(pending))
            replies.extend(got)
            pending -= {m.metadata.reply_to_message_id for m in got}
            if not pending or (deadline is not None and time.monotonic() >= deadline):
                break
            time.sleep(self.poll_seconds)
        return replies

    def _audit(self, msg: Message) -> None:
        payload = _payload(msg)
        name = f"{next(_seq):05d}-{msg.metadata.message_type}-{msg.metadata.src_node_id}.npz"
        np.savez(self.audit_dir / name, **{k.replace("/", "__"): v for k, v in payload.items()})
