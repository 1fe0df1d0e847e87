"""A stand-in for vLLM's runtime LoRA API, over real HTTP: vLLM itself cannot run on this machine (no
GPU; its wheels pull a CUDA torch). It answers as vLLM's OpenAI server does when started with
VLLM_ALLOW_RUNTIME_LORA_UPDATING=True (vllm/entrypoints/openai/serving_models.py): POST
/v1/load_lora_adapter refuses a missing field or a name already loaded (400), POST
/v1/unload_lora_adapter refuses an unknown name (404), GET /v1/models lists the base model and the
loaded adapters. Every call is recorded for the tests.
"""

from __future__ import annotations

import contextlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator


class VLLMStandIn:
    def __init__(self, base_model: str = "base"):
        self.base_model = base_model
        self.loaded: dict[str, str] = {}  # lora_name -> lora_path
        self.calls: list[tuple[str, dict]] = []
        self.fail_loads = 0  # answer this many loads with 500 first (a server restarting)
        self.lock = threading.Lock()


def _handler(state: VLLMStandIn):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet
            pass

        def _answer(self, code: int, body) -> None:
            raw = (json.dumps(body) if not isinstance(body, str) else body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json" if not isinstance(body, str) else "text/plain")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def do_GET(self):
            if self.path != "/v1/models":
                return self._answer(404, {"error": "not found"})
            with state.lock:
                data = [{"id": state.base_model, "object": "model", "root": state.base_model}]
                data += [{"id": n, "object": "model", "root": p, "parent": state.base_model}
                         for n, p in sorted(state.loaded.items())]
            self._answer(200, {"object": "list", "data": data})

        def do_POST(self):
            length = int(self.headers.get("Content-Length") or 0)
            try:
                body = json.loads(self.rfile.read(length) or b"{}")
            except ValueError:
                return self._answer(400, {"error": {"message": "invalid JSON", "code": 400}})
            with state.lock:
                state.calls.append((self.path, body))
                name, path = body.get("lora_name"), body.get("lora_path")
                if self.path == "/v1/load_lora_adapter":
                    if state.fail_loads:
                        state.fail_loads -= 1
                        return self._answer(500, {"error": {"message": "engine is restarting", "code": 500}})
                    if not name or not path:
                        return self._answer(400, {"error": {"message": "Both 'lora_name' and 'lora_path' must be "
                                                                       "provided.", "code": 400}})
                    if name in state.loaded:
                        return self._answer(400, {"error": {"message": f"The lora adapter '{name}' has already "
                                                                       "been loaded.", "code": 400}})
                    state.loaded[name] = path
                    return self._answer(200, f"Success: LoRA adapter '{name}' added successfully.")
                if self.path == "/v1/unload_lora_adapter":
                    if name not in state.loaded:
                        return self._answer(404, {"error": {"message": f"The lora adapter '{name}' cannot be "
                                                                       "found.", "code": 404}})
                    del state.loaded[name]
                    return self._answer(200, f"Success: LoRA adapter '{name}' removed successfully.")
            self._answer(404, {"error": "not found"})

    return Handler


@contextlib.contextmanager
def running_standin(base_model: str = "base") -> Iterator[tuple[str, VLLMStandIn]]:
    """(base URL, state) of a stand-in listening on 127.0.0.1."""
    state = VLLMStandIn(base_model)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", state
    finally:
        server.shutdown()
        server.server_close()
