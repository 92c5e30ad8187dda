"""`trl_priority.phi`: Φ as a pure function (schedule → selection → priority → pooling → warm-up), on hand-made
statistics whose Φ is worked out by hand, and the trainer's Φ against it on the same batch."""

from __future__ import annotations

import math

import pytest
import torch

from tests.conftest import naive_top_fraction
from trl_priority import get_priority
from trl_priority.phi import PhiSettings, compute_phi, step_hyperparameters
from trl_priority.priorities.schedules import parse_schedule


# Two rows × three positions; (1, 2) is ignored. Rho-1's excess loss is ref_logps − logps (L_θ − L_ref):
#   (0,0) = 1.0, (0,1) = 0.0, (0,2) = 2.0 | (1,0) = −0.5, (1,1) = 3.0 | ignored (1,2) = 8.0
MASK = torch.tensor([[True, True, True], [True, True, False]])
LOGPS = torch.tensor([[-2.0, -1.0, -3.0], [-0.5, -4.0, -9.0]])
REF_LOGPS = torch.full((2, 3), -1.0)


def rho1_statistics() -> dict:
    return {"logps": LOGPS.clone(), "ref_logps": REF_LOGPS.clone(), "mask": MASK.clone()}


def rho1_settings(**settings) -> PhiSettings:
    priority = get_priority("rho1")
    args = settings.pop("args", {})
    return PhiSettings(priority, priority.resolve_args({"scope": "micro_batch", **args}), **settings)


