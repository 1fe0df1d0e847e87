"""The operator benchmark's real-API-server side: a private Kubernetes v1.36 control plane (etcd +
kube-apiserver from ../shared/k8s, in its own home, never the shared test cluster), a small HTTPS
client for the benchmark's own requests, metadata-only watches that timestamp what the operator
writes, and the apiserver's request counters.

Writes are counted from the apiserver's `apiserver_request_total` (by verb, resource, subresource),
diffed before/after a run. In-process clients (the apiserver's own leases, flow-control objects)
carry `system_client="kube-apiserver"` and are left out; what remains is the operator's requests plus
the benchmark's own, which the benchmark counts itself and subtracts. Nothing else runs against this
control plane (no controller-manager, no scheduler, no kubelet), so no Job ever runs: a run is
measured until every trainer Job exists and the operator's writes have stopped.
"""

from __future__ import annotations

import collections
import json
import multiprocessing
import os
import re
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Optional

import requests
import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO.parent / "shared" / "k8s"
CRDS = REPO / "crds"
#: Where the shared cluster of the realcluster tests lives; the benchmark refuses it (it purges etcd).
SHARED_HOME = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "finetune-k8s"
DEFAULT_HOME = SHARED_HOME.with_name("finetune-k8s-bench")
WRITE_VERBS = ("POST", "PUT", "PATCH", "APPLY", "DELETE", "DELETECOLLECTION")
# Metadata only: the benchmark needs when an object changed, not its body (less for the server to
# encode and for this process to decode while it shares the CPUs with the operator).
METADATA_ACCEPT = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1,application/json"
METADATA_LIST_ACCEPT = "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1,application/json"


