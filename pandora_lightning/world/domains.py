"""Domains of the built-in procedural world: backgrounds, objects, actions.

A domain is a static, deterministic background plus one kind of hard-edged
object with known dynamics. Because the background is identical in every
episode of a domain, the measurement code can find the object by comparing
a frame with it (see ``measure.py``).

Coordinates: pixel column ``i`` / row ``j`` covers ``[i, i+1) x [j, j+1)``,
so its centre is ``(i + 0.5, j + 0.5)``; ``x`` grows to the right and ``y``
downward. The object "radius" is the disc radius, the half side of a square
and the centre-to-corner distance of a diamond, so in every shape the
object spans ``[x - radius, x + radius]`` on both axes.
"""

from __future__ import annotations

import functools
import zlib
from dataclasses import dataclass

import numpy as np

from pandora_lightning.errors import PandoraError
from pandora_lightning.world.phrasing import CORES

RGB = tuple[int, int, int]

# Canonical actions; their phrasings are the grammar in ``phrasing.py``.
ACTIONS: dict[str, tuple[str, ...]] = CORES

# Third-person verb phrases used to write episode captions.
ACTION_VERBS: dict[str, str] = {
    "move_left": "moves left",
    "move_right": "moves right",
    "move_up": "moves up",
    "move_down": "moves down",
    "grow": "grows",
    "shrink": "shrinks",
}

MOVES: dict[str, tuple[int, int]] = {
    "move_left": (-1, 0),
    "move_right": (1, 0),
    "move_up": (0, -1),
    "move_down": (0, 1),
}
# Signed radius change per unit of the domain's grow rate.
RESIZES: dict[str, int] = {"grow": 1, "shrink": -1}

SHAPES = ("disc", "square", "diamond")
# Area of each shape in units of radius**2; inverted by the measurement.
SHAPE_AREA: dict[str, float] = {"disc": float(np.pi), "square": 4.0, "diamond": 2.0}

BACKGROUNDS = ("vertical_gradient", "stars", "stripes", "diagonal_gradient")

# Palette colours must stay this far (Euclidean RGB) from every background
# pixel: twice the measurement threshold, so a blurred edge pixel is counted
# as object only when it is more than half object.
MIN_CONTRAST = 160.0
# A pixel whose colour is farther than this from the known background is
# object. Neighbouring background pixels differ by less (dim stars, soft
# stripes), so a background misplaced by a pixel in generated frames is never
# mistaken for the object.
MASK_THRESHOLD = MIN_CONTRAST / 2
# Held-out start states come from a reserved part of colour space: an episode's object is a palette
# colour shaded by an integer offset on every channel; training draws |offset| in 8..24, held-out
# splits |offset| <= 4. Every palette colour has a channel that never clips (24..231), so no object
# pixel of a held-out episode has a colour any training frame shows (tests enumerate both sets).
TRAIN_SHADES: tuple[int, ...] = tuple(d for d in range(-24, 25) if abs(d) >= 8)
HELD_OUT_SHADES: tuple[int, ...] = tuple(range(-4, 5))


@dataclass(frozen=True)
class ObjectState:
    """The single object of a frame: centre (px), radius (px), RGB colour."""

    x: float
    y: float
    radius: float
    color: RGB

    def as_list(self) -> list[float]:
        """``[x, y, radius, r, g, b]``, the layout of ``measure_states`` rows."""
        return [self.x, self.y, self.radius, *map(float, self.color)]


@dataclass(frozen=True)
class Domain:
    """A world domain: background, object kind and exactly computable dynamics."""

    name: str
    scene: str  # caption fragment, e.g. "on a green meadow"
    background_kind: str
    background_colors: tuple[RGB, RGB]
    shape: str
    palette: tuple[tuple[str, RGB], ...]  # (colour name for captions, RGB)
    speed: float  # px / frame for the move actions
    grow_rate: float  # px of radius / frame for grow and shrink
    radius_limits: tuple[float, float]  # allowed (min, max) radius
    start_radius: tuple[float, float]  # range sampled for start states
    actions: tuple[str, ...] = tuple(ACTIONS)

    def __post_init__(self) -> None:
        if self.background_kind not in BACKGROUNDS:
            raise PandoraError(
                f"Domain {self.name!r}: background_kind={self.background_kind!r} is unknown; "
                f"use one of {BACKGROUNDS}"
            )
        if self.shape not in SHAPES:
            raise PandoraError(f"Domain {self.name!r}: shape={self.shape!r} is unknown; use one of {SHAPES}")
        if self.speed <= 0 or self.grow_rate <= 0:
            raise PandoraError(
                f"Domain {self.name!r}: speed={self.speed} and grow_rate={self.grow_rate} "
                "must both be > 0 so every action changes the frame"
            )
        lo, hi = self.radius_limits
        s_lo, s_hi = self.start_radius
        if not (0 < lo <= s_lo <= s_hi <= hi):
            raise PandoraError(
                f"Domain {self.name!r}: need 0 < radius_limits[0] <= start_radius[0] <= "
                f"start_radius[1] <= radius_limits[1], got radius_limits={self.radius_limits}, "
                f"start_radius={self.start_radius}"
            )
        unknown = [a for a in self.actions if a not in ACTIONS]
        if unknown or not 1 <= len(self.actions) <= 7:
            raise PandoraError(
                f"Domain {self.name!r}: actions={self.actions} must be 1..7 names from {tuple(ACTIONS)}"
            )
        if not self.palette:
            raise PandoraError(f"Domain {self.name!r}: palette is empty; give at least one (name, RGB)")

    def background(self, size: int) -> np.ndarray:
        """The static background, ``(size, size, 3) uint8``, read-only and cached."""
        return _background(self.background_kind, self.background_colors, self.name, size)


