"""`TokenState`: what a stateful method remembers about each training token across steps and checkpoints.

A method that reads the `state` statistic gets one `TokenState` for the whole run. It is keyed by the per-token
identity that the trainer adds to every example (`example_index`, `token_position`), which survives shuffling,
padding, padding-free and packing, so "this token" means the same token at every visit:

```python
@register_priority(regime="hard")
def forget_what_was_learnt_early(logps, state, mask):
    first = state.get("first_logps")  # (B, T-1), NaN where never seen
    state.set("first_logps", logps, where=mask & first.isnan())
    return (first.isnan() | (logps <= first)).float() * mask
```

The trainer saves it with every checkpoint (`priority_state.safetensors`, next to the optimizer state) and restores it
on `resume_from_checkpoint`, so a resumed run continues with the same history. Under several processes, every write
is shared with every process after each step, so each holds the whole history and the main process saves it.
"""

from __future__ import annotations

import os

import torch
from safetensors.torch import load_file, save_file


STATE_FILE = "priority_state.safetensors"


class TokenState:
    """Named per-token float tables, keyed by (example index, token position). Missing values read as NaN."""

    def __init__(self):
        self._tables: dict[str, dict[int, torch.Tensor]] = {}  # name -> example -> (positions,) float32
        self._pending: list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._index: torch.Tensor | None = None  # (B, T-1) example of each scored token, -1 on padding
        self._position: torch.Tensor | None = None  # (B, T-1)
        self._writable = True

    # -- the trainer binds each batch's identities -------------------------------------------------------------------
    def bind(self, example_index: torch.Tensor, token_position: torch.Tensor, writable: bool = True) -> TokenState:
        """Point the state at a batch's tokens. Outside training (evaluation, `token_priorities`) writes are dropped,
        so looking at Φ never changes the history."""
        self._index, self._position = example_index.long(), token_position.long()
        self._writable = writable
        return self

    def _bound(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._index is None:
            raise RuntimeError("TokenState is used outside a batch: the trainer binds it to each batch's tokens.")
        return self._index, self._position

    # -- what a priority uses ------------------------------------------------------------------------------------------
    def get(self, name: str, default: float = float("nan")) -> torch.Tensor:
        """`(B, T-1)` float32 values of `name` for this batch's tokens; `default` where nothing was stored."""
        index, position = self._bound()
        out = torch.full(index.shape, default, dtype=torch.float32)
        table = self._tables.get(name, {})
        index_cpu, position_cpu = index.cpu(), position.cpu()
        for example in index_cpu.unique().tolist():
            row = table.get(example)
            if example < 0 or row is None:
                continue
            where = (index_cpu == example) & (position_cpu >= 0) & (position_cpu < row.numel())
            values = row[position_cpu[where]]
            out[where] = torch.where(values.isnan(), default, values)
        return out.to(index.device)

    def set(self, name: str, values: torch.Tensor, where: torch.Tensor) -> None:
        """Store `values` `(B, T-1)` for the tokens where `where` is true."""
        index, position = self._bound()
        if not self._writable:
            return
        where = where.bool() & (index >= 0) & (position >= 0)
        update = (name, index[where].cpu(), position[where].cpu(), values.detach()[where].float().cpu())
        self._apply(*update)
        self._pending.append(update)

    # -- the trainer -----------------------------------------------------------------------------------------------
    @staticmethod
    def _updated_rows(table, examples, positions, values):
        """Yield `(example, row)` for every example written: its stored row (or None), grown with NaN to cover the
        written positions, with the values written in."""
        for example in examples.unique().tolist():
            at = examples == example
            pos = positions[at]
            row = table.get(example)
            size = int(pos.max()) + 1
            if row is None or row.numel() < size:
                grown = torch.full((size,), float("nan"))
                if row is not None:
                    grown[: row.numel()] = row
                row = grown
            row[pos] = values[at]
            yield example, row

    def _apply(self, name, examples, positions, values) -> None:
        table = self._tables.setdefault(name, {})
        for example, row in self._updated_rows(table, examples, positions, values):
            table[example] = row

    def sync(self, accelerator=None) -> None:
        """Share this step's writes with every process (each then holds the whole history)."""
        pending, self._pending = self._pending, []
        if accelerator is None or accelerator.num_processes == 1:
            return
        from accelerate.utils import gather_object

        everyone = gather_object([pending])  # one list per process
        for rank, updates in enumerate(everyone):
            if rank != accelerator.process_index:
                for update in updates:
                    self._apply(*update)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{name}/{example}": row for name, table in self._tables.items() for example, row in table.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self._tables = {}
        for key, row in state.items():
            name, example = key.rsplit("/", 1)
            self._tables.setdefault(name, {})[int(example)] = row.float().clone()

    def save(self, directory: str) -> None:
        state = self.state_dict() or {"__empty__/0": torch.zeros(0)}
        save_file({key: row.contiguous() for key, row in state.items()}, os.path.join(directory, STATE_FILE))

    def load(self, directory: str) -> None:
        path = os.path.join(directory, STATE_FILE)
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"The checkpoint {directory} has no {STATE_FILE}: it was not written by a run of this stateful "
                "priority, so its token history cannot be restored. Resume from a checkpoint of the same method."
            )
        self.load_state_dict({k: v for k, v in load_file(path).items() if not k.startswith("__empty__/")})

    def __len__(self) -> int:
        return sum(len(table) for table in self._tables.values())
