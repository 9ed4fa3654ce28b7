"""Built-in procedural world: tiny videos with exactly known, text-steered dynamics."""

from pandora_lightning.world.domains import (
    ACTIONS,
    DOMAINS,
    TRANSFER_DOMAIN,
    TRANSFER_HELD_OUT,
    Domain,
    ObjectState,
    get_domain,
    parse_action,
    phrase,
)
from pandora_lightning.world.measure import (
    classify_episode,
    classify_round,
    frame_consistency,
    measure_states,
)
from pandora_lightning.world.simulator import (
    SPLITS,
    Episode,
    WorldConfig,
    object_mask,
    random_state,
    render,
    render_states,
    sample_episode,
    simulate,
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
    "classify_episode",
    "classify_round",
    "frame_consistency",
    "get_domain",
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
