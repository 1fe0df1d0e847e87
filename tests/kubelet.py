"""A fake kubelet for operator tests (not part of the operator).

Against the Kubernetes API emulator it plays the parts of a cluster that the emulator lacks:

- the Job controller: one pod per attempt, Job status (active/ready/succeeded/failed, startTime,
  completionTime, Complete/Failed conditions), the backoff limit, podFailurePolicy exit codes
  (FailJob), and spec.suspend (the running pod is stopped);
- the scheduler and the kubelet: it runs the pod's container command as a local subprocess,
  with the container's environment (secretKeyRef values read from Secrets in the emulator),
  the ConfigMap, Secret and downward-API (annotation) volumes written to a temp dir and every
  mount path rewritten to a local dir;
  a deleted Job's pod gets SIGTERM, like a real pod on deletion;
- the garbage collector: objects whose owners are all gone are deleted.

Tests can declare per Job-name prefix that a pod is OOM-killed (container terminated with
reason OOMKilled, exit code 137), cannot be scheduled (PodScheduled=False with the scheduler's
message), cannot pull its image (waiting ErrImagePull), or runs another command instead.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import os
import signal
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Optional

import aiohttp

OWNED = ("/apis/batch/v1/jobs", "/api/v1/configmaps", "/api/v1/pods")
OWNERS = ("/apis/finetune.dev/v1alpha1/datasets", "/apis/finetune.dev/v1alpha1/finetunejobs",
          "/apis/finetune.dev/v1alpha1/federatedfinetunejobs", "/apis/batch/v1/jobs")


@dataclasses.dataclass
class Behaviour:
    oom: bool = False
    unschedulable: Optional[str] = None
    image_pull: bool = False
    command: Optional[list[str]] = None  # replaces the container command (stand-in scripts)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _report_crash(task: "asyncio.Task") -> None:
    """A pod task that dies leaves its Job running forever: say why on stderr (pytest shows it)."""
    if not task.cancelled() and task.exception() is not None:
        import traceback

        print("fake kubelet: a pod task died:", file=sys.stderr)
        traceback.print_exception(task.exception(), file=sys.stderr)


def _host_path_exists(value: str) -> bool:
    """Whether an argument or env value names an existing path on this machine (not just any string)."""
    if not value.startswith("/") or "\n" in value:
        return False
    try:
        return Path(value).exists()
    except OSError:  # e.g. a name too long to be a path
        return False


class FakeKubelet:
    def __init__(self, api_url: str, workdir: Path, poll: float = 0.2, base_env: Optional[dict] = None):
        self.url = api_url.rstrip("/")
        self.workdir = Path(workdir)
        self.poll = poll
        self.behaviours: dict[str, Behaviour] = {}
        self.base_env = {"PATH": os.environ.get("PATH", ""), "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1",
                         "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                         # Pods run the code the tests import (a worktree's, when PYTHONPATH puts it first).
                         **({"PYTHONPATH": os.environ["PYTHONPATH"]} if os.environ.get("PYTHONPATH") else {}),
                         **(base_env or {})}
        self.started_jobs: list[str] = []  # every Job the kubelet started a pod for (in order)
        self.exit_codes: dict[str, int] = {}  # pod name -> exit code
        self._runs: dict[tuple[str, str], asyncio.Task] = {}
        self._procs: dict[tuple[str, str], tuple[asyncio.subprocess.Process, str]] = {}
        self._loop = asyncio.new_event_loop()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(self._main(),),
                                        name="fake-kubelet", daemon=True)

    # --- test controls ------------------------------------------------------------------------

    def declare(self, job_prefix: str, **behaviour: Any) -> None:
        """Make every Job whose name starts with job_prefix behave as declared (see Behaviour)."""
        self.behaviours[job_prefix] = Behaviour(**behaviour)

    def start(self) -> "FakeKubelet":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping = True
        self._thread.join(30)

    def log(self, job_prefix: str) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.workdir.glob(f"{job_prefix}*/pod.log")))

    # --- the loop ------------------------------------------------------------------------------

    async def _main(self) -> None:
        async with aiohttp.ClientSession() as self.http:
            while not self._stopping:
                try:
                    await self._tick()
                except Exception as exc:  # keep playing the cluster; the test sees the consequences
                    print(f"fake kubelet: {type(exc).__name__}: {exc}", file=sys.stderr)
                await asyncio.sleep(self.poll)
            for key in list(self._runs):
                await self._stop_pod(key)

    async def _api(self, method: str, path: str, body: Any = None, merge: bool = False) -> Any:
        headers = {"Content-Type": "application/merge-patch+json" if merge else "application/json"}
        async with self.http.request(method, self.url + path, json=body, headers=headers) as resp:
            data = await resp.json(content_type=None) if resp.status != 204 else {}
            if resp.status == 404:
                return None
            if resp.status >= 400:
                raise RuntimeError(f"{method} {path}: {resp.status} {data}")
            return data

    async def _tick(self) -> None:
        jobs = (await self._api("GET", "/apis/batch/v1/jobs"))["items"]
        seen = set()
        for job in jobs:
            key = (job["metadata"]["namespace"], job["metadata"]["name"])
            seen.add(key)
            finished = any(c.get("type") in ("Complete", "Failed") and c.get("status") == "True"
                           for c in (job.get("status") or {}).get("conditions") or [])
            suspended = bool(job["spec"].get("suspend"))
            if key in self._runs and suspended:
                await self._stop_pod(key)
                await self._job_status(key, {"active": 0, "ready": 0, "conditions": [
                    {"type": "Suspended", "status": "True", "reason": "JobSuspended", "lastTransitionTime": _now()}]})
            elif key not in self._runs and not finished and not suspended:
                self.started_jobs.append(key[1])
                self._runs[key] = asyncio.create_task(self._run_job(job))
                self._runs[key].add_done_callback(_report_crash)
        for key in [k for k in self._runs if k not in seen]:
            await self._stop_pod(key)  # the Job was deleted: its pod gets SIGTERM
        await self._collect_garbage()

    async def _collect_garbage(self) -> None:
        # Owned objects are listed before their owners: an owner always exists before the objects
        # made for it, so an owner missing from the later list is really gone. (Listing owners first
        # raced with the operator: a FineTuneJob created between the two lists had its brand-new
        # Job and ConfigMap collected as orphans.)
        owned = [(path, (await self._api("GET", path))["items"]) for path in OWNED]
        owners = set()
        for path in OWNERS:
            for obj in ((await self._api("GET", path)) or {}).get("items") or []:  # 404: a kind not served
                owners.add(obj["metadata"].get("uid"))
        jobs = set()
        for job in (await self._api("GET", "/apis/batch/v1/jobs"))["items"]:
            jobs.add((job["metadata"]["namespace"], job["metadata"]["name"]))
        for path, items in owned:
            for obj in items:
                refs = obj["metadata"].get("ownerReferences") or []
                job_name = (obj["metadata"].get("labels") or {}).get("job-name") if path.endswith("pods") else None
                orphan = job_name is not None and (obj["metadata"]["namespace"], job_name) not in jobs
                if orphan or (refs and not any(r.get("uid") in owners for r in refs)):
                    ns, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
                    base = path.rsplit("/", 1)[0]
                    await self._api("DELETE", f"{base}/namespaces/{ns}/{path.rsplit('/', 1)[1]}/{name}")

    async def _stop_pod(self, key: tuple[str, str]) -> None:
        proc, pod_name = self._procs.get(key) or (None, "")
        if proc is not None and proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 120)
            except asyncio.TimeoutError:
                proc.kill()
            self.exit_codes[pod_name] = await proc.wait()
        task = self._runs.pop(key, None)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    # --- one Job ---------------------------------------------------------------------------------

    def _behaviour(self, name: str) -> Behaviour:
        for prefix, b in sorted(self.behaviours.items(), key=lambda kv: -len(kv[0])):
            if name.startswith(prefix):
                return b
        return Behaviour()

    async def _job_status(self, key: tuple[str, str], status: dict) -> None:
        ns, name = key
        await self._api("PATCH", f"/apis/batch/v1/namespaces/{ns}/jobs/{name}/status", {"status": status}, merge=True)

    async def _pod_status(self, ns: str, pod: str, status: dict) -> None:
        await self._api("PATCH", f"/api/v1/namespaces/{ns}/pods/{pod}/status", {"status": status}, merge=True)

    async def _run_job(self, job: dict) -> None:
        meta, spec = job["metadata"], job["spec"]
        key = (meta["namespace"], meta["name"])
        behaviour = self._behaviour(meta["name"])
        failures = 0
        rules = (spec.get("podFailurePolicy") or {}).get("rules") or []
        fail_codes = {c for r in rules if r.get("action") == "FailJob" for c in (r.get("onExitCodes") or {}).get("values", [])}
        await self._job_status(key, {"startTime": _now(), "active": 1})
        while True:
            pod = await self._create_pod(job)
            ns, pod_name = meta["namespace"], pod["metadata"]["name"]
            if behaviour.unschedulable:
                await self._pod_status(ns, pod_name, {"phase": "Pending", "conditions": [
                    {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                     "message": behaviour.unschedulable, "lastTransitionTime": _now()}]})
                return
            if behaviour.image_pull:
                await self._pod_status(ns, pod_name, {"phase": "Pending", "containerStatuses": [
                    {"name": "main", "ready": False, "state": {"waiting": {
                        "reason": "ErrImagePull", "message": f"pull access denied for {pod['spec']['containers'][0]['image']}"}}}]})
                return
            await self._wait_for_config_maps(ns, pod)
            await self._pod_status(ns, pod_name, {"phase": "Running", "conditions": [
                {"type": "PodScheduled", "status": "True"}, {"type": "Ready", "status": "True"}],
                "containerStatuses": [{"name": "main", "ready": True, "state": {"running": {"startedAt": _now()}}}]})
            await self._job_status(key, {"active": 1, "ready": 1})
            if behaviour.oom:
                await asyncio.sleep(0.5)
                code, reason = 137, "OOMKilled"
            else:
                code = await self._execute(key, pod)
                reason = "Completed" if code == 0 else "Error"
            self.exit_codes[pod_name] = code
            await self._pod_status(ns, pod_name, {"phase": "Succeeded" if code == 0 else "Failed",
                                                  "containerStatuses": [{"name": "main", "ready": False, "state": {
                                                      "terminated": {"exitCode": code, "reason": reason}}}]})
            if code == 0:
                await self._job_status(key, {"active": 0, "ready": 0, "succeeded": 1, "completionTime": _now(),
                                             "conditions": [{"type": "Complete", "status": "True",
                                                             "lastTransitionTime": _now()}]})
                return
            failures += 1
            if code in fail_codes:
                why = ("PodFailurePolicy", f"Container main for pod {ns}/{pod_name} failed with exit code {code} "
                                           "matching FailJob rule at index 0")
            elif failures > int(spec.get("backoffLimit", 6)):
                why = ("BackoffLimitExceeded", "Job has reached the specified backoff limit")
            else:
                current = await self._api("GET", f"/apis/batch/v1/namespaces/{ns}/jobs/{meta['name']}")
                await self._job_status(key, {"failed": failures, "active": 0, "ready": 0})
                if current is None or (current.get("spec") or {}).get("suspend"):
                    return
                continue
            await self._job_status(key, {"active": 0, "ready": 0, "failed": failures, "conditions": [
                {"type": "Failed", "status": "True", "reason": why[0], "message": why[1],
                 "lastTransitionTime": _now()}]})
            return

    async def _create_pod(self, job: dict) -> dict:
        meta, template = job["metadata"], job["spec"]["template"]
        name = f"{meta['name']}-{uuid.uuid4().hex[:5]}"
        labels = {**(template.get("metadata") or {}).get("labels", {}), "job-name": meta["name"],
                  "batch.kubernetes.io/job-name": meta["name"]}
        annotations = dict((template.get("metadata") or {}).get("annotations") or {})
        pod = {"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": name, "namespace": meta["namespace"], "labels": labels, "annotations": annotations,
                            "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": meta["name"],
                                                 "uid": meta.get("uid", ""), "controller": True}]},
               "spec": template["spec"], "status": {"phase": "Pending"}}
        return await self._api("POST", f"/api/v1/namespaces/{meta['namespace']}/pods", pod)

    async def _wait_for_config_maps(self, ns: str, pod: dict) -> None:
        """Like a kubelet, which retries mounting a missing ConfigMap volume: the pod starts once its
        ConfigMaps exist (the operator may create a Job just before its ConfigMap)."""
        names = [v["configMap"]["name"] for v in pod["spec"].get("volumes") or [] if "configMap" in v]
        for name in names:
            while await self._api("GET", f"/api/v1/namespaces/{ns}/configmaps/{name}") is None:
                await asyncio.sleep(0.1)

    async def _execute(self, key: tuple[str, str], pod: dict) -> int:
        """Run the container's command locally, with its env and volumes; return the exit code."""
        ns, pod_name = pod["metadata"]["namespace"], pod["metadata"]["name"]
        spec = pod["spec"]
        container = spec["containers"][0]
        root = self.workdir / pod_name
        root.mkdir(parents=True, exist_ok=True)
        volumes = {v["name"]: v for v in spec.get("volumes") or []}
        mounts: dict[str, Path] = {}
        for mount in container.get("volumeMounts") or []:
            local = root / mount["name"]
            local.mkdir(exist_ok=True)
            source = volumes.get(mount["name"]) or {}
            if "configMap" in source:
                cm = await self._api("GET", f"/api/v1/namespaces/{ns}/configmaps/{source['configMap']['name']}")
                for fname, content in ((cm or {}).get("data") or {}).items():
                    (local / fname).write_text(content)
            elif "secret" in source:  # the items asked for (all keys without items), like a kubelet
                secret = await self._api("GET", f"/api/v1/namespaces/{ns}/secrets/{source['secret']['secretName']}")
                if secret is None:
                    raise RuntimeError(f"secret {source['secret']['secretName']} not found")  # a real pod would wait
                data = secret.get("data") or {}
                items = source["secret"].get("items") or [{"key": k, "path": k} for k in data]
                for item in items:
                    (local / item["path"]).write_bytes(base64.b64decode(data[item["key"]]))
            elif "downwardAPI" in source:
                annotations = pod["metadata"].get("annotations") or {}
                for item in source["downwardAPI"].get("items") or []:
                    field = item["fieldRef"]["fieldPath"]  # metadata.annotations['key'] is all the operator uses
                    annotation = field[len("metadata.annotations['"):-2]
                    (local / item["path"]).write_text(annotations[annotation])
            mounts[mount["mountPath"]] = local

        def rewrite(value: str) -> str:
            # Paths inside the pod (config mounts, caches) map to this pod's folder; a path that
            # exists on this machine (the Python running the tests, which may itself live under
            # /tmp like the pod's /tmp mount) is the host's own and stays as it is.
            if _host_path_exists(value):
                return value
            for path in sorted(mounts, key=len, reverse=True):
                if value == path or value.startswith(path + "/"):
                    return str(mounts[path]) + value[len(path):]
            return value

        env = dict(self.base_env)
        for item in container.get("env") or []:
            if "value" in item:
                env[item["name"]] = rewrite(item["value"])
            elif "secretKeyRef" in (item.get("valueFrom") or {}):
                ref = item["valueFrom"]["secretKeyRef"]
                secret = await self._api("GET", f"/api/v1/namespaces/{ns}/secrets/{ref['name']}")
                raw = ((secret or {}).get("data") or {}).get(ref["key"])
                if raw is None:
                    if ref.get("optional"):
                        continue
                    raise RuntimeError(f"secret {ref['name']} has no key {ref['key']}")  # a real pod would not start
                env[item["name"]] = base64.b64decode(raw).decode()
        behaviour = self._behaviour(key[1])
        argv = list(behaviour.command or (container.get("command") or []) + (container.get("args") or []))
        argv = [rewrite(a) for a in argv]
        exe = Path(sys.executable).parent / argv[0]
        if exe.exists():
            argv[0] = str(exe)
        with open(root / "pod.log", "wb") as log:
            proc = await asyncio.create_subprocess_exec(*argv, env=env, cwd=root, stdout=log, stderr=log)
            self._procs[key] = (proc, pod_name)
            try:
                return await proc.wait()
            except asyncio.CancelledError:
                if proc.returncode is None:
                    proc.kill()
                raise
