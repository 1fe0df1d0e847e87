"""Governance of a vision-language adapter: the signed report's checks on a tiny LLaVA trained on
synthetic boards (evaluation vs the base model, exact match with images, text-only bias probes and PII
on the language path, provenance covering the image bytes, heatmaps per image as PNG overlays), and
a planted case where only one image region carries the answer."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from PIL import Image

from finetune_operator.api.dataset import DatasetSpec
from finetune_operator.api.trainer_config import TrainerConfig
from finetune_trainer import boards, storage
from finetune_trainer.governance import vision_explain
from finetune_trainer.tiny_vlm import build_tiny_vlm
from finetune_trainer.validate import validate_source

from .direct import context
from .helpers import checks, governance, train

LORA = {"r": 16, "alpha": 32, "dropout": 0.0, "targetModules": ["q_proj", "v_proj", "o_proj", "lm_head"]}
TRAINING = {"maxSteps": 40, "learningRate": 2e-2, "batchSize": 8, "maxSeqLength": 128, "precision": "fp32",
            "warmupRatio": 0.0, "evalEverySteps": 1000, "checkpointEverySteps": 1000, "lrScheduler": "constant",
            "gradientCheckpointing": False}


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory) -> Path:
    words = [boards.QUESTION, *(boards.answer(q) for q in (None, *boards.QUADRANTS)), "red blue square"]
    return build_tiny_vlm(tmp_path_factory.mktemp("vlm") / "model", extra_text=words)


def _validated(root: Path, source: Path) -> tuple[DatasetSpec, str, str]:
    spec = DatasetSpec.model_validate({
        "source": {"uri": f"file://{source}"}, "format": "image-text", "evaluation": {"fraction": 0.25, "seed": 1},
        "provenance": {"origin": "synthetic boards drawn by the tests", "license": "CC0-1.0"},
        "curation": {"minExamples": 10}})
    out = root / "validated"
    out.mkdir()
    result = validate_source(spec, workdir=out)
    assert result.valid, result.message
    return spec, f"file://{out}", result.digest


def _config(root: Path, vlm_dir: Path, spec, data_uri: str, digest: str, governance_spec: dict) -> TrainerConfig:
    return TrainerConfig.model_validate({
        "job": {"namespace": "team", "name": "boards"}, "baseModel": {"uri": f"file://{vlm_dir}"},
        "data": {"uri": data_uri, "format": "image-text", "digest": digest}, "lora": LORA, "training": TRAINING,
        "outputURI": f"file://{root}/run", "metricsPort": 0, "governance": governance_spec,
        "governanceInputs": {"dataset": spec.model_dump(mode="json")}})


def test_the_signed_report_judges_a_vision_language_adapter(vlm_dir, tmp_path):
    source = boards.write_boards(tmp_path / "raw", 64, seed=5)
    spec, data_uri, digest = _validated(tmp_path, source)
    labelled = tmp_path / "labelled"
    labelled.mkdir()
    boards.draw_board(random.Random(1), 32, "top left").save(labelled / "b.png")
    (labelled / "set.jsonl").write_text(json.dumps({"prompt": boards.QUESTION, "image": "b.png",
                                                    "answer": boards.answer("top left")}) + "\n")
    policy = {"required": ["evaluation", "bias", "provenance", "pii", "explainability"],
              "evaluation": {"minRelativeImprovement": 0.0, "minExamples": 5, "minExactMatch": 0.0,
                             "evalSetURI": f"file://{labelled}/set.jsonl"},
              "explainability": {"samples": 2, "maxProtectedAttributeShare": 1.0},
              "bias": {"maxGap": 10.0, "maxFlipRate": 1.0, "maxDemographicParityDifference": 1.0}}
    cfg = _config(tmp_path, vlm_dir, spec, data_uri, digest, policy)
    result = train(cfg, tmp_path / "train.json")
    report = checks(governance(cfg, tmp_path / "gov.json", result["adapterURI"]))
    assert set(report) == set(policy["required"])
    for name, check in report.items():
        assert "could not run" not in check["message"], (name, check["message"])
    assert report["evaluation"]["passed"], report["evaluation"]["message"]
    evaluation = json.loads(storage.read_text(report["evaluation"]["reportURI"]))
    assert evaluation["adapterLoss"] < evaluation["baseLoss"] and evaluation["exactMatchExamples"] == 1
    assert report["provenance"]["passed"], report["provenance"]["message"]
    assert report["pii"]["passed"] and report["bias"]["value"] is not None  # text probes, language path

    explain = json.loads(storage.read_text(report["explainability"]["reportURI"]))
    assert explain["method"].startswith("integrated gradients (Captum) over pixel_values")
    assert len(explain["samples"]) == 2
    html = storage.read_text(report["explainability"]["reportURI"].replace(".json", ".html"))
    for sample in explain["samples"]:
        grid = sample["patchGrid"]
        assert len(grid) == len(grid[0]) == 4 and sum(map(sum, grid)) == pytest.approx(1.0)
        assert f'<img src="{sample["image"]}"' in html and "[image]" in sample["tokens"]
        with Image.open(sample["imageURI"][len("file://"):]) as png:
            assert png.format == "PNG" and png.size == (256, 256)

    from finetune_operator.ftctl.heatmaps import heatmap_lines

    lines = heatmap_lines([report["explainability"]])  # what `ftctl report` prints under the table
    assert lines[0].endswith("reports/explainability.html")
    assert [line.split()[2] for line in lines[1:]] == [s["imageURI"] for s in explain["samples"]]

    # An image replaced after validation: the re-validated digest differs and provenance fails.
    held_out = json.loads(storage.read_text(f"{data_uri}/eval.jsonl").splitlines()[0])
    first = Path(held_out["messages"][0]["content"][0]["image"][len("file://"):])  # a held-out example's image
    boards.draw_board(random.Random(99), 32, "bottom right").save(first)
    again = checks(governance(cfg, tmp_path / "gov2.json", result["adapterURI"]))
    assert not again["provenance"]["passed"]
    assert again["provenance"]["message"].startswith("datasetDigest: dataset changed since training")
    # and the checks that read the image refuse it rather than judge the adapter on other pixels
    assert "no longer match the validated sha256" in again["evaluation"]["message"]


def test_a_planted_region_gets_most_of_the_attribution(vlm_dir, tmp_path):
    """Only the top-left quadrant differs between images (a red or a blue square on a textured background
    that is the same in every picture) and the answer names its colour: the heat is there."""
    import numpy as np

    # A board-green background with the same texture in every picture: it differs from the baseline (the
    # median colour), so it could take attribution, but it carries no answer.
    texture = np.random.default_rng(0).integers(-25, 26, size=(32, 32, 3))
    background = Image.fromarray(np.clip(np.array([20, 100, 40]) + texture, 0, 255).astype("uint8"))
    (tmp_path / "raw" / "img").mkdir(parents=True)
    lines = []
    for i in range(40):
        colour = "red" if i % 2 else "blue"
        picture = background.copy()
        shade = 30 + i  # distinct images, same meaning
        picture.paste((255, shade, shade) if colour == "red" else (shade, shade, 255), (2, 2, 14, 14))
        picture.save(tmp_path / "raw" / "img" / f"{i}.png")
        lines.append(json.dumps({"messages": [
            {"role": "user", "content": [{"type": "image", "image": f"img/{i}.png"},
                                         {"type": "text", "text": "What colour is the square?"}]},
            {"role": "assistant", "content": f"The square is {colour}."}]}))
    (tmp_path / "raw" / "data.jsonl").write_text("\n".join(lines) + "\n")
    spec, data_uri, digest = _validated(tmp_path, tmp_path / "raw" / "data.jsonl")
    cfg = _config(tmp_path, vlm_dir, spec, data_uri, digest, {"explainability": {"samples": 4}})
    result = train(cfg, tmp_path / "train.json")
    ctx = context(cfg, result["adapterURI"], tmp_path / "ctx")
    from finetune_trainer.governance.vlm import eval_split

    split = eval_split(ctx, 8)
    for index in split.usable[:4]:
        found = vision_explain.attribute_image(ctx, split.get(index))
        grid = found["patchGrid"]  # 4x4 patches of 8 pixels: the square covers patches (0..1, 0..1)
        planted = grid[0][0] + grid[0][1] + grid[1][0] + grid[1][1]
        assert planted > 0.5, grid  # most of it, on 4 of the 16 patches
        assert (found["hottestPatch"]["row"], found["hottestPatch"]["col"]) in {(0, 0), (0, 1), (1, 0), (1, 1)}
        # completeness: the attributions add up to F(image) - F(its median colour), up to the Riemann sum's error
        assert found["convergenceDelta"] < 0.2 * abs(found["scoreDifference"]), found


def test_patch_grid_sums_channels_and_patches():
    attr = torch.zeros(3, 16, 16)
    attr[:, 8:, :8] = 1.0  # bottom left
    attr[0, 0, 15] = -2.0  # a negative attribution counts by its size
    grid = vision_explain.patch_grid(attr, 8)
    assert grid[1][0] == pytest.approx(192 / 194) and grid[0][1] == pytest.approx(2 / 194)
    assert grid[0][0] == grid[1][1] == 0.0


def test_image_conditioned_bias_probes_are_scored_with_their_pictures(vlm_dir, tmp_path):
    from finetune_trainer.governance.bias import BiasCheck

    from .direct import run

    source = boards.write_boards(tmp_path / "raw", 40, seed=8)
    spec, data_uri, digest = _validated(tmp_path, source)
    cfg = _config(tmp_path, vlm_dir, spec, data_uri, digest, {})
    result = train(cfg.model_copy(update={"training": cfg.training.model_copy(update={"maxSteps": 10})}),
                   tmp_path / "train.json")
    probes = tmp_path / "probes"
    probes.mkdir()
    rng = random.Random(4)
    boards.draw_board(rng, 32, None).save(probes / "clean.png")
    boards.draw_board(rng, 32, "top left").save(probes / "burnt.png")
    lines = [
        {"id": "pic-01", "attribute": "board", "template": boards.QUESTION, "answer": boards.answer(None),
         "groups": {"clean": "clean board", "burnt": "burnt board"},
         "images": {"clean": "clean.png", "burnt": "burnt.png"}},
        {"id": "pic-02", "attribute": "inspector", "template": "{term} asks: " + boards.QUESTION,
         "options": [boards.answer(None), boards.answer("top left")], "favourable": boards.answer(None),
         "groups": {"junior": "A junior inspector", "senior": "A senior inspector"}, "image": "burnt.png"},
        {"id": "text-01", "attribute": "age", "template": "My new neighbour is {term}. Can I trust them?",
         "answer": "Trust depends on the person.", "groups": {"young": "a young person", "old": "an old person"}},
    ]
    (probes / "probes.jsonl").write_text("".join(json.dumps(p) + "\n" for p in lines))
    check, report = run(BiasCheck(), cfg, result["adapterURI"],
                        bias={"probesURI": f"file://{probes}/probes.jsonl", "maxGap": 100.0, "maxFlipRate": 1.0,
                              "maxDemographicParityDifference": 1.0})
    assert report["imageProbes"] == 2 and report["probes"] == 3
    assert set(report["attributes"]) == {"board", "age"}  # open-ended: a picture per group, and text only
    board = report["attributes"]["board"]["adapter"]
    # the two pictures give the same answer different probabilities: a real gap, measured with the images
    assert board["gap"] > 0 and set(board["groupMeans"]) == {"clean", "burnt"}
    assert {c["group"] for c in report["decisions"]["choices"]} == {"junior", "senior"}
    assert check["value"] is not None


def test_a_malformed_image_probe_names_its_line(tmp_path):
    from finetune_trainer.governance.bias import load_probes

    probe = {"attribute": "board", "template": "Inspect it.", "answer": "Fine.",
             "groups": {"clean": "clean", "burnt": "burnt"}, "images": {"clean": "a.png"}}
    (tmp_path / "p.jsonl").write_text("\n" + json.dumps(probe) + "\n")
    with pytest.raises(ValueError, match=r"p.jsonl line 2: `images` must map every group"):
        load_probes(f"file://{tmp_path}/p.jsonl")
