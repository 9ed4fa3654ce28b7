"""Actions that refer to earlier rounds: "again" repeats the previous round's effect, "go back" undoes it.

No single-round model can follow them: the text alone does not say what to do. A round's effect
is its resolved action (a canonical name), so "again" after "again" after "move left" still moves
left, and "undo" after "undo" moves the way the first action did. Episodes store the resolved
action in "action" (what the metrics score against), the words that were said in "text", the
kind in "refers", and a phrasing of the resolved action in "resolved_text" (what the generator's
own text encoder is asked to embed while the LLM learns to resolve the reference).
"""
from __future__ import annotations

from pandora_lightning.errors import PandoraError

# Phrasings share a key word per kind ("again"/"going", "back"/"undo") so the tiny random LLM can
# learn them from the data alone.
HISTORY_ACTIONS: dict[str, tuple[str, ...]] = {
    "again": ("again", "do it again", "keep going", "same again"),
    "undo": ("go back", "undo", "undo that", "turn back"),
}
OPPOSITE: dict[str, str] = {
    "move_left": "move_right",
    "move_right": "move_left",
    "move_up": "move_down",
    "move_down": "move_up",
    "grow": "shrink",
    "shrink": "grow",
}
_PHRASE_TO_KIND = {p: kind for kind, phrases in HISTORY_ACTIONS.items() for p in phrases}


def history_kind(text: str) -> str | None:
    """"again" | "undo" when `text` is one of their phrasings (any case or spacing), else None."""
    return _PHRASE_TO_KIND.get(" ".join(str(text).lower().split()))


def resolve(kind: str, previous: str | None) -> str:
    """The canonical action a history action stands for, given the previous round's resolved action."""
    if kind not in HISTORY_ACTIONS:
        raise ValueError(f"unknown history action kind {kind!r}; use one of {tuple(HISTORY_ACTIONS)}")
    if previous is None:
        raise PandoraError(f"'{HISTORY_ACTIONS[kind][0]}' refers to the previous round, and there is none yet: start with an action")
    return previous if kind == "again" else OPPOSITE[previous]


def check_history_action(action: str, model) -> None:
    """A session's action check: refuse history actions on a model that reads no earlier rounds."""
    if history_kind(action) and model.history_rounds == 1:
        raise PandoraError(
            f"'{action}' refers to an earlier round, but this checkpoint was trained without history "
            f"(model.llm.history_rounds=1); say the action itself (e.g. 'move left') or use a history "
            f"checkpoint (recipes/tiny-history)"
        )
