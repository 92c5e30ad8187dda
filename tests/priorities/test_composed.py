"""Composed priorities: product, min and weighted sum of registered ones, a `Priority` everywhere one is taken."""

from __future__ import annotations

import json
import math
import os
import pickle
from pathlib import Path

import pytest
import torch

from trl_priority import PriorityError, PrioritySFTTrainer, compose, get_priority
from trl_priority.priorities.composed import ComposedPriority
from trl_priority.scripts import sft


# Three supervised tokens and one ignored: p (policy), q (reference), a made-up span on the second token
P = [0.5, 0.2, 0.9, 0.3]
Q = [0.4, 0.6, 0.1, 0.7]
MASK = torch.tensor([[True, True, True, False]])


def hand_statistics() -> dict[str, torch.Tensor]:
    return {
        "mask": MASK,
        "logps": torch.tensor([P]).log(),
        "ref_logps": torch.tensor([Q]).log(),
        "made_up": torch.tensor([[0.0, 1.0, 0.0, 0.0]]),
        "progress": torch.tensor(0.0),
    }


def phi(spec, priority_args=None) -> list[float]:
    priority = get_priority(spec)
    return priority(hand_statistics(), priority.resolve_args(priority_args)).squeeze(0).tolist()


def close(values, expected):
    assert values == pytest.approx(expected, abs=1e-6)


def test_product_min_and_sum_against_hand_values():
    # Worked by hand from P and Q: dft Φ = p, prift_prob Φ = q, sft Φ = 1; the ignored 4th token gets 0
    close(phi({"product": ["dft", "prift_prob"]}), [0.20, 0.12, 0.09, 0.0])
    close(phi({"min": ["dft", "prift_prob"]}), [0.4, 0.2, 0.1, 0.0])
    close(phi({"sum": {"dft": 0.5, "sft": 0.5}}), [0.75, 0.6, 0.95, 0.0])
    close(phi({"sum": ["dft", "prift_prob"]}), [0.9, 0.8, 1.0, 0.0])  # a list: every weight 1


def test_signed_parts_combine_by_hand():
    # ignorance: Φ = −weight on the made-up token, 1 elsewhere
    close(phi({"product": ["ignorance", "prift_prob"]}, {"ignorance": {"weight": 0.5}}), [0.4, -0.3, 0.1, 0.0])
    close(phi({"min": ["ignorance", "dft"]}), [0.5, -1.0, 0.9, 0.0])  # the most negative wins
    close(phi({"sum": {"sft": 1.0, "ignorance": 0.5}}), [1.5, 0.5, 1.5, 0.0])


def test_each_part_keeps_its_own_hyperparameters():
    # dft reads the reference (q) through its `signal` switch, profit keeps the policy's p > tau: q · 1[p > 0.25]
    spec = {"product": ["dft", "profit"]}
    close(phi(spec, {"dft": {"signal": "reference"}, "profit": {"tau": 0.25}}), [0.4, 0.0, 0.1, 0.0])
    priority = get_priority(spec)
    args = priority.resolve_args({"dft": {"signal": "reference"}, "profit": {"tau": 0.25}})
    assert args["dft.signal"] == "reference" and args["profit.signal"] == "policy" and args["profit.tau"] == 0.25
    assert priority.resolve_args(args) == args  # resolving what it returned changes nothing
    assert priority.resolve_args({"dft.signal": "reference", "profit.tau": 0.25}) == args


