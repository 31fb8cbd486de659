"""Loading local checkpoints through the same path as hub ids, offline."""

from __future__ import annotations

import numpy as np
import pytest
from transformers import LlamaConfig, LlamaForCausalLM

from moeviz.model.capture import NoRoutersError, trace_text
from moeviz.model.loading import ModelLoadError, load_model


@pytest.fixture()
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory, tiny_mixtral, tokenizer):
    path = tmp_path_factory.mktemp("tiny-mixtral")
    tiny_mixtral.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_local_checkpoint_loads_on_cpu_and_routes_like_the_original(offline, mixtral_dir, tiny_mixtral, tokenizer):
    loaded = load_model(mixtral_dir)
    assert loaded.device == "cpu" and loaded.model_id == mixtral_dir.name
    assert loaded.parameter_count == sum(p.numel() for p in tiny_mixtral.parameters())
    text = "The quick brown fox"
    original = trace_text(tiny_mixtral, tokenizer, text)
    reloaded = trace_text(loaded.model, loaded.tokenizer, text)
    np.testing.assert_array_equal(original.topk_ids, reloaded.topk_ids)
    np.testing.assert_allclose(original.router_logits, reloaded.router_logits, atol=1e-6)


def test_missing_directory_is_a_clear_error(offline, tmp_path):
    with pytest.raises(ModelLoadError, match="No model directory"):
        load_model(tmp_path / "nope")
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(tmp_path)


def test_unknown_hub_id_offline_is_a_clear_error(offline):
    with pytest.raises(ModelLoadError, match="Could not load a model from 'nobody/no-such-moe'"):
        load_model("nobody/no-such-moe")


def test_corrupt_weights_are_a_clear_error(offline, mixtral_dir, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for file in mixtral_dir.iterdir():
        (broken / file.name).write_bytes(file.read_bytes())
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match="Could not load"):
        load_model(broken)


def test_dense_checkpoint_is_refused(offline, tmp_path, tokenizer):
    config = LlamaConfig(vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(NoRoutersError, match="llama"):
        load_model(tmp_path)


def test_unknown_dtype_and_missing_gpu_are_clear_errors(mixtral_dir):
    with pytest.raises(ModelLoadError, match="Unknown dtype"):
        load_model(mixtral_dir, dtype="int3")
    with pytest.raises(ModelLoadError, match="no GPU"):
        load_model(mixtral_dir, device="cuda")
