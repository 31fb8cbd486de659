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
from moeviz.model.tokens import Tokenized, context_length, token_strings, tokenize
from moeviz.trace import RoutingTrace

# Why a generation stopped, as `RoutingTrace.stop_reason` records it.
STOP_REASONS = {
    "eos": "the model ended the text (an end-of-sequence token)",
    "max_new_tokens": "the number of new tokens asked for was reached",
    "token_limit": "the token limit was reached",
    "context": "the model's trained context was reached",
}


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

    Stops at any end-of-sequence token (`eos_token_ids`), after `sampling.max_new_tokens`, at
    `max_tokens` tokens in all, or at the positions the model was trained on
    (`context_length`), whichever comes first; `trace.stop_reason` says which.
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
    limit, budget = _room(model.config, len(prompt_tokens.ids), sampling.max_new_tokens, max_tokens)
    eos_ids = eos_token_ids(model, tokenizer)
    with recording_routers(model) as collector, torch.inference_mode():
        new_ids = _generate(model, prompt_tokens.ids, budget, sampling, eos_ids)
    tokenized, text = with_generation(tokenizer, prompt, prompt_tokens, new_ids)
    trace = build_trace(model, tokenized, text, collector, model_id=model_id)
    return dataclasses.replace(trace, generated_from=len(prompt_tokens.ids),
                               stop_reason="eos" if new_ids[-1] in eos_ids else limit)


def eos_token_ids(model, tokenizer) -> set[int]:
    """Every id that ends a generation: the model's `generation_config.eos_token_id` (an id
    or a list, e.g. Llama 3's end-of-text and end-of-turn) and the tokenizer's `eos_token_id`."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    return {int(i) for i in [*ids, tokenizer.eos_token_id] if i is not None}


def _room(config, prompt_length: int, max_new_tokens: int, max_tokens: int) -> tuple[str, int]:
    """The limit that stops generation first (a `STOP_REASONS` key) and the new tokens it allows."""
    room = {"max_new_tokens": max_new_tokens, "token_limit": max_tokens - prompt_length}
    context = context_length(config)
    if context is not None:
        room["context"] = context - prompt_length
        if room["context"] < 1:
            raise ValueError(
                f"The prompt has {prompt_length} tokens, and {config.model_type} was trained on {context} "
                "positions: there is no room left to generate. Shorten the prompt."
            )
    limit = min(room, key=room.get)  # on a tie, the first: what the person asked for
    return limit, room[limit]


def _generate(model, prompt_ids: list[int], budget: int, sampling: Sampling, eos_ids: set[int]) -> list[int]:
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
        if next_id in eos_ids:
            break
    return new_ids


def _choose(logits: torch.Tensor, temperature: float, generator: torch.Generator) -> int:
    if temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / temperature, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def with_generation(tokenizer, prompt: str, prompt_tokens: Tokenized, new_ids: list[int]):
    """Tokens, ids and character offsets of prompt + generation in the text they spell.

    The continuation is what decoding the whole sequence adds to decoding the prompt alone:
    decoded on their own, the new ids would lose the space a SentencePiece tokenizer drops
    at the start of a sequence ("quick" + "▁brown" -> "quickbrown"). Special tokens spell
    nothing, as in the prompt. Generated tokens have no offsets from the tokenizer; each one
    spans the characters it adds.
    """
    def decoded(count: int) -> str:
        return tokenizer.decode(prompt_tokens.ids + new_ids[:count], skip_special_tokens=True,
                                clean_up_tokenization_spaces=False)

    prompt_length = len(decoded(0))
    continuation_ends = [len(decoded(i + 1)) - prompt_length for i in range(len(new_ids))]
    starts = [0] + continuation_ends[:-1]
    base = len(prompt)
    offsets = [(base + start, base + max(start, end)) for start, end in zip(starts, continuation_ends)]
    text = prompt + decoded(len(new_ids))[prompt_length:]
    ids = prompt_tokens.ids + new_ids
    tokenized = Tokenized(
        ids=ids,
        tokens=prompt_tokens.tokens + token_strings(tokenizer, new_ids),
        offsets=prompt_tokens.offsets + offsets,
        input_token_count=len(ids),
        special_ids=prompt_tokens.special_ids,
    )
    return tokenized, text