def test_statistics_are_the_union_of_the_parts():
    verified = get_priority({"product": ["verifier", "prift_prob"]})
    assert set(verified.all_statistics) == {"verdict", "mask", "ref_logps"}
    assert verified.reference_used(verified.resolve_args({})) and verified.source == "reference"
    assert verified.reference_statistics_for(verified.resolve_args({})) == ("logps",)
    # No part reads the reference: the trainer runs none
    policy_only = get_priority({"product": ["dft", "profit"]})
    assert not policy_only.reference_used(policy_only.resolve_args({}))
    assert set(policy_only.statistics_for(policy_only.resolve_args({}))) == {"logps", "mask"}
    # ... until one part's `signal` switch reads the reference
    switched = policy_only.resolve_args({"dft": {"signal": "reference"}})
    assert policy_only.reference_used(switched)
    assert set(policy_only.statistics_for(switched)) == {"ref_logps", "logps", "mask"}
    # A selecting part brings its selection and its score's statistics; an explicit reference stays explicit
    selecting = get_priority({"min": ["rho1", "faithful"]})
    assert selecting.reference == "explicit" and selecting.selection is not None
    args = selecting.resolve_args({"rho1": {"ratio": 0.5, "scope": "micro_batch"}})
    assert selecting.selection.kept_fraction(args, 0.0) == 0.5 and selecting.selection.scope_of(args) == "micro_batch"
    assert {"selected", "nonfactual", "ref_logps", "logps"} <= set(selecting.statistics_for(args))


@pytest.mark.parametrize(
    "spec, regime",
    [
        ({"product": ["profit", "sftkey"]}, "hard"),  # {0, 1} · {0, 1} stays in {0, 1}
        ({"min": ["profit", "sftkey"]}, "hard"),
        ({"sum": ["profit", "sftkey"]}, "soft"),  # 1 + 1 = 2
        ({"product": ["profit", "dft"]}, "soft"),
        ({"min": ["profit", "verifier"]}, "signed"),  # signed if any part is
        ({"product": ["verifier", "prift_prob"]}, "signed"),
        ({"sum": {"dft": 1.0, "sft": -0.5}}, "signed"),  # a negative weight
    ],
)
def test_the_regime_is_derived(spec, regime):
    assert get_priority(spec).regime == regime


@pytest.mark.parametrize(
    "spec, args, message",
    [
        ({"product": ["dft"]}, None, "at least two"),
        ({"divide": ["dft", "sft"]}, None, "one key, product | min | sum"),
        ({"product": {"dft": 1.0, "sft": 1.0}}, None, "takes a list"),
        ({"sum": {"dft": float("nan"), "sft": 1.0}}, None, "finite numbers"),
        ({"product": ["dft", "dft"]}, None, "more than once"),
        ({"product": ["dtf", "sft"]}, None, "Did you mean 'dft'"),
        ({"min": ["rho1", "forgetting"]}, None, "at most one selecting method"),
        ({"product": ["forgetting", "ignorance"]}, None, "two negative weights give a positive one"),
        ({"product": ["asft", "verifier"]}, None, "adds loss terms"),
        ({"product": ["target_sft", "verifier"]}, None, "adds loss terms"),
        ({"product": ["verifier", "prift_prob"]}, {"verifier": {"wrong_weight": -2}}, r"wrong_weight=-2.0 is outside"),
        ({"product": ["verifier", "prift_prob"]}, {"verifier": {"wrong_wieght": 0}}, r"Unknown priority_args"),
        ({"product": ["verifier", "prift_prob"]}, {"wrong_weight": -0.5}, "Write it under its part"),
        ({"product": ["verifier", "prift_prob"]}, {"ratio": 0.5}, "Unknown priority_args key 'ratio'"),
        ({"product": ["verifier", "prift_prob"]}, {"verifier": {"checker": "abacus"}}, "abacus"),
        ({"product": ["eaft", "profit"]}, {"eaft": {"k": 5}}, None),  # the control: a valid composition
    ],
)
def test_bad_compositions_are_named(spec, args, message):
    if message is None:  # a valid case among the invalid ones: the table's control
        get_priority(spec).resolve_args(args)
        return
    with pytest.raises(PriorityError, match=message):
        get_priority(spec).resolve_args(args)


