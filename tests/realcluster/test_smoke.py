"""The tier's own footing: the control plane answers, fakenode runs a pod the scheduler placed."""

from __future__ import annotations

from realcluster.realk8s import wait_for


def test_control_plane_serves_v1_36(real_cluster):
    version = real_cluster.kubectl("version", "-o", "json").stdout
    assert '"minor": "36"' in version


def test_scheduler_places_a_gpu_pod_and_fakenode_runs_it(fakenode, namespace):
    fakenode.apply({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "gpu-hello", "namespace": namespace},
        "spec": {"restartPolicy": "Never",
                 "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                 "containers": [{"name": "main", "image": "any", "command": ["python", "-c", "print('hello')"],
                                 "resources": {"limits": {"nvidia.com/gpu": "1"}}}]}})
    pod = wait_for(lambda: (p := fakenode.get("pod", "gpu-hello", namespace))
                   and p["status"].get("phase") == "Succeeded" and p, timeout=60, what="the pod to succeed")
    assert pod["spec"]["nodeName"] == "gpu-node-1"
    assert fakenode.kubectl("logs", "-n", namespace, "gpu-hello").stdout.strip() == "hello"
