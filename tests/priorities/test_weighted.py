"""`weighted`: a `weight` per message (Mistral's format) and a `weight` column per example, checked against weights
worked out from the rendered conversation and against the hand-weighted loss, also under packing and padding-free."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset

from trl_priority import PrioritySFTTrainer, get_priority
from trl_priority.data.weights import message_token_weights


# Multi-turn conversations: good, bad (unlearn) and unweighted turns; row weights 2 and (absent) 1
CONVERSATIONS = [
    (
        [
            {"role": "user", "content": "Tom has 3 apples and buys 4 more. How many apples?"},
            {"role": "assistant", "content": "3 + 4 = 7 apples.", "weight": 0.5},
            {"role": "user", "content": "A box holds 6 pens. How many pens in 2 boxes?"},
            {"role": "assistant", "content": "6 * 2 = 13 pens.", "weight": -1.0},
            {"role": "user", "content": "Sam had 10 cards and gave away 3. How many are left?"},
            {"role": "assistant", "content": "10 - 3 = 7 cards.", "weight": None},
        ],
        2.0,
    ),
    (
        [
            {"role": "user", "content": "Each bag has 5 beads. How many beads in 4 bags?"},
            {"role": "assistant", "content": "5 * 4 = 20 beads.", "weight": 0.25},
            {"role": "user", "content": "There are 9 birds and 2 fly away. How many stay?"},
            {"role": "assistant", "content": "9 - 2 = 7 birds.", "weight": None},
        ],
        None,
    ),
]


def conversation_dataset() -> Dataset:
    return Dataset.from_list([{"messages": messages, "weight": weight} for messages, weight in CONVERSATIONS])


def hand_weights(tokenizer, messages, row_weight) -> tuple[list[int], list[float]]:
    """The conversation as the test template writes it, one message at a time ("<|im_start|>role\\ncontent<|im_end|>";
    the newline after `{% endif %}` is trimmed by transformers' `trim_blocks`), each piece tokenized alone (special
    tokens split the text, so the pieces do not merge), and each piece's tokens given its message's weight times the
    row's: the oracle, built without the chat template."""
    ids, weights = [], []
    for message in messages:
        piece = f"<|im_start|>{message['role']}\n{message['content']}<|im_end|>"
        piece_ids = tokenizer(piece, add_special_tokens=False)["input_ids"]
        weight = 1.0 if message.get("weight") is None else message["weight"]
        ids += piece_ids
        weights += [weight * (1.0 if row_weight is None else row_weight)] * len(piece_ids)
    return ids, weights


def trainer_for(tokenizer, make_model, make_args, dataset, **settings):
    return PrioritySFTTrainer(
        model=make_model(),
        args=make_args(**{"priority": "weighted", "max_length": 256, **settings}),
        train_dataset=dataset,
        processing_class=tokenizer,
    )


