"""Token priorities: one module per family, every method registered by name.

Importing this package registers every built-in method.
"""

from trl_priority.priorities import (  # noqa: F401  (registration side effects)
    contrastive,
    distribution,
    dynamics,
    example_level,
    external,
    intrinsic,
    multimodal,
    privacy,
    reference,
    signed,
    weighted,
    weighting,
)
from trl_priority.priorities.composed import ComposedPriority, compose
from trl_priority.priorities.registry import (
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
    "ComposedPriority",
    "Fraction",
    "Hyperparameter",
    "NonNegative",
    "PositiveInt",
    "Priority",
    "PriorityError",
    "Probability",
    "Range",
    "available_priorities",
    "compose",
    "get_priority",
    "register_priority",
]
