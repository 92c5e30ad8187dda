"""PAINT on a tiny random LLaVA: the image-attention statistic against a naive loop over eager attention weights, only
the layers read are captured, a kernel without weights is an error, and the recipe trains two steps."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from trl_priority import PrioritySFTTrainer
from trl_priority.statistics import captured_attention
from trl_priority.tools.builtin import load_shapes

from .conftest import build_tokenizer


VLM_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n{% else %}{{ part['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_llava(attn: str = "eager") -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A LLaVA-shaped VLM (CLIP tower: 16×16 images, 4×4 patches: 16 image tokens; 2-layer Llama), random weights."""
    tokenizer = build_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tokenizer.chat_template = VLM_TEMPLATE
    image_processor = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=4, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=VLM_TEMPLATE,
    )  # fmt: skip
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=16,
            patch_size=4, projection_dim=16,
        ),
        text_config=LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        ),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )  # fmt: skip
    config._attn_implementation = config.text_config._attn_implementation = attn
    config.vision_config._attn_implementation = attn
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(config), processor


def paint_trainer(make_args, alpha=0.5, layers=1, attn="eager"):
    model, processor = build_tiny_llava(attn)
    args = make_args(priority="paint", priority_args={"alpha": alpha, "attention_layers": layers}, max_length=None)
    trainer = PrioritySFTTrainer(
        model=model, args=args, train_dataset=load_shapes(limit=4), processing_class=processor
    )
    return trainer, model


def naive_phi(model, batch, alpha, layers):
    """Φ_t = 1 + α · mean over the last `layers` layers and heads of Σ_{k image} A[t, k], by loops."""
    with torch.no_grad():
        out = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"],
            output_attentions=True,
        )  # fmt: skip
    attentions = out.attentions[-layers:]  # each (B, heads, T, T)
    image = model.config.image_token_index
    ids, labels = batch["input_ids"], batch["labels"]
    phi = torch.zeros(ids.shape[0], ids.shape[1] - 1)
    for b in range(ids.shape[0]):
        for t in range(ids.shape[1] - 1):
            if labels[b, t + 1] == -100:
                continue
            total, count = 0.0, 0
            for layer in attentions:
                for h in range(layer.shape[1]):
                    total += sum(layer[b, h, t, k].item() for k in range(ids.shape[1]) if ids[b, k] == image)
                    count += 1
            phi[b, t] = 1 + alpha * total / count
    return phi


@pytest.mark.parametrize("layers", [1, 2])
def test_phi_is_one_plus_alpha_times_the_naive_image_attention(layers, make_args):
    trainer, model = paint_trainer(make_args, alpha=0.5, layers=layers)
    batch = next(iter(trainer.get_train_dataloader()))
    phi = trainer.token_priorities(batch)
    expected = naive_phi(model, batch, 0.5, layers)
    torch.testing.assert_close(phi, expected, rtol=1e-4, atol=1e-5)
    supervised = batch["labels"][:, 1:] != -100
    assert ((phi[supervised] >= 1) & (phi[supervised] <= 1.5)).all()  # Φ ∈ [1, 1 + α]
    assert phi[supervised].std() > 0  # the tokens differ in how much they look at the image


def test_only_the_layers_read_are_captured():
    model, processor = build_tiny_llava()
    inputs = processor(images=load_shapes(limit=1)[0]["images"], text=["<image>\nhi"], return_tensors="pt")
    with captured_attention(model, 1) as weights, torch.no_grad():
        model(**inputs)
    assert len(weights) == 1 and weights[0].shape[-1] == inputs["input_ids"].shape[1]


def test_an_attention_kernel_without_weights_is_an_error(make_args):
    trainer, _ = paint_trainer(make_args, attn="sdpa")
    batch = next(iter(trainer.get_train_dataloader()))
    with pytest.raises(ValueError, match="attn_implementation='eager'"):
        trainer.token_priorities(batch)


def test_paint_recipe_trains_two_steps_on_a_tiny_vlm(tmp_path):
    from trl_priority.scripts import sft

    recipe = Path(__file__).parents[1] / "recipes" / "paint.yaml"
    assert recipe.read_text().startswith("# paint:") and "# Tested in tests/test_multimodal.py" in recipe.read_text()
    model, processor = build_tiny_llava()
    model.save_pretrained(tmp_path / "tiny-llava")
    processor.save_pretrained(tmp_path / "tiny-llava")
    overrides = [
        "--model_name_or_path", str(tmp_path / "tiny-llava"), "--output_dir", str(tmp_path / "run"),
        "--max_steps", "2", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1",
        "--disable_tqdm", "true",
    ]  # fmt: skip
    parsed = sft.make_parser().parse_args_and_config(["--config", str(recipe), *overrides])
    assert parsed[1].priority == "paint" and parsed[0].dataset_name == "builtin:shapes"
    trainer = sft.main(*parsed)
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert len(logs) == 2 and all(log["priority/mean"] > 1 for log in logs)
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()


def test_loss_is_phi_weighted_nll_from_the_full_logits(make_args):
    """The loss the trainer optimises on the VLM is Σ_t Φ_t·(−log p(y_t)) / N, log p from the model's full logits."""
    trainer, model = paint_trainer(make_args, alpha=1.0, layers=2)
    batch = next(iter(trainer.get_train_dataloader()))
    phi = trainer.token_priorities(dict(batch))
    loss = trainer.compute_loss(trainer.model, trainer._prepare_inputs(dict(batch)))
    with torch.no_grad():
        logits = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"]
        ).logits
    labels = batch["labels"][:, 1:]
    logps = logits[:, :-1].log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)  # (B, T-1)
    mask = labels != -100
    expected = torch.where(mask, phi * -logps, 0.0).sum() / mask.sum()
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-4, atol=1e-6)
