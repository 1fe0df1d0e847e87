"""`python -m finetune_trainer.federated.supernode ARGS`: Flower's own `flower-supernode ARGS`, polling faster.

Flower's SuperNode asks the SuperLink for messages every 3 s (fixed in flwr 1.42). A SecAgg+ round is
four exchanges; with a short federation that wait is most of the round. FINETUNE_FLOWER_POLL_SECONDS
shortens it (only that idle wait: every other sleep of the SuperNode is already shorter).
"""

from __future__ import annotations

import os
import sys
import time


class _FasterPolling:
    """The `time` module, with sleeps capped at the poll interval."""

    def __init__(self, poll: float):
        self._poll = poll

    def __getattr__(self, name):
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self._poll))


def main() -> int:
    poll = float(os.environ.get("FINETUNE_FLOWER_POLL_SECONDS", "3"))
    import flwr.supernode.start_client_internal as loop
    from flwr.supernode.cli import flower_supernode

    if poll < 3:
        loop.time = _FasterPolling(poll)
    sys.argv = ["flower-supernode", *sys.argv[1:]]
    return int(flower_supernode() or 0)


if __name__ == "__main__":
    sys.exit(main())
