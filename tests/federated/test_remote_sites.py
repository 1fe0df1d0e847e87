"""Remote sites: the SuperLink's TLS Fleet-only port, the sites' keys, and the server binding a remote
site's name to its key. Real SuperLink processes on 127.0.0.1 (a CA and a server certificate made
here), Flower's own Fleet client and SuperNodes.

* `link` (one SuperLink, remote sites west and far): what the remote port lets through and what not;
  Flower's NodeAuthMiddleware behind it checks every Fleet call with SuperNode auth off; SIGTERM.
* `federation`: north and south on the plain port, west through TLS with its key, and an impostor
  holding far's (listed) key that says it is north: one round, west's update is in it, the impostor
  is never sampled.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
from base64 import b64encode
from pathlib import Path

import httpx
import pytest
import yaml

from finetune_operator.api import Dataset, FederatedFineTuneJob
from finetune_operator.api.trainer_config import JobIdentity
from finetune_operator.api.validation import validate_manifest
from finetune_trainer.errors import ConfigError
from finetune_trainer.federated import config as fc
from finetune_trainer.federated.client_app import update_uri
from finetune_trainer.federated.keygen import keygen
from finetune_trainer.federated.localrun import LocalFederation, free_port, wait_for_port
from finetune_trainer.federated.remote_fleet import public_key_pem, remote_keys
from finetune_trainer.federated.server_app import admit

from .sites import tickets_dataset

REPO = Path(__file__).resolve().parents[2]


# ---- certificates and keys --------------------------------------------------------------------------

def make_tls(folder: Path) -> fc.TLSFiles:
    """A CA and a server certificate for 127.0.0.1 / localhost signed by it (PEM files in `folder`)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test federation CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "superlink")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    (folder / "ca.crt").write_bytes(ca.public_bytes(pem))
    (folder / "tls.crt").write_bytes(cert.public_bytes(pem))
    (folder / "tls.key").write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
    return fc.TLSFiles(caFile=str(folder / "ca.crt"), certFile=str(folder / "tls.crt"),
                       keyFile=str(folder / "tls.key"))


def load_private(path: Path):
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key

    return load_ssh_private_key(path.read_bytes(), None)  # exactly how flower-supernode loads it


def fleet_client(port: int, ca: str, private_key, public_key=None):
    """Flower's own Fleet HTTP client, signing with `private_key` and presenting `public_key`."""
    from flwr.supernode.fleet_http_client import FleetHttpClient
    from flwr.supernode.node_auth_http_interceptor import NodeAuthHttpInterceptor

    return FleetHttpClient.from_server_address(
        f"127.0.0.1:{port}", False, ca,
        interceptors=[NodeAuthHttpInterceptor(private_key, public_key or private_key.public_key())])


