"""trl-priority: token priority for supervised fine-tuning, as an extension of TRL.

Every target token's loss is weighted by a priority Φ:  L = Σ_t Φ_t · (−log π_θ(y_t | y_<t)) / N.

```python
from trl_priority import PrioritySFTConfig, PrioritySFTTrainer, available_priorities, register_priority
```
"""

from importlib.metadata import PackageNotFoundError, version

from trl_priority.config import PrioritySFTConfig
from trl_priority.objectives import LossTerm
from trl_priority.priorities import (
    Priority,
    PriorityError,
    available_priorities,
    compose,
    get_priority,
    register_priority,
)
from trl_priority.references.precompute import precompute_reference_statistics
from trl_priority.trainer import PrioritySFTTrainer


try:
    __version__ = version("trl-priority")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

__all__ = [
    "LossTerm",
    "Priority",
    "PriorityError",
    "PrioritySFTConfig",
    "PrioritySFTTrainer",
    "available_priorities",
    "compose",
    "get_priority",
    "precompute_reference_statistics",
    "register_priority",
]
