"""Exact simulation, rendering and episode sampling for the procedural world.

An episode is ``cond_frames`` frames of a static start state followed by
``rounds`` action spans of ``round_frames`` frames each. Every action's effect
is linear in time, so trajectories are exactly computable from the state at
the end of the previous span (which is what ``measure.classify_round`` uses).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pandora_lightning.world.domains import (
    ACTION_VERBS,
    DOMAINS,
    MOVES,
    RESIZES,
    TRANSFER_DOMAIN,
    TRANSFER_HELD_OUT,
    Domain,
    ObjectState,
    get_domain,
    phrase,
)

# "adapt": a few dozen transfer-domain episodes with all of its actions (the held-out ones too),
# training data for the adapt stage (LoRA); its start states come from their own random stream.
SPLITS = ("train", "val", "transfer", "adapt")
# Objects never touch the frame border closer than this (px), so no action is
# ever clamped and two different actions never give the same trajectory.
BORDER_MARGIN = 1.0
# Extra room (px) the sampler demands on top of the validity rules, so an
# action stays valid from a *measured* start state that is off by < 1 px.
SAMPLING_SLACK = 1.0
_MAX_SAMPLING_ATTEMPTS = 200


@dataclass
class WorldConfig:
    """Size and timing of procedural-world episodes."""

    image_size: int = 32
    cond_frames: int = 2
    round_frames: int = 4
    rounds: int = 3
    fps: int = 8
    seed: int = 0
    domains: tuple[str, ...] = field(default_factory=lambda: tuple(DOMAINS))

    def __post_init__(self) -> None:
        if self.image_size < 16 or self.image_size % 8:
            raise ValueError(
                f"WorldConfig.image_size={self.image_size} must be a multiple of 8 and >= 16 "
                "(e.g. 32) so objects fit and video codecs accept the size"
            )
        for name in ("cond_frames", "round_frames", "rounds", "fps"):
            if getattr(self, name) < 1:
                raise ValueError(f"WorldConfig.{name}={getattr(self, name)} must be a positive integer")
        self.domains = tuple(self.domains)
        unknown = [d for d in self.domains if d not in DOMAINS]
        if unknown or not self.domains:
            raise ValueError(
                f"WorldConfig.domains={self.domains} must be a non-empty subset of {tuple(DOMAINS)}"
            )

    @property
    def num_frames(self) -> int:
        """Frames per episode: ``cond_frames + rounds * round_frames``."""
        return self.cond_frames + self.rounds * self.round_frames


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
        raise ValueError(f"action {action!r} is not available in domain {domain.name!r}: {domain.actions}")
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
            raise ValueError(f"allowed actions {bad} are not in domain {domain.name!r}: {domain.actions}")
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


def random_state(domain: Domain, rng: np.random.Generator, image_size: int) -> ObjectState:
    """A start state with a palette colour, away from the borders.

    The centre is drawn from the middle of the feasible range (15% of the
    frame kept free on each side when it fits) so several rounds of moves
    have room.
    """
    _, rgb = domain.palette[int(rng.integers(len(domain.palette)))]
    radius = float(rng.uniform(*domain.start_radius))
    lo = radius + BORDER_MARGIN + SAMPLING_SLACK
    hi = image_size - lo
    pad = min(0.15 * image_size, max(0.0, (hi - lo) / 2.0))
    x, y = rng.uniform(lo + pad, hi - pad, size=2)
    return ObjectState(x=float(x), y=float(y), radius=radius, color=rgb)


def caption_for(domain: Domain, color_name: str, actions: list[str]) -> str:
    """E.g. "a red disc on a green meadow moves left, then grows"."""
    verbs = ", then ".join(ACTION_VERBS[a] for a in actions)
    return f"a {color_name} {domain.shape} {domain.scene} {verbs}"


def _color_name(domain: Domain, rgb: tuple[int, int, int]) -> str:
    return next(name for name, c in domain.palette if c == rgb)


def _sample_actions(
    cfg: WorldConfig, domain: Domain, start: ObjectState, rng: np.random.Generator, allowed
) -> tuple[list[ObjectState], list[str]] | None:
    """Roll out ``cfg.rounds`` random valid actions; None if one round has no option."""
    states = [start] * cfg.cond_frames
    chosen: list[str] = []
    for _ in range(cfg.rounds):
        options = valid_actions(domain, states[-1], cfg.round_frames, cfg.image_size, allowed, SAMPLING_SLACK)
        if not options:
            return None
        action = options[int(rng.integers(len(options)))]
        chosen.append(action)
        states.extend(simulate(domain, states[-1], action, cfg.round_frames))
    return states, chosen


def sample_episode(
    cfg: WorldConfig,
    domain_name: str,
    rng: np.random.Generator,
    allowed_actions: tuple[str, ...] | list[str] | None = None,
) -> Episode:
    """Sample and render one episode; actions drawn uniformly from the valid ones."""
    domain = get_domain(domain_name)
    for _ in range(_MAX_SAMPLING_ATTEMPTS):
        start = random_state(domain, rng, cfg.image_size)
        rollout = _sample_actions(cfg, domain, start, rng, allowed_actions)
        if rollout is not None:
            break
    else:
        raise ValueError(
            f"could not sample an episode in domain {domain_name!r} with allowed_actions={allowed_actions} "
            f"at image_size={cfg.image_size}; increase image_size or reduce round_frames"
        )
    states, chosen = rollout
    spans = []
    for i, action in enumerate(chosen):
        start_idx = cfg.cond_frames + i * cfg.round_frames
        end_idx = start_idx + cfg.round_frames
        spans.append({"action": action, "text": phrase(action, rng), "start": start_idx, "end": end_idx})
    return Episode(
        frames=render_states(domain, states, cfg.image_size),
        states=states,
        actions=spans,
        caption=caption_for(domain, _color_name(domain, start.color), chosen),
        domain=domain_name,
    )


def split_actions(domain_name: str, split: str) -> tuple[str, ...] | None:
    """Actions a split may use in a domain; None means all of the domain's actions.

    "train"/"val" hide ``TRANSFER_HELD_OUT`` in the transfer domain; "transfer"
    uses only those held-out actions and "adapt" all of them; both exist only for the transfer domain.
    """
    domain = get_domain(domain_name)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {SPLITS}")
    if split in ("transfer", "adapt"):
        if domain_name != TRANSFER_DOMAIN:
            raise ValueError(
                f"split {split!r} only exists for the transfer domain {TRANSFER_DOMAIN!r}, "
                f"not {domain_name!r}"
            )
        if split == "adapt":
            return tuple(domain.actions)
        return tuple(a for a in TRANSFER_HELD_OUT if a in domain.actions)
    if domain_name == TRANSFER_DOMAIN:
        return tuple(a for a in domain.actions if a not in TRANSFER_HELD_OUT)
    return None
