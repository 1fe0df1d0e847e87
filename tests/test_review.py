"""Human review of synthetic candidates (finetune_trainer.review): the decision store, imports (ours and
Argilla-shaped), where the review stands, and the reviewed file with its lineage."""

from __future__ import annotations

import hashlib
import json
import threading
from datetime import datetime, timedelta, timezone

import pytest
from synthetic_work import LINEAGE, chat, digest, jsonl, make_candidates, write_work

from finetune_operator.api.synthetic import (ReviewDecision, ReviewSettings, ReviewStats, SynthesisConfig,
                                             SynthesisInputs, SyntheticDatasetSpec)
from finetune_trainer import formats, review, storage
from finetune_trainer.synthesis import records


@pytest.fixture()
def work(tmp_path):
    uri = f"file://{tmp_path}/work"
    cands = make_candidates(6, sampled={0, 1, 2, 3, 4})  # the 6th is not sampled
    write_work(uri, cands)
    return uri, cands


def decide(cand, verdict="accepted", who="ana", at=None, example=None):
    return ReviewDecision(id=cand.id, verdict=verdict, reviewer=who, example=example,
                          at=at or review.now())


def config_for(uri, fraction=5 / 6, min_rate=0.8):
    spec = SyntheticDatasetSpec.model_validate({
        "seed": {"dataset": "faq"}, "generator": {"baseModel": {"uri": "file:///models/base"}}, "examples": 6,
        "review": {"fraction": fraction, "minAcceptanceRate": min_rate}})
    inputs = SynthesisInputs(seedURI="file:///seed", seedFormat="chat", seedDigest=LINEAGE.seedDigest,
                             baseModel={"uri": "file:///models/base"})
    return SynthesisConfig(namespace="team-a", name="faq-synth", spec=spec, inputs=inputs, workURI=uri)


# --- the store --------------------------------------------------------------------------------------------

def test_decisions_are_stored_per_candidate_and_pending_keeps_file_order(work):
    uri, cands = work
    assert [c.id for c in review.pending(uri)] == [c.id for c in cands[:5]]
    review.record_decision(uri, decide(cands[1], "rejected", at="2026-12-01T10:00:00+02:00"))
    review.record_decision(uri, decide(cands[3]))
    decisions, problems = review.load_decisions(uri)
    assert problems == [] and set(decisions) == {cands[1].id, cands[3].id}
    assert decisions[cands[1].id].at == "2026-12-01T08:00:00.000000Z"  # stored in UTC
    assert storage.exists(storage.join(uri, "reviews", f"{cands[1].id}.json"))
    assert [c.id for c in review.pending(uri)] == [cands[0].id, cands[2].id, cands[4].id]


def test_hostile_decisions_are_refused_with_the_field_named(work):
    uri, cands = work
    with pytest.raises(review.ReviewError, match="not a candidate"):
        review.record_decision(uri, decide(cands[0]).model_copy(update={"id": "0123456789abcdef"}))
    traversal = ReviewDecision.model_construct(id="../../../etc/pw", verdict="accepted", reviewer="x",
                                               at=review.now(), via="ftctl", note="", example=None)
    with pytest.raises(review.ReviewError, match="id: must be 16 lower-case hex digits"):
        review.record_decision(uri, traversal)
    bad_edit = {"messages": [{"role": "user", "content": "q"}, {"role": "robot", "content": "a"}]}
    with pytest.raises(review.ReviewError, match=r"example\.messages\[1\]\.role"):
        review.record_decision(uri, decide(cands[0], "edited", example=bad_edit))
    with pytest.raises(review.ReviewError, match="example.metadata"):
        review.record_decision(uri, decide(cands[0], "edited", example={**cands[0].example, "metadata": {}}))
    with pytest.raises(review.ReviewError, match="at: not an RFC 3339 time"):
        review.record_decision(uri, decide(cands[0], at="yesterday"))
    with pytest.raises(review.ReviewError, match="example: not valid JSON .* at line 2 column 15"):
        review.parse_edit_text('{\n "messages": [', "chat")
    assert review.load_decisions(uri) == ({}, [])  # nothing was written
    # an "edit" that changed nothing is an acceptance
    same = review.record_decision(uri, decide(cands[0], "edited", example=dict(cands[0].example)))
    assert same.decision.verdict == "accepted" and same.decision.example is None


