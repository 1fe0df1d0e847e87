"""The Flower App's two components, as the App Bundle names them (finetune_trainer.federated.apps:…).

They live in the trainer image (no code travels in the bundle, and nothing is installed at run time).
"""

from __future__ import annotations

from flwr.serverapp import ServerApp

from . import client_app as _client
from .server_app import main

# Plain assignments: Flower checks the bundle's component references by reading this module.
client_app = _client.client_app
server_app = ServerApp()
server_app.main()(main)
