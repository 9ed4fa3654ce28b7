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
    ActionFollowing,
    classify_episode,
    classify_round,
    measure_states,
)
from pandora_lightning.world.simulator import (
    SPLITS,
    Episode,
    WorldConfig,
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
    "ActionFollowing",
    "Domain",
    "Episode",
    "ObjectState",
    "WorldConfig",
    "classify_episode",
    "classify_round",
    "get_domain",
    "measure_states",
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
