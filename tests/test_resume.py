"""A run stopped at a checkpoint and resumed trains exactly as the run that was never stopped.

Two methods whose Φ depends on more than the batch in hand:

- `t3s` reads `state`: each token's history (first confidence, visits, anchor flag), saved with every checkpoint as
  `priority_state.safetensors` and restored on resume (`trl_priority.statistics.state.TokenState`);
- `rho1` with a `priority_schedule` on its kept ratio and a `priority_warmup_ratio`: both read the training progress
  `global_step / max_steps`, which the checkpoint's trainer state restores.

Each is trained N = 6 steps without stopping, and separately stopped after step k = 3 (right after checkpoint-3 is
written, as `trl-priority sft` stops on SIGTERM: same `max_steps`, so the learning-rate schedule and the progress are
those of the long run), then resumed from checkpoint-3 to step N in a fresh trainer. The per-step losses of
`trainer.state.log_history`, the logged scheduled values, the final weights and the method's state must match.
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.conftest import StopAfter
from trl_priority import PrioritySFTTrainer
from trl_priority.statistics.state import STATE_FILE, TokenState


N, K = 6, 3


def _train(make_model, tokenizer, dataset, args, stop_after=None, resume_from=None, **kwargs):
    callbacks = [StopAfter(stop_after)] if stop_after is not None else None
    trainer = PrioritySFTTrainer(
        model=make_model(), args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=callbacks, **kwargs
    )
    trainer.train(resume_from_checkpoint=resume_from)
    return trainer


def _logged(trainer, key: str) -> list[float]:
    return [log[key] for log in trainer.state.log_history if "loss" in log]


def _assert_same_weights(trainer, expected) -> None:
    weights, reference = trainer.model.state_dict(), expected.model.state_dict()
    assert weights.keys() == reference.keys()
    for name, value in weights.items():
        torch.testing.assert_close(value, reference[name], rtol=1e-6, atol=1e-7, msg=f"{name} differs")


def _run_three_ways(tmp_path, make_model, tokenizer, dataset, make_args, **settings):
    """(uninterrupted, stopped at K, resumed from checkpoint-K) trainers, all with max_steps = N."""

    def args(name):
        return make_args(output_dir=str(tmp_path / name), max_steps=N, save_strategy="steps", save_steps=K, **settings)

    full = _train(make_model, tokenizer, dataset, args("full"))
    stopped = _train(make_model, tokenizer, dataset, args("stopped"), stop_after=K)
    assert stopped.state.global_step == K
    checkpoint = str(tmp_path / "stopped" / f"checkpoint-{K}")
    assert os.path.isdir(checkpoint) and not os.path.exists(tmp_path / "stopped" / f"checkpoint-{N}")
    resumed = _train(make_model, tokenizer, dataset, args("stopped"), resume_from=checkpoint)
    assert resumed.state.global_step == N
    return full, stopped, resumed


def test_stateful_method_resumes_to_the_same_losses_weights_and_state(
    tmp_path, make_model, tokenizer, datasets_, make_args
):
    # 4 examples, 2 per step: each token is revisited every 2 steps, so t3s decides anchors from step 3 on, and the
    # checkpoint at step 3 holds a history that steps 4-6 read
    full, stopped, resumed = _run_three_ways(
        tmp_path,
        make_model,
        tokenizer,
        datasets_.prompt_completion(4),
        make_args,
        priority="t3s",
        priority_args={"threshold": 0.1},
    )
    saved = TokenState()
    saved.load(os.path.join(tmp_path, "stopped", f"checkpoint-{K}"))
    assert {name.split("/")[0] for name in saved.state_dict()} == {"first_logps", "visits", "anchor"}

    losses = _logged(full, "loss")
    assert len(losses) == N
    assert _logged(stopped, "loss") == pytest.approx(losses[:K], rel=1e-6)
    assert _logged(resumed, "loss") == pytest.approx(losses, rel=1e-6)  # steps 1-3 from the checkpoint, 4-6 trained
    assert _logged(resumed, "priority/effective_tokens") == pytest.approx(_logged(full, "priority/effective_tokens"))
    _assert_same_weights(resumed, full)

    final, expected = resumed.priority_state.state_dict(), full.priority_state.state_dict()
    assert final.keys() == expected.keys()
    for key, row in final.items():
        torch.testing.assert_close(row, expected[key], equal_nan=True, msg=f"state {key} differs")
    anchors = [row for key, row in expected.items() if key.startswith("anchor/")]
    assert any((row == 1).any() for row in anchors) and any((row == 0).any() for row in anchors)  # a real split
    assert os.path.isfile(os.path.join(tmp_path, "stopped", f"checkpoint-{N}", STATE_FILE))


def test_scheduled_values_continue_after_resume(tmp_path, make_model, model_dir, tokenizer, datasets_, make_args):
    # rho1 keeps the top `ratio` of tokens by excess loss; the ratio moves from 1.0 to 0.3 over training, and Φ is
    # blended from uniform SFT over the first 3/4 of it: both differ at every step, before and after the resume
    full, stopped, resumed = _run_three_ways(
        tmp_path,
        make_model,
        tokenizer,
        datasets_.prompt_completion(8),
        make_args,
        priority="rho1",
        priority_args={"ratio": 0.3},
        priority_schedule={"ratio": {"start": 1.0, "end": 0.3, "kind": "linear"}},
        priority_warmup_ratio=0.75,
        ref_model_name_or_path=model_dir(seed=1),
    )
    progress = [step / N for step in range(N)]  # global_step / max_steps while step + 1 trains
    expected_ratio = [1.0 - 0.7 * s for s in progress]
    expected_warmup = [min(1.0, s / 0.75) for s in progress]
    for trainer in (full, resumed):
        assert _logged(trainer, "priority/ratio") == pytest.approx(expected_ratio)
        assert _logged(trainer, "priority/warmup_weight") == pytest.approx(expected_warmup)
    assert _logged(stopped, "priority/ratio") == pytest.approx(expected_ratio[:K])
    # The kept fraction follows the ratio (a step keeps round(ratio · n) of its n tokens, Φ > 0 on the blended rest
    # until the warm-up ends), and the losses and weights follow the run that never stopped
    assert _logged(resumed, "priority/kept_fraction") == pytest.approx(_logged(full, "priority/kept_fraction"))
    assert _logged(resumed, "loss") == pytest.approx(_logged(full, "loss"), rel=1e-6)
    _assert_same_weights(resumed, full)
