"""The SuperLink's port for sites in other clusters: Flower's own app, Fleet API only, listed keys only.

Flower 1.42 serves Fleet, Control and the runtime API on one HTTP app. Exposing that port outside the
cluster would let anyone reach the Control API (submit a run whose ServerApp our server pod executes).
Flower's global `--enable-supernode-auth` does not fit either: every SuperNode, the in-cluster ones
too, would need a key registered through the Control API. So the SuperLink runs Flower's app in this
process behind two uvicorn servers on one event loop, one LinkState:

    in-cluster port  cfg.host:cfg.port, everything Flower serves, plus REMOTE_NODES_PATH (node id -> site)
    remote port      TLS (remoteFleet cert/key); only POST /v1/fleet/<call> with a listed site's key

Each server gets its own outermost guard, so which port a request came through is fixed by
construction. Behind the guard Flower's NodeAuthMiddleware checks every Fleet call (auth on or off):
the timestamp's signature against the public key header, and that the node id is that key's.

A listed key is registered in the LinkState at start (what `flwr supernode register` does over the
Control API): a SuperNode started with `--auth-supernode-private-key` only activates an existing node.
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import json
import re
import signal
import sys
from base64 import b64decode
from pathlib import Path

from ..errors import EXIT_OK, EXIT_TRANSIENT_ERROR, ConfigError
from ..logs import get_logger
from .config import REMOTE_NODES_PATH, RemoteFleet, SuperLinkConfig

log = get_logger("federation.superlink")

#: The curves OpenSSH (and Flower's key check) accept for ECDSA keys.
NIST_CURVES = ("secp256r1", "secp384r1", "secp521r1")
#: How long a stopping server waits for open connections (a SuperNode's keep-alive ones) before closing them.
GRACEFUL_SHUTDOWN_SECONDS = 5
#: The Fleet calls a SuperNode makes: one path segment under /v1/fleet/, nothing that could be normalised.
FLEET_CALL = re.compile(r"/v1/fleet/[a-z][a-z0-9-]{0,63}")
#: A remote site's node exists from the start (register_remote_nodes) and outlives its SuperNode, which
#: only activates and deactivates it: self-registration and unregistering are no remote site's business.
NOT_REMOTE_CALLS = ("/v1/fleet/register-node", "/v1/fleet/unregister-node")


def public_key_pem(site: str, path: str) -> bytes:
    """The key as Flower compares it (PEM SubjectPublicKeyInfo), from an OpenSSH or PEM public key file."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"remote site {site}: cannot read its public key {path}: {exc.strerror}") from None
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            key = serialization.load_pem_public_key(data)
        else:
            key = serialization.load_ssh_public_key(data.strip())
    except (ValueError, TypeError, binascii.Error) as exc:
        raise ConfigError(f"remote site {site}: {path} is not an OpenSSH or PEM public key ({exc})") from None
    except Exception as exc:  # cryptography's UnsupportedAlgorithm and friends
        raise ConfigError(f"remote site {site}: {path} is not a usable public key ({type(exc).__name__})") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name not in NIST_CURVES:
        raise ConfigError(f"remote site {site}: {path} is not an ECDSA key on a NIST curve "
                          f"({', '.join(NIST_CURVES)})")
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def remote_keys(fleet: RemoteFleet) -> dict[bytes, str]:
    """PEM public key -> remote site; a site listed twice or two sites with one key is a ConfigError."""
    keys: dict[bytes, str] = {}
    sites: set[str] = set()
    for entry in fleet.sites:
        if entry.site in sites:
            raise ConfigError(f"remote site {entry.site} is listed twice in remoteFleet.sites")
        sites.add(entry.site)
        pem = public_key_pem(entry.site, entry.publicKeyFile)
        if pem in keys:
            raise ConfigError(f"remote site {entry.site}: {entry.publicKeyFile} is the same key as site "
                              f"{keys[pem]}'s: a key names one site")
        keys[pem] = entry.site
    return keys


async def _respond(send, status: int, body: dict) -> None:
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})


