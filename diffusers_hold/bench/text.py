"""The text conditioning of the benchmark's text-conditional methods: a unique caption per training image, encoded by
a small frozen CLIP text encoder."""

from __future__ import annotations

import random
import string
from collections.abc import Sequence

import torch
from transformers import CLIPTextConfig, CLIPTextModel

from ..testing import tiny_clip_tokenizer

__all__ = ["BenchTextEncoder", "bench_caption"]


def bench_caption(index: int) -> str:
    """The caption of training image ``index`` in the text-conditional methods: a unique id per image, spelled as
    three random three-letter words (seeded by the index), so that captions differ in every token."""
    rng = random.Random(index)
    return " ".join("".join(rng.choice(string.ascii_lowercase) for _ in range(3)) for _ in range(3))


class BenchTextEncoder:
    """A frozen CLIP text encoder of random weights (the offline tokenizer of :mod:`diffusers_hold.testing`): real
    CLIP code and distinct embeddings for distinct captions, which is all a conditioning signal needs here.

    Args:
        seed (`int`): seed of the encoder's weights.
    """

    width, max_length = 32, 16
    _cache: dict[int, BenchTextEncoder] = {}

    def __init__(self, seed: int):
        self.tokenizer = tiny_clip_tokenizer(model_max_length=self.max_length)
        config = CLIPTextConfig(
            hidden_size=self.width,
            intermediate_size=2 * self.width,
            num_attention_heads=2,
            num_hidden_layers=2,
            vocab_size=len(self.tokenizer),
            max_position_embeddings=self.max_length,
            bos_token_id=self.tokenizer.bos_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.model = CLIPTextModel(config).eval().requires_grad_(False)

    @classmethod
    def shared(cls, seed: int) -> BenchTextEncoder:
        """One encoder per seed, so every text-conditional method of a run sees the same conditioning."""
        if seed not in cls._cache:
            cls._cache[seed] = cls(seed)
        return cls._cache[seed]

    @torch.no_grad()
    def encode(self, captions: Sequence[str]) -> torch.Tensor:
        """Text states `(len(captions), max_length, width)` of the captions."""
        tokens = self.tokenizer(
            list(captions), padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
        )
        return self.model(tokens.input_ids)[0]
