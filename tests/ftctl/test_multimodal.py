"""`ftctl run examples/multimodal/ --tiny`: the board-inspection example end to end on a tiny LLaVA built
from a config (validation of the images, training, every governance check with heatmaps, promotion),
through the real command line; and the committed example data is what its generator draws."""

from __future__ import annotations

import json
import shutil

from PIL import Image

from .conftest import REPO, ftctl

EXAMPLE = REPO / "examples" / "multimodal"


def test_the_multimodal_example_runs_end_to_end_with_tiny(tmp_path):
    shutil.copytree(EXAMPLE, tmp_path / "examples" / "multimodal")
    proc = ftctl("run", "examples/multimodal/", "--tiny", cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "format: image-text" in out or "board-inspections" in out
    assert "Governance: passed" in out and "promoted as board-inspector" in out
    assert "attribution heatmaps (integrated gradients (Captum) over pixel_values" in out
    run = tmp_path / ".finetune" / "runs" / "board-inspector-tiny"
    result = json.loads((run / "result.json").read_text())
    manifest = json.loads((run / "adapters" / result["digest"].split(":")[1] / "manifest.json").read_text())
    assert manifest["training"]["multimodal"]["parts"]["vision"]["mode"] == "frozen"
    pngs = sorted((run / "adapters" / result["digest"].split(":")[1] / "reports").glob("explain-*.png"))
    assert len(pngs) == 2 and all(str(p) in out for p in pngs)
    report = json.loads(next((tmp_path / ".finetune" / "datasets").rglob("report.json")).read_text())
    assert report["valid"] and report["stats"]["images"]["images"] == 100
    assert report["stats"]["images"]["standardised"] == "PNG, longest side 336"


def test_the_committed_boards_are_what_the_generator_draws(tmp_path):
    from finetune_trainer.boards import write_boards

    write_boards(tmp_path, 100, size=32, seed=0)
    assert (tmp_path / "data.jsonl").read_text() == (EXAMPLE / "data" / "data.jsonl").read_text()
    for drawn in sorted((tmp_path / "boards").iterdir()):
        with Image.open(drawn) as a, Image.open(EXAMPLE / "data" / "boards" / drawn.name) as b:
            assert a.tobytes() == b.tobytes(), drawn.name
