"""Every word the built-in world can say: the vocabulary its tiny recipes train with.

`shards world` writes it next to the manifest (data_manifests/world.vocab.txt); the tiny recipes
name that file as their `vocabulary`, and each checkpoint stores its own copy."""
from __future__ import annotations

from pathlib import Path

from pandora_lightning.models.tokenizer import words_of
from pandora_lightning.world.domains import ACTIONS, DOMAINS, get_domain
from pandora_lightning.world.history import HISTORY_ACTIONS
from pandora_lightning.world.phrasing import phrasings
from pandora_lightning.world.simulator import caption_for


def world_corpus(history: bool = False, practice: tuple[str, ...] = ()) -> list[str]:
    """Every phrasing the grammar makes (held-out ones use only words of training ones), and a caption
    per domain (scored, and the `practice` ones) and colour that uses every verb of the domain; with
    `history`, also the phrasings of actions that refer to earlier rounds ("again", "go back")."""
    texts = [text for action in ACTIONS for text in phrasings(action)]
    if history:
        texts += [text for history_phrasings in HISTORY_ACTIONS.values() for text in history_phrasings]
    for domain in [*DOMAINS.values(), *map(get_domain, practice)]:
        texts += [caption_for(domain, name, list(domain.actions)) for name, _ in domain.palette]
    return texts


def world_vocabulary(history: bool = False, practice: tuple[str, ...] = ()) -> list[str]:
    """The sorted words of `world_corpus(history, practice)`."""
    return words_of(world_corpus(history, practice))


def vocabulary_path(manifest: str | Path) -> Path:
    """Where `shards world` writes the vocabulary for a manifest: beside it, <name>.vocab.txt."""
    return Path(manifest).with_suffix(".vocab.txt")
