"""Fetch the base model once into a local cache, check its digest, load it with LoRA / QLoRA / DoRA."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import torch

from . import storage
from .errors import ConfigError
from .logs import get_logger

log = get_logger("model")

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
COMPUTE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def cache_root() -> Path:
    return Path(os.environ.get("FINETUNE_CACHE_DIR") or Path.home() / ".cache" / "finetune")


#: Inside a cached model folder: its digest, computed when it was downloaded (dotfiles are not
#: part of storage.folder_digest, so this does not change the digest it records).
DIGEST_FILE = ".digest"


def _check_digest(actual: str, uri: str, expected: Optional[str]) -> None:
    if expected and actual != expected:
        raise ConfigError(f"baseModel.digest mismatch for {uri}: expected {expected}, actual {actual}")


def model_digest(path: Path) -> str:
    """The folder digest of a fetched model, for the adapter manifest. Cached downloads carry it;
    a file:// folder is hashed once per content stamp (names, sizes, mtimes), memoized in the cache."""
    sidecar = path / DIGEST_FILE
    if sidecar.is_file():
        return sidecar.read_text().strip()
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    stamp = hashlib.sha256(json.dumps(
        [str(path)] + [(str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    ).encode()).hexdigest()
    memo = cache_root() / "digests" / stamp
    if memo.is_file():
        return memo.read_text().strip()
    digest = storage.folder_digest(path)
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        memo.write_text(digest)
    except OSError:
        pass  # a read-only cache only costs a re-hash next time
    return digest


def fetch_model(uri: str, digest: Optional[str]) -> Path:
    """A local folder holding the model at `uri` (verified against `digest` when given).

    s3:// models are downloaded once into the cache, keyed by URI + digest. The download
    goes to a temp dir that is renamed into place only when complete and verified, so a
    crash never leaves a half model that a later run would trust. file:// is used in place.
    """
    loc = storage.parse(uri)
    if loc.scheme == "file":
        path = Path(loc.key)
        if not (path / "config.json").is_file():
            raise ConfigError(f"baseModel.uri {uri}: no model found (config.json missing)")
        if digest:  # verification always hashes the files themselves
            _check_digest(storage.folder_digest(path), uri, digest)
        return path
    key = hashlib.sha256(f"{uri}\0{digest or ''}".encode()).hexdigest()[:32]
    root = cache_root()
    final = root / key
    if (final / "config.json").is_file():
        log.info("base model found in cache", extra={"event": "model_cache_hit", "uri": uri})
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".partial-{key}-"))
    try:
        try:
            storage.download_folder(uri, tmp)
        except ConfigError as exc:
            raise ConfigError(f"baseModel.uri: {exc}") from None
        if not (tmp / "config.json").is_file():
            raise ConfigError(f"baseModel.uri {uri}: no model found (config.json missing)")
        actual = storage.folder_digest(tmp)
        _check_digest(actual, uri, digest)
        (tmp / DIGEST_FILE).write_text(actual)
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished first: theirs is as good as ours
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("base model downloaded", extra={"event": "model_downloaded", "uri": uri})
    return final


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def effective_precision(precision: str, device: torch.device) -> str:
    """fp16 needs a GPU; on CPU it falls back to fp32 (with a warning)."""
    if precision == "fp16" and device.type != "cuda":
        log.warning("fp16 training needs a GPU; using fp32 on CPU", extra={"event": "precision_fallback"})
        return "fp32"
    return precision


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def weights_bytes(path: Path) -> int:
    """Bytes of the model's weight files (what the frozen base takes in memory at its stored dtype)."""
    return sum(p.stat().st_size for p in Path(path).glob("*.safetensors"))


def load_base_model(path: Path, *, precision: str, quantization=None, device: torch.device,
                    gradient_checkpointing: bool = False, quant_storage_as_compute: bool = False):
    """The frozen base model (4-bit with bitsandbytes when `quantization` is set).
    `quant_storage_as_compute`: store the packed 4-bit weights in the compute dtype, as FSDP needs
    to shard them alongside the other (bf16) parameters (peft's FSDP-QLoRA recipe)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    # Weights from safetensors only and no model code from the folder: a base model is user input,
    # and a pickle (pytorch_model.bin) or remote code would run in the pod (next to the governance
    # Job's signing key).
    kwargs = {"local_files_only": True, "dtype": DTYPES[precision], "attn_implementation": "sdpa",
              "use_safetensors": True, "trust_remote_code": False}
    if quantization is not None:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quantization.quantType,
            bnb_4bit_use_double_quant=quantization.doubleQuant,
            bnb_4bit_compute_dtype=COMPUTE_DTYPES[quantization.computeDtype],
            **({"bnb_4bit_quant_storage": COMPUTE_DTYPES[quantization.computeDtype]}
               if quant_storage_as_compute else {}),
        )
    if quantization is not None or device.type == "cuda":
        kwargs["device_map"] = {"": device}  # straight onto the GPU, not via a full copy in host memory
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"baseModel: cannot load model from {path}: {exc}") from None
    if "device_map" not in kwargs:
        model.to(device)
    model.config.use_cache = False
    for p in model.parameters():
        p.requires_grad_(False)
    if quantization is not None:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    elif gradient_checkpointing:
        kwargs = {"use_reentrant": False}  # non-reentrant: works with frozen inputs, keeps RNG for dropout
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model


def lora_config(method: str, lora):
    from peft import LoraConfig

    targets = lora.targetModules
    return LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
        target_modules="all-linear" if targets == ["all-linear"] else list(targets),
        layers_to_transform=list(lora.layersToTransform) if lora.layersToTransform else None,
        use_dora=method == "dora", bias="none", task_type="CAUSAL_LM",
    )


def build_peft_model(base, method: str, lora, base_model_uri: str):
    """The trainable model; adapter_config.json will name `base_model_uri` (set when saving)."""
    from peft import get_peft_model

    try:
        model = get_peft_model(base, lora_config(method, lora))
    except ValueError as exc:  # e.g. targetModules that match nothing
        raise ConfigError(f"lora.targetModules: {exc}") from None
    for cfg in model.peft_config.values():
        cfg.base_model_name_or_path = base_model_uri  # the URI, not this pod's cache path
    return model
