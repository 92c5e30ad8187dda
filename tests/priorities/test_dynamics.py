"""Dynamics priorities (EntroDrop, T3S) against hand-computed schedules and naive loops written from the equations."""

from __future__ import annotations

import math
import shutil

import pytest
import torch

from tests.conftest import phi_of
from trl_priority import PriorityError, PrioritySFTTrainer, get_priority
from trl_priority.priorities.dynamics import entrodrop_drop_rate
from trl_priority.statistics.state import STATE_FILE, TokenState


# ------------------------------------------------------------------------------------------------------------------
# EntroDrop: the schedule
# ------------------------------------------------------------------------------------------------------------------
def naive_sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def naive_drop_rate(s: float, r_max: float, k: float, m: float) -> float:
    """r(s) = r_max·(σ(k(s−m)) − σ(−km)) / (σ(k(1−m)) − σ(−km)), written out."""
    low = naive_sigmoid(-k * m)
    return r_max * (naive_sigmoid(k * (s - m)) - low) / (naive_sigmoid(k * (1 - m)) - low)


@pytest.mark.parametrize(
    "s, expected",
    [
        # Defaults r_max = 0.5, k = 10, m = 0.5. σ(−5) = 0.0066928509, σ(5) = 0.9933071491, σ(−2.5) = 0.0758581800,
        # σ(2.5) = 0.9241418200, σ(−4) = 0.0179862100: r(s) = 0.5·(σ(10(s − 0.5)) − σ(−5)) / (σ(5) − σ(−5))
        (0.0, 0.0),
        (0.1, 0.5 * (0.0179862100 - 0.0066928509) / 0.9866142982),  # 0.0057232
        (0.25, 0.5 * (0.0758581800 - 0.0066928509) / 0.9866142982),  # 0.0350518
        (0.5, 0.25),  # the midpoint of a symmetric rescaled sigmoid is half-way
        (0.75, 0.5 * (0.9241418200 - 0.0066928509) / 0.9866142982),  # 0.4649482
        (1.0, 0.5),
    ],
)
def test_entrodrop_schedule_hand_computed(s, expected):
    assert entrodrop_drop_rate(s, max_drop=0.5, steepness=10.0, midpoint=0.5) == pytest.approx(expected, abs=1e-9)


def test_entrodrop_schedule_other_settings_against_the_closed_form():
    for r_max, k, m in [(0.3, 4.0, 0.2), (0.9, 25.0, 0.7), (0.5, 0.01, 0.5), (0.6, 500.0, 0.3)]:
        rates = [entrodrop_drop_rate(s / 20, max_drop=r_max, steepness=k, midpoint=m) for s in range(21)]
        assert rates[0] == pytest.approx(0.0, abs=1e-12) and rates[-1] == pytest.approx(r_max, abs=1e-12)
        assert all(a <= b for a, b in zip(rates, rates[1:]))  # the drop only grows
        if k < 100:  # exp(−500·0.3) underflows in the naive form; the steep case is checked by its ends
            for s, rate in zip(range(21), rates):
                assert rate == pytest.approx(naive_drop_rate(s / 20, r_max, k, m), rel=1e-6, abs=1e-9)
    # A tiny steepness is a straight line: r(s) ≈ r_max·s
    assert entrodrop_drop_rate(0.3, max_drop=0.5, steepness=1e-3, midpoint=0.5) == pytest.approx(0.15, rel=1e-4)
    # A very steep sigmoid is a step at the midpoint
    assert entrodrop_drop_rate(0.29, max_drop=0.6, steepness=500.0, midpoint=0.3) < 1e-2
    assert entrodrop_drop_rate(0.31, max_drop=0.6, steepness=500.0, midpoint=0.3) > 0.59


def test_entrodrop_kept_fraction_is_one_minus_the_drop_rate():
    selection = get_priority("entrodrop").selection
    args = get_priority("entrodrop").resolve_args({"max_drop": 0.8, "steepness": 6.0, "midpoint": 0.4})
    for s in (0.0, 0.2, 0.4, 0.9, 1.0):
        assert selection.kept_fraction(args, s) == pytest.approx(1 - naive_drop_rate(s, 0.8, 6.0, 0.4), abs=1e-9)


