"""Pod scheduling fields a FineTuneJob passes to its trainer pods: tolerations and affinity.

They are typed with the core/v1 shapes (a subset: the fields a training pod needs) and carry the
checks the API server applies to a Pod, so a bad value is refused when the FineTuneJob is applied,
not later when the operator creates the Job. List bounds (maxItems) keep the CEL rules' estimated
cost within the API server's budget.
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field

from .meta import (DNS_LABEL_PATTERN, LABEL_VALUE_PATTERN, QUALIFIED_NAME_MAX, QUALIFIED_NAME_PATTERN, ApiModel,
                   prefix_rule)


def _rules(*rules: dict) -> dict:
    return {"json_schema_extra": {"x-kubernetes-validations": list(rules)}}


def _key_field(description: str, what: str, default=...):
    return Field(default, description=description, min_length=1, max_length=QUALIFIED_NAME_MAX,
                 pattern=QUALIFIED_NAME_PATTERN, json_schema_extra={"x-kubernetes-validations": [prefix_rule(what)]})


#: CEL over a map whose keys are label keys (structural schemas cannot put a pattern on keys).
_LABEL_KEYS_RULE = {
    "rule": "self.all(k, k.matches('" + QUALIFIED_NAME_PATTERN.replace("\\", "\\\\") + "') && "
            "(!k.contains('/') || k.matches('^[^/]{1,253}/')))",
    "message": "every key must be a label key: [DNS subdomain/]name, the name <= 63 characters of "
               "alphanumerics, '-', '_' or '.', starting and ending with an alphanumeric",
}


def label_map_field(description: str, optional: bool = False, **kw):
    default = {"default": None} if optional else {"default_factory": dict}
    return Field(**default, description=description, max_length=64,
                 json_schema_extra={"x-kubernetes-validations": [_LABEL_KEYS_RULE],
                                    "additionalProperties": {"type": "string", "maxLength": 63,
                                                             "pattern": LABEL_VALUE_PATTERN}}, **kw)


class Toleration(ApiModel):
    """A pod toleration (core/v1 Toleration), checked like the API server checks a Pod's."""

    model_config = ApiModel.model_config | _rules(
        {"rule": "(has(self.key) && self.key != '') || self.operator == 'Exists'",
         "message": "operator must be Exists when key is empty (which means: tolerate every taint)",
         "fieldPath": ".operator", "reason": "FieldValueInvalid"},
        {"rule": "self.operator != 'Exists' || !has(self.value) || self.value == ''",
         "message": "value must be empty when operator is Exists",
         "fieldPath": ".value", "reason": "FieldValueInvalid"},
        {"rule": "!has(self.tolerationSeconds) || (has(self.effect) && self.effect == 'NoExecute')",
         "message": "effect must be NoExecute when tolerationSeconds is set",
         "fieldPath": ".effect", "reason": "FieldValueInvalid"},
    )

    key: Optional[str] = Field(None, description="Taint key (a label key, e.g. nvidia.com/gpu); empty with "
                               "operator Exists matches all taints.", max_length=QUALIFIED_NAME_MAX,
                               pattern=QUALIFIED_NAME_PATTERN,
                               json_schema_extra={"x-kubernetes-validations": [prefix_rule("key")]})
    operator: Literal["Exists", "Equal"] = Field("Equal", description="Exists or Equal.")
    value: Optional[str] = Field(None, description="Taint value for operator Equal (a label value).",
                                 max_length=63, pattern=LABEL_VALUE_PATTERN)
    effect: Optional[Literal["NoSchedule", "PreferNoSchedule", "NoExecute"]] = Field(
        None, description="Taint effect to tolerate; empty matches all effects.")
    tolerationSeconds: Optional[int] = Field(
        None, description="For effect NoExecute only: how long the pod stays bound after the taint appears.")


class NodeSelectorRequirement(ApiModel):
    """A node label requirement (core/v1 NodeSelectorRequirement)."""

    model_config = ApiModel.model_config | _rules(
        {"rule": "!(self.operator in ['In', 'NotIn']) || (has(self.values) && size(self.values) > 0)",
         "message": "values must be non-empty when operator is In or NotIn",
         "fieldPath": ".values", "reason": "FieldValueRequired"},
        {"rule": "!(self.operator in ['Exists', 'DoesNotExist']) || !has(self.values) || size(self.values) == 0",
         "message": "values must be empty when operator is Exists or DoesNotExist",
         "fieldPath": ".values", "reason": "FieldValueForbidden"},
        {"rule": "!(self.operator in ['Gt', 'Lt']) || (has(self.values) && size(self.values) == 1 && "
                 "self.values[0].matches('^-?[0-9]{1,18}$'))",
         "message": "values must be a single integer when operator is Gt or Lt",
         "fieldPath": ".values", "reason": "FieldValueInvalid"},
    )

    key: str = _key_field("The node label key the requirement applies to.", "key")
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist", "Gt", "Lt"] = Field(
        ..., description="In, NotIn, Exists, DoesNotExist, Gt or Lt.")
    values: Optional[list[str]] = Field(
        None, max_length=64, description="Values for In and NotIn (one or more), Gt and Lt (one integer); "
        "empty for Exists and DoesNotExist.",
        json_schema_extra={"items": {"type": "string", "maxLength": 63}})


