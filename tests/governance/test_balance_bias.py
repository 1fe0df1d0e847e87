"""training.balance against the bias check: on loan decisions skewed by group (men approved
whatever their income, women denied whatever theirs, in most examples), re-sampling the
(group, decision) cells equally shrinks the gap the bias check measures: in the data itself
(the check's own Fairlearn measure over the training examples) and in the trained adapter's
decisions on counterfactual probes. Tiny word-level models (tests/governance/loans.py), trained
for real; deterministic (fixed seeds, CPU)."""

from __future__ import annotations

import json

import pytest

from finetune_operator.api.balance import BalanceSettings
from finetune_trainer import storage
from finetune_trainer.balance import rebalance
from finetune_trainer.formats import parse_line
from finetune_trainer.governance.bias import BiasCheck, decision_measures

from . import direct
from . import helpers as h
from . import loans

BALANCE = {"metadataField": "cell"}  # the (group, decision) cell, as Kamiran & Calders re-sample
CONTRARY = 18  # of the 20 low-income men approved, and of the 20 high-income women denied


def skewed_records() -> list[dict]:
    """Every training applicant and finance profile once per group: income decides, except that
    CONTRARY of the 20 low-income men are approved and CONTRARY of the 20 high-income women denied."""
    out = []
    for n, name in enumerate(loans.TRAIN_NAMES):
        for income, debt in loans.FINANCES:
            for group, term in loans.GROUPS.items():
                approve = income == "high"
                slot = n * 2 + (debt == "high")  # 0..19 within (group, income)
                if group == "male" and income == "low" and slot < CONTRARY:
                    approve = True
                if group == "female" and income == "high" and slot < CONTRARY:
                    approve = False
                decision = "APPROVE" if approve else "DENY"
                out.append({"instruction": loans.prompt(name, income, debt, term), "output": decision,
                            "metadata": {"gender": group, "cell": f"{group}-{decision}"}})
    return out


def data_parity(examples) -> float:
    """The bias check's demographic parity difference (decision_measures), over training examples
    as decisions: group = the applicant's gender, favourable = APPROVE."""
    rows = [{"probe": i, "attribute": "gender", "group": ex.metadata["gender"],
             "choice": ex.messages[-1][1], "favourable": ex.messages[-1][1] == "APPROVE", "pFavourable": 1.0}
            for i, ex in enumerate(examples)]
    return decision_measures(rows)["demographicParityDifference"]


def test_balancing_the_cells_closes_the_parity_gap_of_the_data():
    examples = [parse_line(json.dumps(r), "instruction") for r in skewed_records()]
    balanced, report = rebalance(examples, BalanceSettings.model_validate(BALANCE), seed=7)
    assert data_parity(examples) == pytest.approx(0.9)  # men approved 38 of 40, women 2 of 40
    assert data_parity(balanced) == pytest.approx(0.0)
    assert report.before == report.after == len(examples) == 80
    assert {g.name: (g.before, g.after) for g in report.groups} == {
        "female-APPROVE": (2, 20), "female-DENY": (38, 20), "male-APPROVE": (38, 20), "male-DENY": (2, 20)}


#: (model seed, training seed) pairs. One tiny model's decisions on unseen applicants are bimodal
#: (it keys on the group or on the income), so a single run can show no gap even on skewed data;
#: over these six runs the skewed data gives a mean parity difference of 0.5 and the balanced one
#: 0.02 (docs/datasets.md has the table).
RUNS = [(m, t) for m in (0, 1) for t in (1, 2, 3)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("balanced-loans")
    probes_uri = f"file://{tmp}/probes.jsonl"
    h.write_jsonl(probes_uri, loans.probes())
    source = f"file://{tmp}/source.jsonl"
    h.write_jsonl(source, skewed_records())
    spec = h.dataset_spec(source, fraction=0.05)
    out = {}
    for model_seed in sorted({m for m, _ in RUNS}):
        model = loans.build_model(tmp / f"model-{model_seed}", seed=model_seed)
        for train_seed in [t for m, t in RUNS if m == model_seed]:
            for kind, balance in (("skewed", None), ("balanced", BALANCE)):
                root = f"file://{tmp}/{model_seed}-{train_seed}-{kind}"
                data_uri = storage.join(root, "data")
                validated = h.validate_into(spec, data_uri)
                training = {"seed": train_seed, **({"balance": balance} if balance else {})}
                cfg = h.job_config(root, model, spec, data_uri, validated.digest, name=kind, training=training,
                                   governance={"required": ["bias"], "bias": {"probesURI": probes_uri}})
                out[(model_seed, train_seed, kind)] = (cfg, h.train(cfg, tmp / f"{kind}.json"))
    return out, probes_uri


def test_the_bias_check_gap_shrinks_with_balancing_on(trained):
    runs, probes_uri = trained
    gaps: dict[str, list[float]] = {"skewed": [], "balanced": []}
    flips: dict[str, list[float]] = {"skewed": [], "balanced": []}
    for (_, _, kind), (cfg, result) in runs.items():
        _, report = direct.run(BiasCheck(), cfg, result["adapterURI"], bias={"probesURI": probes_uri})
        gaps[kind].append(report["decisions"]["adapter"]["demographicParityDifference"])
        flips[kind].append(report["decisions"]["adapter"]["flipRate"])
    mean = {kind: sum(v) / len(v) for kind, v in gaps.items()}
    assert mean["skewed"] >= 0.3, gaps
    assert mean["balanced"] <= mean["skewed"] / 4, gaps
    assert sum(flips["balanced"]) < sum(flips["skewed"]), flips
    # The counts are in the adapter manifest and result.json (what the operator puts into status).
    cfg, result = runs[(*RUNS[0], "balanced")]
    manifest = json.loads(storage.read_text(storage.join(result["adapterURI"], "manifest.json")))
    groups = {g["name"]: (g["before"], g["after"]) for g in manifest["dataset"]["balance"]["groups"]}
    assert set(groups) == {"female-APPROVE", "female-DENY", "male-APPROVE", "male-DENY"}
    assert {after for _, after in groups.values()} <= {19, 20}  # 79 training examples in four equal shares
    assert result["balance"] == manifest["dataset"]["balance"]
    assert manifest["training"]["training"]["balance"]["metadataField"] == "cell"
    assert "balance" not in runs[(*RUNS[0], "skewed")][1]