def test_a_statistic_hyperparameter_shared_by_two_parts_must_agree():
    from trl_priority import register_priority
    from trl_priority.priorities import registry

    def flat_topk(topk_entropy, mask, *, k: int = 20):
        """Φ = H_top-k / ln k"""
        return topk_entropy / math.log(k) * mask

    register_priority(flat_topk, name="flat_topk", regime="soft", paper="a test")
    try:
        # eaft and flat_topk both read `topk_entropy`, computed once per run with one k
        composed = compose("product", ["eaft", "flat_topk"])
        assert composed.resolve_args({"eaft": {"k": 5}, "flat_topk": {"k": 5}})["k"] == 5
        with pytest.raises(PriorityError, match="'eaft' and 'flat_topk' both set `k`"):
            composed.resolve_args({"eaft": {"k": 5}})
    finally:
        registry._REGISTRY.pop("flat_topk")


def test_compose_from_python_and_config(make_args):
    priority = compose("product", ["verifier", "prift_prob"])
    assert isinstance(priority, ComposedPriority) and priority.name == "product(verifier, prift_prob)"
    assert priority.spec == {"product": ["verifier", "prift_prob"]}
    assert pickle.loads(pickle.dumps(priority)).name == priority.name  # training_args.bin pickles it as its spec
    assert compose("sum", {"dft": 0.5, "sft": 0.5}).name == "sum(0.5*dft, 0.5*sft)"
    assert "Φ_verifier · Φ_prift_prob" in priority.fn.__doc__

    config = make_args(
        priority={"product": ["verifier", "prift_prob"]}, priority_args={"verifier": {"wrong_weight": -0.5}}
    )
    assert config.priority_name == "product(verifier, prift_prob)"
    # On the command line both arrive as JSON strings
    config = make_args(priority='{"min": ["dft", "prift_prob"]}', priority_args='{"dft": {"signal": "reference"}}')
    assert config.priority == {"min": ["dft", "prift_prob"]} and config.priority_args == {
        "dft": {"signal": "reference"}
    }
    with pytest.raises(ValueError, match="not valid JSON"):
        make_args(priority='{"min": [dft]}')
    with pytest.raises(PriorityError, match="wrong_weight=-3.0 is outside"):
        make_args(priority={"product": ["verifier", "prift_prob"]}, priority_args={"verifier": {"wrong_weight": -3}})
    # A schedule moves a part's hyperparameter by its composed name; one read by a statistic cannot move
    config = make_args(
        priority={"product": ["rho1", "verifier"]},
        priority_args={"verifier": {"wrong_weight": -0.5}},
        priority_schedule={"rho1.ratio": {"start": 1.0, "end": 0.6}},
    )
    assert config.priority_schedule["rho1.ratio"]["end"] == 0.6
    with pytest.raises(PriorityError, match="cannot move it"):
        make_args(priority={"product": ["eaft", "dft"]}, priority_schedule={"eaft.k": {"start": 5, "end": 10}})


def test_a_recipe_composes(tmp_path):
    recipe = tmp_path / "composed.yaml"
    recipe.write_text(
        "priority: {product: [verifier, prift_prob]}\n"
        "priority_args: {verifier: {wrong_weight: -0.5}, prift_prob: {}}\n"
        f"output_dir: {tmp_path / 'out'}\nbf16: false\n"
    )
    _, training_args, _, _ = sft.make_parser().parse_args_and_config(["--config", str(recipe)])
    assert training_args.priority_name == "product(verifier, prift_prob)"
    assert training_args.priority_args == {"verifier": {"wrong_weight": -0.5}, "prift_prob": {}}
    shipped = Path(__file__).parents[2] / "recipes" / "verified_prift.yaml"
    _, training_args, _, _ = sft.make_parser().parse_args_and_config(["--config", str(shipped)])
    assert get_priority(training_args.priority).name == "product(verifier, prift_prob)"
    # Flags override a recipe with a composition as JSON, as `trl-priority sft` passes them
    flags = ["--priority", '{"min": ["dft", "prift_prob"]}', "--priority_args", '{"dft": {"signal": "reference"}}']
    _, training_args, _, _ = sft.make_parser().parse_args_and_config(["--config", str(recipe), *flags])
    assert training_args.priority_name == "min(dft, prift_prob)"
    assert training_args.priority_args == {"dft": {"signal": "reference"}}