def _header(scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value
    return None


class PortGuard:
    """The outermost ASGI layer of one of the SuperLink's two servers."""

    def __init__(self, app, *, remote: bool, keys: dict[bytes, str], state):
        from flwr.supercore.constant import FLEET_HTTP_PUBLIC_KEY_HEADER

        self.app, self.remote, self.keys, self.state = app, remote, keys, state
        self.key_header = FLEET_HTTP_PUBLIC_KEY_HEADER.lower().encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)  # lifespan (the in-cluster server only runs it)
        if self.remote:
            refusal = self.refusal(scope)
            if refusal:
                log.warning("refused on the remote port", extra={"event": "remote_refused", "reason": refusal,
                                                                  "path": scope.get("path", "")[:100]})
                return await _respond(send, 403, {"error": refusal})
        elif scope["type"] == "http" and scope.get("path") == REMOTE_NODES_PATH:
            if scope.get("method") != "GET":
                return await _respond(send, 405, {"error": "GET only"})
            return await _respond(send, 200, {"nodes": await asyncio.to_thread(self.remote_nodes)})
        return await self.app(scope, receive, send)

    def refusal(self, scope) -> str:
        """Why a request on the remote port is refused ('' when it may go on to Flower's Fleet API)."""
        if scope["type"] != "http" or scope.get("method") != "POST" or not FLEET_CALL.fullmatch(scope.get("path", "")):
            return "only the Fleet API is served on this port"
        if scope["path"] in NOT_REMOTE_CALLS:
            return "a remote site's node is registered by the SuperLink, never by the site"
        raw = _header(scope, self.key_header)
        try:
            key = b64decode(raw or b"", validate=True)
        except (binascii.Error, ValueError):
            key = b""
        if key not in self.keys:
            return "this SuperNode's key is not one of the federation's remote sites"
        return ""

    def remote_nodes(self) -> dict[str, str]:
        nodes = {}
        for pem, site in self.keys.items():
            node_id = self.state().get_node_id_by_public_key(pem)
            if node_id is not None:
                nodes[str(node_id)] = site
        return nodes


def register_remote_nodes(state, keys: dict[bytes, str]) -> None:
    """Each listed key as a registered node (Flower's own Fleet registration, without the Control API)."""
    from flwr.common.constant import NOOP_ACCOUNT_NAME, NOOP_FLWR_AID

    for pem, site in keys.items():
        if state.get_node_id_by_public_key(pem) is not None:
            continue  # a SuperLink restarted on its database: the node is still there
        try:
            node_id = state.create_node(NOOP_FLWR_AID, NOOP_ACCOUNT_NAME, pem, 0)
        except ValueError as exc:  # the key's node was unregistered (through Control on the in-cluster port)
            raise ConfigError(f"remote site {site}: its key cannot be registered in the SuperLink's "
                              f"database ({exc}); start on a fresh database") from None
        log.info("remote site registered", extra={"event": "remote_registered", "site": site, "node": node_id})


def _server(config):
    """A uvicorn.Server without its own signal handling: this process stops both servers together."""
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            yield

    return Server(config)


def serve(cfg: SuperLinkConfig, argv: list[str]) -> int:
    """Flower's SuperLink app (configured from Flower's own flags, `argv`), on both ports until SIGTERM/SIGINT."""
    fleet = cfg.remoteFleet
    assert fleet is not None
    if fleet.port == cfg.port or fleet.port == cfg.healthPort:
        raise ConfigError(f"remoteFleet.port {fleet.port} is already the SuperLink's port or health port")
    keys = remote_keys(fleet)
    for name, path in (("certFile", fleet.certFile), ("keyFile", fleet.keyFile)):
        if not Path(path).is_file():
            raise ConfigError(f"remoteFleet.{name}: {path} not found")

    import uvicorn
    from flwr.supercore.http_logging import get_uvicorn_log_config
    from flwr.supercore.logger import console_handler
    from flwr.superlink.cli.flower_superlink import SuperLinkLifespan, _parse_superlink_lifespan_config
    from flwr.superlink.main import create_app

    saved, sys.argv = sys.argv, ["flower-superlink", *argv[1:]]
    try:
        lifespan_config = _parse_superlink_lifespan_config()
    finally:
        sys.argv = saved
    app = create_app(lifespan_config, SuperLinkLifespan)
    state = app.state.linkstate_factory.state
    register_remote_nodes(state(), keys)

    log_config = get_uvicorn_log_config(console_handler.level)
    # A SuperNode's keep-alive connection must not hold the pod past its grace period.
    common = dict(log_config=log_config, access_log=True, workers=1, ws="none",
                  timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS)
    in_cluster = _server(uvicorn.Config(
        PortGuard(app, remote=False, keys=keys, state=state), host=cfg.host, port=cfg.port, lifespan="on",
        ssl_certfile=lifespan_config.ssl_certfile, ssl_keyfile=lifespan_config.ssl_keyfile, **common))
    remote = _server(uvicorn.Config(
        PortGuard(app, remote=True, keys=keys, state=state), host=cfg.host, port=fleet.port, lifespan="off",
        ssl_certfile=fleet.certFile, ssl_keyfile=fleet.keyFile, **common))
    servers = [in_cluster, remote]
    log.info("SuperLink serving", extra={"event": "serving", "port": cfg.port, "remotePort": fleet.port,
                                         "remoteSites": sorted(keys.values())})

    def stop(*_):
        for server in servers:
            server.should_exit = True

    failed: list[int] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop)

        async def one(server):
            try:
                await server.serve()
            except SystemExit:  # uvicorn could not bind its port (it logged which): the pod's restart may
                failed.append(server.config.port)  # find it free
            finally:
                stop()  # one server down (a port taken, a signal): the other follows

        await asyncio.gather(*(one(s) for s in servers))

    asyncio.run(main())
    if failed:
        return EXIT_TRANSIENT_ERROR
    return EXIT_OK if all(s.started for s in servers) else EXIT_TRANSIENT_ERROR
