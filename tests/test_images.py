"""format: image-text Datasets: every image found, decoded and digested; malformed and hostile images
refused with the line's number and field; standardised copies; PII in the text parts; the digest covers
the image bytes (an image replaced after validation changes it)."""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image

from finetune_operator.api.dataset import DatasetSpec
from finetune_trainer import images
from finetune_trainer.formats import parse_line
from finetune_trainer.validate import validate_source, validate_text


def board(path: Path, size=(32, 24), color=(0, 120, 0), fmt=None, mode="RGB") -> Path:
    Image.new(mode, size, color if mode == "RGB" else 0).save(path, format=fmt)
    return path


def line(image: str, answer: str, question: str = "What is on the board?") -> str:
    return json.dumps({"messages": [
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]},
        {"role": "assistant", "content": answer}]})


def spec(folder: Path, **curation) -> DatasetSpec:
    return DatasetSpec.model_validate({
        "source": {"uri": f"file://{folder}/data.jsonl"}, "format": "image-text",
        "evaluation": {"fraction": 0.2, "seed": 7}, "provenance": {"origin": "tests"},
        "curation": {"minExamples": 3, **curation}})


@pytest.fixture
def boards(tmp_path: Path) -> Path:
    (tmp_path / "img").mkdir()
    lines = []
    for i in range(10):
        board(tmp_path / "img" / f"b{i}.png", size=(32 + i, 24), color=(i * 20, 120, 0))
        lines.append(line(f"img/b{i}.png", f"Board {i}: no defect."))
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path


def test_valid_image_text_dataset_records_each_image_with_its_digest(boards):
    result = validate_source(spec(boards))
    assert result.valid, result.message
    stats = result.stats.images
    assert stats.images == stats.distinct == 10
    assert {e.name: e.count for e in stats.formats} == {"PNG": 10}
    assert {e.name: e.count for e in stats.modes} == {"RGB": 10}
    assert [(b.le, b.count) for b in stats.sideHistogram] == [(64, 10)]
    assert stats.bytes == sum(p.stat().st_size for p in (boards / "img").iterdir())
    # Relative paths become absolute URIs with the bytes' sha256: the trainer reads what was checked.
    (boards / "out").mkdir()
    result = validate_source(spec(boards), workdir=boards / "out")
    record = json.loads(result.train_path.read_text().splitlines()[0])
    part = record["messages"][0]["content"][0]
    assert part["image"].startswith(f"file://{boards}/img/b")
    data = Path(part["image"][len("file://"):]).read_bytes()
    import hashlib
    assert part["sha256"] == hashlib.sha256(data).hexdigest()
    assert parse_line(json.dumps(record), "image-text").images()[0].sha256 == part["sha256"]


def test_an_image_replaced_after_validation_changes_the_digest(boards):
    before = validate_source(spec(boards)).digest
    assert validate_source(spec(boards)).digest == before  # deterministic
    board(boards / "img" / "b3.png", size=(35, 24), color=(1, 2, 3))  # same name, new pixels
    after = validate_source(spec(boards))
    assert after.valid and after.digest != before


def _png_header(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    # A header and the start of the pixel data: Pillow knows the size without any pixel decoded.
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))


