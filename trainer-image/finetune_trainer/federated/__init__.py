"""Federated fine-tuning on Flower's deployment engine (docs/federated.md).

config      what each role reads; rendered by the operator (no torch, no flwr)
superlink   `finetune-trainer federation-superlink`: Flower's SuperLink
server      `finetune-trainer federation-server`: submits the run, runs the ServerApp
site        `finetune-trainer federation-site`: a SuperNode whose ClientApp trains on the site's data
"""
