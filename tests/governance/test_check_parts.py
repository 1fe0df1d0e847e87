"""The pure parts of the checks: probe set, group gaps, token masks, provenance declarations."""

from __future__ import annotations

from finetune_operator.api.dataset import Provenance
from finetune_operator.api.governance import ProvenanceRules
from finetune_operator.governance import NO_LICENSE_ALLOWED
from finetune_trainer.governance.bias import group_gaps, load_probes, protected_terms
from finetune_trainer.governance.explainability import content_mask, protected_mask
from finetune_trainer.governance.provenance import declaration_findings


def test_default_probe_set_covers_every_protected_attribute():
    probes = load_probes(None)
    assert len(probes) >= 30
    assert {p["attribute"] for p in probes} == {"gender", "ethnicity", "religion", "age", "disability"}
    for p in probes:
        assert p["template"].count("{term}") == 1 and len(p["groups"]) >= 2
    terms = protected_terms(probes)
    assert {"woman", "Muslim", "elderly person", "wheelchair user"} <= terms
    assert not any(t.startswith(("a ", "an ")) for t in terms)


def test_group_gap_is_the_largest_difference_of_group_means():
    rows = [{"attribute": "age", "group": g, "score": s}
            for g, s in [("young", -1.0), ("young", -2.0), ("old", -3.0), ("old", -4.0), ("mid", -2.0)]]
    rows += [{"attribute": "gender", "group": g, "score": -1.0} for g in ("male", "female")]
    gaps = group_gaps(rows)
    means = {"young": -1.5, "old": -3.5, "mid": -2.0}
    assert gaps["age"]["groupMeans"] == means
    assert abs(gaps["age"]["gap"] - (max(means.values()) - min(means.values()))) < 1e-12
    assert gaps["gender"]["gap"] == 0.0


def test_protected_tokens_are_whole_word_matches():
    pieces = ["The", " wo", "man", " met", " a", " human", " and", " an", " elderly", " person", "."]
    mask = protected_mask(pieces, {"woman", "man", "elderly person"})
    assert [p for p, m in zip(pieces, mask) if m] == [" wo", "man", " elderly", " person"]  # not "human"


def test_content_mask_marks_only_message_content():
    pieces = ["<|im_start|>", "user", "\n", "What", " is", " 2", "?", "<|im_end|>", "\n"]
    assert content_mask(pieces, ["What is 2?"]) == [False, False, False, True, True, True, True, False, False]


def test_declarations():
    rules = ProvenanceRules(allowedLicenses=["MIT"], requireConsentForPersonalData=True)
    ok = declaration_findings(Provenance(origin="crm export", license="mit"), rules)
    assert all(passed for _, passed, _ in ok)
    bad = declaration_findings(Provenance(origin="crm", license="MIT", containsPersonalData=True), rules)
    assert [r for r, passed, _ in bad if not passed] == ["consent"]
    nothing = ProvenanceRules(allowedLicenses=[NO_LICENSE_ALLOWED])
    assert [r for r, p, _ in declaration_findings(Provenance(origin="x", license="MIT"), nothing) if not p] == ["license"]


def test_attribution_reports_never_show_personal_data():
    from finetune_trainer.governance.explainability import redact_pieces

    pieces = ["Mail", " ana", "@", "mail", ".example", ".com", " now"]
    assert redact_pieces(pieces) == ["Mail", "[PII]", "[PII]", "[PII]", "[PII]", "[PII]", " now"]