def start_superlink(work: Path, cfg: fc.SuperLinkConfig, name: str = "superlink") -> subprocess.Popen:
    path = work / f"{name}.json"
    path.write_text(cfg.model_dump_json())
    log = open(work / f"{name}.log", "wb")
    return subprocess.Popen([sys.executable, "-m", "finetune_trainer.cli", "federation-superlink", "--config",
                             str(path)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


# ---- pure parts ----------------------------------------------------------------------------------------

def test_keygen_writes_an_openssh_pair_flower_loads_and_refuses_to_overwrite(tmp_path):
    from cryptography.hazmat.primitives.asymmetric import ec

    private, public = keygen(tmp_path / "keys")
    assert (private.stat().st_mode & 0o777) == 0o600
    key = load_private(private)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    assert public.read_text().startswith("ecdsa-sha2-nistp384 ")
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes

    assert public_key_pem("west", str(public)) == public_key_to_bytes(key.public_key())  # what Flower sends
    before = private.read_bytes()
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        keygen(tmp_path / "keys")
    assert private.read_bytes() == before


def test_remote_keys_load_openssh_and_pem_and_name_the_site_and_file_of_a_bad_one(tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    _, west = keygen(tmp_path / "west")
    _, far = keygen(tmp_path / "far")
    pem = tmp_path / "far.pem"
    pem.write_bytes(public_key_pem("far", str(far)))
    keys = remote_keys(fc.RemoteFleet(certFile="c", keyFile="k", sites=[
        fc.RemoteSiteKey(site="west", publicKeyFile=str(west)), fc.RemoteSiteKey(site="far", publicKeyFile=str(pem))]))
    assert sorted(keys.values()) == ["far", "west"]

    def fleet(*pairs):
        return fc.RemoteFleet(certFile="c", keyFile="k",
                              sites=[fc.RemoteSiteKey(site=s, publicKeyFile=str(p)) for s, p in pairs])

    with pytest.raises(ConfigError, match=f"remote site far: cannot read its public key {tmp_path}/nope"):
        remote_keys(fleet(("west", west), ("far", tmp_path / "nope")))
    junk = tmp_path / "junk"
    junk.write_text("ecdsa-sha2-nistp384 not-base64!!\n")
    with pytest.raises(ConfigError, match=f"remote site far: {junk} is not an OpenSSH or PEM public key"):
        remote_keys(fleet(("west", west), ("far", junk)))
    edwards = tmp_path / "ed25519.pub"
    edwards.write_bytes(ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    with pytest.raises(ConfigError, match=f"remote site far: {edwards} is not an ECDSA key on a NIST curve"):
        remote_keys(fleet(("west", west), ("far", edwards)))
    copy = tmp_path / "west-again.pem"
    copy.write_bytes(public_key_pem("west", str(west)))
    with pytest.raises(ConfigError, match=f"remote site far: {copy} is the same key as site west's"):
        remote_keys(fleet(("west", west), ("far", copy)))
    with pytest.raises(ConfigError, match="remote site west is listed twice"):
        remote_keys(fleet(("west", west), ("west", far)))


def test_a_bad_remote_key_exits_3_naming_the_site_and_file_without_a_traceback(tmp_path):
    junk = tmp_path / "west.pub"
    junk.write_text("hello\n")
    tls = make_tls(tmp_path / "tls")
    cfg = fc.SuperLinkConfig(job=JobIdentity(name="f"), host="127.0.0.1", port=free_port(), healthPort=0,
                             remoteFleet=fc.RemoteFleet(port=free_port(), certFile=tls.certFile, keyFile=tls.keyFile,
                                                        sites=[fc.RemoteSiteKey(site="west", publicKeyFile=str(junk))]))
    path = tmp_path / "superlink.json"
    path.write_text(cfg.model_dump_json())
    proc = subprocess.run([sys.executable, "-m", "finetune_trainer.cli", "federation-superlink", "--config",
                           str(path)], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "FINETUNE_TERMINATION_LOG": str(tmp_path / "termination")})
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert f"remote site west: {junk}" in proc.stderr and "Traceback" not in proc.stderr


def test_a_taken_remote_port_stops_the_superlink_with_both_ports_closed(tmp_path):
    _, west = keygen(tmp_path / "west")
    tls = make_tls(tmp_path / "tls")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = free_port()
        cfg = fc.SuperLinkConfig(job=JobIdentity(name="f"), host="127.0.0.1", port=port, healthPort=0,
                                 remoteFleet=fc.RemoteFleet(port=taken.getsockname()[1], certFile=tls.certFile,
                                                            keyFile=tls.keyFile,
                                                            sites=[fc.RemoteSiteKey(site="west", publicKeyFile=str(west))]))
        proc = start_superlink(tmp_path, cfg)
        assert proc.wait(timeout=60) == 4, (tmp_path / "superlink.log").read_text()[-2000:]
    log = (tmp_path / "superlink.log").read_text()
    assert "address already in use" in log and "Traceback" not in log
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0


def test_admit_binds_a_remote_sites_name_to_its_key():
    known, remote = {"north", "south", "west", "far"}, {"west", "far"}
    nodes = {11: "west", 12: "far"}
    assert admit(11, "west", known, remote, nodes) == ("west", "")  # its key, its name
    assert admit(1, "north", known, remote, nodes) == ("north", "")  # an in-cluster site, no key
    assert admit(12, "north", known, remote, nodes)[0] is None  # far's key claiming an in-cluster site
    assert admit(12, "west", known, remote, nodes)[0] is None  # far's key claiming west
    assert admit(12, "nobody", known, remote, nodes)[0] is None
    assert admit(2, "west", known, remote, nodes)[0] is None  # no key, a remote site's name
    assert admit(2, "east", known, remote, nodes) == (None, "unknown_site")
    assert admit(1, "north", {"north"}, set(), None) == ("north", "")  # no remote participant at all


# ---- one SuperLink with a remote port -------------------------------------------------------------------

@pytest.fixture(scope="module")
def link(tmp_path_factory):
    work = tmp_path_factory.mktemp("remote-link")
    tls = make_tls(work / "tls")
    keys = {name: keygen(work / "keys" / name) for name in ("west", "far", "stranger")}
    port, remote_port = free_port(), free_port()
    cfg = fc.SuperLinkConfig(
        job=JobIdentity(name="f"), host="127.0.0.1", port=port, healthPort=0,
        remoteFleet=fc.RemoteFleet(port=remote_port, certFile=tls.certFile, keyFile=tls.keyFile, sites=[
            fc.RemoteSiteKey(site=s, publicKeyFile=str(keys[s][1])) for s in ("west", "far")]))
    proc = start_superlink(work, cfg)
    try:
        wait_for_port(port)
        wait_for_port(remote_port)
        yield {"proc": proc, "port": port, "remote": remote_port, "ca": tls.caFile, "work": work,
               "keys": {s: load_private(private) for s, (private, _) in keys.items()}}
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def remote_nodes(link) -> dict[str, str]:
    response = httpx.get(f"http://127.0.0.1:{link['port']}{fc.REMOTE_NODES_PATH}", timeout=10)
    response.raise_for_status()
    return response.json()["nodes"]


def _pem(key) -> bytes:
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes

    return public_key_to_bytes(key.public_key())


def test_a_listed_key_activates_through_the_remote_tls_port_as_the_node_the_map_names(link):
    from flwr.proto.fleet_pb2 import ActivateNodeRequest, DeactivateNodeRequest, PullMessagesRequest
    from flwr.proto.node_pb2 import Node

    nodes = remote_nodes(link)
    assert sorted(nodes.values()) == ["far", "west"]
    west = fleet_client(link["remote"], link["ca"], link["keys"]["west"])
    node_id = west.ActivateNode(ActivateNodeRequest(public_key=_pem(link["keys"]["west"]),
                                                    heartbeat_interval=30)).node_id
    assert nodes[str(node_id)] == "west"
    assert west.PullMessages(PullMessagesRequest(node=Node(node_id=node_id))).messages_list is not None
    # a SuperNode that stops deactivates its node; started again it is the same node (the same site)
    west.DeactivateNode(DeactivateNodeRequest(node_id=node_id))
    again = west.ActivateNode(ActivateNodeRequest(public_key=_pem(link["keys"]["west"]), heartbeat_interval=30))
    assert again.node_id == node_id and remote_nodes(link) == nodes


def test_an_unlisted_key_is_refused_on_the_remote_port(link):
    from flwr.proto.fleet_pb2 import ActivateNodeRequest, RegisterNodeFleetRequest

    stranger = link["keys"]["stranger"]
    client = fleet_client(link["remote"], link["ca"], stranger)
    with pytest.raises(httpx.HTTPStatusError) as err:
        client.ActivateNode(ActivateNodeRequest(public_key=_pem(stranger), heartbeat_interval=30))
    assert err.value.response.status_code == 403
    assert "not one of the federation's remote sites" in err.value.response.json()["error"]
    # a self-registering SuperNode (no key given: a throwaway one) is refused, a listed site's too
    for key in (stranger, link["keys"]["far"]):
        with pytest.raises(httpx.HTTPStatusError) as err:
            fleet_client(link["remote"], link["ca"], key).RegisterNode(RegisterNodeFleetRequest(public_key=_pem(key)))
        assert err.value.response.status_code == 403
    assert len(remote_nodes(link)) == 2  # nothing was registered


def test_flowers_node_auth_checks_signature_and_node_id_behind_the_guard_with_supernode_auth_off(link):
    from flwr.proto.fleet_pb2 import PullMessagesRequest
    from flwr.proto.node_pb2 import Node

    keys = link["keys"]
    ids = {site: int(node) for node, site in remote_nodes(link).items()}
    west = fleet_client(link["remote"], link["ca"], keys["west"])
    # west's (listed) key passes our guard, but asks for far's node: Flower refuses it (wrong node id)
    with pytest.raises(httpx.HTTPStatusError) as err:
        west.PullMessages(PullMessagesRequest(node=Node(node_id=ids["far"])))
    assert err.value.response.status_code == 401
    # presenting west's public key, signing with another key: Flower refuses it (bad signature)
    forged = fleet_client(link["remote"], link["ca"], keys["stranger"], public_key=keys["west"].public_key())
    with pytest.raises(httpx.HTTPStatusError) as err:
        forged.PullMessages(PullMessagesRequest(node=Node(node_id=ids["west"])))
    assert err.value.response.status_code == 401
    # the same checks on the in-cluster port (no guard of ours there): it is Flower's, auth flag off
    inside = httpx.post(f"http://127.0.0.1:{link['port']}/v1/fleet/pull-messages",
                        content=PullMessagesRequest(node=Node(node_id=ids["far"])).SerializeToString(),
                        headers={"content-type": "application/protobuf"})
    assert inside.status_code == 401


def test_control_runtime_docs_and_the_node_map_are_refused_on_the_remote_port(link):
    from flwr.proto.control_pb2 import ListRunsRequest

    body = ListRunsRequest().SerializeToString()
    listed = {"content-type": "application/protobuf",
              "flwr-public-key": b64encode(_pem(link["keys"]["west"])).decode()}
    inside = httpx.post(f"http://127.0.0.1:{link['port']}/v1/control/list-runs", content=body, headers=listed)
    assert inside.status_code == 200  # the Control API is there, on the in-cluster port
    with httpx.Client(verify=link["ca"], base_url=f"https://127.0.0.1:{link['remote']}") as remote:
        for method, path in (("POST", "/v1/control/list-runs"), ("POST", "/v1/control/start-run"),
                             ("POST", "/v1/runtime/acquire-task"), ("POST", "/v1/runtime/pull-task-input"),
                             ("GET", "/docs"), ("GET", "/openapi.json"), ("GET", "/health"),
                             ("GET", fc.REMOTE_NODES_PATH), ("GET", "/v1/fleet/pull-messages"),
                             ("POST", "/v1/fleet/%2e%2e/control/list-runs")):
            response = remote.request(method, path, content=body if method == "POST" else None, headers=listed)
            assert response.status_code == 403, (method, path, response.status_code)
            assert response.json()["error"] == "only the Fleet API is served on this port"


def test_plaintext_to_the_remote_port_fails(link):
    with pytest.raises(httpx.TransportError):
        httpx.post(f"http://127.0.0.1:{link['remote']}/v1/fleet/register-node", content=b"", timeout=10)


def test_sigterm_stops_both_servers(link):
    proc = link["proc"]
    assert proc.poll() is None
    # a SuperNode's keep-alive TLS connection is open on the remote port while the SuperLink stops
    open_connection = httpx.Client(verify=link["ca"])
    assert open_connection.get(f"https://127.0.0.1:{link['remote']}/docs").status_code == 403
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0
    for port in (link["port"], link["remote"]):
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0
    log = (link["work"] / "superlink.log").read_text()
    assert "Traceback" not in log and "remote_refused" in log
    open_connection.close()


# ---- a federation with a remote site --------------------------------------------------------------------

IN_CLUSTER = ("north", "south")
DATA = {"north": "north", "south": "south", "west": "east"}


def _folder(work: Path, site: str) -> Path:
    lines = (REPO / "examples" / "federated" / "data" / f"{DATA[site]}.jsonl").read_text().splitlines()
    folder = work / "data" / site
    folder.mkdir(parents=True)
    (folder / "train.jsonl").write_text("\n".join(lines[:40]) + "\n")
    (folder / "eval.jsonl").write_text("\n".join(lines[60:]) + "\n")
    return folder


def _job(model: Path, output: Path) -> FederatedFineTuneJob:
    doc = yaml.safe_load((REPO / "examples" / "federated" / "federation.yaml").read_text())
    doc["metadata"].update(namespace="coordinator", uid="uid-remote-test")
    spec = doc["spec"]
    spec.update(baseModel={"uri": f"file://{model}"}, output={"uri": f"file://{output}"}, rounds=1, localSteps=2,
                minSites=3, roundTimeoutSeconds=60, privacy={"secureAggregation": "off"},
                # The third aggregation end to end (fedavg: test_federation.py; ffa-lora: tests/ftctl/).
                aggregation="svd-refactor",
                superlink={"externalAddress": "127.0.0.1:9095", "tls": {"secretName": "remote-tls"}})
    spec["training"]["checkpointEverySteps"] = 100
    spec["participants"] = [{"name": s, "namespace": f"desk-{s}", "dataset": "tickets"} for s in IN_CLUSTER] + [
        {"name": s, "remote": {"credentialsSecret": f"{s}-supernode", "datasetDigest": "sha256:" + "e" * 64,
                               "license": "CC0-1.0"}} for s in ("west", "far")]
    return FederatedFineTuneJob.model_validate(validate_manifest(doc))


def _dataset(site: str, folder: Path) -> Dataset:
    return tickets_dataset(site, folder, 40, "1" if site == "north" else "2")


@pytest.fixture(scope="module")
def federation(tiny_model_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("remote-federation")
    tls = make_tls(work / "tls")
    keys = {s: keygen(work / "keys" / s) for s in ("west", "far")}
    folders = {s: _folder(work, s) for s in DATA}
    job = _job(tiny_model_dir, work / "out")
    datasets = {s: _dataset(s, folders[s]) for s in IN_CLUSTER}
    port, remote_port = free_port(), free_port()
    inside, outside = f"127.0.0.1:{port}", f"127.0.0.1:{remote_port}"
    superlink = fc.superlink_config(job, remote_tls=tls, key_file=lambda s: str(keys[s][1]))
    superlink = superlink.model_copy(update={"host": "127.0.0.1", "port": port, "healthPort": 0, "remoteFleet":
                                             superlink.remoteFleet.model_copy(update={"port": remote_port})})
    server = fc.server_config(job, superlink=inside, datasets={**datasets, "west": None, "far": None}).model_copy(
        update={"pollSeconds": 0.2, "connectTimeoutSeconds": 120})
    fast = {"pollSeconds": 0.2, "healthPort": 0}
    sites = {p.name: fc.site_config(job, p, datasets[p.name], superlink=inside,
                                    scratch_uri=f"file://{work}/scratch/{p.name}").model_copy(
        update={**fast, "runtimePort": free_port()}) for p in job.spec.participants if p.remote is None}
    # The remote team's own site.json: the external address, the platform's CA, its private key, its data.
    remote = sites["north"].model_copy(update={
        "site": "west", "superlink": outside, "tls": fc.TLSFiles(caFile=tls.caFile),
        "authPrivateKeyFile": str(keys["west"][0]), "runtimePort": free_port(),
        "data": sites["north"].data.model_copy(update={"uri": f"file://{folders['west']}", "digest": None}),
        "scratchURI": f"file://{work}/scratch/west"})
    # Holds far's listed key, says it is north (with north's data): it must never be sampled.
    impostor = remote.model_copy(update={"site": "north", "authPrivateKeyFile": str(keys["far"][0]),
                                         "runtimePort": free_port(), "data": sites["north"].data,
                                         "scratchURI": f"file://{work}/scratch/impostor"})
    all_sites = {**sites, "west": remote, "impostor": impostor}
    run = LocalFederation(work, superlink, server, all_sites, env={"OMP_NUM_THREADS": "1"})
    started = time.monotonic()
    run.start()
    try:
        wait_for_port(remote_port)
        code = run.procs["server"].wait(timeout=240)
        run.kill_site("impostor")  # never a site of the federation, so never told it is over
        run.wait(timeout=60)
    finally:
        run.stop()
    progress = json.loads(Path(server.progressURI.removeprefix("file://")).read_text())
    return {"code": code, "progress": progress, "run": run, "sites": all_sites, "work": work,
            "seconds": time.monotonic() - started}


def test_a_remote_site_trains_through_the_remote_port_with_its_key(federation):
    run = federation["run"]
    assert federation["code"] == 0, run.log_of("server")[-4000:] + run.log_of("site-west")[-3000:]
    p = federation["progress"]
    assert p["state"] == "Succeeded" and p["currentRound"] == 1
    (round_,) = p["rounds"]
    assert sorted(s["site"] for s in round_["sites"]) == ["north", "south", "west"]
    assert round_["sitesSelected"] == 3
    assert Path(update_uri(federation["sites"]["west"], 1).removeprefix("file://")).exists()
    print(f"federation with a remote site: {federation['seconds']:.1f}s")


def test_a_node_with_a_remote_key_claiming_an_in_cluster_site_is_never_sampled(federation):
    run = federation["run"]
    server_log = run.log_of("server")
    assert '"event": "impersonation"' in server_log, server_log[-3000:]
    impostor = federation["sites"]["impostor"]
    assert not Path(update_uri(impostor, 1).removeprefix("file://")).exists()
    assert not (federation["work"] / "scratch" / "impostor" / "checkpoints").exists()
    # the real north trained the round
    assert Path(update_uri(federation["sites"]["north"], 1).removeprefix("file://")).exists()


def test_svd_refactor_the_aggregate_is_the_best_rank_r_factorisation_of_the_mean_full_update(federation):
    """Computed here from what the sites sent (their own records): ΔW₁ = s·B₀A₀ + Σ wᵢ ΔWᵢ / Σ wᵢ, cut to
    rank r by its SVD (Eckart–Young), is what round 1's global adapter multiplies out to."""
    import numpy as np
    from safetensors.numpy import load_file

    from finetune_trainer.federated import wire

    assert federation["code"] == 0
    out = federation["work"] / "out" / "federation" / "rounds"
    before, after = load_file(out / "round-0000.safetensors"), load_file(out / "round-0001.safetensors")
    sent = []
    for site in ("north", "south", "west"):
        data = Path(update_uri(federation["sites"][site], 1).removeprefix("file://")).read_bytes()
        sent.append((wire.arrays_from_bytes(data), float(wire.metadata_of(data)["weight"])))
    total = sum(w for _, w in sent)
    job = _job(Path("/unused"), Path("/unused"))
    rank, scaling = job.spec.lora.r, job.spec.lora.alpha / job.spec.lora.r
    modules = sorted(n[: -len(".lora_A.weight")] for n in before if n.endswith(".lora_A.weight"))
    assert modules and all(n.endswith(".delta_w") for n in sent[0][0])
    worst = 0.0
    for m in modules:
        a0, b0 = before[f"{m}.lora_A.weight"].astype(np.float64), before[f"{m}.lora_B.weight"].astype(np.float64)
        mean = sum(w * u[f"{m}.delta_w"].astype(np.float64) for u, w in sent) / total
        u, sv, vt = np.linalg.svd(scaling * b0 @ a0 + mean, full_matrices=False)
        best = (u[:, :rank] * sv[:rank]) @ vt[:rank]
        got = scaling * after[f"{m}.lora_B.weight"].astype(np.float64) @ after[f"{m}.lora_A.weight"].astype(np.float64)
        worst = max(worst, float(np.abs(got - best).max() / max(np.abs(best).max(), 1e-12)))
        assert np.linalg.matrix_rank(got, tol=1e-6 * max(sv[0], 1e-12)) <= rank
    assert worst < 1e-4, worst
