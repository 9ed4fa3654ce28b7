"""A word-level tokenizer built in code, for tiny LLM configs (no files, no downloads)."""
from __future__ import annotations

import re
from collections.abc import Iterable

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>")


def build_word_tokenizer(corpus: Iterable[str]) -> PreTrainedTokenizerFast:
    """Vocabulary = the sorted set of lower-cased words and punctuation marks of `corpus`.

    Sorting makes token ids a pure function of the corpus, so a checkpoint's embedding rows
    line up with a tokenizer rebuilt later. Unknown words map to <unk>.
    """
    words = sorted({w for text in corpus for w in re.findall(r"\w+|[^\w\s]", text.lower())})
    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *words])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", bos_token="<s>")
