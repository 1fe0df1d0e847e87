"""Group-balanced sampling of the training examples (`spec.training.balance`) and what it reports."""

from __future__ import annotations

from typing import Annotated, Literal, Optional

from pydantic import Field

from .meta import ApiModel

#: Most groups a balanced run may have (status and the manifest list each one).
MAX_GROUPS = 64
_GROUP = Annotated[str, Field(min_length=1, max_length=63)]


class GroupRule(ApiModel):
    """A group label from the text: the first rule with a matching word or phrase labels the example."""

    group: _GROUP = Field(..., description="The group this rule labels.")
    anyOf: list[Annotated[str, Field(min_length=1, max_length=128)]] = Field(
        ..., min_length=1, max_length=256,
        description="Words or phrases (whole words, case-insensitive, whitespace-normalized); any one of them "
        "in the text labels the example. Plain words, not regular expressions.")
    text: Literal["prompt", "answer", "all"] = Field(
        "prompt", description="Which text the rule reads: the prompt (every non-assistant message), the answer, "
        "or both.")


class BalanceSettings(ApiModel):
    """Re-sample the training examples so that each group contributes equally, or to `weights`.

    The number of training examples stays the same: a group's share is N * weight / total weight,
    drawn without replacement from a larger group and by repeating a smaller one (every example
    as often as it fits, the rest drawn without replacement). Deterministic: the same data, settings
    and seed give the same sample (which examples, how often), so a resumed run trains on the
    same data.
    """

    model_config = ApiModel.model_config | {"json_schema_extra": {"x-kubernetes-validations": [{
        "rule": "has(self.metadataField) || (has(self.rules) && size(self.rules) > 0)",
        "message": "training.balance needs metadataField or rules to label the groups",
    }]}}

    metadataField: Optional[str] = Field(
        None, min_length=1, max_length=128,
        description="The key of each line's `metadata` object that holds its group (a string, number or boolean). "
        "Lines without it are labelled by `rules`, else `defaultGroup`.")
    rules: list[GroupRule] = Field(default_factory=list, max_length=MAX_GROUPS,
                                   description="Group labels from the text, tried in order.")
    defaultGroup: _GROUP = Field("other", description="The group of an example nothing labels.")
    weights: dict[str, Annotated[float, Field(ge=0, le=1000)]] = Field(
        default_factory=dict, max_length=MAX_GROUPS,
        description="Relative weight per group (a group not listed: 1; 0 leaves the group out). Unset: equal.")
    seed: Optional[int] = Field(None, ge=0, le=2**32 - 1,
                                description="Seed of the re-sampling; defaults to training.seed.")


class GroupCount(ApiModel):
    """One group's examples before and after balancing."""

    name: str = Field(..., max_length=128, description="The group.")
    before: int = Field(0, ge=0, description="Training examples in the group before balancing.")
    after: int = Field(0, ge=0, description="Training examples drawn from the group (repeats counted).")
    weight: float = Field(1.0, ge=0, description="Its weight.")


class BalanceReport(ApiModel):
    """Group counts of a balanced run (also in the adapter manifest, dataset.balance)."""

    before: int = Field(0, ge=0, description="Training examples before balancing.")
    after: int = Field(0, ge=0, description="Training examples after balancing.")
    seed: int = Field(0, ge=0, description="Seed the sample was drawn with.")
    groups: list[GroupCount] = Field(default_factory=list, max_length=MAX_GROUPS, description="Per group.")