# ------------------------------------------------------------------------------------------------------------------
# EntroDrop: Φ
# ------------------------------------------------------------------------------------------------------------------
def naive_entrodrop(entropy: torch.Tensor, mask: torch.Tensor, progress: float, r_max, k, m) -> list[list[float]]:
    """Keep the round-half-up((1 − r)·n) (at least 1) supervised tokens of highest entropy; ties: earlier first."""
    supervised = [(b, t) for b in range(mask.shape[0]) for t in range(mask.shape[1]) if mask[b, t]]
    keep = math.floor((1 - naive_drop_rate(progress, r_max, k, m)) * len(supervised) + 0.5)
    keep = max(1, keep) if supervised else 0
    ranked = sorted(range(len(supervised)), key=lambda i: (-entropy[supervised[i]].item(), i))
    phi = [[0.0] * mask.shape[1] for _ in range(mask.shape[0])]
    for i in ranked[:keep]:
        b, t = supervised[i]
        phi[b][t] = 1.0
    return phi


def entrodrop_phi(entropy, mask, progress, **priority_args):
    """Φ as the trainer forms it for a micro-batch (`tests.conftest.phi_of`): the selection, then the priority."""
    identity = torch.arange(entropy.numel()).view(entropy.shape).float()
    statistics = {
        "entropy": entropy,
        "mask": mask,
        "example_index": identity // entropy.shape[1],
        "token_position": identity % entropy.shape[1],
        "progress": torch.tensor(progress),
    }
    return phi_of("entrodrop", statistics, progress, **priority_args)


@pytest.mark.parametrize("progress", [0.0, 0.3, 0.5, 0.8, 0.99])
@pytest.mark.parametrize("settings", [{}, {"max_drop": 0.9, "steepness": 3.0, "midpoint": 0.25}])
def test_entrodrop_oracle_loop(progress, settings):
    generator = torch.Generator().manual_seed(int(progress * 100))
    entropy = torch.rand(3, 11, generator=generator) * 4  # (B, T-1)
    entropy[0, 2] = entropy[1, 5] = entropy[2, 0]  # a tie across rows
    mask = torch.rand(3, 11, generator=generator) > 0.25
    mask[2, 0] = True
    full = {"max_drop": 0.5, "steepness": 10.0, "midpoint": 0.5, **settings}
    phi = entrodrop_phi(entropy, mask, progress, **settings)
    expected = naive_entrodrop(entropy, mask, progress, full["max_drop"], full["steepness"], full["midpoint"])
    assert phi.tolist() == expected


def test_entrodrop_hand_case_ties_and_all_masked_rows():
    # 5 supervised tokens, progress 0.5 with defaults: r = 0.25, keep round(0.75·5) = round(3.75) = 4.
    # Entropies 2, 1, 3, 1, 1(ignored), 0.5: the tie at 1 keeps the earlier position.
    entropy = torch.tensor([[2.0, 1.0, 3.0, 1.0, 1.0, 0.5], [9.0, 9.0, 9.0, 9.0, 9.0, 9.0]])
    mask = torch.tensor([[True, True, True, True, False, True], [False] * 6])
    phi = entrodrop_phi(entropy, mask, 0.5)
    assert phi.tolist() == [[1.0, 1.0, 1.0, 1.0, 0.0, 0.0], [0.0] * 6]
    # Nothing is dropped at the start of training
    assert entrodrop_phi(entropy, mask, 0.0).tolist() == mask.float().tolist()
    # At least one token is kept, even with a drop rate that rounds every token away: keep round(0.05·5) = 0 → 1
    phi = entrodrop_phi(entropy, mask, 1.0, max_drop=0.95)
    assert phi.tolist() == [[0.0, 0.0, 1.0, 0.0, 0.0, 0.0], [0.0] * 6]


