"""Token priorities: one module per family, every method registered by name.

Importing this package registers every built-in method.
"""

from . import (  # noqa: F401  (registration side effects)
    contrastive,
    distribution,
    dynamics,
    external,
    intrinsic,
    multimodal,
    privacy,
    reference,
    signed,
    weighting,
)
from .registry import (
    Fraction,
    Hyperparameter,
    NonNegative,
    PositiveInt,
    Priority,
    PriorityError,
    Probability,
    Range,
    available_priorities,
    get_priority,
    register_priority,
)


__all__ = [
    "Fraction",
    "Hyperparameter",
    "NonNegative",
    "PositiveInt",
    "Priority",
    "PriorityError",
    "Probability",
    "Range",
    "available_priorities",
    "get_priority",
    "register_priority",
]
