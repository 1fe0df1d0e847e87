"""The v1alpha1 API of finetune.dev: the single source of truth for CRDs and docs.

Everything here is plain pydantic (no Kubernetes client, no torch), so the trainer,
the operator and the CLI all share one definition of every field.
"""

from .meta import GROUP, VERSION, API_VERSION, Condition
from .dataset import Dataset, DatasetSpec, DatasetStatus
from .finetunejob import FineTuneJob, FineTuneJobSpec, FineTuneJobStatus
from .synthetic import SyntheticDataset, SyntheticDatasetSpec, SyntheticDatasetStatus
from .federated import FederatedFineTuneJob, FederatedFineTuneJobSpec, FederatedFineTuneJobStatus
from .governance import GovernancePolicy, GovernancePolicySpec, GovernanceSpec, CHECK_NAMES
from .trainer_config import TrainerConfig

#: Every kind this API serves, in the order the CRDs are generated.
KINDS = (Dataset, FineTuneJob, GovernancePolicy, SyntheticDataset, FederatedFineTuneJob)

__all__ = [
    "GROUP", "VERSION", "API_VERSION", "Condition",
    "Dataset", "DatasetSpec", "DatasetStatus",
    "FineTuneJob", "FineTuneJobSpec", "FineTuneJobStatus",
    "SyntheticDataset", "SyntheticDatasetSpec", "SyntheticDatasetStatus",
    "FederatedFineTuneJob", "FederatedFineTuneJobSpec", "FederatedFineTuneJobStatus",
    "GovernancePolicy", "GovernancePolicySpec", "GovernanceSpec", "CHECK_NAMES",
    "TrainerConfig", "KINDS",
]