def _lerp(c0: RGB, c1: RGB, t: np.ndarray) -> np.ndarray:
    """Colours along ``t`` in [0, 1]: ``t.shape + (3,)`` float."""
    a, b = np.asarray(c0, np.float64), np.asarray(c1, np.float64)
    return a + (b - a) * t[..., None]


@functools.lru_cache(maxsize=64)
def _background(kind: str, colors: tuple[RGB, RGB], name: str, size: int) -> np.ndarray:
    c0, c1 = colors
    rows = np.linspace(0.0, 1.0, size)[:, None] * np.ones((1, size))
    if kind == "vertical_gradient":
        img = _lerp(c0, c1, rows)
    elif kind == "diagonal_gradient":
        img = _lerp(c0, c1, (rows + rows.T) / 2.0)
    elif kind == "stripes":
        # 4-px bands: coarse enough to survive video coding, fine enough to
        # always lie under the object.
        band = (np.arange(size) // 4) % 2
        img = _lerp(c0, c1, band[:, None].astype(np.float64) * np.ones((1, size)))
    else:  # stars: fixed per-domain seed so every episode shares the sky
        img = np.broadcast_to(np.asarray(c0, np.float64), (size, size, 3)).copy()
        star_rng = np.random.default_rng(zlib.crc32(name.encode()))
        stars = star_rng.random((size, size)) < 0.04
        img[stars] = c1
    out = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    out.setflags(write=False)
    return out


DOMAINS: dict[str, Domain] = {
    d.name: d
    for d in (
        Domain(
            name="meadow",
            scene="on a green meadow",
            background_kind="vertical_gradient",
            background_colors=((120, 190, 90), (40, 120, 40)),
            shape="disc",
            palette=(("red", (225, 30, 35)), ("blue", (30, 50, 230)), ("magenta", (230, 40, 220)),
                     ("purple", (140, 20, 200))),
            speed=1.0,
            grow_rate=0.5,
            radius_limits=(2.0, 9.0),
            start_radius=(3.0, 5.0),
        ),
        Domain(
            name="space",
            scene="in starry space",
            background_kind="stars",
            background_colors=((8, 8, 28), (50, 50, 72)),
            shape="square",
            palette=(("orange", (250, 140, 20)), ("red", (235, 35, 35)), ("green", (40, 230, 60)),
                     ("yellow", (240, 230, 30))),
            speed=1.25,
            grow_rate=0.5,
            radius_limits=(2.0, 10.0),
            start_radius=(3.0, 5.0),
        ),
        Domain(
            name="ocean",
            scene="in a striped blue ocean",
            background_kind="stripes",
            background_colors=((15, 50, 120), (35, 95, 170)),
            shape="diamond",
            palette=(("yellow", (250, 225, 30)), ("red", (235, 45, 35)), ("white", (225, 225, 225)),
                     ("orange", (250, 150, 30))),
            speed=1.0,
            grow_rate=0.5,
            radius_limits=(3.0, 10.0),
            start_radius=(4.0, 6.0),
        ),
        Domain(
            name="desert",
            scene="in a sandy desert",
            background_kind="diagonal_gradient",
            background_colors=((235, 205, 150), (200, 160, 100)),
            shape="disc",
            palette=(("blue", (30, 50, 200)), ("green", (20, 100, 35)), ("black", (40, 40, 40)),
                     ("navy", (30, 30, 110))),
            speed=0.75,
            # The held-out actions' rate: the disc's grow rate in meadow, the only one a model can infer.
            grow_rate=0.5,
            radius_limits=(2.0, 10.0),
            start_radius=(3.0, 7.0),
        ),
    )
}

# Training-only domains (`WorldConfig.practice`): more backgrounds, shapes and speeds, every action shown.
# They are never scored, and none resembles the transfer domain's sand: a diagonal gradient (the
# desert's kind) appears here only in teal, purple and dark green, so the transfer split still asks
# for actions that no training frame on sand shows. What they teach is that an action does the same
# thing on any background (README, "The built-in world", "Practice domains").
PRACTICE_DOMAINS: dict[str, Domain] = {
    d.name: d
    for d in (
        Domain(
            name="lagoon",
            scene="in a teal lagoon",
            background_kind="diagonal_gradient",
            background_colors=((60, 170, 170), (20, 90, 110)),
            shape="diamond",
            palette=(("yellow", (250, 225, 30)), ("red", (235, 45, 35)), ("magenta", (230, 40, 220)),
                     ("orange", (250, 150, 30))),
            speed=0.75,
            grow_rate=0.5,
            radius_limits=(3.0, 10.0),
            start_radius=(4.0, 6.0),
        ),
        Domain(
            name="dusk",
            scene="in a purple dusk",
            background_kind="diagonal_gradient",
            background_colors=((90, 60, 130), (30, 20, 60)),
            shape="square",
            palette=(("yellow", (240, 230, 30)), ("green", (40, 230, 60)), ("orange", (250, 140, 20)),
                     ("white", (225, 225, 225))),
            speed=1.0,
            grow_rate=0.5,
            radius_limits=(2.0, 10.0),
            start_radius=(3.0, 5.0),
        ),
        Domain(
            name="forest",
            scene="in a dark forest",
            background_kind="diagonal_gradient",
            background_colors=((70, 120, 60), (20, 60, 25)),
            shape="disc",
            palette=(("red", (225, 30, 35)), ("magenta", (230, 40, 220)), ("yellow", (240, 230, 30)),
                     ("white", (225, 225, 225))),
            speed=0.75,
            grow_rate=0.5,
            radius_limits=(2.0, 10.0),
            start_radius=(3.0, 7.0),
        ),
        Domain(
            name="snow",
            scene="on white snow",
            background_kind="vertical_gradient",
            background_colors=((235, 240, 250), (180, 190, 210)),
            shape="disc",
            palette=(("red", (225, 30, 35)), ("blue", (30, 50, 230)), ("black", (40, 40, 40)),
                     ("green", (20, 100, 35))),
            speed=1.25,
            grow_rate=0.5,
            radius_limits=(2.0, 10.0),
            start_radius=(3.0, 5.0),
        ),
        Domain(
            name="lavender",
            scene="in a pale lavender field",
            background_kind="vertical_gradient",
            background_colors=((230, 225, 250), (190, 185, 220)),
            shape="square",
            palette=(("navy", (30, 30, 110)), ("green", (20, 100, 35)), ("black", (40, 40, 40)),
                     ("red", (200, 20, 25))),
            speed=0.75,
            grow_rate=0.5,
            radius_limits=(2.0, 10.0),
            start_radius=(3.0, 6.0),
        ),
        Domain(
            name="night",
            scene="under a red night sky",
            background_kind="stars",
            background_colors=((70, 25, 15), (110, 60, 40)),
            shape="disc",
            palette=(("cyan", (40, 220, 230)), ("yellow", (240, 230, 30)), ("green", (40, 230, 60)),
                     ("white", (225, 225, 225))),
            speed=1.0,
            grow_rate=0.5,
            radius_limits=(2.0, 10.0),
            start_radius=(3.0, 5.0),
        ),
        Domain(
            name="cave",
            scene="in a brown cave",
            background_kind="stripes",
            background_colors=((60, 50, 45), (95, 80, 70)),
            shape="square",
            palette=(("yellow", (240, 230, 30)), ("cyan", (40, 220, 230)), ("white", (225, 225, 225)),
                     ("magenta", (230, 40, 220))),
            speed=0.75,
            grow_rate=0.5,
            radius_limits=(2.0, 10.0),
            start_radius=(3.0, 5.0),
        ),
    )
}

TRANSFER_DOMAIN = "desert"
# Never shown in the transfer domain by the training split (nor by "val"/"phrasings"); the "transfer"
# split draws from all of its actions and scores these rounds apart: the model has to carry them over
# from the other domains.
TRANSFER_HELD_OUT = ("grow", "shrink")


# Scored domains first: a domain's random stream is seeded by its index here (world/shards.py).
ALL_DOMAINS: dict[str, Domain] = {**DOMAINS, **PRACTICE_DOMAINS}


def get_domain(name: str) -> Domain:
    """Look up a domain by name with a helpful error."""
    try:
        return ALL_DOMAINS[name]
    except KeyError:
        raise PandoraError(f"unknown domain {name!r}; known domains: {tuple(ALL_DOMAINS)}") from None


def shade(rgb: RGB, delta: int) -> RGB:
    """``rgb`` with ``delta`` added to every channel (clipped to 0..255)."""
    return tuple(int(min(255, max(0, c + delta))) for c in rgb)


def shade_band(held_out: bool) -> tuple[int, ...]:
    """The colour shades (added to a palette colour) of training or of held-out start states."""
    return HELD_OUT_SHADES if held_out else TRAIN_SHADES
