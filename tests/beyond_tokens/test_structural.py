"""S2FT (structural priority): the selection against per-head gradient norms computed naively, only the selected slices
change in training, the optimizer holds only them, and the saved model is a plain checkpoint."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaForCausalLM

from trl_priority import PrioritySFTConfig, PrioritySFTTrainer
from trl_priority.beyond_tokens.structural import S2FTArgs, apply_s2ft, merge_s2ft


def batches_of(tokenizer, n_batches=2, size=2):
    from tests.conftest import QUESTIONS

    texts = [q + " " + a for q, a in QUESTIONS]
    out = []
    for i in range(n_batches):
        enc = tokenizer(texts[i * size : (i + 1) * size], return_tensors="pt", padding=True)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels})
    return out


def naive_scores(model, batches):
    """Per layer: [‖∇W_o[:, head h columns]‖ for h], [‖∇W_down[:, c]‖ for c], from `.backward()` and Python loops."""
    model.zero_grad()
    for batch in batches:
        model(**batch).loss.backward()
    layers = []
    for layer in model.model.layers:
        g_o, g_down = layer.self_attn.o_proj.weight.grad, layer.mlp.down_proj.weight.grad
        d = model.config.hidden_size // model.config.num_attention_heads
        heads = []
        for h in range(model.config.num_attention_heads):
            total = 0.0
            for row in range(g_o.shape[0]):
                for col in range(h * d, (h + 1) * d):
                    total += g_o[row, col].item() ** 2
            heads.append(math.sqrt(total))
        channels = [math.sqrt(sum(g_down[row, c].item() ** 2 for row in range(g_down.shape[0]))) for c in range(64)]
        layers.append((heads, channels))
    model.zero_grad()
    return layers


def top(scores, k):
    return sorted(sorted(range(len(scores)), key=lambda i: -scores[i])[:k])


def test_selection_is_the_top_heads_and_channels_by_naive_gradient_norm(tokenizer, make_model):
    batches = batches_of(tokenizer)
    expected = naive_scores(make_model(), batches)
    selection = apply_s2ft(make_model(), batches, S2FTArgs(head_ratio=0.5, channel_ratio=0.1))
    for layer, (heads, channels) in enumerate(expected):
        assert selection["heads"][layer] == top(heads, 2)  # 0.5 of 4 heads
        assert selection["channels"][layer] == top(channels, 7)  # ceil(0.1 · 64)
        assert selection["scores"][layer][0].tolist() == pytest.approx(heads, rel=1e-4)


def test_threshold_selects_every_slice_above_tau(tokenizer, make_model):
    batches = batches_of(tokenizer)
    expected = naive_scores(make_model(), batches)
    ranked = sorted(expected[0][0])
    tau = (ranked[1] + ranked[2]) / 2  # between layer 0's second and third heads: two heads are above it
    every = [s for heads, channels in expected for s in heads + channels]
    assert min(abs(s - tau) for s in every) > 1e-4 * tau  # no score so close to τ that rounding could decide
    selection = apply_s2ft(make_model(), batches, S2FTArgs(threshold=tau))
    for layer, (heads, channels) in enumerate(expected):
        assert selection["heads"][layer] == [h for h, s in enumerate(heads) if s > tau]
        assert selection["channels"][layer] == [c for c, s in enumerate(channels) if s > tau]
    assert len(selection["heads"][0]) == 2


def test_only_the_selected_slices_train_and_the_optimizer_holds_only_them(tokenizer, make_model, datasets_, tmp_path):
    model = make_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    args = PrioritySFTConfig(
        output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-2,
        report_to="none", save_strategy="no", max_length=64, disable_tqdm=True, bf16=False,
        priority="dft", structural_priority="s2ft",
    )  # fmt: skip
    trainer = PrioritySFTTrainer(
        model=model, args=args, train_dataset=datasets_.prompt_completion(8), processing_class=tokenizer
    )
    selection = trainer.structural_selection
    # 1 of 4 heads (8 columns of o_proj) and ceil(0.05 · 64) = 4 channels of down_proj, times 32 rows, per layer
    assert selection["trainable_parameters"] == 2 * (32 * 8 + 32 * 4)
    trainer.train()
    optimized = [p for group in trainer.optimizer.param_groups for p in group["params"]]
    assert sum(p.numel() for p in optimized) == 2 * (32 * 8 + 32 * 4)
    assert sum(s["exp_avg"].numel() for s in trainer.optimizer.state.values()) == 2 * (32 * 8 + 32 * 4)

    after = trainer.model.state_dict()  # Δ folded into the weights
    assert set(after) == set(before)
    for name, old in before.items():
        changed = (after[name] != old).any(dim=0) if after[name].dim() == 2 else (after[name] != old).any()
        layer = int(name.split(".")[2]) if ".layers." in name else None
        if name.endswith("o_proj.weight"):
            columns = [h * 8 + i for h in selection["heads"][layer] for i in range(8)]
            assert changed.nonzero().flatten().tolist() == columns, name
        elif name.endswith("down_proj.weight"):
            assert changed.nonzero().flatten().tolist() == selection["channels"][layer], name
        else:
            assert not changed.any(), f"{name} changed but is frozen"

    trainer.save_model(str(tmp_path / "saved"))
    reloaded = LlamaForCausalLM.from_pretrained(str(tmp_path / "saved"))
    batch = batches_of(tokenizer, 1)[0]
    with torch.no_grad():
        expected = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        got = reloaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    merge_s2ft(trainer.model)
    with torch.no_grad():
        merged = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(merged, expected, rtol=1e-5, atol=1e-5)


def test_random_strategy_selects_the_same_budget(tokenizer, make_model):
    selection = apply_s2ft(make_model(), None, S2FTArgs(strategy="random", seed=3))
    assert [len(h) for h in selection["heads"]] == [1, 1] and [len(c) for c in selection["channels"]] == [4, 4]


@pytest.mark.parametrize(
    "args, message",
    [
        ({"head_ratio": 0}, r"head_ratio=0.*outside \(0, 1\]"),
        ({"heads": 2}, r"Unknown S2FT argument\(s\) \['heads'\]"),
        ({"strategy": "weights"}, "not one of 'gradient', 'random'"),
    ],
)
def test_bad_arguments_fail_in_the_config(args, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        PrioritySFTConfig(output_dir=str(tmp_path), structural_priority="s2ft", structural_priority_args=args)


def test_s2ft_with_lora_is_an_error(tokenizer, make_model, datasets_, make_args):
    from peft import LoraConfig

    args = make_args(structural_priority="s2ft")
    with pytest.raises(ValueError, match="replaces LoRA"):
        PrioritySFTTrainer(
            model=make_model(), args=args, train_dataset=datasets_.prompt_completion(4), processing_class=tokenizer,
            peft_config=LoraConfig(target_modules="all-linear"),
        )  # fmt: skip


def test_every_row_beyond_tokens_has_a_recipe_a_readme_row_and_is_listed(capsys):
    from pathlib import Path

    from trl_priority.beyond_tokens import ROWS
    from trl_priority.tools.cli import main

    root = Path(__file__).parents[2]
    readme = (root / "README.md").read_text().split("### Table 1 rows that are not a token weight")[1]
    assert main(["list"]) == 0
    listed = capsys.readouterr().out.split("not a token weight")[1]
    for row in ROWS:
        assert (root / "recipes" / f"{row['row']}.yaml").is_file(), row["row"]
        assert f"| `{row['row']}` |" in readme, row["row"]
        assert row["row"] in listed and row["paper"] in listed