def test_a_later_decision_on_the_same_candidate_stands_whatever_the_write_order(work):
    uri, cands = work
    t0 = datetime(2026, 12, 1, 9, tzinfo=timezone.utc)
    later = decide(cands[0], "rejected", who="bo", at=review.rfc3339(t0 + timedelta(seconds=1)))
    earlier = decide(cands[0], "accepted", who="ana", at=review.rfc3339(t0))
    assert review.record_decision(uri, later).written
    kept = review.record_decision(uri, earlier)  # arrives last, decided first: does not replace it
    assert not kept.written and kept.decision.reviewer == "bo"
    assert review.load_decisions(uri)[0][cands[0].id].verdict == "rejected"
    assert review.record_decision(uri, decide(cands[0], "accepted", who="ana")).written  # decided now: stands


def test_two_reviewers_at_once_lose_no_decision(tmp_path):
    uri = f"file://{tmp_path}/work"
    cands = make_candidates(40)
    write_work(uri, cands)
    loaded = review.load_candidates(uri)
    errors = []

    def reviewer(who, mine):
        try:
            for cand in mine:
                review.record_decision(uri, decide(cand, "accepted" if who == "ana" else "rejected", who), loaded)
        except Exception as exc:  # noqa: BLE001 - surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=reviewer, args=("ana", cands[0::2])),
               threading.Thread(target=reviewer, args=("bo", cands[1::2]))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    decisions, problems = review.load_decisions(uri)
    assert errors == [] and problems == [] and len(decisions) == 40
    assert {d.reviewer for i, d in enumerate(decisions[c.id] for c in cands) if i % 2 == 0} == {"ana"}
    stats = review.summarize(uri, ReviewSettings())
    assert (stats.accepted, stats.rejected, stats.pending) == (20, 20, 0)


def test_unreadable_decision_objects_are_reported_not_a_crash(work):
    uri, cands = work
    review.record_decision(uri, decide(cands[0]))
    storage.write_text(storage.join(uri, "reviews", f"{cands[1].id}.json"), "{not json")
    storage.write_text(storage.join(uri, "reviews", f"{cands[2].id}.json"),
                       decide(cands[3]).model_dump_json())  # the wrong id inside
    storage.write_text(storage.join(uri, "reviews", "notes.txt"), "hello")
    storage.write_bytes(storage.join(uri, "reviews", f"{cands[4].id}.json"), b" " * (review.MAX_DECISION_BYTES + 1))
    decisions, problems = review.load_decisions(uri)
    assert list(decisions) == [cands[0].id]
    text = "\n".join(problems)
    assert len(problems) == 4 and "not valid JSON" in text and f"not {cands[2].id}" in text
    assert "notes.txt: not a decision" in text and "larger than" in text
    found: list[str] = []
    stats = review.summarize(uri, ReviewSettings(), found)
    assert stats.reviewed == 1 and len(found) == 4
    with pytest.raises(review.ReviewError, match="4 decision object"):
        review.materialize(config_for(uri))


# --- where the review stands ------------------------------------------------------------------------------

def test_review_outcome_needs_every_sampled_candidate_and_the_acceptance_rate():
    settings = ReviewSettings(minAcceptanceRate=0.8)
    status, message = review.review_outcome(ReviewStats(required=5, reviewed=4, accepted=4, pending=1), settings)
    assert status == "pending" and "1 of 5 sampled candidates await review" in message
    status, message = review.review_outcome(ReviewStats(required=5, reviewed=5, accepted=3, edited=1, rejected=1),
                                            settings)
    assert status == "passed" and "4 of 5 reviewed accepted" in message and "80.0%" in message  # exactly 0.8
    status, message = review.review_outcome(ReviewStats(required=5, reviewed=5, accepted=3, rejected=2), settings)
    assert status == "failed" and "60.0% is below minAcceptanceRate 80.0%" in message and "2 rejected" in message
    assert review.review_outcome(ReviewStats(), settings)[0] == "failed"


