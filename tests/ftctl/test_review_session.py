"""ftctl review's session and screen without a terminal: what each key does to the store and to what is
shown (the tmux test drives the same through a real terminal)."""

from __future__ import annotations

import json

from synthetic_work import chat, make_candidates, write_work

from finetune_operator.api.synthetic import ReviewDecision
from finetune_operator.ftctl.review import Session, handle_key, screen
from finetune_trainer import review


def session_for(tmp_path, n=3, reviewer="ana"):
    work = f"file://{tmp_path}/work"
    cands = make_candidates(n)
    write_work(work, cands)
    loaded = review.load_candidates(work)
    return Session(work, reviewer, "team-a/faq-synth", loaded, review.pending(work, loaded)), cands


def test_keys_decide_move_and_wrap_around_to_what_is_left(tmp_path):
    session, cands = session_for(tmp_path)
    handle_key(session, "s")  # skip the first: still pending
    assert session.pos == 1 and "skipped" in session.message
    handle_key(session, "a")
    handle_key(session, "r")  # the last: back to the skipped one
    assert session.pos == 0 and session.left == 1
    decisions = review.load_decisions(session.work_uri)[0]
    assert (decisions[cands[1].id].verdict, decisions[cands[2].id].verdict) == ("accepted", "rejected")
    handle_key(session, "p")
    assert session.pos == 0  # nothing before the first
    handle_key(session, "x")
    assert session.error and "'x' is not a key" in session.message
    assert session.summary() == "2 decision(s) recorded by ana (1 accepted, 0 edited, 1 rejected)"


def test_a_later_decision_by_someone_else_is_said_and_kept(tmp_path):
    session, cands = session_for(tmp_path)
    future = ReviewDecision(id=cands[0].id, verdict="rejected", reviewer="bo", at="2999-01-01T00:00:00Z")
    review.record_decision(session.work_uri, future)
    handle_key(session, "a")
    assert session.error and "kept the later decision of bo (rejected" in session.message
    assert session.written["accepted"] == 0
    assert review.load_decisions(session.work_uri)[0][cands[0].id].reviewer == "bo"


def test_an_invalid_edit_is_kept_as_a_draft_and_a_valid_one_saved(tmp_path):
    session, cands = session_for(tmp_path)
    broken = '{\n  "messages": [{"role": "user", "content": "q"}]\n}'
    session.edited(broken)
    assert session.error and "needs at least one non-empty assistant message" in session.message
    assert session.edit_text() == broken  # the next `e` reopens what was typed
    assert review.load_decisions(session.work_uri)[0] == {}
    session.edited(json.dumps(cands[0].example))
    assert "unchanged: nothing recorded" in session.message
    session.edited(json.dumps(chat("How do I reset password number 0?", "Use the link.")))
    assert review.load_decisions(session.work_uri)[0][cands[0].id].verdict == "edited" and session.pos == 1


def test_the_screen_fits_80x24_whatever_the_example(tmp_path):
    session, cands = session_for(tmp_path, n=1, reviewer="a-reviewer-with-a-very-long-name@" + "h" * 80)
    long = chat("日本語の質問" * 40, "\n".join(f"line {i} " + "答え" * 50 for i in range(60)))
    session.items[0] = cands[0].model_copy(update={"example": long})
    for width, height in ((80, 24), (40, 12), (200, 60)):
        lines = screen(session, width, height)
        assert len(lines) == height and all(line.cell_len <= width for line in lines)
        assert lines[0].plain.startswith("1 of 1 pending")
        assert "more line(s)" in "".join(line.plain for line in lines)
    session.scroll = 10_000  # past the end: the last screenful
    assert "more line(s)" not in "".join(line.plain for line in screen(session, 80, 24))
