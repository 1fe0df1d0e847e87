"""The real-cluster tier: every test under tests/realcluster/ runs against the Kubernetes v1.36
control plane of ../shared/k8s (marker `realcluster`), started once per test session and left
running for the next session (up.sh answers in well under a second when it is up).

Without ../shared (a fresh clone on its own) these tests skip, and the run says so in one line.
Tests that run pods also need root (fakenode uses mount namespaces).
"""

from __future__ import annotations

import os
from typing import Iterator

import pytest

from realcluster.realk8s import ABSENT_REASON, RealCluster, install_crds, start_control_plane, start_fakenode

_HERE = os.path.dirname(os.path.abspath(__file__))


def pytest_collection_modifyitems(items):
    for item in items:
        if str(item.fspath).startswith(_HERE + os.sep):
            item.add_marker(pytest.mark.realcluster)


def pytest_terminal_summary(terminalreporter):
    if ABSENT_REASON:
        terminalreporter.write_line(f"realcluster tier: skipped: {ABSENT_REASON}")


@pytest.fixture(scope="session")
def real_cluster() -> RealCluster:
    """The running control plane (started if needed); KUBECONFIG is set for subprocesses too."""
    if ABSENT_REASON:
        pytest.skip(ABSENT_REASON)
    kubeconfig = start_control_plane()
    os.environ["KUBECONFIG"] = kubeconfig
    return RealCluster(kubeconfig)


@pytest.fixture(scope="session")
def crds(real_cluster) -> list[str]:
    """Our CRDs from crds/, applied server-side and Established."""
    return install_crds(real_cluster)


@pytest.fixture(scope="session")
def fakenode(real_cluster) -> RealCluster:
    """fakenode running the pods the real scheduler binds to gpu-node-1 / cpu-node-1."""
    if os.geteuid() != 0:
        pytest.skip("fakenode runs pods in mount namespaces: needs root")
    start_fakenode()
    return real_cluster


@pytest.fixture()
def namespace(real_cluster) -> Iterator[str]:
    """A fresh namespace per test (state persists between runs); deleted afterwards without waiting."""
    name = real_cluster.create_namespace()
    yield name
    real_cluster.delete_namespace(name)