def test_summarize_follows_new_decisions_and_counts_only_sampled_ones(work):
    uri, cands = work
    settings = ReviewSettings(fraction=5 / 6)
    assert review.summarize(uri, settings) == ReviewStats(required=5, pending=5)
    review.record_decision(uri, decide(cands[0]))
    review.record_decision(uri, decide(cands[5], "rejected"))  # not sampled: no count here
    stats = review.summarize(uri, settings)
    assert (stats.reviewed, stats.accepted, stats.rejected, stats.pending) == (1, 1, 0, 4)
    review.record_decision(uri, decide(cands[0], "rejected"))  # a changed decision is read again
    stats = review.summarize(uri, settings)
    assert (stats.accepted, stats.rejected, stats.acceptanceRate) == (0, 1, 0.0)
    storage.delete(storage.join(uri, "reviews", f"{cands[0].id}.json"))
    assert review.summarize(uri, settings).reviewed == 0


def test_summarize_on_s3_lists_once_and_reads_only_new_decisions(bucket):
    uri = f"s3://{bucket}/synth/work"
    cands = make_candidates(30)
    write_work(uri, cands)
    review.import_decisions(uri, jsonl([{"id": c.id, "status": "accepted"} for c in cands[:20]]), "ana")
    calls: list[str] = []

    def count(model, **_):
        calls.append(model.name)

    clients = [storage.s3_client(), storage.s3_client(validate_checksums=False)]
    for s3 in clients:
        s3.meta.events.register("before-call.s3", count)
    try:
        assert review.summarize(uri, ReviewSettings()).reviewed == 20  # the first call reads everything
        calls.clear()
        review.record_decision(uri, decide(cands[25], "rejected"))
        calls.clear()
        stats = review.summarize(uri, ReviewSettings())
    finally:
        for s3 in clients:
            s3.meta.events.unregister("before-call.s3", count)
    assert (stats.reviewed, stats.rejected, stats.pending) == (21, 1, 9)
    # generation.json, one listing, the one new decision: not the 20 already read, not candidates.jsonl
    assert sorted(calls) == ["GetObject", "GetObject", "ListObjectsV2"], calls


# --- imports ----------------------------------------------------------------------------------------------

def test_import_of_our_own_decision_lines_is_idempotent(work):
    uri, cands = work
    lines = jsonl([decide(c, "accepted", who="ana", at="2026-12-01T09:00:00Z").model_dump(exclude_none=True)
                   for c in cands[:3]])
    result = review.import_decisions(uri, lines, "importer")
    assert result.imported == {"accepted": 3, "edited": 0, "rejected": 0} and result.unknown == []
    again = review.import_decisions(uri, lines, "importer")
    assert sum(again.imported.values()) == 0 and again.unchanged == 3
    decisions, _ = review.load_decisions(uri)
    assert {d.via for d in decisions.values()} == {"import"} and {d.reviewer for d in decisions.values()} == {"ana"}


