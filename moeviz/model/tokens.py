"""Text -> token ids, character offsets and faithful token strings.

Byte-level BPE tokens can hold part of a UTF-8 character (an emoji is often split over two or
three tokens). Decoding such a token alone gives U+FFFD, which hides what the model saw; we
show the raw bytes instead, e.g. `\\xf0\\x9f`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache

from transformers.convert_slow_tokenizer import bytes_to_unicode

_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass(frozen=True)
class Tokenized:
    ids: list[int]
    tokens: list[str]
    offsets: list[tuple[int, int]]
    input_token_count: int  # before the cut at max_tokens
    special_ids: list[int] = field(default_factory=list)  # `special_token_ids` of the tokenizer


def tokenize(tokenizer, text: str, max_tokens: int) -> Tokenized:
    """Tokenize `text` as the model sees it (special tokens included), cut at `max_tokens`."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    if not text.strip():
        raise ValueError("The text is empty: paste or type some text to analyse.")
    surrogate = _SURROGATE.search(text)
    if surrogate:
        # Half of a UTF-16 pair, e.g. from a mis-decoded file: not a character, and the
        # tokenizer (Rust, UTF-8) refuses it with an unreadable TypeError.
        raise ValueError(
            f"The text holds U+{ord(surrogate.group()):04X} at character {surrogate.start()}, half of a "
            "UTF-16 surrogate pair, which is not a character. Remove it or replace it with U+FFFD."
        )
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
    encoding = tokenizer(text, return_offsets_mapping=True, add_special_tokens=True)
    ids = list(encoding["input_ids"])
    offsets = [tuple(span) for span in encoding["offset_mapping"]]
    kept = ids[:max_tokens]
    return Tokenized(
        ids=kept,
        tokens=token_strings(tokenizer, kept),
        offsets=offsets[:max_tokens],
        input_token_count=len(ids),
        special_ids=special_token_ids(tokenizer),
    )


def special_token_ids(tokenizer) -> list[int]:
    """The ids of the tokenizer's special tokens (BOS, EOS, PAD, chat markers...), which
    statistics leave out by default. UNK is not among them: it stands for real text."""
    return sorted(set(tokenizer.all_special_ids) - {tokenizer.unk_token_id})


def context_length(config) -> int | None:
    """The positions the model was trained on (`max_position_embeddings`), or None when its
    config does not say (relative positions, as in T5 and Switch Transformers)."""
    length = getattr(config.get_text_config(), "max_position_embeddings", None)
    return length if isinstance(length, int) and length > 0 else None


def token_strings(tokenizer, ids: list[int]) -> list[str]:
    """What each token stands for, faithfully: text where it is whole UTF-8, `\\xNN` escapes
    for the bytes of a partial character, special tokens as their names."""
    pieces = tokenizer.convert_ids_to_tokens(ids)
    special = set(tokenizer.all_special_tokens)
    if _is_byte_level(tokenizer):
        return [piece if piece in special else _byte_level_text(piece) for piece in pieces]
    return [piece if piece in special else piece.replace("\u2581", " ") for piece in pieces]


def _is_byte_level(tokenizer) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend is not None and type(backend.decoder).__name__ == "ByteLevel"


@lru_cache(maxsize=1 << 18)  # pieces come from a vocabulary: a text repeats most of them
def _byte_level_text(piece: str) -> str:
    decoder = _byte_decoder()
    if not all(char in decoder for char in piece):
        return piece
    return bytes(decoder[char] for char in piece).decode("utf-8", errors="backslashreplace")


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: the printable stand-in character of each byte."""
    return {char: byte for byte, char in bytes_to_unicode().items()}
