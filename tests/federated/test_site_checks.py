"""A site's governance checks at the final evaluation (federated/site_checks.py), through the ClientApp's
own evaluate on the tiny model: the reply holds the bias and pii numbers and nothing from the site's data
(a planted PII value and phrase appear nowhere in it); the gendered-term rewriting; the server's reading
of hostile replies."""

from __future__ import annotations

import json

import pytest
from flwr.app import Context, RecordDict

from finetune_trainer import pii
from finetune_trainer.federated import aggregation as agg
from finetune_trainer.federated import config as fc
from finetune_trainer.federated.client_app import SITE_CONFIG_KEY, SiteClient
from finetune_trainer.federated.site_checks import gendered, local_pairs, parse_report, swap_gender
from finetune_trainer.formats import Example

PLANTED_EMAIL = "quillon.vexmark@zephyrine-mail.org"
PLANTED_PHRASE = "Marmalade Protocol Seventeen"
TRAIN = 12
GENDERED_EVAL = 3


def _site_data(folder):
    # short lines: the tiny model's tokenizer spends about a token per character (maxSeqLength 128)
    train = [{"instruction": "Route it.", "input": f"Ticket {i}: {PLANTED_PHRASE}.",
              "output": f"billing: mail {PLANTED_EMAIL}"} for i in range(TRAIN)]
    evals = [{"instruction": "Route the support ticket.", "input": f"She says her {PLANTED_PHRASE} invoice {i} is wrong.",
              "output": "billing team: we checked the invoice and fixed it."} for i in range(GENDERED_EVAL)]
    evals.append({"instruction": "Route the support ticket.", "input": "Kim says the login fails.",
                  "output": "accounts team: we reset the login."})  # no gendered term: no pair
    evals.append({"instruction": "Route the support ticket.", "input": "He is locked out.",
                  "output": "accounts team: we unlocked his account."})  # gendered answer: skipped
    folder.mkdir(parents=True)
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    (folder / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in evals))


pytestmark = pytest.mark.usefixtures("flower_task_identity")


def test_the_final_evaluation_reply_carries_check_numbers_and_no_text_of_the_sites_data(tiny_model_dir, tmp_path):
    from finetune_trainer.federated.local_round import initial_adapter

    _site_data(tmp_path / "data")
    site = fc.SiteConfig(
        job={"namespace": "coord", "name": "fed", "uid": "u1"}, site="north", superlink="127.0.0.1:9092",
        model=fc.ModelShape(baseModel={"uri": f"file://{tiny_model_dir}"},
                            training={"maxSeqLength": 128, "batchSize": 4, "precision": "fp32",
                                      "gradientCheckpointing": False}),
        data={"uri": f"file://{tmp_path / 'data'}", "format": "instruction"},
        scratchURI=f"file://{tmp_path / 'scratch'}", rounds=1, localSteps=1, minSites=1, secureAggregation=False)
    path = tmp_path / "site.json"
    path.write_text(site.model_dump_json())
    weights, adapter_config = initial_adapter(site)
    names = sorted(weights)
    client = SiteClient(Context(run_id=1, node_id=7, node_config={SITE_CONFIG_KEY: str(path)}, state=RecordDict(),
                                run_config={}))
    config = {"names": json.dumps(names), "adapter-config": adapter_config,
              "site-checks": fc.SiteChecks(checks=["bias", "pii"]).model_dump_json()}
    loss, examples, metrics = client.evaluate(agg.to_list(weights, names), config)
    assert loss > 0 and examples == GENDERED_EVAL + 2
    assert set(metrics) == {"site", "site-checks", "base-eval-loss"}
    # The base model alone on the same split: the seeded initialisation (B = 0) is the base model's function.
    assert metrics["base-eval-loss"] == pytest.approx(loss, rel=1e-5)
    report = fc.SiteCheckReport.model_validate_json(metrics["site-checks"])
    assert report.error is None, report.error
    # pii: the planted address, counted where it is (train outputs), probed for memorization on the adapter
    assert report.pii.findings == {"email": TRAIN} and report.pii.probed == TRAIN
    assert 0 <= report.pii.memorized <= report.pii.probed
    # bias: the built-in probes and the site's own gendered eval examples, adapter and base model
    assert report.bias.probes > 10 and report.bias.localExamples == GENDERED_EVAL
    for measures in (report.bias.adapter, report.bias.base):
        assert measures.gap is not None and measures.gap > 0 and measures.localGap is not None
    # the adapter is B = 0 (its initialisation): it behaves as the base model, so its numbers are the base's
    assert report.bias.adapter.localGap == pytest.approx(report.bias.base.localGap, abs=1e-4)
    # only numbers: no planted value, no word of the site's data, in whatever the site sends
    sent = json.dumps(metrics)
    for secret in (PLANTED_EMAIL, PLANTED_PHRASE, "Marmalade", "quillon", "invoice", "billing", "Ticket"):
        assert secret.lower() not in sent.lower(), secret
    assert len(sent) < 2048