def test_import_of_an_argilla_export_matches_by_id_and_by_content(work):
    uri, cands = work
    ex = [c.example for c in cands]
    records = [
        # v1 FeedbackDataset export: fields + responses with a label question; matched by content
        {"fields": {"messages": ex[0]["messages"]}, "updated_at": "2026-11-30T12:00:00",
         "responses": [{"user_id": "u-41", "status": "submitted", "values": {"quality": {"value": "accept"}}}]},
        # v1 with a discarded response
        {"fields": ex[1], "responses": [{"user_id": "u-42", "status": "discarded", "values": {}}]},
        # v2 export: record status + responses by question, with a corrected answer; matched by its id
        {"id": cands[2].id, "status": "completed",
         "responses": {"label": [{"value": "accepted", "user_id": "u-43"}],
                       "corrected_response": [{"value": "Open settings, then Security, then Reset.",
                                               "user_id": "u-43"}]}},
        # flat: the example's fields at the top level, a status and an annotator
        {**ex[3], "status": "rejected", "annotator": "lee"},
        {"messages": chat("Something never generated?", "No.")["messages"], "status": "accepted"},  # unknown
        {**ex[4], "status": "pending"},  # not yet annotated in the tool
    ]
    result = review.import_decisions(uri, jsonl(records), "importer")
    assert result.imported == {"accepted": 1, "edited": 1, "rejected": 2}
    assert result.unknown == [5] and result.undecided == 1 and "lines 5" in result.summary()
    decisions, _ = review.load_decisions(uri)
    assert decisions[cands[0].id].reviewer == "u-41" and decisions[cands[0].id].at == "2026-11-30T12:00:00.000000Z"
    assert decisions[cands[1].id].verdict == "rejected" and decisions[cands[1].id].reviewer == "u-42"
    edited = decisions[cands[2].id]
    assert edited.verdict == "edited" and edited.example["messages"][1]["content"].startswith("Open settings, then")
    assert edited.example["messages"][0] == ex[2]["messages"][0]
    assert decisions[cands[3].id].reviewer == "lee"


def test_a_bad_line_imports_nothing_and_names_the_line(work):
    uri, cands = work
    lines = jsonl([{"id": cands[0].id, "status": "accepted"},
                   {"id": cands[1].id, "status": "maybe"},
                   {"id": cands[2].id, "verdict": "edited", "example": {"messages": []}, "reviewer": "x"}])
    lines.insert(1, "{broken")
    with pytest.raises(review.ReviewError) as err:
        review.import_decisions(uri, lines, "importer")
    text = str(err.value)
    assert text.startswith("nothing imported: 3 bad line(s)") and "line 2: json: not valid JSON" in text
    assert "line 3: no decision" in text and "line 4: example.messages: must be a non-empty list" in text
    assert review.load_decisions(uri) == ({}, [])


def test_a_path_traversal_id_in_an_import_never_names_a_file(work, tmp_path):
    uri, cands = work
    result = review.import_decisions(uri, jsonl([{"id": "../../../../tmp/owned", "verdict": "accepted",
                                                  "reviewer": "x", "at": review.now()}]), "importer")
    assert result.unknown == [1] and sum(result.imported.values()) == 0
    assert review.load_decisions(uri) == ({}, []) and not list(tmp_path.rglob("owned*"))


def test_a_huge_import_file_fails_on_its_line_without_reading_it_whole(work, tmp_path):
    uri, cands = work
    path = tmp_path / "huge.jsonl"
    with open(path, "w") as fh:
        fh.write(json.dumps({"id": cands[0].id, "status": "accepted"}) + "\n")
        fh.write(json.dumps({"id": cands[1].id, "status": "accepted", "note": "x" * (3 * 2**20)}) + "\n")
    with pytest.raises(review.ReviewError, match="line 2: longer than"):
        review.import_file(uri, str(path), "importer")
    assert review.load_decisions(uri) == ({}, [])


# --- the reviewed file ------------------------------------------------------------------------------------

def reviewed_lines(uri):
    return [json.loads(line) for line in storage.read_text(storage.join(uri, "reviewed.jsonl")).splitlines()]


