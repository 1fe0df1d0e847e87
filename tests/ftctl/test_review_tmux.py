"""`ftctl review` in a real terminal: tmux runs it in an 80x24 pane, the test presses keys and reads the
screen (`tmux capture-pane -p`), then checks the decisions in the work folder. And `--import`, locally and
against the emulated API server (the SyntheticDataset found by name, annotated afterwards)."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys

import pytest
from kubernetes import client, config
from synthetic_work import make_candidates, write_work
from tmux_pane import Pane
from typer.testing import CliRunner

from finetune_operator.ftctl.main import app
from finetune_trainer import review
from finetune_trainer.synthesis.records import candidate_id

from .conftest import NS, ftctl

#: The editor the test "types" in: a script that rewrites the example's answer -- or, for the candidate
#: about password number 3, saves an example that is not valid (a role that does not exist).
EDITOR = """\
import json, sys
path = sys.argv[1]
text = open(path).read()
if "number 3" in text:
    open(path, "w").write('{"messages": [{"role": "user", "content": "q"}, {"role": "robot", "content": "a"}]}')
else:
    example = json.loads(text)
    example["messages"][-1]["content"] = "Edited in tmux."
    open(path, "w").write(json.dumps(example, indent=2))
"""


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux (hack/test.sh installs Debian's package)")
def test_review_in_tmux_accept_reject_edit_and_quit(tmp_path):
    work = f"file://{tmp_path}/work"
    cands = make_candidates(4)
    write_work(work, cands)
    editor = tmp_path / "editor.py"
    editor.write_text(EDITOR)
    env = {"PYTHONPATH": os.environ.get("PYTHONPATH", ""), "EDITOR": f"{sys.executable} {editor}",
           "FTCTL_REVIEWER": "tess@review-host", "TERM": "tmux-256color", "LANG": "C.UTF-8"}
    command = f"{shlex.quote(sys.executable)} -m finetune_operator.ftctl.main review --work-uri {work}"
    pane = Pane(tmp_path, command, env)
    try:
        first = pane.wait_for("1 of 4 pending")
        lines = first.split("\n")
        assert len(lines) >= 24 and all(len(line) <= 80 for line in lines)
        assert "How do I reset password number 0?" in first and "rougeL 0.1" in first
        assert f"seed {cands[0].lineage.seedDigest[7:19]}" in first and "a accept · r reject · e edit" in first

        pane.keys("a")
        pane.wait_for("2 of 4 pending")
        pane.keys("r")
        pane.wait_for("3 of 4 pending")
        decisions = review.load_decisions(work)[0]
        assert decisions[cands[0].id].verdict == "accepted" and decisions[cands[1].id].verdict == "rejected"
        assert decisions[cands[0].id].reviewer == "tess@review-host"  # written at the key press, not at quit

        pane.keys("e")
        shown = pane.wait_for("4 of 4 pending")
        assert f"edited: {cands[2].id}" in shown
        edited = review.load_decisions(work)[0][cands[2].id]
        assert edited.verdict == "edited" and edited.example["messages"][1]["content"] == "Edited in tmux."

        pane.keys("e")  # this edit does not validate: nothing saved, the error on screen
        shown = pane.wait_for("not saved")
        assert "messages[1].role" in shown and cands[3].id not in review.load_decisions(work)[0]

        pane.keys("p")
        shown = pane.wait_for("3 of 4 pending")
        assert "decided: edited by tess@review-host" in shown and "Edited in tmux." in shown
        pane.keys("Right")  # arrows arrive as escape sequences
        pane.wait_for("4 of 4 pending")
        pane.keys("Left")
        pane.wait_for("3 of 4 pending")

        pane.keys("q")
        shown = pane.wait_for("[exit 0]")
        assert "3 decision(s) recorded by tess@review-host (1 accepted, 1 edited, 1 rejected)" in shown
        assert "1 of 4 sampled candidates await review" in shown
    finally:
        pane.close()
    assert [c.id for c in review.pending(work)] == [cands[3].id]


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux (hack/test.sh installs Debian's package)")
def test_review_without_an_editor_edits_inline_and_never_lets_an_example_drive_the_terminal(tmp_path):
    work = f"file://{tmp_path}/work"
    cands = make_candidates(2)
    hostile = {"messages": [{"role": "user", "content": "Hi"},
                            {"role": "assistant", "content": "ok \x1b]2;PWNED\x07 \x1b[2J\x1b[31mred"}]}
    cands[1] = cands[1].model_copy(update={"example": hostile, "id": candidate_id(hostile)})
    write_work(work, cands)
    (tmp_path / "bin").mkdir()  # a PATH without any editor, and no $EDITOR / $VISUAL
    env = {"PYTHONPATH": os.environ.get("PYTHONPATH", ""), "PATH": str(tmp_path / "bin"), "EDITOR": "",
           "VISUAL": "", "FTCTL_REVIEWER": "ines", "TERM": "screen", "LANG": "C.UTF-8"}
    command = f"{shlex.quote(sys.executable)} -m finetune_operator.ftctl.main review --work-uri {work}"
    pane = Pane(tmp_path, command, env)
    try:
        pane.wait_for("1 of 2 pending")
        pane.keys("e")
        pane.wait_for("new answer")
        pane.keys("Use the reset link.\\nThen sign in.", "Enter")
        shown = pane.wait_for("2 of 2 pending")
        assert f"edited: {cands[0].id}" in shown
        edited = review.load_decisions(work)[0][cands[0].id]
        assert edited.example["messages"][1]["content"] == "Use the reset link.\nThen sign in."
        assert "\\x1b]2;PWNED\\x07" in shown and "\\x1b[2J" in shown  # shown escaped, not obeyed
        assert pane.tmux("display-message", "-p", "-t", "review", "#{pane_title}").strip() != "PWNED"
        pane.keys("q")
        pane.wait_for("[exit 0]")
    finally:
        pane.close()


def test_import_prints_the_counts_and_needs_no_terminal(tmp_path):
    work = f"file://{tmp_path}/work"
    cands = make_candidates(3)
    write_work(work, cands)
    export = tmp_path / "argilla.jsonl"
    export.write_text("".join(json.dumps({**c.example, "status": s, "annotator": "kim"}) + "\n"
                              for c, s in zip(cands, ["accepted", "discarded", "accepted"])))
    result = ftctl("review", "--work-uri", work, "--import", str(export), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "imported 3 (2 accepted, 0 edited, 1 rejected)" in result.stdout
    assert "review passed" not in result.stdout  # 2 of 3 is below the default 80%
    assert "66.7% is below minAcceptanceRate 80.0%" in result.stdout
    interactive = ftctl("review", "--work-uri", work, cwd=tmp_path)  # nothing left: says so, no terminal needed
    assert interactive.returncode == 0 and "nothing to review" in interactive.stdout
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"status": "accepted"}\n{oops\n')
    failed = ftctl("review", "--work-uri", work, "--import", str(bad), cwd=tmp_path)
    assert failed.returncode == 1 and failed.stderr.startswith("error: nothing imported: 1 bad line(s): line 2: json")
    assert "Traceback" not in failed.stderr
    wrong = ftctl("review", "--work-uri", "http://example.com/work", cwd=tmp_path)
    assert wrong.returncode == 2 and "--work-uri: http://example.com/work: unsupported URI scheme" in wrong.stderr


def test_review_finds_the_synthetic_dataset_on_the_cluster_and_annotates_it(k8s, tmp_path):
    work = f"file://{tmp_path}/work"
    cands = make_candidates(2)
    write_work(work, cands)
    api = client.CustomObjectsApi(config.new_client_from_config(config_file=str(k8s.kubeconfig)))
    body = {"apiVersion": "finetune.dev/v1alpha1", "kind": "SyntheticDataset", "metadata": {"name": "faq-synth"},
            "spec": {"seed": {"dataset": "faq"}, "generator": {"baseModel": {"uri": "file:///models/base"}},
                     "examples": 2, "review": {"minAcceptanceRate": 0.5}}}
    api.create_namespaced_custom_object("finetune.dev", "v1alpha1", NS, "syntheticdatasets", body)
    runner = CliRunner()
    early = runner.invoke(app, ["--kubeconfig", str(k8s.kubeconfig), "review", "faq-synth", "--import", "x.jsonl"])
    assert early.exit_code == 1 and "has no work folder yet" in early.output
    api.patch_namespaced_custom_object_status("finetune.dev", "v1alpha1", NS, "syntheticdatasets", "faq-synth",
                                              {"status": {"phase": "Reviewing", "workURI": work}})
    decisions = tmp_path / "decisions.jsonl"
    decisions.write_text("".join(json.dumps({"id": c.id, "verdict": v, "reviewer": "ops", "at": review.now()}) + "\n"
                                 for c, v in zip(cands, ["accepted", "rejected"])))
    result = runner.invoke(app, ["--kubeconfig", str(k8s.kubeconfig), "review", "faq-synth",
                                 "--import", str(decisions)])
    assert result.exit_code == 0, result.output
    assert "imported 2 (1 accepted, 0 edited, 1 rejected)" in result.output
    assert "review passed" in result.output  # 1 of 2 meets this object's minAcceptanceRate 0.5
    obj = api.get_namespaced_custom_object("finetune.dev", "v1alpha1", NS, "syntheticdatasets", "faq-synth")
    stamp = obj["metadata"]["annotations"]["finetune.dev/reviewed-at"]
    assert review.parse_time(stamp) <= review.parse_time(review.now())
