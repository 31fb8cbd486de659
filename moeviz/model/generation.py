"""Routing while the model generates: the prompt and every new token, captured with the KV
cache, in one RoutingTrace whose `generated_from` marks where generation began.

The loop is written out rather than delegated to `model.generate`, because `generate` never
forwards the last token it samples: here every generated token goes through the model once,
so the trace covers all of them and equals one forward pass over the same tokens.
"""

from __future__ import annotations

import dataclasses

import torch

from moeviz.model.capture import DEFAULT_MAX_TOKENS, build_trace, last_logit_only, recording_routers
from moeviz.model.tokens import Tokenized, token_strings, tokenize
from moeviz.trace import RoutingTrace


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: greedy when temperature is 0, else sampled with a seed."""

    max_new_tokens: int = 32
    temperature: float = 0.0
    seed: int = 0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")


def trace_generation(
    model, tokenizer, prompt: str, sampling: Sampling = Sampling(), *, model_id: str = "",
    max_tokens: int = DEFAULT_MAX_TOKENS,
) -> RoutingTrace:
    """Generate from `prompt` and return the routing of prompt + generated tokens.

    Stops at the end-of-sequence token or after `sampling.max_new_tokens`; prompt plus
    generation never exceeds `max_tokens`.
    """
    if getattr(model.config, "is_encoder_decoder", False):
        raise ValueError(
            f"Generation traces are for decoder-only models; {model.config.model_type} is an "
            "encoder-decoder model. Analyse a text instead."
        )
    prompt_tokens = tokenize(tokenizer, prompt, max_tokens - 1)
    if prompt_tokens.input_token_count > len(prompt_tokens.ids):
        raise ValueError(
            f"The prompt has {prompt_tokens.input_token_count} tokens, more than the token limit "
            f"({max_tokens}) leaves room for: shorten it or raise the limit."
        )
    budget = min(sampling.max_new_tokens, max_tokens - len(prompt_tokens.ids))
    with recording_routers(model) as collector, torch.inference_mode():
        new_ids = _generate(model, prompt_tokens.ids, budget, sampling, tokenizer.eos_token_id)
    tokenized, text = with_generation(tokenizer, prompt, prompt_tokens, new_ids)
    trace = build_trace(model, tokenized, text, collector, model_id=model_id)
    return dataclasses.replace(trace, generated_from=len(prompt_tokens.ids))


def _generate(model, prompt_ids: list[int], budget: int, sampling: Sampling, eos_id) -> list[int]:
    """Token ids generated after the prompt; each is forwarded once (routing captured)."""
    device = next(model.parameters()).device
    generator = torch.Generator(device="cpu").manual_seed(sampling.seed)
    output = model(input_ids=torch.tensor([prompt_ids], device=device), use_cache=True, **last_logit_only(model))
    new_ids: list[int] = []
    for _ in range(budget):
        next_id = _choose(output.logits[0, -1].float().cpu(), sampling.temperature, generator)
        new_ids.append(next_id)
        output = model(
            input_ids=torch.tensor([[next_id]], device=device),
            cache=output.cache,
            use_cache=True,
        )
        if next_id == eos_id:
            break
    return new_ids


def _choose(logits: torch.Tensor, temperature: float, generator: torch.Generator) -> int:
    if temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / temperature, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def with_generation(tokenizer, prompt: str, prompt_tokens: Tokenized, new_ids: list[int]):
    """Tokens, ids and character offsets of prompt + generation in the text they spell.

    Generated tokens have no offsets from the tokenizer; each one spans the characters its
    id adds to the decoded continuation.
    """
    continuation_ends = [len(tokenizer.decode(new_ids[: i + 1])) for i in range(len(new_ids))]
    starts = [0] + continuation_ends[:-1]
    base = len(prompt)
    offsets = [(base + start, base + max(start, end)) for start, end in zip(starts, continuation_ends)]
    text = prompt + tokenizer.decode(new_ids)
    ids = prompt_tokens.ids + new_ids
    tokenized = Tokenized(
        ids=ids,
        tokens=prompt_tokens.tokens + token_strings(tokenizer, new_ids),
        offsets=prompt_tokens.offsets + offsets,
        input_token_count=len(ids),
    )
    return tokenized, text
