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
from safetensors import safe_open
from safetensors.torch import load_file, save_file


STATE_FILE = "priority_state.safetensors"
FLAT_FORMAT = "flat-1"  # `save_state`'s layout: three tensors per table, whatever the number of examples


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
        save_state(self, os.path.join(directory, STATE_FILE))

    def load(self, directory: str) -> None:
        path = os.path.join(directory, STATE_FILE)
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"The checkpoint {directory} has no {STATE_FILE}: it was not written by a run of this stateful "
                "priority, so its token history cannot be restored. Resume from a checkpoint of the same method."
            )
        load_state(self, path)

    def __len__(self) -> int:
        return sum(len(table) for table in self._tables.values())


# ------------------------------------------------------------------------------------------------------------------
# On disk: a few large tensors, not one per example
# ------------------------------------------------------------------------------------------------------------------
def flatten_tables(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`{"name/example": row}` (`TokenState.state_dict`) as three tensors per table:

        name/examples  (E,)    int64    the examples stored, ascending
        name/offsets   (E+1,)  int64    example e's row is values[offsets[e] : offsets[e + 1]]
        name/values    (N,)    float32  every row, one after the other

    One tensor per example made the safetensors header (its list of tensor names, capped at 100 MB) overflow past
    about 1.2M stored examples, and the checkpoint could not be read back.
    """
    tables: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for key, row in state.items():
        name, example = key.rsplit("/", 1)
        tables.setdefault(name, []).append((int(example), row))
    flat = {}
    for name, rows in tables.items():
        rows.sort(key=lambda item: item[0])
        lengths = torch.tensor([row.numel() for _, row in rows], dtype=torch.int64)  # (E,)
        flat[f"{name}/examples"] = torch.tensor([example for example, _ in rows], dtype=torch.int64)
        flat[f"{name}/offsets"] = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
        flat[f"{name}/values"] = torch.cat([row.float().reshape(-1) for _, row in rows])
    return flat


def unflatten_tables(flat: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of `flatten_tables`: `{"name/example": row}`."""
    state = {}
    for key in flat:
        if not key.endswith("/examples"):
            continue
        name = key[: -len("/examples")]
        examples, offsets = flat[f"{name}/examples"].tolist(), flat[f"{name}/offsets"]
        rows = torch.split(flat[f"{name}/values"], (offsets[1:] - offsets[:-1]).tolist())
        state.update({f"{name}/{example}": row for example, row in zip(examples, rows)})
    return state


def save_state(state: TokenState, path: str) -> None:
    """`state` to a safetensors file, as a few large tensors (`flatten_tables`)."""
    flat = flatten_tables(state.state_dict())
    save_file({k: v.contiguous() for k, v in flat.items()}, path, metadata={"format": FLAT_FORMAT})


def load_state(state: TokenState, path: str) -> None:
    """Load a file of `save_state`, or of the older layout (one tensor per example, `name/example`)."""
    with safe_open(path, framework="pt") as file:
        flat = (file.metadata() or {}).get("format") == FLAT_FORMAT
    tensors = load_file(path)
    if flat:
        state.load_state_dict(unflatten_tables(tensors))
    else:
        state.load_state_dict({k: v for k, v in tensors.items() if not k.startswith("__empty__/")})