class ControlPlane:
    """etcd + kube-apiserver started by ../shared/k8s/up.sh in a home of its own."""

    def __init__(self, home: Path):
        self.home = Path(home).resolve()
        if self.home == SHARED_HOME.resolve():
            raise SystemExit(f"--home {self.home} is the shared test cluster's home: the benchmark purges "
                             f"its etcd between runs; use another (default {DEFAULT_HOME})")
        if not (K8S / "up.sh").exists():
            raise SystemExit(f"no {K8S}/up.sh: the real-API-server mode needs ../shared/k8s")
        self.kubeconfig: Optional[Path] = None

    def _script(self, name: str, *args: str) -> str:
        env = {**os.environ, "FINETUNE_K8S_HOME": str(self.home), "FINETUNE_K8S_COMPONENTS": "apiserver"}
        proc = subprocess.run([str(K8S / name), *args], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"{name} {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        return proc.stdout

    def fresh(self) -> Path:
        """A control plane with an empty etcd (down.sh --purge, then up.sh), our CRDs Established."""
        self._script("down.sh", "--purge")
        out = self._script("up.sh")
        self.kubeconfig = Path(out.strip().splitlines()[-1].split("=", 1)[1])
        kubectl = [str(self.home / "bin" / "kubectl"), "--kubeconfig", str(self.kubeconfig), "--request-timeout=60s"]
        subprocess.run(kubectl + ["apply", "--server-side", "-f", str(CRDS)], check=True, stdout=subprocess.DEVNULL)
        subprocess.run(kubectl + ["wait", "--for=condition=Established", "--timeout=60s", "-f", str(CRDS)],
                       check=True, stdout=subprocess.DEVNULL)
        return self.kubeconfig

    def down(self, purge: bool = False) -> None:
        self._script("down.sh", *(["--purge"] if purge else []))

    def pids(self) -> dict[str, int]:
        """The server processes (their CPU time is the API side's work for one operator)."""
        out = {}
        for name in ("kube-apiserver", "etcd"):
            try:
                out[name] = int((self.home / "state" / f"{name}.pid").read_text().strip())
            except (OSError, ValueError):
                pass
        return out


class Api:
    """The benchmark's own HTTPS client (the kubeconfig's admin client certificate), keep-alive."""

    def __init__(self, kubeconfig: Path, user_agent: str):
        cfg = yaml.safe_load(Path(kubeconfig).read_text())
        cluster = cfg["clusters"][0]["cluster"]
        user = cfg["users"][0]["user"]
        self.server = cluster["server"].rstrip("/")
        self._dir = tempfile.TemporaryDirectory(prefix="bench-tls-")
        import base64

        def put(name: str, data: str) -> str:
            path = Path(self._dir.name) / name
            path.write_bytes(base64.b64decode(data))
            return str(path)

        self.ca = put("ca.crt", cluster["certificate-authority-data"])
        self.cert = (put("client.crt", user["client-certificate-data"]), put("client.key", user["client-key-data"]))
        self.user_agent = user_agent
        self.session = self.new_session()
        #: the benchmark's own writes, by the key `writes_by_kind` uses (subtracted from the counters)
        self.own_writes: collections.Counter[str] = collections.Counter()

    def new_session(self) -> requests.Session:
        s = requests.Session()
        s.verify, s.cert = self.ca, self.cert
        s.trust_env = False  # else REQUESTS_CA_BUNDLE replaces our CA (and *_PROXY would apply)
        s.headers["User-Agent"] = self.user_agent
        return s

    def request(self, method: str, path: str, body: Any = None, content_type: str = "application/json",
                key: Optional[str] = None) -> dict:
        resp = self.session.request(method, self.server + path, data=None if body is None else json.dumps(body),
                                    headers={"Content-Type": content_type}, timeout=60)
        if resp.status_code >= 400:
            raise RuntimeError(f"{method} {path} -> {resp.status_code}: {resp.text[:500]}")
        if key:
            self.own_writes[key] += 1
        return resp.json() if resp.content else {}

    def metrics_text(self) -> str:
        resp = self.session.get(self.server + "/metrics", timeout=60)
        resp.raise_for_status()
        return resp.text


_LABELS = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def request_counts(metrics: str, verbs: tuple[str, ...] = WRITE_VERBS) -> collections.Counter[str]:
    """Requests (writes by default) from clients outside the apiserver, keyed "VERB resource[/subresource]"
    (every answer code: a 409 or a 422 is a request the server had to serve too)."""
    out: collections.Counter[str] = collections.Counter()
    for line in metrics.splitlines():
        if not line.startswith("apiserver_request_total{"):
            continue
        labels_part, _, value = line.rpartition("} ")
        labels = dict(_LABELS.findall(labels_part))
        if labels.get("verb") not in verbs or labels.get("system_client") or not labels.get("resource"):
            continue
        key = f"{labels['verb']} {labels.get('resource', '?')}" + (
            f"/{labels['subresource']}" if labels.get("subresource") else "") + (
            " (dryRun)" if labels.get("dry_run") else "")  # served (admission ran), nothing stored
        out[key] += int(float(value))
    return out


def watchers(metrics: str, resource: str) -> int:
    """Open WATCH requests on a resource (the operator is ready once it watches FineTuneJobs)."""
    total = 0
    for line in metrics.splitlines():
        if line.startswith("apiserver_longrunning_requests{"):
            labels_part, _, value = line.rpartition("} ")
            labels = dict(_LABELS.findall(labels_part))
            if labels.get("verb") == "WATCH" and labels.get("resource") == resource:
                total += int(float(value))
    return total


class Recorder:
    """Metadata-only watches (all namespaces: the etcd is fresh, nothing else is there) that record
    when each watch event arrived: the Jobs' ADDED events time "every Job exists", and the last
    event caused by the operator (a Job, ConfigMap or Event, a FineTuneJob's status) times "all
    writes done".

    The watches run in a process of their own: in this one they shared the GIL with the applies,
    fell behind under load, and the apiserver closed the slow watch (it drops a watcher whose buffer
    stays full), so events went missing. A watch the server ends anyway is resumed from the last
    resourceVersion seen (counted in `resumed`). Times are CLOCK_MONOTONIC, the same in both processes."""

    RESOURCES = {"jobs": "/apis/batch/v1/jobs", "configmaps": "/api/v1/configmaps",
                 "events": "/api/v1/events", "finetunejobs": "/apis/finetune.dev/v1alpha1/finetunejobs"}

    def __init__(self, kubeconfig: Path, target_jobs: int):
        ctx = multiprocessing.get_context("spawn")  # no copy of this process's threads and sockets
        self.added_jobs = ctx.Value("l", 0, lock=False)
        self._all_jobs_at = ctx.Value("d", 0.0, lock=False)
        self._last_operator_event = ctx.Value("d", 0.0, lock=False)
        self._ready = ctx.Event()
        self._stop = ctx.Event()
        self._parent, child = ctx.Pipe()
        self._counts: Optional[dict] = None
        self._proc = ctx.Process(target=_record, daemon=True, name="bench-recorder",
                                 args=(str(kubeconfig), target_jobs, self.added_jobs, self._all_jobs_at,
                                       self._last_operator_event, self._ready, self._stop, child))

    def start(self) -> None:
        self._proc.start()
        if not self._ready.wait(60):
            raise RuntimeError("the watches did not start in 60 s")

    @property
    def all_jobs_at(self) -> Optional[float]:
        return self._all_jobs_at.value or None

    def last_operator_event(self) -> Optional[float]:
        """When the last change the operator made arrived (a FineTuneJob's ADDED is the benchmark's)."""
        return self._last_operator_event.value or None

    def stop(self) -> dict[str, int]:
        """Stop the watches; their event counts by type and resource (and watches resumed)."""
        if self._counts is None:
            self._stop.set()
            try:
                self._counts = self._parent.recv() if self._parent.poll(30) else {"error": "no answer"}
            except EOFError:
                self._counts = {"error": "the recorder exited"}
            self._proc.join(10)
            if self._proc.is_alive():
                self._proc.kill()
        return self._counts


def _record(kubeconfig: str, target_jobs: int, added_jobs: Any, all_jobs_at: Any, last_operator_event: Any,
            ready: Any, stop: Any, conn: Any) -> None:
    api = Api(Path(kubeconfig), "operator-bench-recorder")
    lock = threading.Lock()
    counts: collections.Counter[str] = collections.Counter()
    errors: list[str] = []
    started = threading.Barrier(len(Recorder.RESOURCES) + 1)

    def watch(name: str, path: str) -> None:
        session = api.new_session()
        try:
            listed = session.get(api.server + path, params={"limit": 1},
                                 headers={"Accept": METADATA_LIST_ACCEPT}, timeout=60)
            listed.raise_for_status()
            rv = listed.json()["metadata"]["resourceVersion"]
        except BaseException as exc:
            errors.append(f"{name}: {exc}")
            started.abort()
            raise
        first = True
        tries = 0
        while not stop.is_set():
            resp = session.get(api.server + path, stream=True, timeout=(60, None),
                               params={"watch": "1", "resourceVersion": rv, "timeoutSeconds": "3600",
                                       "allowWatchBookmarks": "true"},
                               headers={"Accept": METADATA_ACCEPT})
            if resp.status_code == 429 and tries < 60:  # a new resource's watch cache is still filling
                tries += 1
                resp.close()
                time.sleep(float(resp.headers.get("Retry-After", "1")))
                continue
            resp.raise_for_status()
            if first:
                started.wait(60)
                first = False
            else:
                with lock:
                    counts[f"resumed {name}"] += 1
            try:
                for line in resp.iter_lines(chunk_size=None):
                    now = time.monotonic()
                    if not line:
                        continue
                    event = json.loads(line)
                    kind = event.get("type", "?")
                    if kind == "ERROR":  # e.g. 410 Gone: resuming is not possible, say so
                        errors.append(f"{name}: {event.get('object')}")
                        return
                    rv = event["object"]["metadata"]["resourceVersion"]
                    if kind == "BOOKMARK":
                        continue
                    with lock:
                        counts[f"{kind} {name}"] += 1
                        if not (name == "finetunejobs" and kind == "ADDED"):
                            last_operator_event.value = now
                        if name == "jobs" and kind == "ADDED":
                            added_jobs.value += 1
                            if added_jobs.value == target_jobs:
                                all_jobs_at.value = now
            except requests.RequestException:
                pass  # the stream broke: resume from rv

    for name, path in Recorder.RESOURCES.items():
        threading.Thread(target=watch, args=(name, path), daemon=True, name=f"watch-{name}").start()
    try:
        started.wait(60)
    except threading.BrokenBarrierError:
        conn.send({"error": "; ".join(errors)})
        return
    ready.set()
    stop.wait()
    with lock:
        out = dict(counts)
    if errors:
        out["errors"] = "; ".join(errors)
    conn.send(out)


def proc_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