def hand_loss(logps: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ_{w ≥ 0} w·(−log p) + Σ_{w < 0} |w|·(−log(1 − p)), over the supervised tokens, divided by their count."""
    p = logps.exp()
    per_token = torch.where(weights >= 0, -weights * logps, weights.abs() * -torch.log1p(-p))
    return (per_token * mask).sum() / mask.sum()


def test_message_weights_match_the_hand_oracle(tokenizer):
    for messages, row_weight in CONVERSATIONS:
        ids, expected = hand_weights(tokenizer, messages, row_weight)
        rendered = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        assert rendered == ids  # the oracle tokenizes what the template renders
        example = {"messages": messages, "weight": row_weight, "input_ids": ids}
        assert message_token_weights(example, tokenizer, 0) == expected
    # Six distinct stretches in the first conversation: 2·1, 2·0.5, 2·1, 2·(−1), 2·1, 2·1
    _, first = hand_weights(tokenizer, *CONVERSATIONS[0])
    assert [w for i, w in enumerate(first) if i == 0 or first[i - 1] != w] == [2.0, 1.0, 2.0, -2.0, 2.0]


def test_trains_each_turn_with_its_weight(tokenizer, make_model, make_args, label_logps):
    trainer = trainer_for(tokenizer, make_model, make_args, conversation_dataset(), assistant_only_loss=True)
    rows = list(trainer.train_dataset)
    by_ids = {tuple(hand_weights(tokenizer, m, w)[0]): hand_weights(tokenizer, m, w)[1] for m, w in CONVERSATIONS}
    for row in rows:
        assert row["data_weight"] == by_ids[tuple(row["input_ids"])]
    batch = trainer.data_collator(rows)
    mask = batch["labels"][:, 1:] != -100  # (B, T-1): the assistant turns only
    weights = torch.where(mask, batch["data_weight"][:, 1:], 0.0)  # (B, T-1): scores labels[:, t + 1]
    # Assistant turns, by hand: 2·0.5, 2·(−1), 2·1 in the first conversation; 0.25, 1 in the second
    assert set(weights[mask].tolist()) == {1.0, -2.0, 2.0, 0.25}
    phi = trainer.token_priorities(batch)
    torch.testing.assert_close(phi, weights)
    # The loss is the hand-weighted NLL (bounded unlikelihood on the unlearned turn), from the full logits
    inputs = trainer._prepare_inputs(dict(batch))
    loss = trainer.compute_loss(trainer.model, inputs)
    expected = hand_loss(label_logps(trainer.model, batch), weights, mask)
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    trainer.train()
    assert len([log for log in trainer.state.log_history if "loss" in log]) == 2


@pytest.mark.parametrize("setting", ["packing", "padding_free"])
def test_weights_travel_through_packing_and_padding_free(setting, tokenizer, make_model, make_args, label_logps):
    settings = {"packing": True} if setting == "packing" else {"padding_free": True, "max_length": None}
    dataset = Dataset.from_list([{"messages": m, "weight": w} for m, w in CONVERSATIONS * 2])
    trainer = trainer_for(tokenizer, make_model, make_args, dataset, per_device_train_batch_size=4, **settings)
    expected = {tuple(hand_weights(tokenizer, m, w)[0]): hand_weights(tokenizer, m, w)[1] for m, w in CONVERSATIONS}
    rows = list(trainer.train_dataset)
    if setting == "packing":
        assert any(len(row["seq_lengths"]) > 1 for row in rows)  # rows that hold several conversations
    # Each packed or concatenated row: every example's stretch carries that example's hand weights
    for row in rows:
        lengths = row.get("seq_lengths") or [len(row["input_ids"])]
        start = 0
        for length in lengths:
            ids = tuple(row["input_ids"][start : start + length])
            assert row["data_weight"][start : start + length] == expected[ids]
            start += length
    batch = trainer.data_collator(rows)
    mask = batch["labels"][:, 1:] != -100
    weights = torch.where(mask, batch["data_weight"][:, 1:], 0.0)
    if setting == "padding_free":
        assert batch["input_ids"].shape[0] == 1  # one row of concatenated examples
    torch.testing.assert_close(trainer.token_priorities(batch), weights)
    inputs = trainer._prepare_inputs(dict(batch))
    loss = trainer.compute_loss(trainer.model, inputs)
    with torch.no_grad():  # under padding-free the examples are told apart by position_ids alone
        logits = trainer.model(
            **{k: v for k, v in inputs.items() if k in ("input_ids", "position_ids", "attention_mask")}
        ).logits
    logps = logits[:, :-1].log_softmax(-1).gather(-1, batch["labels"][:, 1:].clamp(min=0)[..., None]).squeeze(-1)
    torch.testing.assert_close(loss, hand_loss(torch.where(mask, logps, 0.0), weights, mask), atol=1e-5, rtol=1e-5)


def test_example_weight_column_on_prompt_completion(tokenizer, make_model, make_args, datasets_):
    dataset = datasets_.prompt_completion(3).add_column("weight", [0.5, 0.0, -0.25])
    trainer = trainer_for(tokenizer, make_model, make_args, dataset)
    batch = trainer.data_collator(list(trainer.train_dataset))
    mask = batch["labels"][:, 1:] != -100  # the completions
    phi = trainer.token_priorities(batch)
    for row, weight in enumerate([0.5, 0.0, -0.25]):
        assert torch.all(phi[row][mask[row]] == weight) and torch.all(phi[row][~mask[row]] == 0)


def test_message_weight_on_a_conversational_completion(tokenizer, make_model, make_args, datasets_):
    dataset = datasets_.conversational_prompt_completion(2)
    completions = [[{**message, "weight": w} for message in c] for c, w in zip(dataset["completion"], [-0.5, 0.75])]
    dataset = dataset.remove_columns("completion").add_column("completion", completions)
    trainer = trainer_for(tokenizer, make_model, make_args, dataset)
    batch = trainer.data_collator(list(trainer.train_dataset))
    mask = batch["labels"][:, 1:] != -100  # completion-only: the assistant message
    phi = trainer.token_priorities(batch)
    for row, weight in enumerate([-0.5, 0.75]):
        assert torch.all(phi[row][mask[row]] == weight)


def test_no_weights_anywhere_is_sft(tokenizer, make_model, make_args, datasets_):
    trainer = trainer_for(tokenizer, make_model, make_args, datasets_.messages(2))
    batch = trainer.data_collator(list(trainer.train_dataset))
    mask = batch["labels"][:, 1:] != -100
    assert torch.equal(trainer.token_priorities(batch), mask.float())


@pytest.mark.parametrize(
    "rows, message",
    [
        (
            [
                {
                    "messages": [
                        {"role": "user", "content": "Hi"},
                        {"role": "assistant", "content": "7", "weight": "high"},
                    ]
                }
            ],
            r"Example 0, message 1 \(assistant\): `weight` must be a finite number.*got 'high'",
        ),
        (
            [
                {
                    "messages": [
                        {"role": "user", "content": "Hi", "weight": float("inf")},
                        {"role": "assistant", "content": "7"},
                    ]
                }
            ],
            r"Example 0, message 0 \(user\): `weight` must be a finite number.*got inf",
        ),
        (
            [
                {"prompt": "Hi ", "completion": "7", "weight": 1.0},
                {"prompt": "Hi ", "completion": "8", "weight": float("nan")},
            ],
            r"Example 1, column 'weight': `weight` must be a finite number.*got nan",
        ),
    ],
)
def test_bad_weights_name_the_row_and_message(rows, message, tokenizer, make_model, make_args):
    with pytest.raises(ValueError, match=message):
        trainer_for(tokenizer, make_model, make_args, Dataset.from_list(rows))


def test_registered_signed_with_its_sources():
    method = get_priority("weighted")
    assert method.regime == "signed" and method.source == "external"
    assert "5951" in method.paper and "Mistral" in method.paper
    data_weight = torch.tensor([[2.0, -0.5, 0.0, 3.0]])
    mask = torch.tensor([[True, True, True, False]])
    assert method({"data_weight": data_weight, "mask": mask}, {}).tolist() == [[2.0, -0.5, 0.0, 0.0]]


def test_readme_example_trains_each_turn_with_its_weight(tokenizer, make_model, make_args):
    from pathlib import Path

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    block = readme.split("## Weights in your data")[1].split("```python")[1].split("```")[0]

    def config(**settings):  # the README's settings, for a CPU test run (max_length: the whole conversation)
        return make_args(**{**settings, "output_dir": make_args().output_dir, "max_length": 512})

    namespace = {"PrioritySFTConfig": config}
    exec(block, namespace)
    trainer = PrioritySFTTrainer(
        model=make_model(), args=namespace["args"], train_dataset=namespace["ds"], processing_class=tokenizer
    )
    batch = trainer.data_collator(list(trainer.train_dataset))
    mask = batch["labels"][:, 1:] != -100  # the three assistant turns
    phi = trainer.token_priorities(batch)[mask]
    # By hand: the example's weight 2 times each turn's: 2·1, 2·(−0.5), 2·0.3, in the order of the turns
    turns = [value for i, value in enumerate(phi.tolist()) if i == 0 or phi[i - 1].item() != value]
    assert turns == pytest.approx([2.0, -1.0, 0.6])


def test_a_template_that_refuses_a_partial_conversation_is_named(tokenizer):
    import copy

    strict = copy.deepcopy(tokenizer)
    strict.chat_template = (
        "{% if messages[-1]['role'] != 'assistant' %}{{ raise_exception('the last message must be the assistant') }}"
        "{% endif %}" + tokenizer.chat_template
    )
    messages, weight = CONVERSATIONS[0]
    ids = strict.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    with pytest.raises(ValueError, match=r"Example 4: .* the template refuses the first 1 .*last message must be"):
        message_token_weights({"messages": messages, "weight": weight, "input_ids": ids}, strict, 4)


@pytest.mark.parametrize("truncation_mode", ["keep_start", "keep_end"])
def test_weights_are_truncated_with_the_tokens(truncation_mode, tokenizer, make_model, make_args):
    trainer = trainer_for(
        tokenizer, make_model, make_args, conversation_dataset(), max_length=40, truncation_mode=truncation_mode
    )
    cut = slice(None, 40) if truncation_mode == "keep_start" else slice(-40, None)
    for row, (messages, weight) in zip(trainer.train_dataset, CONVERSATIONS):
        ids, weights = hand_weights(tokenizer, messages, weight)
        assert row["input_ids"] == ids[cut] and row["data_weight"] == weights[cut]


def test_a_row_tokenized_with_another_template_is_named(tokenizer):
    messages, weight = CONVERSATIONS[0]
    ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    other = ids[:10] + [tokenizer.pad_token_id] + ids[10:]  # one token more, mid-way
    with pytest.raises(ValueError, match=r"Example 2: .* renders the conversation differently .* agree on 10 of"):
        message_token_weights({"messages": messages, "weight": weight, "input_ids": other}, tokenizer, 2)
