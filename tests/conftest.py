"""Fixtures: tiny real models built from configs, and a real byte-level BPE tokenizer."""

from __future__ import annotations

import os

# No machine running the tests reaches a model hub; say so before huggingface_hub reads it.
os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from transformers import MixtralConfig, MixtralForCausalLM, PreTrainedTokenizerFast, Qwen2MoeConfig, Qwen2MoeForCausalLM  # noqa: E402

TRAINING_TEXT = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "def add(a, b):\n    return a + b\n",
    "Der schnelle braune Fuchs springt über den faulen Hund.",
    "Съешь же ещё этих мягких французских булок.",
    "What is 12 + 7? Answer: 19",
]


@pytest.fixture(scope="session")
def tokenizer():
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<s>", "</s>", "<unk>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(TRAINING_TEXT, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def tiny_mixtral_config(vocab_size: int = 400) -> MixtralConfig:
    return MixtralConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=6, num_experts_per_tok=2,
        max_position_embeddings=4096,
    )


def tiny_qwen2_moe_config(vocab_size: int = 400) -> Qwen2MoeConfig:
    # decoder_sparse_step=2: layers 1 and 3 are MoE, layers 0 and 2 dense.
    return Qwen2MoeConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=48, moe_intermediate_size=24,
        shared_expert_intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, num_experts=8, num_experts_per_tok=3, decoder_sparse_step=2,
        norm_topk_prob=False, max_position_embeddings=4096,
    )


def _random_model(model_class, config):
    torch.manual_seed(0)
    model = model_class(config).eval()
    # Random routers with larger weights so that routing is far from uniform and ties are rare.
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("gate.weight"):
                parameter.normal_(0, 1.0)
    return model


@pytest.fixture(scope="session")
def tiny_mixtral():
    return _random_model(MixtralForCausalLM, tiny_mixtral_config())


@pytest.fixture(scope="session")
def tiny_qwen2_moe():
    return _random_model(Qwen2MoeForCausalLM, tiny_qwen2_moe_config())