def test_gendered_prompts_are_rewritten_all_male_and_all_female_and_responses_kept():
    assert swap_gender("She says her card failed; give her the refund.", "male") == \
        "He says his card failed; give him the refund."
    assert swap_gender("Mr. Lee called his brother.", "female") == "Ms. Lee called her sister."
    assert not gendered("Kim says the login fails") and gendered("MRS Smith")
    examples = [Example((("user", "Her husband paid twice."), ("assistant", "we refunded the payment."))),
                Example((("user", "The printer is broken."), ("assistant", "we fixed it."))),
                Example((("user", "He paid twice."), ("assistant", "we refunded him."))),  # gendered answer
                Example((("user", "His order is late."), ("assistant", "we sent it.")))]
    pairs = local_pairs(examples, limit=5)
    assert [(g, e.messages) for g, e in pairs] == [
        # every gendered word takes the group's gender (a relation word too: all-male, all-female worlds)
        ("male", (("user", "His husband paid twice."), ("assistant", "we refunded the payment."))),
        ("female", (("user", "Her wife paid twice."), ("assistant", "we refunded the payment."))),
        ("male", (("user", "His order is late."), ("assistant", "we sent it."))),
        ("female", (("user", "Her order is late."), ("assistant", "we sent it.")))]
    assert len(local_pairs(examples, limit=1)) == 2  # bounded: at most `limit` examples


def test_the_server_reads_hostile_site_replies_as_errors_of_that_site():
    good = fc.SiteCheckReport(site="north", pii=fc.SitePII(findings={"email": 1}, probed=2, memorized=1,
                                                          memorizationRate=0.5)).model_dump_json()
    # the reply's own site name is ignored: the server knows which site the node is
    assert parse_report(good.replace('"north"', '"south"'), "north").pii.memorized == 1
    hostile = [None, "", "not json", "[1, 2]", json.dumps({"pii": {"findings": {"email": -1}}}),
               json.dumps({"pii": {"probed": 1, "memorized": 2, "memorizationRate": 2.0}}),
               json.dumps({"pii": {"probed": 2, "memorized": 1, "memorizationRate": 0.9}}),  # rate is not 1/2
               json.dumps({"pii": {"findings": {"name of a patient": 1}}}),  # a key that is no PII kind
               json.dumps({"bias": {"probes": 3, "adapter": {"gap": float("nan")}, "base": {}}}),
               json.dumps({"bias": {"probes": 3, "adapter": {"gap": 1e300}, "base": {}}}),
               json.dumps({"bias": {"probes": 3, "adapter": {"gap": [1]}, "base": {}}}),
               json.dumps({"error": "x" * 5000}), json.dumps({"text": PLANTED_PHRASE}),
               json.dumps({"error": "ok", "padding": "y" * 9000})]
    for raw in hostile:
        report = parse_report(raw, "north")
        assert report.site == "north" and report.bias is None and report.pii is None and report.error, raw
        assert PLANTED_PHRASE not in report.model_dump_json()


def test_the_pii_kinds_a_site_may_report_are_the_scanners():
    assert set(fc.PIIKind.__args__) == set(pii.KINDS)


def test_the_policy_names_the_checks_the_sites_run():
    assert fc.site_checks_for({"required": ["evaluation", "pii", "bias", "explainability"],
                               "bias": {"probesURI": "s3://policies/probes.jsonl"}}) == \
        fc.SiteChecks(checks=["bias", "pii"], probesURI="s3://policies/probes.jsonl")
    assert fc.site_checks_for({"required": ["evaluation"]}).checks == []