def _bad_images(folder: Path) -> dict[str, str]:
    """file name -> the problem its line must report."""
    board(folder / "ok.png")
    whole = (folder / "ok.png").read_bytes()
    big = folder / "big.png"
    board(big, size=(64, 64))
    (folder / "truncated.png").write_bytes(big.read_bytes()[: len(big.read_bytes()) // 2])
    board(folder / "photo.png", fmt="JPEG")  # a JPEG named .png
    (folder / "wide.png").write_bytes(_png_header(20000, 10))  # header only: refused before decoding
    (folder / "bomb.png").write_bytes(_png_header(8000, 8000))  # 64 Mpixel: a decompression bomb
    Image.new("CMYK", (16, 16)).save(folder / "cmyk.jpg")
    frames = [Image.new("RGB", (8, 8), (i * 80, 0, 0)) for i in range(3)]
    frames[0].save(folder / "anim.gif", save_all=True, append_images=frames[1:])
    (folder / "notes.txt.png").write_bytes(b"just some text, not a picture\n")
    os.symlink(folder / "ok.png", folder / "link.png")
    (folder.parent / "outside.png").write_bytes(whole)
    return {
        "missing.png": "image not found",
        "truncated.png": "truncated or corrupt",
        "photo.png": "the name ends in .png but the file is JPEG",
        "wide.png": "20000x10 pixels: a side over 8192",
        "bomb.png": "decompression bomb",
        "cmyk.jpg": "mode CMYK: convert it to RGB",
        "anim.gif": "animated (3 frames)",
        "notes.txt.png": "not an image Pillow can decode",
        "link.png": "symlink",
        "../outside.png": "may not hold '..'",
        "/etc/passwd": "unsupported image URI",
        "http://example.com/a.png": "unsupported image URI",
    }


def test_malformed_and_hostile_images_each_get_a_line_numbered_message(tmp_path):
    folder = tmp_path / "ds"
    folder.mkdir()
    cases = _bad_images(folder)
    good = [line("ok.png", f"Answer {i}.", question=f"Question {i}?") for i in range(4)]
    bad = [line(name, "A defect.") for name in cases]
    (folder / "data.jsonl").write_text("\n".join(good + bad) + "\n")
    result = validate_source(spec(folder, maxInvalidLines=100))
    assert result.valid, result.message  # the bad lines are dropped (tolerated), each one reported
    assert result.stats.invalidLines == len(cases)
    by_line = {e.line: e for e in result.errors}
    for number, (name, problem) in enumerate(cases.items(), start=len(good) + 1):
        error = by_line[number]
        assert error.field == "messages[0].content[0].image", (name, error)
        assert problem in error.problem, (name, error.problem)
        assert error.describe().startswith(f"line {number}: messages[0].content[0].image: ")
    strict = validate_source(spec(folder))
    assert not strict.valid and strict.reason == "TooManyInvalidLines"
    assert f"line {len(good) + 1}: messages[0].content[0].image: image not found" in strict.message


def test_a_symlinked_folder_cannot_lead_a_relative_path_out(tmp_path):
    folder, elsewhere = tmp_path / "ds", tmp_path / "secret"
    folder.mkdir(), elsewhere.mkdir()
    for i in range(4):
        board(elsewhere / f"s{i}.png")
    os.symlink(elsewhere, folder / "imgs")
    (folder / "data.jsonl").write_text("\n".join(line(f"imgs/s{i}.png", f"A{i}.") for i in range(4)) + "\n")
    result = validate_source(spec(folder))
    assert not result.valid
    assert "line 1: messages[0].content[0].image: the image's real path leaves the source's folder" in result.message


def test_a_sha256_on_the_line_must_match_the_bytes(boards):
    record = json.loads(line("img/b0.png", "Fine."))
    record["messages"][0]["content"][0]["sha256"] = "0" * 64
    text = (boards / "data.jsonl").read_text() + json.dumps(record) + "\n"
    result = validate_text(text, spec(boards), image_base=f"file://{boards}")
    assert not result.valid
    assert "line 11: messages[0].content[0].image: the image's sha256 is" in result.message


def test_malformed_parts_name_the_field():
    bad = {
        '{"messages": [{"role": "user", "content": [{"type": "video", "video": "a.mp4"}]}, '
        '{"role": "assistant", "content": "x"}]}': "messages[0].content[0].type: must be text or image, got 'video'",
        '{"messages": [{"role": "user", "content": []}, {"role": "assistant", "content": "x"}]}':
            "messages[0].content: a list of parts must not be empty",
        '{"messages": [{"role": "user", "content": [{"type": "image"}]}, {"role": "assistant", "content": "x"}]}':
            "messages[0].content[0].image: missing required field",
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": '
        '[{"type": "image", "image": "a.png"}]}]}': "messages[1].content: an assistant message cannot hold images",
    }
    from finetune_trainer.formats import FormatError
    for text, message in bad.items():
        with pytest.raises(FormatError) as exc:
            parse_line(text, "image-text")
        assert str(exc.value).startswith(message)


def test_pii_policy_applies_to_the_text_parts(boards):
    extra = line("img/b1.png", "Noted.", question="Send the report to jane.doe@example.com please")
    text = (boards / "data.jsonl").read_text() + extra + "\n"
    rejected = validate_text(text, spec(boards), image_base=f"file://{boards}")
    assert not rejected.valid and rejected.reason == "PIIFound" and "line 11" in rejected.message
    redacted = validate_text(text, spec(boards, piiPolicy="redact"), image_base=f"file://{boards}")
    assert redacted.valid
    out = redacted.train_jsonl + redacted.eval_jsonl
    assert "jane.doe@example.com" not in out and "Send the report to" in out
    assert out.count('"type":"image"') == 11  # the image parts are kept as they were


def test_standardisation_writes_resized_copies_beside_the_validated_files(tmp_path):
    (tmp_path / "img").mkdir()
    lines = []
    for i in range(6):
        board(tmp_path / "img" / f"p{i}.png", size=(400 + i, 200), mode="RGB", color=(i * 40, 0, 0))
        lines.append(line(f"img/p{i}.png", f"Board {i}."))
    Image.new("RGBA", (300, 300), (255, 0, 0, 0)).save(tmp_path / "img" / "alpha.png")
    lines.append(line("img/alpha.png", "Transparent board."))
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
    settings = {"images": {"maxSide": 100, "format": "JPEG"}}
    (tmp_path / "out").mkdir()
    result = validate_source(spec(tmp_path, **settings), workdir=tmp_path / "out")
    assert result.valid, result.message
    assert result.stats.images.standardised == "JPEG, longest side 100"
    copies = sorted(result.images_dir.iterdir())
    assert len(copies) == 7
    for copy in copies:
        with Image.open(copy) as im:
            assert im.format == "JPEG" and im.mode == "RGB" and max(im.size) == 100
    record = json.loads(result.train_path.read_text().splitlines()[0])
    part = record["messages"][0]["content"][0]
    assert part["image"].startswith("images/") and part["image"].endswith(".jpg")
    assert (tmp_path / "out" / part["image"]).is_file() and len(part["sourceSha256"]) == 64
    # what the trainer does with it: the copy, checked against its digest
    picture = images.load_verified(part["image"], part["sha256"], f"file://{tmp_path}/out")
    assert picture.mode == "RGB" and max(picture.size) == 100
    (tmp_path / "out" / part["image"]).write_bytes(copies[0].read_bytes() if copies[0].name not in part["image"]
                                                   else copies[1].read_bytes())
    with pytest.raises(images.ImageProblem, match="no longer match the validated sha256"):
        images.load_verified(part["image"], part["sha256"], f"file://{tmp_path}/out")


def test_the_command_on_s3_reads_relative_images_and_uploads_the_copies(tmp_path, bucket):
    import io
    import subprocess
    import sys

    from finetune_operator.api.trainer_config import ValidationConfig
    from finetune_trainer import storage

    lines = []
    for i in range(8):
        buf = io.BytesIO()
        Image.new("RGB", (120, 60), (i * 30, 0, 0)).save(buf, format="PNG")
        storage.write_bytes(f"s3://{bucket}/raw/pics/b{i}.png", buf.getvalue())
        lines.append(line(f"pics/b{i}.png", f"Board {i}."))
    lines.append(line("pics/gone.png", "Missing."))
    storage.write_text(f"s3://{bucket}/raw/data.jsonl", "\n".join(lines) + "\n")
    out = f"s3://{bucket}/validated/boards"
    dataset = spec(tmp_path, maxInvalidLines=1, images={"maxSide": 32}).model_dump(exclude_none=True)
    dataset["source"]["uri"] = f"s3://{bucket}/raw/data.jsonl"
    config = tmp_path / "validation.json"
    config.write_text(ValidationConfig.model_validate({
        "job": {"namespace": "team-a", "name": "boards"}, "dataset": dataset, "outputURI": out}).model_dump_json())
    proc = subprocess.run([sys.executable, "-m", "finetune_trainer.cli", "validate", "--config", str(config)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(storage.read_text(f"{out}/report.json"))
    assert report["valid"], report["message"]
    assert report["errors"][0]["line"] == 9 and report["errors"][0]["problem"] == "image not found"
    assert report["stats"]["images"]["images"] == 8
    record = json.loads(storage.read_text(f"{out}/train.jsonl").splitlines()[0])
    part = record["messages"][0]["content"][0]
    copy = images.load_verified(part["image"], part["sha256"], out)
    assert copy.size == (32, 16)
    assert len([k for k in storage.list_keys(f"{out}/images") if k.endswith(".png")]) == 8


def test_moving_the_dataset_folder_moves_no_example_between_the_splits(boards, tmp_path_factory):
    import shutil

    def held_out(folder: Path) -> set[str]:
        (folder / "out").mkdir(exist_ok=True)
        result = validate_source(spec(folder), workdir=folder / "out")
        return {json.loads(line)["messages"][0]["content"][0]["sha256"]
                for line in result.eval_path.read_text().splitlines()}

    moved = tmp_path_factory.mktemp("elsewhere") / "copy"
    shutil.copytree(boards, moved)
    assert held_out(moved) == held_out(boards) != set()