def test_trains_and_weights_like_its_parts(make_model, tokenizer, datasets_, make_args, label_logps):
    """Two steps on a tiny model; at step 0 the reference is the starting model, so product(dft, prift_prob) gives
    Φ = p · q = p², p from the model's full logits (an oracle independent of the fused head)."""
    model = make_model()
    trainer = PrioritySFTTrainer(
        model=model,
        args=make_args(priority={"product": ["dft", "prift_prob"]}),
        train_dataset=datasets_.prompt_completion(4),
        processing_class=tokenizer,
    )
    assert trainer.reference is not None  # prift_prob reads the reference, so the trainer built one
    batch = trainer.data_collator(list(trainer.train_dataset.select(range(2))))
    expected = label_logps(model, batch).exp() ** 2 * (batch["labels"][:, 1:] != -100)
    torch.testing.assert_close(trainer.token_priorities(batch), expected, atol=1e-5, rtol=1e-4)
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)


def test_no_reference_is_built_when_no_part_reads_one(make_model, tokenizer, datasets_, make_args):
    trainer = PrioritySFTTrainer(
        model=make_model(),
        args=make_args(priority={"min": ["dft", "profit"]}),
        train_dataset=datasets_.prompt_completion(2),
        processing_class=tokenizer,
    )
    assert trainer.reference is None


def test_checkpoint_round_trip_and_a_changed_composition_is_refused(make_model, tokenizer, datasets_, make_args):
    def trainer(priority, priority_args=None, **settings):
        return PrioritySFTTrainer(
            model=make_model(),
            args=make_args(priority=priority, priority_args=priority_args, **settings),
            train_dataset=datasets_.prompt_completion(4),
            processing_class=tokenizer,
        )

    spec, args = {"product": ["dft", "profit"]}, {"profit": {"tau": 0.001}}
    first = trainer(spec, args, save_strategy="steps", save_steps=1)
    first.train()
    checkpoint = os.path.join(first.args.output_dir, "checkpoint-1")
    with open(os.path.join(checkpoint, "priority.json")) as file:
        record = json.load(file)
    assert record["priority"] == "product(dft, profit)" and record["priority_args"]["profit.tau"] == 0.001
    # The same composition resumes, and ends where the uninterrupted run ended
    resumed = trainer(spec, args)
    resumed.train(resume_from_checkpoint=checkpoint)
    assert resumed.state.global_step == 2
    first_loss = [log["loss"] for log in first.state.log_history if "loss" in log][-1]
    resumed_loss = [log["loss"] for log in resumed.state.log_history if "loss" in log][-1]
    assert resumed_loss == pytest.approx(first_loss, rel=1e-5)
    # Another op, or other settings of a part: refused
    for other, other_args in [({"min": ["dft", "profit"]}, args), (spec, {"profit": {"tau": 0.2}})]:
        with pytest.raises(ValueError, match="trained with other priority settings"):
            trainer(other, other_args).train(resume_from_checkpoint=checkpoint)


def test_list_shows_how_to_compose_and_every_example_composes(capsys):
    import yaml

    from trl_priority.tools.cli import main

    assert main(["list"]) == 0
    out = capsys.readouterr().out
    examples = [line.split("#")[0] for line in out.splitlines() if line.strip().startswith("priority: {")]
    assert len(examples) == 3
    for line in examples:
        assert isinstance(get_priority(yaml.safe_load(line)["priority"]), ComposedPriority)


