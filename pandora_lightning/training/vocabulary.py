"""The vocabulary of the tiny word-level tokenizers (LLM and teacher text encoder built without a
pretrained folder): where it comes from, and which training words it does not know.

Source, in this order: the checkpoint a run resumes or starts from (its embedding rows are laid
out for its own vocabulary), the recipe's `vocabulary` file (one word per line), or every word of
the training split's texts. The result is stored in each checkpoint, so a trained model never
depends on the data or the file again.
"""
from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

from pandora_lightning.data.dataset import split_texts
from pandora_lightning.data.manifest import load_manifest
from pandora_lightning.errors import PandoraError
from pandora_lightning.models.tokenizer import SPECIAL_TOKENS, words_of
from pandora_lightning.training.checkpoint import load_checkpoint_file, stored_vocabulary
from pandora_lightning.training.recipe import TrainingRecipe

log = logging.getLogger(__name__)


def needs_vocabulary(recipe: TrainingRecipe) -> bool:
    model = recipe.model
    return model.llm.pretrained is None or (model.text_encoder.enabled and model.text_encoder.pretrained is None)


def read_vocabulary_file(path: str | Path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise PandoraError(f"vocabulary file '{path}' does not exist (recipe key `vocabulary`; null = the training texts' words)")
    words = [w.strip() for w in path.read_text(encoding="utf-8").splitlines() if w.strip()]
    if not words:
        raise PandoraError(f"vocabulary file '{path}' holds no words (one word per line)")
    return words


def write_vocabulary_file(path: str | Path, words: list[str]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(words) + "\n", encoding="utf-8")
    return path


def resolve_vocabulary(recipe: TrainingRecipe, texts: list[str] | None = None, from_checkpoints: bool = True) -> list[str]:
    """The words the run's tiny tokenizers use (empty when every text component is pretrained).

    `texts`: the training texts, when the caller already read them; `from_checkpoints=False`
    ignores the checkpoints the recipe resumes or starts from.
    """
    if not needs_vocabulary(recipe):
        return []
    resume = recipe.trainer.resume_from if from_checkpoints else None
    if resume:
        path = Path(recipe.run_dir) / "checkpoints" / "last.ckpt" if resume == "last" else Path(resume)
        if path.exists():  # a file, or a sharded checkpoint folder (fsdp2)
            return stored_vocabulary(load_checkpoint_file(path), path)
    if recipe.init_from and from_checkpoints:
        return stored_vocabulary(load_checkpoint_file(recipe.init_from), recipe.init_from)
    if recipe.vocabulary:
        return read_vocabulary_file(recipe.vocabulary)
    words = words_of(texts if texts is not None else training_texts(recipe))
    if not words:
        raise PandoraError(
            f"the training split '{recipe.data.split}' of {recipe.data.manifest} has no texts to build the tiny "
            f"tokenizer's vocabulary from; set `vocabulary` to a word list file"
        )
    return words


def training_texts(recipe: TrainingRecipe) -> list[str]:
    return split_texts(load_manifest(recipe.data.manifest, allow_commands=recipe.data.allow_commands), recipe.data.split)


def unknown_words(vocabulary: list[str], texts: list[str]) -> Counter[str]:
    """How often each word of `texts` is missing from `vocabulary` (it would become <unk>)."""
    known = set(vocabulary) | set(SPECIAL_TOKENS)
    return Counter(w for text in texts for w in words_of([text]) if w not in known)


def warn_unknown_words(vocabulary: list[str], texts: list[str]) -> int:
    """Log one warning naming the training words the tokenizer does not know; returns how many occurrences."""
    missing = unknown_words(vocabulary, texts)
    total = sum(missing.values())
    if total:
        words = sum(len(words_of([t])) for t in texts)
        common = ", ".join(f"'{w}' x{n}" for w, n in missing.most_common(8))
        log.warning(
            f"{total} of {words} words in the training texts ({len(missing)} distinct) are not in the tokenizer's "
            f"vocabulary and become <unk>: {common}; add them to the `vocabulary` file (or set vocabulary=null to "
            f"build it from the training texts)"
        )
    return total
