"""The true chance level of action following: the best predictor that ignores the action text.

A text-ignoring predictor sees everything but the words: the domain, the split, the object's true
state at the start of each round and the actions of the rounds before. A model that ignored the
text could score what such a predictor scores, so `score` prints it beside every accuracy.
Three predictors are tried, each scored as its expected accuracy per round (ties split evenly):

- ``valid_uniform``: any action that is valid from the true start state (the sampler draws uniformly
  from those, so this is the best possible when the sampler works as designed);
- ``majority_domain``: the most common action of the domain;
- ``majority_state``: the most common action given (domain, set of valid actions, previous action),
  backing off to (domain, valid set) and then the domain. This one catches a sampler whose choice
  leaks through the state or the history (e.g. grow -> shrink -> grow).

The two majority predictors are fitted on the same episodes, leaving out the episode they predict
(leave-one-episode-out), so no predictor sees the round it is scored on.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence

import numpy as np

from pandora_lightning.errors import PandoraError
from pandora_lightning.world.domains import ObjectState, get_domain
from pandora_lightning.world.simulator import SAMPLING_SLACK, split_actions, valid_actions

PREDICTORS = ("valid_uniform", "majority_domain", "majority_state")


def _allowed(domain: str, split: str) -> tuple[str, ...]:
    try:
        return split_actions(domain, split)
    except PandoraError:  # a split the world does not define: any of the domain's actions
        return get_domain(domain).actions


def valid_sets(episode: dict, rounds: int) -> list[tuple[str, ...]] | None:
    """The actions valid from the true start state of each of the first ``rounds`` rounds (as the
    sampler saw them), or None when the episode JSON has no states."""
    if "states" not in episode or "image_size" not in episode:
        return None
    domain = get_domain(episode["domain"])
    allowed = _allowed(episode["domain"], episode.get("split", "val"))
    out = []
    for span in episode["actions"][:rounds]:
        row = episode["states"][span["start"] - 1]
        state = ObjectState(row[0], row[1], row[2], tuple(int(c) for c in row[3:6]))
        frames = span["end"] - span["start"]
        valid = valid_actions(domain, state, frames, episode["image_size"], allowed, SAMPLING_SLACK)
        # The JSON rounds states to 1e-4 px, which can put one a hair past a border the sampler allowed.
        if span["action"] not in valid:
            valid = valid_actions(domain, state, frames, episode["image_size"], allowed, SAMPLING_SLACK - 1e-3)
        out.append(tuple(valid))
    return out


def round_contexts(episodes: Sequence[dict], rounds: Sequence[int]) -> list[dict]:
    """One dict per scored round (episode order): episode, domain, action, previous action, valid set."""
    out = []
    for e, (ep, n) in enumerate(zip(episodes, rounds)):
        valid = valid_sets(ep, n)
        previous = None
        for r, span in enumerate(ep["actions"][:n]):
            out.append({"episode": e, "domain": ep["domain"], "action": span["action"], "previous": previous,
                        "valid": None if valid is None else valid[r]})
            previous = span["action"]
    return out


def _majority(contexts: list[dict], keys) -> np.ndarray:
    """Leave-one-episode-out majority vote over the first key (of ``keys``) with data."""
    total: dict[tuple, Counter] = defaultdict(Counter)
    own: dict[tuple[int, tuple], Counter] = defaultdict(Counter)
    for c in contexts:
        for key_fn in keys:
            k = key_fn(c)
            total[k][c["action"]] += 1
            own[c["episode"], k][c["action"]] += 1
    out = np.zeros(len(contexts))
    for i, c in enumerate(contexts):
        for key_fn in keys:
            k = key_fn(c)
            counts = total[k] - own[c["episode"], k]
            if counts:
                best = max(counts.values())
                winners = [a for a, v in counts.items() if v == best]
                out[i] = (c["action"] in winners) / len(winners)
                break
    return out


def predictor_accuracies(contexts: list[dict]) -> dict[str, np.ndarray]:
    """Expected accuracy of each predictor in ``PREDICTORS`` per round of ``round_contexts``.

    Empty when some round has no valid set (episodes without states): then no baseline is claimed.
    """
    if not contexts or any(c["valid"] is None for c in contexts):
        return {}
    uniform = np.array([(c["action"] in c["valid"]) / max(1, len(c["valid"])) for c in contexts])
    by_domain = _majority(contexts, [lambda c: (c["domain"],)])
    by_state = _majority(
        contexts,
        [lambda c: (c["domain"], c["valid"], c["previous"]), lambda c: (c["domain"], c["valid"]), lambda c: (c["domain"],)],
    )
    return {"valid_uniform": uniform, "majority_domain": by_domain, "majority_state": by_state}


def text_ignoring_baselines(episodes: Sequence[dict], rounds: Sequence[int]) -> dict[str, np.ndarray]:
    """``predictor_accuracies`` of the first ``rounds[i]`` rounds of each world episode (shard JSON)."""
    return predictor_accuracies(round_contexts(episodes, rounds))


def best_baseline(values: dict[str, np.ndarray], groups: np.ndarray, mask: np.ndarray | None = None) -> tuple[float, dict]:
    """The best text-ignoring accuracy over rounds (``mask`` picks a subset), its best predictor per group.

    The predictor may pick its strategy per group (the domain is visible), so the overall figure is the
    round-weighted mean of each group's best. Returns (overall, {group: (accuracy, predictor)}).
    """
    mask = np.ones(len(groups), bool) if mask is None else mask
    per_group = {}
    total = 0.0
    for g in sorted(set(groups[mask].tolist())):
        sel = mask & (groups == g)
        name, acc = max(((n, float(v[sel].mean())) for n, v in values.items()), key=lambda t: t[1])
        per_group[g] = (acc, name)
        total += acc * sel.sum()
    return (total / mask.sum() if mask.sum() else float("nan")), per_group
