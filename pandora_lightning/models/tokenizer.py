"""A word-level tokenizer for tiny LLM configs, from a stored vocabulary (no files, no downloads)."""
from __future__ import annotations

import re
from collections.abc import Iterable

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import CLIPTokenizer, PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>")


def words_of(texts: Iterable[str]) -> list[str]:
    """The sorted set of lower-cased words and punctuation marks of `texts`: a vocabulary."""
    return sorted({w for text in texts for w in re.findall(r"\w+|[^\w\s]", text.lower())})


def build_word_tokenizer(vocabulary: Iterable[str]) -> PreTrainedTokenizerFast:
    """Token ids = special tokens, then `vocabulary` in its order; unknown words map to <unk>.

    The vocabulary is stored in every checkpoint, so the embedding rows of a reloaded model line
    up with its tokenizer whatever the data says later.
    """
    words = [w for w in dict.fromkeys(vocabulary) if w not in SPECIAL_TOKENS]
    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *words])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", bos_token="<s>")


def word_clip_tokenizer(words: Iterable[str], max_length: int) -> CLIPTokenizer:
    """A byte-pair CLIP tokenizer whose merges spell exactly `words`, so every text of those words is
    whole-word tokens: the tokenizer of the tiny CLIP-style folders (tests, benches) built as releases are."""
    vocab, merges = {"<|startoftext|>": 0, "<|endoftext|>": 1}, []
    for word in words:
        parts = [*word[:-1], word[-1] + "</w>"]
        for p in parts:
            vocab.setdefault(p, len(vocab))
        while len(parts) > 1:
            merges.append((parts[0], parts[1]))
            parts = [parts[0] + parts[1], *parts[2:]]
            vocab.setdefault(parts[0], len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)
