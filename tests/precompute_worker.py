"""One process of the two-process `precompute-ref` test (`tests/test_stop_across_ranks.py`); not collected by pytest.

    OMP_NUM_THREADS=1 python -m torch.distributed.run --standalone --nproc_per_node 2 tests/precompute_worker.py \\
        --output_dir /tmp/pre

Fills `ref_cache_dir` over 7 rows on 2 processes (gathered in pieces of 2 rows) and writes `<output_dir>/rank-<r>.json`:
the rows of values handed to the entry's writing code on this process, per call (the writer: every row, a piece of
at most 2 at a time; the other: none), the entry's key and the cached `ref_logps` every process reads back.
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

    from trl_priority import PrioritySFTTrainer
    from trl_priority.references import disk_cache as ref_cache
    from trl_priority.references import precompute

    state = PartialState(cpu=True)
    # Rows of values handed to the entry's writing code, per call: all at once (`write_entry`), or piece by piece
    handed = []
    write_entry = ref_cache.write_entry

    def whole(root, key, columns, meta):
        handed.append(len(next(iter(columns.values()), [])))
        return write_entry(root, key, columns, meta)

    ref_cache.write_entry = whole
    if hasattr(ref_cache, "EntryWriter"):
        add = ref_cache.EntryWriter.add

        def piece(self, rows):
            handed.append(len(rows))
            return add(self, rows)

        ref_cache.EntryWriter.add = piece
    precompute.GATHER_PIECE_ROWS = 2
    tokenizer = build_tokenizer()
    with state.main_process_first():
        reference = save_model_dir(os.path.join(output_dir, "models"), tokenizer, 1)
    args = build_args(
        os.path.join(output_dir, "run"), priority="prift_prob", ref_model_name_or_path=reference, use_cpu=True,
        ref_cache_dir=os.path.join(output_dir, "cache"), ref_cache_batch_size=2, per_device_train_batch_size=1,
    )  # fmt: skip
    trainer = PrioritySFTTrainer(
        model=build_model(tokenizer), args=args, train_dataset=prompt_completion_dataset(7), processing_class=tokenizer
    )
    record = {
        "handed": handed,
        "key": trainer.ref_cache_entries[0].key,
        "ref_logps": [list(row) for row in trainer.train_dataset["ref_logps"]],
    }
    with open(os.path.join(output_dir, f"rank-{state.process_index}.json"), "w") as file:
        json.dump(record, file)
    close_process_group()


if __name__ == "__main__":
    main()
