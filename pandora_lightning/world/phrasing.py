"""The grammar of action phrasings: ``[opener] core [closer]``, with a held-out set.

Every action has a few core phrasings ("slide to the left", "get bigger"); an optional opener
("now", "please", ...) and closer ("a bit", "now", ...) make the rest. A fixed, hashed fifth of the
combinations is held out of training: the "phrasings" split asks for them, so a model is scored on
word combinations it never saw, built only from words it did see (tests check both).

The grammar is plain data: a new action needs only its cores in ``CORES`` (and its dynamics in
``domains.py``); openers and closers apply to every action.
"""
from __future__ import annotations

import functools
import itertools
import re
import zlib

import numpy as np

from pandora_lightning.errors import PandoraError

# Core phrasings per canonical action. The tiny LLM is random and learns each word from the data, so
# every core of an action shares a word with another core of it (left, bigger, ...).
CORES: dict[str, tuple[str, ...]] = {
    "move_left": ("move left", "go left", "slide left", "slide to the left", "head left", "move to the left"),
    "move_right": ("move right", "go right", "slide right", "slide to the right", "head right", "move to the right"),
    "move_up": ("move up", "go up", "climb up", "float up", "rise up", "head up"),
    "move_down": ("move down", "go down", "drop down", "sink down", "fall down", "head down"),
    "grow": ("grow", "grow larger", "grow bigger", "get bigger", "get larger", "become bigger"),
    "shrink": ("shrink", "shrink smaller", "get smaller", "become smaller", "shrink a little", "get tinier"),
}
OPENERS: tuple[str, ...] = ("", "now", "please", "ok", "then")
CLOSERS: tuple[str, ...] = ("", "a bit", "now", "please", "for me")
# One combination in HELD_OUT_MODULUS (by CRC-32 of the text) is held out; bare cores never are.
HELD_OUT_MODULUS = 5


def normalise(text: str) -> str:
    """Lower case, punctuation dropped, single spaces: the key phrasings are compared by."""
    return " ".join(re.findall(r"[a-z0-9_]+", str(text).lower()))


def _combine(opener: str, core: str, closer: str) -> str:
    return " ".join(part for part in (opener, core, closer) if part)


def is_held_out(text: str) -> bool:
    """Whether a phrasing belongs to the held-out set (decided by its text alone)."""
    return zlib.crc32(normalise(text).encode()) % HELD_OUT_MODULUS == 0


@functools.lru_cache(maxsize=None)
def phrasings(action: str, held_out: bool | None = None) -> tuple[str, ...]:
    """Every phrasing of ``action`` the grammar makes; ``held_out`` picks one part (None: all).

    An opener and a closer never repeat a word ("now ... now"); a bare core is always a training
    phrasing.
    """
    if action not in CORES:
        raise PandoraError(f"unknown action {action!r}; canonical actions: {tuple(CORES)}")
    out = []
    for opener, core, closer in itertools.product(OPENERS, CORES[action], CLOSERS):
        if opener and opener == closer:
            continue
        text = _combine(opener, core, closer)
        bare = not opener and not closer
        if held_out is None or held_out == (is_held_out(text) and not bare):
            out.append(text)
    return tuple(out)


def phrase(action: str, rng: np.random.Generator, held_out: bool = False) -> str:
    """A phrasing of ``action`` drawn uniformly from the training (or held-out) part of the grammar."""
    options = phrasings(action, held_out)
    return options[int(rng.integers(len(options)))]


@functools.lru_cache(maxsize=1)
def _lookup() -> dict[str, str]:
    table = {}
    for action in CORES:
        table[normalise(action)] = action
        for text in phrasings(action):
            key = normalise(text)
            if table.setdefault(key, action) != action:
                raise PandoraError(f"phrasing {text!r} is ambiguous: {table[key]} and {action}")
    return table


def parse_action(text: str) -> str:
    """Canonical action of any phrasing the grammar makes (case, spaces and punctuation ignored)."""
    key = normalise(text)
    action = _lookup().get(key) or _lookup().get(key.replace(" ", "_"))
    if action is None:
        examples = "; ".join(f"{a}: {', '.join(c[:3])}" for a, c in CORES.items())
        raise PandoraError(
            f"unknown action phrasing {text!r}; phrasings are [opener] core [closer] with openers "
            f"{[o for o in OPENERS if o]}, closers {[c for c in CLOSERS if c]} and cores such as {examples}"
        )
    return action
