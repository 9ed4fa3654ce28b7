"""History through the LLM: one segment per round, a key/value cache across rounds, a bounded window.

Every round appends one segment [state tokens of its given frames, action text, query tokens] to
the LLM's context. With a window of W rounds each token attends to the tokens of its own round and
of the W - 1 rounds before it (a block-banded causal mask). A cache that keeps the keys and values
of the last W - 1 rounds and drops older ones computes exactly that model: a round only ever reads
keys and values computed when their round was new, and those never change. So encoding one new
segment against the cache equals reading all rounds at once with the banded mask (the uncached
reference), and the cost of a round stays flat however long the session runs. Positions keep
counting across dropped rounds: RoPE only sees distances, which stay within the window.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache


@dataclass(frozen=True)
class RoundCache:
    """One round of one sequence in every LLM layer, padding removed: keys and values (heads, tokens, head_dim)."""

    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]

    @property
    def tokens(self) -> int:
        return self.keys[0].shape[1]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))


def history_mask(mask: torch.Tensor, rounds: torch.Tensor, window: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, L) key mask + (L,) round of each position -> (B, 1, L, L) additive attention mask.

    Causal, padding keys hidden, and a token sees only its own round and the `window` - 1 rounds
    before it (window 0: every earlier round). Additive (0 / dtype min) so that every attention
    implementation reads it the same way.
    """
    n = mask.shape[1]
    allowed = torch.ones(n, n, dtype=torch.bool, device=mask.device).tril()
    if window > 0:
        allowed &= (rounds[:, None] - rounds[None, :]) < window
    allowed = allowed[None] & mask.bool()[:, None, :]
    return torch.zeros(allowed.shape, dtype=dtype, device=mask.device).masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


def trim(history: tuple[RoundCache, ...], window: int) -> tuple[RoundCache, ...]:
    """The rounds a next round may read: the last window - 1 (window 0: all)."""
    if window == 0:
        return history
    keep = window - 1
    return history[max(0, len(history) - keep) :] if keep else ()


def split_rounds(cache: DynamicCache, mask: torch.Tensor, bounds: list[tuple[int, int]]) -> list[list[RoundCache]]:
    """A batched cache -> per sequence, per round (begin, end) a RoundCache of its real (unpadded) tokens."""
    keep = mask.bool().cpu()  # one device sync for the whole batch, not one per sequence and layer
    out = []
    for b in range(mask.shape[0]):
        rounds = []
        for begin, end in bounds:
            real = keep[b, begin:end].nonzero().squeeze(1)
            index = None if len(real) == end - begin else (real + begin).to(mask.device)  # None: no padding

            def take(t: torch.Tensor) -> torch.Tensor:  # a copy: a view would keep the whole batch's cache alive
                return t[b, :, begin:end].clone() if index is None else t[b].index_select(1, index)

            rounds.append(RoundCache(tuple(take(layer.keys) for layer in cache.layers), tuple(take(layer.values) for layer in cache.layers)))
        out.append(rounds)
    return out


def merge(histories: list[tuple[RoundCache, ...]], config) -> tuple[DynamicCache, torch.Tensor]:
    """Per-sequence cached rounds -> one left-padded DynamicCache (B, heads, L, head_dim) and its (B, L) mask."""
    lengths = [sum(r.tokens for r in h) for h in histories]
    longest = max(lengths, default=0)
    sample = next((r for h in histories for r in h), None)
    if sample is None:
        return DynamicCache(config=config), torch.zeros(len(histories), 0, dtype=torch.long)
    device = sample.keys[0].device
    mask = torch.zeros(len(histories), longest, dtype=torch.long, device=device)
    layers = []
    for layer in range(len(sample.keys)):
        pair = []
        for part in ("keys", "values"):
            ref = getattr(sample, part)[layer]
            rows = []
            for h, n in zip(histories, lengths):
                pad = ref.new_zeros(ref.shape[0], longest - n, ref.shape[2])
                rows.append(torch.cat([pad, *(getattr(r, part)[layer] for r in h)], dim=1))
            pair.append(torch.stack(rows))
        layers.append(tuple(pair))
    for i, n in enumerate(lengths):
        mask[i, longest - n :] = 1
    return DynamicCache(layers, config=config), mask
