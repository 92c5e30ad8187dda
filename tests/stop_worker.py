"""One process of the two-process stop test (`tests/test_stop_across_ranks.py`); not collected by pytest.

    OMP_NUM_THREADS=1 python -m torch.distributed.run --standalone --nproc_per_node 2 tests/stop_worker.py \\
        --output_dir /tmp/stop

Trains `dft` on a tiny model for up to 50 steps with the CLI's `StopOnSignal`; only rank 1 is sent SIGTERM, during
step 3. Each process writes `<output_dir>/rank-<r>.json` (the step it stopped after, the signal it stopped on) and
exits as `trl-priority sft`'s script does: 128 + the signal.
"""

from __future__ import annotations

import json
import os
import signal
import sys


# Run as a script, Python puts this folder first on the path, where tests/statistics, tests/data, ... (the test tree
# mirrors the package) would shadow the standard library's `statistics` and other top-level modules: the repository
# root instead
_TESTS = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [os.path.dirname(_TESTS), *(p for p in sys.path if os.path.abspath(p or ".") != _TESTS)]


from transformers import TrainerCallback  # noqa: E402

from tests.conftest import build_args, build_model, build_tokenizer, prompt_completion_dataset, worker_output_dir  # noqa: E402
from trl_priority.scripts.sft import close_process_group  # noqa: E402


class SignalRankOne(TrainerCallback):
    """SIGTERM to this process (rank 1 only) at the start of step `step`, as a scheduler killing one worker would."""

    def __init__(self, rank: int, step: int):
        self.rank, self.step = rank, step

    def on_step_begin(self, args, state, control, **kwargs):
        if self.rank == 1 and state.global_step + 1 == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def main(argv=None) -> None:
    output_dir = worker_output_dir(argv)

    from accelerate import PartialState

    from trl_priority import PrioritySFTTrainer
    from trl_priority.scripts.sft import StopOnSignal

    state = PartialState(cpu=True)
    tokenizer = build_tokenizer()
    args = build_args(
        os.path.join(output_dir, "run"), priority="dft", use_cpu=True, per_device_train_batch_size=1, max_steps=50
    )
    trainer = PrioritySFTTrainer(
        model=build_model(tokenizer), args=args, train_dataset=prompt_completion_dataset(8), processing_class=tokenizer
    )
    trainer.add_callback(SignalRankOne(state.process_index, step=3))
    trainer.add_callback(stop := StopOnSignal())  # last, as `scripts/sft.py` adds it
    trainer.train()
    record = {"step": trainer.state.global_step, "signal": stop.signum}
    with open(os.path.join(output_dir, f"rank-{state.process_index}.json"), "w") as file:
        json.dump(record, file)
    close_process_group()  # the stop is agreed, so every process gets here
    if stop.signum is not None:
        raise SystemExit(128 + stop.signum)


if __name__ == "__main__":
    main()