# ------------------------------------------------------------------------------------------------------------------
# EntroDrop, the position paper's Table 1 form: Φ ~ Bernoulli(1 − e^{−λH}), drawn from the token and the step
# ------------------------------------------------------------------------------------------------------------------
def bernoulli_phi(entropy, example, position, progress, **priority_args):
    """Φ as the trainer forms it (`tests.conftest.phi_of`): the variant's selection keeps a fraction of 1, every token."""
    priority = get_priority("entrodrop")
    args = priority.resolve_args({"variant": "bernoulli", **priority_args})
    assert priority.selection.kept_fraction(args, progress) == 1.0
    statistics = {
        "entropy": entropy,
        "mask": torch.ones_like(entropy, dtype=torch.bool),
        "example_index": example.float(),
        "token_position": position.float(),
        "progress": torch.tensor(progress),
    }
    return phi_of("entrodrop", statistics, progress, variant="bernoulli", **priority_args)


@pytest.mark.parametrize("entropy_scale", [1.0, 2.5])
def test_entrodrop_bernoulli_mean_is_the_closed_form(entropy_scale):
    # 5 entropy levels, 8000 tokens each (400 examples × 20 positions per level): E[Φ] = 1 − e^{−λH}, σ ≤ 0.0056
    levels = torch.tensor([0.0, 0.05, math.log(2), 1.5, 4.0])
    examples, positions = torch.meshgrid(torch.arange(400), torch.arange(100), indexing="ij")  # (400, 100)
    entropy = levels[positions % 5]  # (400, 100): column t has level t mod 5
    phi = bernoulli_phi(entropy, examples, positions, 0.3, entropy_scale=entropy_scale)
    assert set(phi.unique().tolist()) <= {0.0, 1.0}
    for i, level in enumerate(levels.tolist()):
        expected = 1 - math.exp(-entropy_scale * level)
        mean = phi[:, i::5].mean().item()
        assert mean == pytest.approx(expected, abs=0.02), level
    assert phi[:, 0::5].sum() == 0  # H = 0: never kept


def test_entrodrop_bernoulli_is_deterministic_per_token_and_step():
    examples, positions = torch.meshgrid(torch.arange(50), torch.arange(40), indexing="ij")
    entropy = torch.full((50, 40), math.log(2))  # kept with probability 1/2
    phi = bernoulli_phi(entropy, examples, positions, 0.25)
    # Same tokens, another batch layout (rows shuffled): the same draw per token
    order = torch.randperm(50, generator=torch.Generator().manual_seed(0))
    shuffled = bernoulli_phi(entropy[order], examples[order], positions[order], 0.25)
    assert torch.equal(shuffled, phi[order])
    # Another step, or another seed: a fresh draw (about half the tokens change for p = 1/2)
    for other in (
        bernoulli_phi(entropy, examples, positions, 0.5),
        bernoulli_phi(entropy, examples, positions, 0.25, seed=1),
    ):
        changed = (other != phi).float().mean().item()
        assert 0.4 < changed < 0.6
    # And the same step again: the same draw (a resumed run sees what the first run saw)
    assert torch.equal(bernoulli_phi(entropy, examples, positions, 0.25), phi)


def test_entrodrop_bernoulli_refuses_a_step_wide_scope():
    with pytest.raises(PriorityError, match="scope: step"):
        get_priority("entrodrop").resolve_args({"variant": "bernoulli", "scope": "step"})


# ------------------------------------------------------------------------------------------------------------------
# T3S: Φ over visits, with a hand-made state
# ------------------------------------------------------------------------------------------------------------------
class NaiveT3S:
    """The online T3S rule, token by token, with plain dicts keyed by (example, position)."""

    def __init__(self, threshold: float = 0.0, decide_at_visit: int = 2):
        self.threshold, self.decide_at_visit = threshold, decide_at_visit
        self.visits, self.first, self.anchor = {}, {}, {}

    def visit(self, example_index, token_position, logps, mask, writable=True) -> list[list[float]]:
        phi = []
        for b in range(mask.shape[0]):
            row = []
            for t in range(mask.shape[1]):
                key = (int(example_index[b, t]), int(token_position[b, t]))
                if not mask[b, t] or key[0] < 0:
                    row.append(0.0)
                    continue
                value = float(logps[b, t])
                visit = self.visits.get(key, 0) + 1
                anchor = self.anchor.get(key)
                if anchor is None and visit >= self.decide_at_visit and key in self.first:
                    anchor = value - self.first[key] > self.threshold
                    if writable:
                        self.anchor[key] = anchor
                if writable:
                    self.first.setdefault(key, value)
                    self.visits[key] = visit
                row.append(0.0 if anchor else 1.0)
            phi.append(row)
        return phi


