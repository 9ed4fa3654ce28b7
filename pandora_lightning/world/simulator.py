"""Exact simulation, rendering and episode sampling for the procedural world.

An episode is ``cond_frames`` frames of a static start state followed by
``rounds`` action spans of ``round_frames`` frames each. Every action's effect
is linear in time, so trajectories are exactly computable from the state at
the end of the previous span (which is what ``measure.classify_round`` uses).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pandora_lightning.errors import PandoraError
from pandora_lightning.world.domains import (
    ACTION_VERBS,
    DOMAINS,
    MOVES,
    PRACTICE_DOMAINS,
    RESIZES,
    TRANSFER_DOMAIN,
    TRANSFER_HELD_OUT,
    Domain,
    ObjectState,
    get_domain,
    shade,
    shade_band,
)
from pandora_lightning.world.history import HISTORY_ACTIONS, resolve
from pandora_lightning.world.phrasing import phrase

# "val": held-out start states; "transfer": the transfer domain with its held-out actions too;
# "phrasings": held-out start states steered by held-out phrasings. These HELD_OUT_SPLITS draw their
# start states from the reserved colour shades (``domains.HELD_OUT_SHADES``). "adapt": a few dozen
# transfer-domain episodes with all of its actions (the held-out ones too), training data for the
# adapt stage (LoRA), drawn like training episodes from their own random stream.
SPLITS = ("train", "val", "transfer", "adapt", "phrasings")
HELD_OUT_SPLITS = ("val", "transfer", "phrasings")
# Every round of every split offers at least this many valid actions, so the start state never gives
# the action away (the domains are sized for it; the sampler raises where a state breaks it).
MIN_OPTIONS = 2
# Objects never touch the frame border closer than this (px), so no action is
# ever clamped and two different actions never give the same trajectory.
BORDER_MARGIN = 1.0
# Extra room (px) the sampler demands on top of the validity rules, so an
# action stays valid from a *measured* start state that is off by < 1 px.
SAMPLING_SLACK = 1.0


@dataclass
class WorldConfig:
    """Size and timing of procedural-world episodes."""

    image_size: int = 32
    cond_frames: int = 2
    round_frames: int = 4
    rounds: int = 3
    fps: int = 8
    seed: int = 0
    held_out_rounds: int = 0  # rounds of the non-train splits' episodes; 0 = ``rounds``
    domains: tuple[str, ...] = field(default_factory=lambda: tuple(DOMAINS))
    # Share of rounds after the first that are said as a reference to the previous round
    # ("again", "go back"; see world/history.py) when what they stand for is valid there.
    history: float = 0.0
    # Training-only domains (``domains.PRACTICE_DOMAINS``) written into the train split beside
    # ``domains``; never in a held-out split.
    practice: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.image_size < 16 or self.image_size % 8:
            raise PandoraError(
                f"WorldConfig.image_size={self.image_size} must be a multiple of 8 and >= 16 "
                "(e.g. 32) so objects fit and video codecs accept the size"
            )
        if not 0.0 <= self.history <= 1.0:
            raise PandoraError(f"WorldConfig.history={self.history} must be a share in [0, 1]")
        for name in ("cond_frames", "round_frames", "rounds", "fps"):
            if getattr(self, name) < 1:
                raise PandoraError(f"WorldConfig.{name}={getattr(self, name)} must be a positive integer")
        if self.held_out_rounds < 0:
            raise PandoraError(f"WorldConfig.held_out_rounds={self.held_out_rounds} must be >= 0 (0 = rounds)")
        self.domains = tuple(self.domains)
        unknown = [d for d in self.domains if d not in DOMAINS]
        if unknown or not self.domains:
            raise PandoraError(
                f"WorldConfig.domains={self.domains} must be a non-empty subset of {tuple(DOMAINS)}"
            )
        self.practice = tuple(self.practice)
        unknown = [d for d in self.practice if d not in PRACTICE_DOMAINS]
        if unknown:
            raise PandoraError(
                f"WorldConfig.practice={self.practice} names unknown practice domains {unknown}; "
                f"use names from {tuple(PRACTICE_DOMAINS)}"
            )

    @property
    def num_frames(self) -> int:
        """Frames per training episode: ``cond_frames + rounds * round_frames``."""
        return self.cond_frames + self.rounds * self.round_frames

    def rounds_for(self, split: str) -> int:
        """Rounds per episode of ``split``: ``held_out_rounds`` (if set) for held-out splits, else ``rounds``."""
        return self.held_out_rounds if split in HELD_OUT_SPLITS and self.held_out_rounds else self.rounds


@dataclass
class Episode:
    """One rendered episode with its ground-truth states and action spans.

    ``frames``: ``(T, H, W, 3) uint8`` with ``T = cond_frames + rounds * round_frames``.
    ``states``: one ``ObjectState`` per frame.
    ``actions``: ``{"action", "text", "start", "end"}`` per span, ``end`` exclusive.
    """

    frames: np.ndarray
    states: list[ObjectState]
    actions: list[dict]
    caption: str
    domain: str


def simulate(domain: Domain, state: ObjectState, action: str, n_frames: int) -> list[ObjectState]:
    """States after each of ``n_frames`` frames of ``action`` (not including ``state``)."""
    if action not in domain.actions:
        raise PandoraError(f"action {action!r} is not available in domain {domain.name!r}: {domain.actions}")
    dx, dy = MOVES.get(action, (0, 0))
    dr = RESIZES.get(action, 0)
    return [
        ObjectState(
            x=state.x + dx * domain.speed * k,
            y=state.y + dy * domain.speed * k,
            radius=state.radius + dr * domain.grow_rate * k,
            color=state.color,
        )
        for k in range(1, n_frames + 1)
    ]


def _fits(domain: Domain, states: list[ObjectState], image_size: int, slack: float) -> bool:
    lo_r, hi_r = domain.radius_limits
    margin = BORDER_MARGIN + slack
    for s in states:
        if not (lo_r + slack <= s.radius <= hi_r - slack):
            return False
        for c in (s.x, s.y):
            if c - s.radius < margin or c + s.radius > image_size - margin:
                return False
    return True


def valid_actions(
    domain: Domain,
    state: ObjectState,
    n_frames: int,
    image_size: int,
    allowed: tuple[str, ...] | list[str] | None = None,
    slack: float = 0.0,
) -> list[str]:
    """Actions whose whole ``n_frames`` trajectory stays in frame and in radius limits.

    "In frame" means at least ``BORDER_MARGIN`` px between object and border.
    ``allowed`` restricts the candidates (None: all domain actions); ``slack``
    tightens both the margin and the radius limits (used by the sampler).
    Order follows ``domain.actions``.
    """
    if allowed is not None:
        bad = [a for a in allowed if a not in domain.actions]
        if bad:
            raise PandoraError(f"allowed actions {bad} are not in domain {domain.name!r}: {domain.actions}")
    return [
        a
        for a in domain.actions
        if (allowed is None or a in allowed)
        and _fits(domain, simulate(domain, state, a, n_frames), image_size, slack)
    ]


def _object_masks(domain: Domain, states: list[ObjectState], image_size: int) -> np.ndarray:
    """Hard-edged object masks, ``(T, H, W) bool``."""
    centres = np.arange(image_size, dtype=np.float64) + 0.5
    xs = np.array([s.x for s in states])[:, None, None]
    ys = np.array([s.y for s in states])[:, None, None]
    rs = np.array([s.radius for s in states])[:, None, None]
    dx = np.abs(centres[None, None, :] - xs)
    dy = np.abs(centres[None, :, None] - ys)
    if domain.shape == "disc":
        return dx**2 + dy**2 <= rs**2
    if domain.shape == "square":
        return np.maximum(dx, dy) <= rs
    return dx + dy <= rs  # diamond


def object_mask(domain: Domain, state: ObjectState, image_size: int) -> np.ndarray:
    """Pixels the object covers in ``state``: ``(H, W) bool``."""
    return _object_masks(domain, [state], image_size)[0]


def render_states(domain: Domain, states: list[ObjectState], image_size: int) -> np.ndarray:
    """Frames for ``states``: ``(T, H, W, 3) uint8``."""
    bg = domain.background(image_size)
    masks = _object_masks(domain, states, image_size)
    colors = np.array([s.color for s in states], dtype=np.uint8)[:, None, None, :]
    return np.where(masks[..., None], colors, bg[None]).astype(np.uint8)


def render(domain: Domain, state: ObjectState, image_size: int) -> np.ndarray:
    """One frame: ``(H, W, 3) uint8``."""
    return render_states(domain, [state], image_size)[0]


def random_state(domain: Domain, rng: np.random.Generator, image_size: int, held_out: bool = False) -> ObjectState:
    """A start state: a palette colour in the training (or the reserved, held-out) shades, away from the borders.

    The centre is drawn from the middle of the feasible range (15% of the
    frame kept free on each side when it fits) so several rounds of moves
    have room.
    """
    _, rgb = domain.palette[int(rng.integers(len(domain.palette)))]
    shades = shade_band(held_out)
    rgb = shade(rgb, shades[int(rng.integers(len(shades)))])
    radius = float(rng.uniform(*domain.start_radius))
    lo = radius + BORDER_MARGIN + SAMPLING_SLACK
    hi = image_size - lo
    pad = min(0.15 * image_size, max(0.0, (hi - lo) / 2.0))
    x, y = rng.uniform(lo + pad, hi - pad, size=2)
    return ObjectState(x=float(x), y=float(y), radius=radius, color=rgb)


def caption_for(domain: Domain, color_name: str, actions: list[str]) -> str:
    """E.g. "a red disc on a green meadow moves left, then grows"."""
    verbs = ", then ".join(ACTION_VERBS[a] for a in actions)
    article = "an" if color_name[0] in "aeiou" else "a"
    return f"{article} {color_name} {domain.shape} {domain.scene} {verbs}"


def _color_name(domain: Domain, rgb: tuple[int, int, int]) -> str:
    """The palette name of a (shaded) colour: the nearest palette entry."""
    return min(domain.palette, key=lambda entry: sum((a - b) ** 2 for a, b in zip(entry[1], rgb)))[0]


def _sample_actions(
    rounds: int, cfg: WorldConfig, domain: Domain, start: ObjectState, rng: np.random.Generator, allowed
) -> tuple[list[ObjectState], list[str], list[str | None]]:
    """Roll out ``rounds`` actions, each drawn uniformly from the valid ones (at least ``MIN_OPTIONS``).

    Also returns, per round, the history kind ("again"/"undo") it is said as, or None.
    """
    states = [start] * cfg.cond_frames
    chosen: list[str] = []
    kinds: list[str | None] = []
    for _ in range(rounds):
        options = valid_actions(domain, states[-1], cfg.round_frames, cfg.image_size, allowed, SAMPLING_SLACK)
        if len(options) < MIN_OPTIONS:
            raise PandoraError(
                f"domain {domain.name!r} reached {states[-1]} where only {options} of {allowed or domain.actions} "
                f"are valid: the start state would give the action away; widen radius_limits or lower speed"
            )
        kind = None
        # Only a history world draws these numbers: plain worlds keep their exact random streams.
        if cfg.history > 0 and chosen and rng.random() < cfg.history:
            kind = tuple(HISTORY_ACTIONS)[int(rng.integers(len(HISTORY_ACTIONS)))]
            if resolve(kind, chosen[-1]) not in options:
                kind = None
        action = resolve(kind, chosen[-1]) if kind else options[int(rng.integers(len(options)))]
        chosen.append(action)
        kinds.append(kind)
        states.extend(simulate(domain, states[-1], action, cfg.round_frames))
    return states, chosen, kinds


def sample_episode(
    cfg: WorldConfig,
    domain_name: str,
    rng: np.random.Generator,
    allowed_actions: tuple[str, ...] | list[str] | None = None,
    split: str = "train",
) -> Episode:
    """Sample and render one episode of ``split``: actions uniform over the valid ones.

    ``allowed_actions`` defaults to ``split_actions(domain_name, split)``; held-out splits use the
    reserved colour shades (``HELD_OUT_SPLITS``), and "phrasings" the held-out phrasings.
    """
    domain = get_domain(domain_name)
    allowed = split_actions(domain_name, split) if allowed_actions is None else tuple(allowed_actions)
    start = random_state(domain, rng, cfg.image_size, held_out=split in HELD_OUT_SPLITS)
    states, chosen, kinds = _sample_actions(cfg.rounds_for(split), cfg, domain, start, rng, allowed)
    spans = []
    for i, (action, kind) in enumerate(zip(chosen, kinds)):
        start_idx = cfg.cond_frames + i * cfg.round_frames
        end_idx = start_idx + cfg.round_frames
        span = {"action": action, "text": phrase(action, rng, held_out=split == "phrasings"), "start": start_idx, "end": end_idx}
        if kind:
            options = HISTORY_ACTIONS[kind]
            span.update(text=options[int(rng.integers(len(options)))], refers=kind, resolved_text=span["text"])
        spans.append(span)
    return Episode(
        frames=render_states(domain, states, cfg.image_size),
        states=states,
        actions=spans,
        caption=caption_for(domain, _color_name(domain, start.color), chosen),
        domain=domain_name,
    )


def split_actions(domain_name: str, split: str) -> tuple[str, ...]:
    """Actions a split may use in a domain.

    The transfer domain hides ``TRANSFER_HELD_OUT`` in "train", "val" and "phrasings"; "transfer"
    (scored, its held-out rounds apart) and "adapt" (training data for the adapt stage) exist only
    for the transfer domain and use all of its actions.
    """
    domain = get_domain(domain_name)
    if split not in SPLITS:
        raise PandoraError(f"unknown split {split!r}; use one of {SPLITS}")
    if split in ("transfer", "adapt"):
        if domain_name != TRANSFER_DOMAIN:
            raise PandoraError(
                f"split {split!r} only exists for the transfer domain {TRANSFER_DOMAIN!r}, not {domain_name!r}"
            )
        return domain.actions
    if domain_name == TRANSFER_DOMAIN:
        return tuple(a for a in domain.actions if a not in TRANSFER_HELD_OUT)
    return domain.actions


def held_out_actions(domain_name: str, split: str) -> tuple[str, ...]:
    """Actions of ``split`` in ``domain_name`` that training never showed in that domain."""
    if split == "transfer" and domain_name == TRANSFER_DOMAIN:
        return tuple(a for a in TRANSFER_HELD_OUT if a in get_domain(domain_name).actions)
    return ()