class NodeFieldSelectorRequirement(ApiModel):
    """A node field requirement (core/v1 NodeSelectorRequirement in matchFields): only metadata.name."""

    key: Literal["metadata.name"] = Field(..., description="The node field; only metadata.name is supported.")
    operator: Literal["In", "NotIn"] = Field(..., description="In or NotIn.")
    values: list[str] = Field(..., min_length=1, max_length=1, description="Exactly one node name.",
                              json_schema_extra={"items": {"type": "string", "maxLength": 253}})


class NodeSelectorTerm(ApiModel):
    """Node requirements that must all hold (core/v1 NodeSelectorTerm)."""

    matchExpressions: Optional[list[NodeSelectorRequirement]] = Field(
        None, max_length=16, description="Requirements on node labels.")
    matchFields: Optional[list[NodeFieldSelectorRequirement]] = Field(
        None, max_length=4, description="Requirements on node fields (metadata.name).")


class NodeSelector(ApiModel):
    """Terms of which at least one must hold (core/v1 NodeSelector)."""

    nodeSelectorTerms: list[NodeSelectorTerm] = Field(
        ..., min_length=1, max_length=8, description="The terms; a node matching any of them qualifies.")


class PreferredSchedulingTerm(ApiModel):
    """A weighted node preference (core/v1 PreferredSchedulingTerm)."""

    weight: int = Field(..., ge=1, le=100, description="Weight of the preference, 1-100.")
    preference: NodeSelectorTerm = Field(..., description="The node requirements preferred.")


class NodeAffinity(ApiModel):
    """Node affinity (core/v1 NodeAffinity)."""

    requiredDuringSchedulingIgnoredDuringExecution: Optional[NodeSelector] = Field(
        None, description="Node requirements the trainer pod must meet to be scheduled.")
    preferredDuringSchedulingIgnoredDuringExecution: Optional[list[PreferredSchedulingTerm]] = Field(
        None, max_length=16, description="Weighted node preferences.")


class LabelSelectorRequirement(ApiModel):
    """A label requirement of a label selector (meta/v1 LabelSelectorRequirement)."""

    model_config = ApiModel.model_config | _rules(
        {"rule": "!(self.operator in ['In', 'NotIn']) || (has(self.values) && size(self.values) > 0)",
         "message": "values must be non-empty when operator is In or NotIn",
         "fieldPath": ".values", "reason": "FieldValueRequired"},
        {"rule": "!(self.operator in ['Exists', 'DoesNotExist']) || !has(self.values) || size(self.values) == 0",
         "message": "values must be empty when operator is Exists or DoesNotExist",
         "fieldPath": ".values", "reason": "FieldValueForbidden"},
    )

    key: str = _key_field("The label key the requirement applies to.", "key")
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"] = Field(
        ..., description="In, NotIn, Exists or DoesNotExist.")
    values: Optional[list[str]] = Field(
        None, max_length=64, description="Label values for In and NotIn; empty for Exists and DoesNotExist.",
        json_schema_extra={"items": {"type": "string", "maxLength": 63, "pattern": LABEL_VALUE_PATTERN}})


class LabelSelector(ApiModel):
    """A label selector (meta/v1 LabelSelector); an empty selector matches everything."""

    matchLabels: Optional[dict[str, str]] = label_map_field("Labels that must all be present with these values.",
                                                            optional=True)
    matchExpressions: Optional[list[LabelSelectorRequirement]] = Field(
        None, max_length=16, description="Label requirements that must all hold.")


class PodAffinityTerm(ApiModel):
    """Pods to be placed near (or away from) (core/v1 PodAffinityTerm, without matchLabelKeys)."""

    labelSelector: Optional[LabelSelector] = Field(None, description="The pods this term is about.")
    namespaceSelector: Optional[LabelSelector] = Field(
        None, description="Namespaces (by label) whose pods count; unset means the namespaces list.")
    namespaces: Optional[list[str]] = Field(
        None, max_length=32, description="Namespaces whose pods count; empty with no namespaceSelector means "
        "the FineTuneJob's namespace.",
        json_schema_extra={"items": {"type": "string", "maxLength": 63, "pattern": DNS_LABEL_PATTERN}})
    topologyKey: str = _key_field("Node label key defining co-location (e.g. kubernetes.io/hostname, "
                                  "topology.kubernetes.io/zone).", "topologyKey")


class WeightedPodAffinityTerm(ApiModel):
    """A weighted pod (anti-)affinity preference (core/v1 WeightedPodAffinityTerm)."""

    weight: int = Field(..., ge=1, le=100, description="Weight of the preference, 1-100.")
    podAffinityTerm: PodAffinityTerm = Field(..., description="The pod affinity term.")


class PodAffinity(ApiModel):
    """Inter-pod affinity or anti-affinity (core/v1 PodAffinity / PodAntiAffinity)."""

    requiredDuringSchedulingIgnoredDuringExecution: Optional[list[PodAffinityTerm]] = Field(
        None, max_length=16, description="Terms the trainer pod's node must meet.")
    preferredDuringSchedulingIgnoredDuringExecution: Optional[list[WeightedPodAffinityTerm]] = Field(
        None, max_length=16, description="Weighted preferences.")


class Affinity(ApiModel):
    """Scheduling constraints of the trainer pod (core/v1 Affinity); unknown fields are rejected."""

    nodeAffinity: Optional[NodeAffinity] = Field(None, description="Node affinity.")
    podAffinity: Optional[PodAffinity] = Field(None, description="Pods to be co-located with.")
    podAntiAffinity: Optional[PodAffinity] = Field(None, description="Pods to stay away from.")