def test_the_reference_cache_takes_a_composition(make_model, tokenizer, datasets_, make_args, tmp_path):
    """The cache key covers the reference statistics and their settings, not the method: a composition whose part
    reads `ref_logps` reuses what prift_prob alone cached, and training reads it back without a reference forward."""
    calls = []

    def reference(seed=1):
        model = make_model(seed=seed)
        model.register_forward_hook(lambda *_: calls.append(1))
        return model

    def trainer(priority):
        return PrioritySFTTrainer(
            model=make_model(),
            args=make_args(priority=priority, ref_cache_dir=str(tmp_path / "cache")),
            train_dataset=datasets_.prompt_completion(4),
            processing_class=tokenizer,
            ref_model=reference(),
        )

    alone = trainer("prift_prob")
    assert not alone.ref_cache_entries[0].reused and calls
    calls.clear()
    composed = trainer({"product": ["dft", "prift_prob"]})
    assert composed.ref_cache_entries[0].reused and composed.ref_cache_entries[0].key == alone.ref_cache_entries[0].key
    composed.train()
    assert not calls  # neither the cache fill nor training ran the reference


def test_a_step_wide_selection_part_selects_over_the_whole_step(
    make_model, tokenizer, datasets_, make_args, monkeypatch
):
    """min(rho1, sft) with two micro-batches per step: rho1's selection runs over both (its `scope: step`) with its
    own ratio, and Φ is the selection itself (min with 1)."""
    from trl_priority import trainer as trainer_module

    selections, select_over_step = [], trainer_module.select_over_step

    def spy(scores, masks, fraction, accelerator=None):
        selections.append((len(scores), fraction))
        return select_over_step(scores, masks, fraction, accelerator)

    monkeypatch.setattr(trainer_module, "select_over_step", spy)
    trainer = PrioritySFTTrainer(
        model=make_model(),
        args=make_args(
            priority={"min": ["rho1", "sft"]},
            priority_args={"rho1": {"ratio": 0.5}},
            gradient_accumulation_steps=2,
            per_device_train_batch_size=2,
        ),
        train_dataset=datasets_.prompt_completion(8),
        processing_class=tokenizer,
        ref_model=make_model(seed=1),
    )
    assert trainer.priority.selection.scope_of(trainer.priority_args) == "step"
    trainer.train()
    kept = [log["priority/kept_fraction"] for log in trainer.state.log_history if "priority/kept_fraction" in log]
    assert kept and all(abs(value - 0.5) < 0.1 for value in kept)  # half of each step's tokens, whichever micro-batch
    assert selections == [(2, 0.5), (2, 0.5)]  # one selection per optimizer step, over both of its micro-batches


def test_verified_prift_is_the_verifier_times_the_reference_probability(make_model, tokenizer, make_args, label_logps):
    """product(verifier, prift_prob) against its parts computed apart: the verifier trained alone (its checker
    finding the wrong step, `wrong_weight` from the composition's arguments) times q = p at step 0 (the reference is
    the starting model), p from the full logits."""
    from datasets import Dataset

    dataset = Dataset.from_dict(
        {
            "prompt": ["Tom has 3 apples and buys 4 more. How many apples? ", "A box holds 6 pens. How many in 2? "],
            "completion": ["3 + 4 = 8 apples.\n#### 8", "6 * 2 = 12 pens.\n#### 12"],  # the first one is wrong
        }
    )

    def trainer(priority, priority_args):
        return PrioritySFTTrainer(
            model=make_model(),
            args=make_args(priority=priority, priority_args=priority_args),
            train_dataset=dataset,
            processing_class=tokenizer,
        )

    composed = trainer({"product": ["verifier", "prift_prob"]}, {"verifier": {"wrong_weight": -0.5}})
    alone = trainer("verifier", {"wrong_weight": -0.5})
    batch = composed.data_collator(list(composed.train_dataset))
    verdict_weights = alone.token_priorities(alone.data_collator(list(alone.train_dataset)))
    assert (verdict_weights < 0).any() and (verdict_weights[1] >= 0).all()  # the checker marks the wrong result
    expected = verdict_weights * label_logps(composed.model, batch).exp()
    torch.testing.assert_close(composed.token_priorities(batch), expected, atol=1e-5, rtol=1e-4)
