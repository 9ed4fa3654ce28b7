"""Every word the built-in world can say: the vocabulary of the tiny tokenizer."""
from __future__ import annotations

from pandora_lightning.world.domains import ACTIONS, DOMAINS
from pandora_lightning.world.simulator import caption_for


def world_corpus() -> list[str]:
    """All action phrasings, and a caption per domain and colour that uses every verb of the domain."""
    texts = [text for phrasings in ACTIONS.values() for text in phrasings]
    for domain in DOMAINS.values():
        texts += [caption_for(domain, name, list(domain.actions)) for name, _ in domain.palette]
    return texts
