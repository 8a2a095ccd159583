"""A synthetic training task that needs no download, for the fine-tuning scripts and the chaos run's
training check (oracle.TrainingCheck).

Each line repeats one short random "word" of a few letters ("cab cab cab ..."). A random model starts
near ln(vocab) nats per token; learning that only a handful of tokens ever occur already halves that,
and copying the word lowers it further, so a loss that falls to half its start within a few dozen
steps shows that gradients reach the trained parameters through the swarm.
"""

from __future__ import annotations

import random
from typing import Any, Iterator

import torch

PATTERN_ALPHABET = "abcd"  # few distinct bytes: a model that has learned them scores well below ln(vocab)
PATTERN_LENGTHS = (2, 3, 4)  # letters in one line's repeated word


def pattern_word(rng: random.Random) -> str:
    return "".join(rng.choice(PATTERN_ALPHABET) for _ in range(rng.choice(PATTERN_LENGTHS)))


def pattern_ids(tokenizer: Any, word: str, seq_len: int) -> list[int]:
    """The first seq_len token ids of a line repeating `word`; the line grows until it is long enough
    (a byte-level tokenizer needs about seq_len characters, a BPE one may merge several into a token)."""
    chars = seq_len
    while True:
        line = " ".join([word] * -(-(chars + 1) // (len(word) + 1)))  # at least `chars` characters
        ids = tokenizer(line).input_ids
        if len(ids) >= seq_len:
            return ids[:seq_len]
        if chars > 64 * seq_len:
            raise ValueError(f"the tokenizer made only {len(ids)} tokens of {len(line)} characters")
        chars *= 2


def pattern_batches(tokenizer: Any, batch_size: int, seq_len: int, seed: int = 0) -> Iterator[torch.Tensor]:
    """Endless batches of input_ids [batch_size, seq_len], the same sequence for the same seed.

    Every row is exactly seq_len tokens (no padding): prompt tuning cannot take left padding, and
    with no pad tokens every label counts.
    """
    if batch_size < 1 or seq_len < 2:
        raise ValueError(f"need batch_size >= 1 and seq_len >= 2, got {batch_size} and {seq_len}")
    rng = random.Random(seed)
    while True:
        rows = [pattern_ids(tokenizer, pattern_word(rng), seq_len) for _ in range(batch_size)]
        yield torch.tensor(rows, dtype=torch.long)
