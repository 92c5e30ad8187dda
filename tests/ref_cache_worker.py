"""One process of the two-process reference cache test (`tests/references/test_disk_cache.py`); not collected by pytest.

    OMP_NUM_THREADS=1 python -m torch.distributed.run --standalone --nproc_per_node 2 tests/ref_cache_worker.py \\
        --output_dir /tmp/two

1. `ref_cache_dir` over 5 rows: each process scores its shard (the shorter one padded by repeating its last row),
   the shards are gathered, the main process writes the entry; every process then trains one step on the columns.
2. The lazy epoch cache over 2 epochs of 4 rows, 1 row per process per step: in epoch 2 a process meets rows the
   other process scored in epoch 1, so it skips the reference only if the values were shared.

The main process writes `<output_dir>/record.json`: the entry's key, whether it was reused, the cached `ref_logps` of
every row, and the number of reference forwards each process ran through the epoch cache.
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


from tests.conftest import (  # noqa: E402
    build_args,
    build_model,
    build_tokenizer,
    prompt_completion_dataset,
    save_model_dir,
    worker_output_dir,
)
from trl_priority.scripts.sft import close_process_group  # noqa: E402


def main(argv=None) -> None:
    output_dir = worker_output_dir(argv)

    from accelerate import PartialState
    from accelerate.utils import gather_object

    from trl_priority import PrioritySFTTrainer

    state = PartialState(cpu=True)
    tokenizer = build_tokenizer()
    with state.main_process_first():  # the main process writes the reference model, the others read it
        reference = save_model_dir(os.path.join(output_dir, "models"), tokenizer, 1)
    common = dict(priority="prift_prob", ref_model_name_or_path=reference, use_cpu=True, per_device_train_batch_size=1)

    args = build_args(
        os.path.join(output_dir, "cached"),
        ref_cache_dir=os.path.join(output_dir, "cache"),
        ref_cache_batch_size=2,
        max_steps=1,
        **common,
    )
    trainer = PrioritySFTTrainer(
        model=build_model(tokenizer), args=args, train_dataset=prompt_completion_dataset(5), processing_class=tokenizer
    )
    entry = trainer.ref_cache_entries[0]
    record = {
        "key": entry.key,
        "reused": entry.reused,
        "ref_logps": [list(row) for row in trainer.train_dataset["ref_logps"]],
    }
    trainer.train()

    args = build_args(os.path.join(output_dir, "epochs"), max_steps=-1, num_train_epochs=2, **common)
    trainer = PrioritySFTTrainer(
        model=build_model(tokenizer), args=args, train_dataset=prompt_completion_dataset(4), processing_class=tokenizer
    )
    trainer.train()
    record["epoch_cache_forwards"] = gather_object([trainer._epoch_cache.forwards])
    record["steps"] = trainer.state.global_step
    if state.is_main_process:
        with open(os.path.join(output_dir, "record.json"), "w") as file:
            json.dump(record, file)
    close_process_group()


if __name__ == "__main__":
    main()