def t3s_phi(state: TokenState, example_index, token_position, logps, mask, writable=True, **priority_args):
    priority = get_priority("t3s")
    statistics = {"logps": logps, "mask": mask, "state": state.bind(example_index, token_position, writable)}
    return priority(statistics, priority.resolve_args(priority_args))


def test_t3s_hand_made_visits():
    # Two examples, three tokens each; row 1 has a padded position (identity −1)
    index = torch.tensor([[0, 0, 0], [1, 1, -1]])
    position = torch.tensor([[1, 2, 3], [1, 2, -1]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    state = TokenState()
    lp = lambda *rows: torch.tensor(rows).log()  # noqa: E731

    # Visit 1: everything trains; the confidences are remembered
    phi = t3s_phi(state, index, position, lp([0.2, 0.5, 0.4], [0.3, 0.6, 0.9]), mask)
    assert phi.tolist() == [[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]]
    # Visit 2: rose (0.2→0.6, 0.3→0.35) → anchors, Φ = 0; fell (0.5→0.1) or unchanged (0.4→0.4, not > 0) → 1
    phi = t3s_phi(state, index, position, lp([0.6, 0.1, 0.4], [0.35, 0.2, 0.9]), mask)
    assert phi.tolist() == [[0.0, 1.0, 1.0], [0.0, 1.0, 0.0]]
    # Visit 3, the rows in another order (shuffled): the anchors are static, whatever the confidences do now
    phi = t3s_phi(state, index.flip(0), position.flip(0), lp([0.01, 0.9, 0.9], [0.01, 0.9, 0.9]), mask.flip(0))
    assert phi.tolist() == [[0.0, 1.0, 0.0], [0.0, 1.0, 1.0]]
    table = {key: row for key, row in state.state_dict().items()}
    assert table["anchor/0"][1:].tolist() == [1.0, 0.0, 0.0] and table["anchor/1"][1:].tolist() == [1.0, 0.0]
    assert table["visits/0"][1:].tolist() == [3.0, 3.0, 3.0]
    torch.testing.assert_close(table["first_logps/0"][1:], torch.tensor([0.2, 0.5, 0.4]).log())


def test_t3s_reading_without_writing_keeps_the_history():
    index, position, mask = torch.tensor([[4, 4]]), torch.tensor([[1, 2]]), torch.tensor([[True, True]])
    state = TokenState()
    t3s_phi(state, index, position, torch.tensor([[0.2, 0.5]]).log(), mask)
    before = {key: row.clone() for key, row in state.state_dict().items()}
    # An evaluation (not writable) that would decide anchors changes nothing
    phi = t3s_phi(state, index, position, torch.tensor([[0.9, 0.1]]).log(), mask, writable=False)
    assert phi.tolist() == [[0.0, 1.0]]
    after = state.state_dict()
    assert before.keys() == after.keys() and all(before[k].allclose(after[k], equal_nan=True) for k in before)
    # So the real second visit still decides from the first confidences
    phi = t3s_phi(state, index, position, torch.tensor([[0.1, 0.9]]).log(), mask)
    assert phi.tolist() == [[1.0, 0.0]]


@pytest.mark.parametrize("threshold, decide_at_visit", [(0.0, 2), (0.05, 2), (-0.05, 3), (0.0, 4)])
def test_t3s_oracle_over_shuffled_epochs(threshold, decide_at_visit):
    """Five epochs of a tiny dataset in shuffled batches; Φ and the stored anchors match the naive rule."""
    generator = torch.Generator().manual_seed(decide_at_visit)
    lengths = [5, 3, 6, 4, 2, 5]  # tokens per example
    confidence = {e: torch.rand(n, generator=generator) for e, n in enumerate(lengths)}
    naive, state = NaiveT3S(threshold, decide_at_visit), TokenState()
    for epoch in range(5):
        order = torch.randperm(len(lengths), generator=generator).tolist()
        for batch in (order[:3], order[3:]):
            width = max(lengths[e] for e in batch) + 1
            index = torch.full((len(batch), width), -1)
            position = torch.full((len(batch), width), -1)
            logps = torch.zeros(len(batch), width)
            for row, example in enumerate(batch):
                n = lengths[example]
                index[row, :n] = example
                position[row, :n] = torch.arange(1, n + 1)
                drift = (torch.rand(n, generator=generator) - 0.5) * 0.6  # confidences move up and down
                confidence[example] = (confidence[example] + drift).clamp(0.01, 0.99)
                logps[row, :n] = confidence[example].log()
            mask = (index >= 0) & (torch.rand(index.shape, generator=generator) > 0.1)  # a few ignored labels
            phi = t3s_phi(state, index, position, logps, mask, threshold=threshold, decide_at_visit=decide_at_visit)
            assert phi.tolist() == naive.visit(index, position, logps, mask), (epoch, batch)
    tables = state.state_dict()
    for (example, pos), anchor in naive.anchor.items():
        assert tables[f"anchor/{example}"][pos].item() == float(anchor)
    assert sum(1 for key in tables if key.startswith("anchor/")) == len({e for e, _ in naive.anchor})


# ------------------------------------------------------------------------------------------------------------------
# Through the trainer
# ------------------------------------------------------------------------------------------------------------------
SPLIT = {"threshold": 0.1}  # splits the confidence gains of the tiny runs below into anchors and others


def expected_targets(dataset) -> set[tuple[int, int]]:
    """(example, position) of every supervised target of the prepared rows: a token with a label that is not the
    first of its document (a document's first token is never predicted)."""
    targets = set()
    for row in dataset:
        for j in range(1, len(row["input_ids"])):
            if row["labels"][j] != -100 and row["token_position"][j] > 0:
                targets.add((int(row["example_index"][j]), int(row["token_position"][j])))
    return targets


def stored(state: TokenState, name: str) -> dict[tuple[int, int], float]:
    out = {}
    for key, row in state.state_dict().items():
        table, example = key.rsplit("/", 1)
        if table == name:
            out.update({(int(example), p): v for p, v in enumerate(row.tolist()) if not math.isnan(v)})
    return out


@pytest.mark.parametrize(
    "layout",
    [{}, {"padding_free": True, "max_length": None}, {"packing": True, "max_length": 64}],
    ids=["padded", "padding_free", "packing"],
)
def test_t3s_trains_epochs_and_its_state_covers_every_token(layout, make_model, tokenizer, datasets_, make_args):
    epochs = 3
    # Every confidence of this tiny run rises in epoch 1 (by 0.03 to 0.25 nats): a threshold of 0.1 splits them
    args = make_args(priority="t3s", priority_args=SPLIT, max_steps=-1, num_train_epochs=epochs, **layout)
    trainer = PrioritySFTTrainer(
        model=make_model(), args=args, train_dataset=datasets_.prompt_completion(4), processing_class=tokenizer
    )
    trainer.train()
    targets = expected_targets(trainer.train_dataset)
    assert {example for example, _ in targets} == {0, 1, 2, 3}
    visits = stored(trainer.priority_state, "visits")
    assert visits.keys() == targets and set(visits.values()) == {float(epochs)}
    assert stored(trainer.priority_state, "first_logps").keys() == targets
    anchors = stored(trainer.priority_state, "anchor")
    assert anchors.keys() == targets and set(anchors.values()) <= {0.0, 1.0}
    num_anchors = int(sum(anchors.values()))
    assert 0 < num_anchors < len(anchors)
    # Epoch 1 trains every token once; each later epoch every token but the anchors
    logs = [log for log in trainer.state.log_history if "priority/effective_tokens" in log]
    steps_per_epoch = len(logs) // epochs
    kept = [
        sum(log["priority/effective_tokens"] for log in logs[i : i + steps_per_epoch]) for i in (0, steps_per_epoch)
    ]
    assert all(log["priority/kept_fraction"] == 1.0 for log in logs[:steps_per_epoch])
    assert kept == [len(targets), len(targets) - num_anchors]
    assert sum(log["priority/effective_tokens"] for log in logs) == len(targets) + 2 * (len(targets) - num_anchors)


def test_t3s_resumes_with_its_state(tmp_path, make_model, tokenizer, datasets_, make_args):
    # 4 examples, 2 per step: 2 steps per epoch. The checkpoint at step 3 is mid-epoch 2: half the anchors decided
    args = make_args(priority="t3s", priority_args=SPLIT, max_steps=6, save_strategy="steps", save_steps=3)
    dataset = datasets_.prompt_completion(4)

    def run(checkpoint=None):
        trainer = PrioritySFTTrainer(model=make_model(), args=args, train_dataset=dataset, processing_class=tokenizer)
        trainer.train(resume_from_checkpoint=checkpoint)
        return trainer, [log["loss"] for log in trainer.state.log_history if "loss" in log]

    full, losses = run()
    checkpoint = tmp_path / "out" / "checkpoint-3"
    saved = TokenState()
    saved.load(str(checkpoint))
    assert 0 < len(stored(saved, "anchor")) < len(stored(saved, "first_logps"))  # some decided, some not yet
    anchors = stored(full.priority_state, "anchor")
    assert 0 < sum(anchors.values()) < len(anchors)

    resumed, resumed_losses = run(str(checkpoint))
    assert len(resumed_losses) == 6
    assert resumed_losses == pytest.approx(losses, rel=1e-6)
    assert stored(resumed.priority_state, "anchor") == stored(full.priority_state, "anchor")

    # The same checkpoint with its token history emptied: steps 4-6 differ, so the state really is what resumes
    amnesic = tmp_path / "amnesic"
    shutil.copytree(checkpoint, amnesic)
    TokenState().save(str(amnesic))
    assert (amnesic / STATE_FILE).is_file()
    _, forgetful_losses = run(str(amnesic))
    assert forgetful_losses[:3] == pytest.approx(losses[:3], rel=1e-6)
    assert forgetful_losses[3:] != pytest.approx(losses[3:], rel=1e-3)


@pytest.mark.parametrize("scope, accumulation", [("micro_batch", 1), ("step", 2)])
def test_entrodrop_kept_fraction_follows_the_schedule(
    scope, accumulation, make_model, tokenizer, datasets_, make_args
):
    settings = {"max_drop": 0.8, "steepness": 8.0, "midpoint": 0.5, "scope": scope}
    max_steps = 8
    args = make_args(
        priority="entrodrop",
        priority_args=settings,
        max_steps=max_steps,
        gradient_accumulation_steps=accumulation,
    )
    trainer = PrioritySFTTrainer(
        model=make_model(), args=args, train_dataset=datasets_.prompt_completion(8), processing_class=tokenizer
    )
    trainer.train()
    logs = [log for log in trainer.state.log_history if "priority/kept_fraction" in log]
    assert len(logs) == max_steps
    for log in logs:
        progress = (log["step"] - 1) / max_steps  # the step logged as i trained at global_step i − 1
        expected = 1 - naive_drop_rate(progress, 0.8, 8.0, 0.5)
        # round(·) on a micro-batch of about 25-50 supervised tokens: within a few hundredths
        assert log["priority/kept_fraction"] == pytest.approx(expected, abs=0.05), log["step"]
    assert logs[0]["priority/kept_fraction"] == 1.0 and logs[-1]["priority/kept_fraction"] < 0.4


def test_entrodrop_keeps_the_highest_entropy_tokens(make_model, tokenizer, datasets_, make_args):
    args = make_args(priority="entrodrop", priority_args={"max_drop": 0.6}, max_steps=3)
    trainer = PrioritySFTTrainer(
        model=make_model(), args=args, train_dataset=datasets_.prompt_completion(4), processing_class=tokenizer
    )
    trainer.train()  # progress is now 1: keep round(0.4 · n)
    batch = trainer.data_collator(list(trainer.train_dataset.select(range(4))))
    phi = trainer.token_priorities(batch)
    # Entropies from the model's full logits, independent of the fused head
    with torch.no_grad():
        logits = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logprobs = logits[:, :-1].float().log_softmax(-1)
    entropy = -(logprobs.exp() * logprobs).sum(-1)  # (B, T-1)
    mask = batch["labels"][:, 1:] != -100
    n = int(mask.sum())
    assert int(phi.sum()) == math.floor(0.4 * n + 0.5)
    kept, dropped = entropy[(phi == 1) & mask], entropy[(phi == 0) & mask]
    assert kept.min() >= dropped.max() - 1e-5
