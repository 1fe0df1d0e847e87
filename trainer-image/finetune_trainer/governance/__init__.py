"""Governance checks run on a trained adapter before it may be promoted.

`finetune-trainer governance --config job.json` (runner.py) runs every check the
effective policy requires and writes governance.json next to the adapter.
"""
