"""finetune-trainer: what runs inside the validation, trainer and governance pods."""

__version__ = "0.1.0"