def test_materialize_writes_lineage_and_is_idempotent(work):
    uri, cands = work
    edit = chat(cands[1].example["messages"][0]["content"], "A better answer.")
    for i, verdict in enumerate(["accepted", "edited", "accepted", "accepted", "rejected"]):
        review.record_decision(uri, decide(cands[i], verdict, who=f"r{i}",
                                           example=edit if verdict == "edited" else None))
    config = config_for(uri)
    with pytest.raises(review.ReviewError, match="below minAcceptanceRate 90.0%"):
        review.materialize(config_for(uri, min_rate=0.9))
    assert not storage.exists(storage.join(uri, "reviewed.jsonl"))
    done = review.materialize(config)
    assert done.written and done.examples == 5 and done.stats.acceptanceRate == 0.8
    lines = reviewed_lines(uri)
    assert [m["metadata"]["synthetic.id"] for m in lines] == [cands[i].id for i in (0, 1, 2, 3, 5)]
    assert [m["metadata"]["synthetic.review"] for m in lines] == ["accepted", "edited", "accepted", "accepted",
                                                                  "not-sampled"]
    assert lines[1]["messages"][1]["content"] == "A better answer."
    assert lines[1]["metadata"]["synthetic.reviewer"] == "r1" and lines[4]["metadata"]["synthetic.reviewer"] == ""
    meta = lines[0]["metadata"]
    assert meta["synthetic.seedDigest"] == LINEAGE.seedDigest
    assert meta["synthetic.baseModelDigest"] == LINEAGE.baseModelDigest
    assert meta["synthetic.generatorAdapterDigest"] == LINEAGE.generatorAdapterDigest
    assert meta["synthetic.templateDigest"] == LINEAGE.templateDigest
    assert set(meta) == set(records.LINEAGE_KEYS)
    for number, parsed in formats.iter_examples(storage.read_text(storage.join(uri, "reviewed.jsonl")), "chat"):
        assert not isinstance(parsed, formats.FormatError), (number, parsed)
    report = json.loads(storage.read_text(storage.join(uri, "review.json")))
    data = storage.read_bytes(storage.join(uri, "reviewed.jsonl"))
    assert report["reviewedDigest"] == "sha256:" + hashlib.sha256(data).hexdigest() == done.reviewed_digest
    assert report["candidatesDigest"] == digest(storage.read_text(storage.join(uri, "candidates.jsonl")))
    assert (report["required"], report["accepted"], report["edited"], report["rejected"]) == (5, 3, 1, 1)
    again = review.materialize(config)
    assert not again.written and storage.read_bytes(storage.join(uri, "reviewed.jsonl")) == data


def test_materialize_refuses_a_pending_review_and_changed_candidates(work):
    uri, cands = work
    review.record_decision(uri, decide(cands[0]))
    with pytest.raises(review.ReviewError, match="nothing written: 4 of 5 sampled candidates await review"):
        review.materialize(config_for(uri))
    for cand in cands[1:5]:
        review.record_decision(uri, decide(cand))
    path = storage.join(uri, "candidates.jsonl")
    storage.write_text(path, storage.read_text(path) + "\n")  # changed after generation.json was written
    with pytest.raises(review.ReviewError, match="changed after generation"):
        review.materialize(config_for(uri))
    assert not storage.exists(storage.join(uri, "review.json"))


def test_synthesis_finalize_command_on_s3(bucket, tmp_path):
    from finetune_trainer.cli import main

    uri = f"s3://{bucket}/synth/work"
    cands = make_candidates(4, sampled={0, 1})
    write_work(uri, cands)
    review.import_decisions(uri, jsonl([{"id": c.id, "status": "accepted"} for c in cands[:2]]), "ana")
    assert review.summarize(uri, ReviewSettings()).reviewed == 2
    config = tmp_path / "synthesis.json"
    config.write_text(config_for(uri).model_dump_json())
    with pytest.raises(SystemExit) as exit_:
        main(["synthesis-finalize", "--config", str(config)])
    assert exit_.value.code == 0
    assert [m["metadata"]["synthetic.review"] for m in reviewed_lines(uri)] == ["accepted", "accepted",
                                                                                "not-sampled", "not-sampled"]
    storage.delete(storage.join(uri, "reviews", f"{cands[0].id}.json"))  # now the review is pending again
    with pytest.raises(SystemExit) as exit_:
        main(["synthesis-finalize", "--config", str(config)])
    assert exit_.value.code == 3