# ------------------------------------------------------------------------------------------------------------------
# Selection
# ------------------------------------------------------------------------------------------------------------------
def test_rho1_selection_by_hand():
    # ratio 0.4 of 5 supervised tokens: k = round(2.0) = 2, the excess losses 3.0 (1,1) and 2.0 (0,2)
    phi = compute_phi(rho1_settings(args={"ratio": 0.4}), rho1_statistics())
    assert phi.tolist() == [[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]]
    # ratio 0.5: k = round(2.5) = 3 (half up), then 1.0 (0,0); the ignored 8.0 is never kept
    statistics = rho1_statistics()
    phi = compute_phi(rho1_settings(args={"ratio": 0.5}), statistics)
    assert phi.tolist() == [[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]
    assert statistics["selected"].tolist() == [[True, False, True], [False, True, False]]  # reported to the caller
    # against the naive loop of the paper's top fraction
    torch.testing.assert_close(phi, naive_top_fraction(REF_LOGPS - LOGPS, MASK, 0.5))


def test_a_selection_made_ahead_is_used_as_given():
    ahead = torch.tensor([[False, True, False], [True, False, False]])  # e.g. a step-wide one
    phi = compute_phi(rho1_settings(args={"ratio": 0.4}), rho1_statistics(), selected=ahead)
    assert phi.tolist() == ahead.float().tolist()


def test_a_step_selection_of_one_micro_batch_goes_over_the_processes():
    calls = []

    def over_processes(scores, masks, fraction):
        calls.append((len(scores), fraction))
        return [torch.zeros_like(masks[0])]  # another process held every kept token

    settings = rho1_settings(args={"ratio": 0.4, "scope": "step"})
    phi = compute_phi(settings, rho1_statistics(), over_processes=over_processes)
    assert calls == [(1, 0.4)] and not phi.any()
    # without it, a step-scoped selection is made over this batch
    assert compute_phi(settings, rho1_statistics()).tolist() == [[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]]


# ------------------------------------------------------------------------------------------------------------------
# Pooling over words
# ------------------------------------------------------------------------------------------------------------------
def dft_statistics(probs, mask, example, unit) -> dict:
    return {
        "logps": torch.tensor([probs]).log(),
        "mask": torch.tensor([mask]),
        "_example": torch.tensor([example]),
        "_unit": torch.tensor([unit]),
    }


@pytest.mark.parametrize(
    ("pooling", "expected"),
    [("max", [0.6, 0.6, 0.9, 0.9, 0.0]), ("mean", [0.4, 0.4, 0.7, 0.7, 0.0]), ("min", [0.2, 0.2, 0.5, 0.5, 0.0])],
)
def test_word_pooling_by_hand(pooling, expected):
    # DFT: Φ = p. Words 0 = {0.2, 0.6} and 1 = {0.5, 0.9}; position 4 (word 1) is ignored: it joins no pool, Φ = 0
    statistics = dft_statistics([0.2, 0.6, 0.5, 0.9, 0.3], [True] * 4 + [False], [0] * 5, [0, 0, 1, 1, 1])
    settings = PhiSettings(get_priority("dft"), {"signal": "policy"}, granularity="word", pooling=pooling)
    torch.testing.assert_close(compute_phi(settings, statistics), torch.tensor([expected]))


def test_the_same_word_id_in_two_packed_examples_is_two_words():
    statistics = dft_statistics([0.2, 0.6, 0.5, 0.9], [True] * 4, [0, 0, 1, 1], [0, 0, 0, 0])
    settings = PhiSettings(get_priority("dft"), {"signal": "policy"}, granularity="word", pooling="max")
    torch.testing.assert_close(compute_phi(settings, statistics), torch.tensor([[0.6, 0.6, 0.9, 0.9]]))


# ------------------------------------------------------------------------------------------------------------------
# Warm-up
# ------------------------------------------------------------------------------------------------------------------
def test_warmup_blend_by_hand():
    # ratio 0.4 keeps (0,2) and (1,1). warm-up 0.4 at progress 0.1: w = 0.1 / 0.4 = 0.25, Φ_eff = 0.75 + 0.25·Φ
    settings = rho1_settings(args={"ratio": 0.4}, warmup_ratio=0.4)
    phi = compute_phi(settings, rho1_statistics(), progress=0.1)
    torch.testing.assert_close(phi, torch.tensor([[0.75, 0.75, 1.0], [0.75, 1.0, 0.0]]))
    assert compute_phi(settings, rho1_statistics(), progress=0.0).tolist() == MASK.float().tolist()  # plain SFT
    assert compute_phi(settings, rho1_statistics(), progress=0.4).tolist() == [[0, 0, 1], [0, 1, 0]]  # w = 1


def test_warmup_blends_the_pooled_phi():
    # max pooling, then the blend: word {0.2, 0.6} pools to 0.6, blended at w = 0.5 to 0.5 + 0.5·0.6 = 0.8
    statistics = dft_statistics([0.2, 0.6], [True, True], [0, 0], [0, 0])
    settings = PhiSettings(get_priority("dft"), {"signal": "policy"}, granularity="word", warmup_ratio=0.5)
    torch.testing.assert_close(compute_phi(settings, statistics, progress=0.25), torch.tensor([[0.8, 0.8]]))


# ------------------------------------------------------------------------------------------------------------------
# Schedule
# ------------------------------------------------------------------------------------------------------------------
def test_schedule_by_hand():
    rho1 = get_priority("rho1")
    args = rho1.resolve_args({"ratio": 0.4})
    linear = parse_schedule({"ratio": {"start": 1.0, "end": 0.4}})
    # linear: 1.0 + (0.4 − 1.0)·0.25 = 0.85; the configured ratio is the default start
    assert step_hyperparameters(rho1, args, linear, 0.25)["ratio"] == pytest.approx(0.85)
    assert step_hyperparameters(rho1, args, {"ratio": {"end": 1.0}}, 0.5)["ratio"] == pytest.approx(0.7)
    # cosine: 1.0 − 0.6·(1 − cos(π/4))/2
    cosine = parse_schedule({"ratio": {"start": 1.0, "end": 0.4, "kind": "cosine"}})
    expected = 1.0 - 0.6 * (1 - math.cos(math.pi / 4)) / 2
    assert step_hyperparameters(rho1, args, cosine, 0.25)["ratio"] == pytest.approx(expected)
    step = parse_schedule({"ratio": {"start": 1.0, "end": 0.4, "kind": "step", "at": 0.3}})
    assert [step_hyperparameters(rho1, args, step, p)["ratio"] for p in (0.29, 0.3)] == [1.0, 0.4]
    assert step_hyperparameters(rho1, args, None, 0.5) == args and args["ratio"] == 0.4  # nothing changed in place

    # An integer hyperparameter is rounded: 1 + 3·0.6 = 2.8 → 3
    def first_k(logps, mask, *, k: int = 4):
        return mask.float()

    custom = get_priority(first_k)
    assert step_hyperparameters(custom, {"k": 4}, {"k": {"start": 1, "end": 4}}, 0.6) == {"k": 3}


def test_the_schedule_feeds_the_selection():
    # ratio 1.0 → 0.4 linearly. At progress 0.5 it is 0.7: k = round(3.5) = 4, the excess losses 3, 2, 1, 0
    settings = rho1_settings(schedule={"ratio": {"start": 1.0, "end": 0.4}})
    assert compute_phi(settings, rho1_statistics(), progress=0.5).tolist() == [[1, 1, 1], [0, 1, 0]]
    assert compute_phi(settings, rho1_statistics(), progress=1.0).tolist() == [[0, 0, 1], [0, 1, 0]]
    # hyperparameters given for the step are used as given (the trainer computes them once per step)
    step_args = settings.step_args(1.0)
    assert compute_phi(settings, rho1_statistics(), 0.5, step_args=step_args).tolist() == [[0, 0, 1], [0, 1, 0]]


# ------------------------------------------------------------------------------------------------------------------
# The trainer
# ------------------------------------------------------------------------------------------------------------------
@pytest.fixture
def rho1_trainer(make_model, priority_trainer):
    return priority_trainer(
        "rho1",
        {"ratio": 0.5, "scope": "micro_batch"},
        ref_model=make_model(seed=1),
        priority_schedule={"ratio": {"start": 1.0, "end": 0.4}},
        priority_warmup_ratio=0.5,
    )


def test_the_trainers_phi_is_the_pure_functions(rho1_trainer):
    trainer = rho1_trainer
    trainer.state.max_steps, trainer.state.global_step = 10, 2  # progress 0.2: ratio 0.88, warm-up weight 0.4
    statistics = trainer.token_statistics(trainer.train_dataset.select(range(4)))
    settings = PhiSettings.from_config(trainer.args, "rho1")  # built apart from the trainer's own
    assert dict(settings.args) == trainer.priority_args and settings.warmup_ratio == 0.5
    inputs = {name: statistics[name] for name in ("logps", "ref_logps", "mask")}
    phi = compute_phi(settings, inputs, progress=0.2)
    assert torch.equal(statistics["phi"], phi)
    assert torch.equal(statistics["selected"], inputs["selected"])
    mask = statistics["mask"]  # warm-up weight 0.4: Φ_eff = 0.6 + 0.4·Φ
    torch.testing.assert_close(phi[mask], torch.where(statistics["selected"][mask], 1.0, 0.6))
    assert trainer.token_priorities(trainer.train_dataset.select(range(4))).tolist() == phi.tolist()


def test_the_step_hyperparameters_are_computed_once_per_step(rho1_trainer, monkeypatch):
    trainer = rho1_trainer
    calls = []
    step_args = PhiSettings.step_args
    monkeypatch.setattr(PhiSettings, "step_args", lambda self, p: calls.append(p) or step_args(self, p))
    trainer.state.max_steps, trainer.state.global_step = 10, 5
    values = [trainer._step_args for _ in range(15)]
    assert calls == [0.5] and all(v is values[0] for v in values) and values[0]["ratio"] == pytest.approx(0.7)
    trainer.state.global_step = 6
    assert trainer._step_args["ratio"] == pytest.approx(0.64) and calls == [0.5, 0.6]
