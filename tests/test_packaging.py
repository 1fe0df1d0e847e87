"""Packaging rules of the design card: light operator deps, two import names, no `operator` shadowing."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "transformers", "peft", "bitsandbytes", "accelerate")


def test_operator_runtime_dependencies_stay_light():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    runtime = " ".join(project["dependencies"]).lower()
    for heavy in HEAVY:
        assert heavy not in runtime, f"{heavy} must only be in the trainer extra"
    trainer = " ".join(project["optional-dependencies"]["trainer"])
    assert "torch==2.13.0" in trainer
    for heavy in HEAVY:
        assert heavy in trainer


def test_operator_code_never_imports_torch():
    code = ("import sys, importlib, pkgutil, finetune_operator\n"
            "for m in pkgutil.walk_packages(finetune_operator.__path__, 'finetune_operator.'):\n"
            "    if '.ftctl' in m.name or m.name.endswith('__main__'): continue\n"
            "    importlib.import_module(m.name)\n"
            "bad = [h for h in ('torch', 'transformers', 'peft') if h in sys.modules]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_no_top_level_operator_package():
    assert not (REPO / "operator" / "__init__.py").exists()
    assert (REPO / "operator" / "finetune_operator" / "__init__.py").exists()
    assert (REPO / "trainer-image" / "finetune_trainer" / "__init__.py").exists()
