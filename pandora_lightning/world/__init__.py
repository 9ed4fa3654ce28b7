"""Built-in procedural world: tiny videos with exactly known, text-steered dynamics."""

from pandora_lightning.world.domains import (
    ACTIONS,
    DOMAINS,
    TRANSFER_DOMAIN,
    TRANSFER_HELD_OUT,
    Domain,
    ObjectState,
    get_domain,
)
from pandora_lightning.world.phrasing import is_held_out, parse_action, phrase, phrasings
from pandora_lightning.world.measure import (
    classify_episode,
    classify_round,
    frame_consistency,
    measure_states,
)
from pandora_lightning.world.simulator import (
    MIN_OPTIONS,
    SPLITS,
    Episode,
    WorldConfig,
    object_mask,
    random_state,
    render,
    render_states,
    sample_episode,
    simulate,
    held_out_actions,
    split_actions,
    valid_actions,
)

__all__ = [
    "ACTIONS",
    "DOMAINS",
    "SPLITS",
    "TRANSFER_DOMAIN",
    "TRANSFER_HELD_OUT",
    "Domain",
    "Episode",
    "ObjectState",
    "WorldConfig",
    "MIN_OPTIONS",
    "classify_episode",
    "classify_round",
    "frame_consistency",
    "get_domain",
    "held_out_actions",
    "is_held_out",
    "phrasings",
    "measure_states",
    "object_mask",
    "parse_action",
    "phrase",
    "random_state",
    "render",
    "render_states",
    "sample_episode",
    "simulate",
    "split_actions",
    "valid_actions",
]
