"""Shared building blocks: API identity, conditions, references, URIs."""

from __future__ import annotations

from typing import Any, ClassVar, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

GROUP = "finetune.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

#: s3://bucket[/key] or file://path. Bucket names follow the S3 naming rules.
URI_PATTERN = r"^(s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/\S*)?|file://\S+)$"
DIGEST_PATTERN = r"^sha256:[a-f0-9]{64}$"
DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
#: A DNS-1123 subdomain (names of most objects: Secrets, PriorityClasses, custom resources); <= 253 chars.
DNS_SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
#: A label key / taint key / resource name: [subdomain/]name, the name part <= 63 chars. The prefix's own
#: limit (253) is a CEL rule (prefix_rule), since a bounded repetition of the subdomain is not a regex.
QUALIFIED_NAME_PATTERN = (r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
                          r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
QUALIFIED_NAME_MAX = 253 + 1 + 63
#: A label value (also a taint value): empty, or <= 63 alphanumerics with -_. inside.
LABEL_VALUE_PATTERN = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"


def prefix_rule(what: str) -> dict:
    """CEL: the DNS prefix of a qualified name is at most 253 characters (the API server's limit)."""
    return {"rule": "!self.contains('/') || self.matches('^[^/]{1,253}/')",
            "message": f"{what}: the prefix before '/' must be no more than 253 characters"}


class ApiModel(BaseModel):
    """Base of every API type: unknown fields are errors, names are camelCase as written."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_default=True)


def uri_field(description: str, **kw: Any) -> Any:
    return Field(..., description=description, pattern=URI_PATTERN, max_length=2048, **kw)


class SecretRef(ApiModel):
    """A Secret in the same namespace holding S3 credentials."""

    name: str = Field(
        ...,
        description="Name of a Secret in the object's namespace with the keys AWS_ACCESS_KEY_ID and "
        "AWS_SECRET_ACCESS_KEY (and optionally AWS_SESSION_TOKEN). The values are passed to Jobs only "
        "through secretKeyRef and never appear in status, events or logs.",
        pattern=DNS_SUBDOMAIN_PATTERN,
        max_length=253,
    )


ConditionStatus = Literal["True", "False", "Unknown"]


class Condition(ApiModel):
    """A standard Kubernetes condition (metav1.Condition shape)."""

    type: str = Field(..., description="Type of the condition, in CamelCase (e.g. Trained, Promoted).")
    status: ConditionStatus = Field(..., description="True, False or Unknown.")
    reason: str = Field(..., description="A CamelCase machine-readable reason for the last transition.")
    message: str = Field("", description="A human-readable message about the last transition.")
    lastTransitionTime: str = Field(..., description="When the status last changed (RFC 3339).")
    observedGeneration: int = Field(0, description="The metadata.generation the condition was computed from.", ge=0)


class ObjectMeta(BaseModel):
    """Kubernetes object metadata; validated by the API server, not by this schema."""

    model_config = ConfigDict(extra="allow")


class Resource(ApiModel):
    """A top-level Kubernetes object of this API group."""

    KIND: ClassVar[str]
    PLURAL: ClassVar[str]
    SHORT_NAMES: ClassVar[tuple[str, ...]]
    SCOPE: ClassVar[str] = "Namespaced"
    PRINTER_COLUMNS: ClassVar[tuple[dict, ...]] = ()
    #: Longest metadata.name: the API server's 253, or 63 where the name becomes a label value.
    NAME_MAX_LENGTH: ClassVar[int] = 253

    apiVersion: Literal["finetune.dev/v1alpha1"] = Field(API_VERSION, description="finetune.dev/v1alpha1")
    kind: str = Field(..., description="The kind of the object.")
    metadata: ObjectMeta = Field(default_factory=ObjectMeta, description="Standard object metadata.")


def age_column() -> dict:
    return {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}
