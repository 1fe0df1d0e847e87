"""Fixtures of the federation tests."""

from __future__ import annotations

import pytest


@pytest.fixture()
def flower_task_identity():
    """What a ClientApp process has from Flower before it sees a message: its run and node."""
    from flwr.supercore.task_identity import TaskIdentity

    before = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 7, 11
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = before
