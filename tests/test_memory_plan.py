"""The pre-flight memory plan: the formula's parts on known shapes, the advice for a job that does
not fit, and the operator refusing such a job before any trainer Job (or GPU) is requested."""

from __future__ import annotations

import copy

import pytest

from finetune_operator import decisions, memory_plan
from finetune_operator.conditions import get_condition
from finetune_operator.config import OperatorConfig

GiB = memory_plan.GiB
LLAMA3_8B = {"hidden_size": 4096, "num_hidden_layers": 32, "intermediate_size": 14336, "num_attention_heads": 32,
             "num_key_value_heads": 8, "vocab_size": 128256}
LLAMA3_70B = {"hidden_size": 8192, "num_hidden_layers": 80, "intermediate_size": 28672, "num_attention_heads": 64,
              "num_key_value_heads": 8, "vocab_size": 128256}
H100 = {"gpuNodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}}


def spec(**kw) -> dict:
    base = {"method": "lora", "lora": {"r": 16, "targetModules": ["all-linear"], "dropout": 0.0},
            "training": {"batchSize": 4, "maxSeqLength": 2048, "precision": "bf16", "gradientCheckpointing": True},
            "resources": {"gpusPerNode": 1, **H100}}
    for key, value in kw.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return base


def test_parameter_count_and_weights_of_an_8b_model():
    shape = memory_plan.Shape.from_config(LLAMA3_8B)
    assert shape.params() == pytest.approx(8.03e9, rel=0.01)  # Llama-3-8B's published size
    plan = memory_plan.estimate(LLAMA3_8B, spec())
    assert plan.parts["weights"] == pytest.approx(shape.params() * 2, rel=1e-6)  # bf16
    # LoRA r=16 on all seven linears of 32 layers: 16 x 81,920 x 32 = 41.9M parameters, 16 bytes each
    assert plan.parts["adapter"] == 16 * 81920 * 32 * 16
    assert plan.parts["cudaContext"] == GiB // 2
    assert plan.total == sum(plan.parts.values()) and plan.fits is True


def test_four_bit_weights_and_fsdp_sharding():
    lora = memory_plan.estimate(LLAMA3_8B, spec())
    qlora = memory_plan.estimate(LLAMA3_8B, spec(method="qlora", quantization={"doubleQuant": True}))
    # decoder linears at ~0.52 byte, embeddings and head at 2 bytes
    assert 5.0 * GiB < qlora.parts["weights"] < 6.0 * GiB < lora.parts["weights"]
    ddp = memory_plan.estimate(LLAMA3_70B, spec(resources={"gpusPerNode": 8}, distributed={"strategy": "ddp"}))
    fsdp = memory_plan.estimate(LLAMA3_70B, spec(resources={"gpusPerNode": 8}, distributed={"strategy": "fsdp"}))
    layers = 80 * memory_plan.Shape.from_config(LLAMA3_70B).layer_linear_params() * 2
    assert ddp.parts["weights"] - fsdp.parts["weights"] == pytest.approx(layers * 7 / 8 - 2 * layers / 80, rel=0.01)
    assert fsdp.parts["adapter"] * 8 == pytest.approx(ddp.parts["adapter"], rel=1e-6)


def test_activations_follow_batch_and_checkpointing():
    gc = memory_plan.estimate(LLAMA3_8B, spec())
    no_gc = memory_plan.estimate(LLAMA3_8B, spec(training={"gradientCheckpointing": False}))
    double = memory_plan.estimate(LLAMA3_8B, spec(training={"batchSize": 8}))
    assert no_gc.parts["activations"] > 8 * gc.parts["activations"]  # 32 layers kept vs their inputs + 2 layers
    assert double.parts["logits"] == 2 * gc.parts["logits"]
    # the log-softmax of every token of a micro-batch and its gradient, fp32: 4 x 2048 x 128256 x 8 bytes
    assert gc.parts["logits"] == 4 * 2048 * 128256 * 8
    assert gc.step_seconds and double.step_seconds == pytest.approx(2 * gc.step_seconds)


def test_a_70b_bf16_job_on_one_h100_is_refused_with_the_numbers_and_what_would_fit():
    fits, message, plan = memory_plan.verdict(LLAMA3_70B, spec())
    assert fits is False and plan.total > 130 * GiB
    assert message.startswith(f"needs {plan.total / GiB:.1f} GiB per GPU (weights ")
    assert "an NVIDIA-H100-80GB-HBM3 has 80.0 GiB: use method qlora" in message
    assert "nodes: 2 with distributed.strategy fsdp" in message or "nodes: 4 with distributed.strategy fsdp" in message
    for fix in memory_plan.alternatives(LLAMA3_70B, spec(), plan.gpu_bytes):
        assert fix  # every suggestion was itself checked with the estimate (see alternatives)


def test_an_unknown_gpu_product_gives_no_verdict():
    fits, message, _ = memory_plan.verdict(LLAMA3_8B, spec(resources={"gpuNodeSelector": {}}))
    assert fits is None and "no known GPU product" in message
    assert memory_plan.check({"resources": {"gpusPerNode": 0}}, LLAMA3_8B) is None  # CPU: nothing to plan
    assert memory_plan.check(spec(), None) is None  # no config.json read


CFG = OperatorConfig(artifact_store="s3://store", default_governance={"required": []})
NOW = "2026-01-01T00:00:00Z"
DATASET = {"metadata": {"name": "ds", "generation": 1}, "spec": {"format": "chat"},
           "status": {"phase": "Ready", "observedGeneration": 1, "validatedURI": "s3://v", "digest": "sha256:1"}}


def ftj(spec_: dict, generation: int = 1, status=None) -> dict:
    return {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob",
            "metadata": {"name": "big", "namespace": "ns", "uid": "u", "generation": generation},
            "spec": {"baseModel": {"uri": "s3://m/70b"}, "datasetRef": {"name": "ds"}, "output": {"uri": "s3://o"},
                     **spec_}, "status": status or {}}


def test_the_operator_refuses_an_infeasible_job_before_creating_any_trainer_job():
    inputs = decisions.JobInputs(dataset=DATASET, model_config=LLAMA3_70B)
    plan = decisions.plan_finetunejob(ftj(spec()), inputs, CFG, NOW)
    assert plan.create == []  # no Job, no GPU requested
    st = plan.status
    assert st["phase"] == "Failed" and "needs" in st["message"] and "use method qlora" in st["message"]
    assert get_condition(st["conditions"], "Failed")["reason"] == "Infeasible"
    assert get_condition(st["conditions"], "Feasible")["status"] == "False"
    assert st["plan"]["fits"] is False and st["plan"]["gpuGiB"] == 80.0 and st["plan"]["perGPUGiB"] > 80
    stalled = get_condition(decisions.kstatus.conditions_for("FineTuneJob", st, 1, NOW), "Stalled")
    assert stalled["status"] == "True" and stalled["reason"] == "Infeasible"

    # The user follows the advice (qlora): generation 2 is planned again, fits, and gets its Job.
    fixed = ftj(spec(method="qlora", quantization={"quantType": "nf4", "doubleQuant": True}), 2, copy.deepcopy(st))
    again = decisions.plan_finetunejob(fixed, inputs, CFG, NOW)
    assert [m["kind"] for m in again.create] == ["ConfigMap", "Job"]
    assert get_condition(again.status["conditions"], "Feasible")["status"] == "True"
    assert again.status["plan"]["fits"] is True and again.status["phase"] == "Queued"


def test_without_a_model_config_the_job_goes_ahead_unplanned():
    plan = decisions.plan_finetunejob(ftj(spec()), decisions.JobInputs(dataset=DATASET), CFG, NOW)
    assert [m["kind"] for m in plan.create] == ["ConfigMap", "Job"]
    assert "plan" not in plan.status and get_condition(plan.status["conditions"], "Feasible") is None


def test_auto_is_ddp_unless_only_a_sharded_base_fits_and_the_trainer_is_told():
    two_gpus = {"gpusPerNode": 2, **H100}
    assert memory_plan.choose_strategy(LLAMA3_8B, spec(resources=two_gpus)) == "ddp"  # 8B bf16 fits one H100
    eight = {"gpusPerNode": 8, **H100}
    assert memory_plan.choose_strategy(LLAMA3_70B, spec(resources=eight)) == "fsdp"  # 70B only fits sharded
    assert memory_plan.choose_strategy(LLAMA3_70B, spec()) == "ddp"  # one rank: nothing to shard over

    inputs = decisions.JobInputs(dataset=DATASET, model_config=LLAMA3_70B)
    made = decisions.plan_finetunejob(ftj(spec(resources=eight, distributed={"strategy": "auto"})), inputs, CFG, NOW)
    assert made.status["plan"]["strategy"] == "fsdp" and made.status["plan"]["fits"] is True
    import json

    cm = next(m for m in made.create if m["kind"] == "ConfigMap")
    assert json.loads(next(iter(cm["data"].values())))["distributed"]["strategy"] == "fsdp"
    # A strategy the user chose is left alone.
    chosen = decisions.plan_finetunejob(ftj(spec(resources=eight, distributed={"strategy": "ddp"})), inputs, CFG, NOW)
    assert chosen.status["phase"] == "Failed"  # a replicated 70B does not fit: the plan says so, nothing overrides


def test_the_grace_period_leaves_time_for_the_checkpoint_and_never_goes_below_the_setting():
    _, _, record = memory_plan.check(spec(), LLAMA3_8B, grace_floor=300)
    assert record["terminationGracePeriodSeconds"] == 300  # a LoRA checkpoint of an 8B model is small
    plan = memory_plan.estimate(LLAMA3_8B, spec(lora={"r": 1024}))
    needed = memory_plan.grace_seconds(plan, 0)
    adapter_state = plan.parts["adapter"] * 3 / 4
    assert needed >= 2 * adapter_state / memory_plan.CHECKPOINT_BYTES_PER_SECOND + 60
    inputs = decisions.JobInputs(dataset=DATASET, model_config=LLAMA3_8B)
    made = decisions.plan_finetunejob(ftj(spec(lora={"r": 1024})), inputs, OperatorConfig(
        artifact_store="s3://store", default_governance={"required": []}, termination_grace_seconds=30), NOW)
    job = next(m for m in made.create if m["kind"] == "Job")
    assert job["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == \
        made.status["plan"]["terminationGracePeriodSeconds"] > 30
