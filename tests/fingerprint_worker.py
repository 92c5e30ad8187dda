"""One process of the FSDP2 fingerprint test (`tests/test_scale.py`); not collected by pytest.

    OMP_NUM_THREADS=1 python -m torch.distributed.run --standalone --nproc_per_node 2 tests/fingerprint_worker.py OUT

Shards the tiny model of `tests/conftest.py` with torch's `fully_shard` (gloo, CPU: each weight a `DTensor` whose
local part is this rank's rows) and writes `OUT/rank-<r>.json`: the fingerprints of two models (seeds 0 and 1)
and of a second seed-0 model, and the share of the weights this rank holds.
"""

from __future__ import annotations

import json
import os
import sys


# Run as a script, Python puts this folder first on the path, where tests/statistics, tests/data, ... (the test tree
# mirrors the package) would shadow the standard library's `statistics` and other top-level modules: the repository
# root instead
_TESTS = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [os.path.dirname(_TESTS), *(p for p in sys.path if os.path.abspath(p or ".") != _TESTS)]

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from tests.conftest import build_model, build_tokenizer  # noqa: E402
from trl_priority.references.identity import module_fingerprint  # noqa: E402


def sharded(tokenizer, seed: int) -> torch.nn.Module:
    from torch.distributed.fsdp import fully_shard

    model = build_model(tokenizer, seed=seed)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def main(output_dir: str) -> None:
    dist.init_process_group("gloo")
    tokenizer = build_tokenizer()
    first = sharded(tokenizer, 0)
    held = sum(p.to_local().numel() for p in first.parameters())
    record = {
        "world_size": dist.get_world_size(),
        "all_dtensor": all(hasattr(p, "placements") for p in first.parameters()),
        "held_share": held / sum(p.numel() for p in first.parameters()),
        "seed0": module_fingerprint(first),
        "seed1": module_fingerprint(sharded(tokenizer, 1)),
        "seed0_again": module_fingerprint(sharded(tokenizer, 0)),
    }
    with open(os.path.join(output_dir, f"rank-{dist.get_rank()}.json"), "w") as handle:
        json.dump(record, handle)
    # Both ranks done before either tears gloo down: a rank destroying its group while the other is still in its last
    # collective aborted once in CI ("terminate called without an active exception", SIGABRT on rank 1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
