"""Fine-tuning a vision-language model on image-text data: a tiny LLaVA built from a config (CLIP
tower, MLP projector, Llama text model; random weights) trained on synthetic circuit boards.

Training lowers the held-out loss; only the intended parts change (the frozen encoder is not in the
adapter and stays bit-identical, the projector and LoRA change); each part is its own optimizer
group at the spec's learning rate; the loss is on assistant tokens only; a resumed run ends with
the same adapter as an uninterrupted one; the manifest records the parts trained."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from finetune_operator.api.dataset import DatasetSpec
from finetune_trainer import boards, storage, vision
from finetune_trainer.data import read_examples
from finetune_trainer.tiny_vlm import build_tiny_vlm
from finetune_trainer.validate import validate_source

from .helpers import read_json, trainer_config, write_config


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory) -> Path:
    words = [boards.QUESTION, *(boards.answer(q) for q in (None, *boards.QUADRANTS))]
    return build_tiny_vlm(tmp_path_factory.mktemp("vlm") / "model", extra_text=words)


@pytest.fixture(scope="module")
def board_data(tmp_path_factory) -> str:
    """Validated synthetic boards (train.jsonl / eval.jsonl with verified image URIs); returns the folder URI."""
    root = tmp_path_factory.mktemp("boards")
    source = boards.write_boards(root / "raw", 72, seed=3)
    out = root / "validated"
    out.mkdir()
    spec = DatasetSpec.model_validate({"source": {"uri": f"file://{source}"}, "format": "image-text",
                                       "evaluation": {"fraction": 0.2, "seed": 1}, "provenance": {"origin": "tests"},
                                       "curation": {"minExamples": 10}})
    result = validate_source(spec, workdir=out)
    assert result.valid, result.message
    return f"file://{out}"


def config(vlm_dir, data_uri, output, multimodal=None, **training):
    settings = {"maxSteps": 40, "batchSize": 8, "maxSeqLength": 128, "learningRate": 2e-2, **training}
    extra = {"multimodal": multimodal} if multimodal is not None else {}
    return trainer_config(model_uri=f"file://{vlm_dir}", data_uri=data_uri, output_uri=output, fmt="image-text",
                          training=settings, lora={"targetModules": ["q_proj", "v_proj"]}, **extra)


def test_labels_are_the_assistant_text_only(vlm_dir, board_data):
    model, processor = vision.load_base(vlm_dir, precision="fp32", device=torch.device("cpu"))
    example = read_examples(board_data, "train.jsonl", "image-text")[0]
    encoded = vision.encode(example, processor, board_data, 128)
    ids, labels = encoded.inputs["input_ids"][0], encoded.labels[0]
    image_token = processor.image_token_id
    assert int((ids == image_token).sum()) == 16  # 32x32 pixels in 8x8 patches
    assert bool((labels[ids == image_token] == vision.IGNORE).all())
    target_text = processor.tokenizer.decode(ids[labels != vision.IGNORE])
    assert target_text.startswith(example.messages[-1][1]) and boards.QUESTION not in target_text
    assert encoded.inputs["pixel_values"].shape == (1, 3, 32, 32)


def test_each_part_is_its_own_parameter_group_at_its_rate(vlm_dir):
    cfg = config(vlm_dir, "file:///unused", "file:///unused",
                 multimodal={"visionEncoder": "lora", "visionLearningRate": 1e-5, "projectorLearningRate": 2e-3})
    model, _ = vision.load_base(vlm_dir, precision="fp32", device=torch.device("cpu"))
    groups = {g["name"]: g for g in vision.param_groups(vision.build_peft(model, cfg), cfg)}
    assert {n: g["lr"] for n, g in groups.items()} == {"vision": 1e-5, "projector": 2e-3, "language": 2e-2}
    optimizer = torch.optim.AdamW(list(groups.values()), lr=1.0)
    assert sorted(g["lr"] for g in optimizer.param_groups) == [1e-5, 2e-3, 2e-2]

    frozen = config(vlm_dir, "file:///unused", "file:///unused", multimodal={"projector": "frozen"})
    model, _ = vision.load_base(vlm_dir, precision="fp32", device=torch.device("cpu"))
    peft_model = vision.build_peft(model, frozen)
    assert [g["name"] for g in vision.param_groups(peft_model, frozen)] == ["language"]
    parts = vision.trained_parts(peft_model, frozen)
    assert parts["vision"] == {"mode": "frozen", "trainableParams": 0}
    assert parts["projector"]["mode"] == "frozen" and parts["language"]["trainableParams"] > 0

    full = config(vlm_dir, "file:///unused", "file:///unused", multimodal={"visionEncoder": "full"})
    model, _ = vision.load_base(vlm_dir, precision="fp32", device=torch.device("cpu"))
    n_vision = sum(p.numel() for n, p in model.named_parameters() if vision.part_of(n) == "vision")
    assert vision.trained_parts(vision.build_peft(model, full), full)["vision"]["trainableParams"] == n_vision


def test_training_lowers_held_out_loss_and_changes_only_the_intended_parts(vlm_dir, board_data, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file

    from finetune_trainer import train

    out = f"file://{tmp_path / 'run'}"
    cfg = config(vlm_dir, board_data, out, multimodal={"projectorLearningRate": 1e-2})
    base, processor = vision.load_base(vlm_dir, precision="fp32", device=torch.device("cpu"))
    evals = vision.Examples(read_examples(board_data, "eval.jsonl", "image-text"), processor, board_data, 128)
    before = vision.evaluate(base, evals, batch_size=8, pad_id=processor.tokenizer.pad_token_id,
                             device=torch.device("cpu"))
    assert train.run(str(write_config(cfg, tmp_path / "config.json"))) == 0
    result = read_json(f"{out}/result.json")
    assert result["metrics"]["evalLoss"] < before - 0.5, (before, result["metrics"])

    folder = Path(result["adapterURI"][len("file://"):])
    manifest = json.loads((folder / "manifest.json").read_text())
    parts = manifest["training"]["multimodal"]["parts"]
    assert parts["vision"] == {"mode": "frozen", "trainableParams": 0}
    assert parts["projector"]["mode"] == "full" and parts["projector"]["learningRate"] == 1e-2
    assert parts["language"]["mode"] == "lora" and manifest["dataset"]["format"] == "image-text"
    weights = load_file(folder / "adapter_model.safetensors")
    assert not [k for k in weights if vision.part_of(k) == "vision"]  # the frozen encoder is not in the adapter
    assert any("multi_modal_projector" in k for k in weights) and any("lora_B" in k for k in weights)

    original = {n: p.clone() for n, p in base.named_parameters()}
    tuned = PeftModel.from_pretrained(base, str(folder))
    changed = {vision.part_of(n) for n, p in tuned.base_model.model.named_parameters()
               if ".modules_to_save." in n or "lora_B" in n
               if not torch.equal(p, original.get(n.replace(".modules_to_save.default", ""), torch.zeros_like(p)))}
    assert changed == {"projector", "language"}
    for n, p in tuned.base_model.model.named_parameters():
        if vision.part_of(n) == "vision":
            assert torch.equal(p, original[n]), n  # bit-identical
    after = vision.evaluate(tuned, evals, batch_size=8, pad_id=processor.tokenizer.pad_token_id,
                            device=torch.device("cpu"))
    assert after == pytest.approx(result["metrics"]["evalLoss"], rel=1e-4)  # the adapter as published


def test_a_resumed_run_ends_with_the_same_adapter(vlm_dir, board_data, tmp_path):
    from finetune_trainer import checkpoint, train

    out = f"file://{tmp_path / 'run'}"
    cfg = config(vlm_dir, board_data, out, maxSteps=4, checkpointEverySteps=2, keepCheckpoints=3)
    path = write_config(cfg, tmp_path / "config.json")
    assert train.run(str(path)) == 0
    uninterrupted = read_json(f"{out}/result.json")["digest"]
    assert checkpoint.list_steps(out) == [4, 2]
    storage.delete_prefix(checkpoint.step_uri(out, 4))  # as if the pod died after step 2's checkpoint
    storage.delete_prefix(f"{out}/adapters")
    storage.delete(f"{out}/result.json")
    assert train.run(str(path)) == 0
    assert read_json(f"{out}/result.json")["digest"] == uninterrupted


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_a_trained_vision_encoder_is_saved_with_the_adapter(vlm_dir, board_data, tmp_path, mode):
    from peft import PeftModel
    from safetensors.torch import load_file

    from finetune_trainer import train

    out = f"file://{tmp_path / 'run'}"
    cfg = config(vlm_dir, board_data, out, maxSteps=3,
                 multimodal={"visionEncoder": mode, "visionLearningRate": 1e-2, "projector": "frozen"})
    assert train.run(str(write_config(cfg, tmp_path / "config.json"))) == 0
    folder = Path(read_json(f"{out}/result.json")["adapterURI"][len("file://"):])
    parts = json.loads((folder / "manifest.json").read_text())["training"]["multimodal"]["parts"]
    assert parts["vision"]["mode"] == ("lora" if mode == "lora" else "full") and parts["vision"]["learningRate"] == 1e-2
    assert parts["projector"] == {"mode": "frozen", "trainableParams": 0}
    weights = load_file(folder / "adapter_model.safetensors")
    vision_keys = [k for k in weights if vision.part_of(k) == "vision"]
    assert vision_keys and not [k for k in weights if vision.part_of(k) == "projector"]
    base, _ = vision.load_base(vlm_dir, precision="fp32", device=torch.device("cpu"))
    original = {n: p.clone() for n, p in base.named_parameters() if vision.part_of(n) == "vision"}
    tuned = PeftModel.from_pretrained(base, str(folder)).merge_and_unload()
    changed = [n for n, p in tuned.named_parameters() if n in original and not torch.equal(p, original[n])]
    assert changed  # the encoder the adapter carries is not the base's


def test_multimodal_settings_on_text_data_are_a_configuration_error(tmp_path):
    from finetune_trainer import train
    from finetune_trainer.errors import ConfigError

    cfg = trainer_config(model_uri="file:///unused", data_uri="file:///unused", output_uri=f"file://{tmp_path}",
                         fmt="chat", multimodal={"visionEncoder": "full"})
    with pytest.raises(ConfigError, match="spec.multimodal needs a Dataset of format image-text; this one is chat"):
        train.run(str(write_config(cfg, tmp_path / "config.json")))
