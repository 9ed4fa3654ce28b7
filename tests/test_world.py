"""Tests for the procedural world: domains, simulator and the action measurement."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from pandora_lightning.data.video import decode_mp4, encode_mp4
from pandora_lightning.world import (
    ACTIONS,
    DOMAINS,
    TRANSFER_DOMAIN,
    TRANSFER_HELD_OUT,
    ObjectState,
    WorldConfig,
    classify_episode,
    classify_round,
    measure_states,
    parse_action,
    phrase,
    phrasings,
    random_state,
    render,
    render_states,
    sample_episode,
    simulate,
    held_out_actions,
    split_actions,
    valid_actions,
)
from pandora_lightning.world.domains import ALL_DOMAINS, MASK_THRESHOLD, MIN_CONTRAST, PRACTICE_DOMAINS, get_domain
from pandora_lightning.world.measure import state_from_row, trajectory_distance

SIZE = 32
CFG = WorldConfig()


def _episodes(n_per_domain: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [sample_episode(CFG, name, rng) for name in DOMAINS for _ in range(n_per_domain)]


def _rounds(ep, frames):
    """Yield (span, clip, candidates) with candidates from the *measured* start state."""
    domain = DOMAINS[ep.domain]
    for span in ep.actions:
        clip = frames[span["start"] - CFG.cond_frames : span["end"]]
        start_row = measure_states(clip[CFG.cond_frames - 1 : CFG.cond_frames], domain, SIZE)[0]
        cands = valid_actions(domain, state_from_row(start_row), CFG.round_frames, SIZE)
        yield span, clip, cands


# --- domains -----------------------------------------------------------------


def test_actions_have_unique_phrasings_and_parse_back():
    all_phrases = [p for phrases in ACTIONS.values() for p in phrases]
    assert len(all_phrases) == len(set(all_phrases))
    for action, phrases in ACTIONS.items():
        assert len(phrases) >= 3
        for p in phrases:
            assert parse_action(p) == action
            assert parse_action("  " + p.upper().replace(" ", "   ") + " ") == action
        assert parse_action(action) == action


def test_parse_action_unknown_lists_valid_phrasings():
    with pytest.raises(ValueError, match="slide left"):
        parse_action("teleport")


def test_phrase_is_a_known_phrasing_and_covers_options():
    rng = np.random.default_rng(0)
    seen = {phrase("grow", rng) for _ in range(400)}
    assert seen <= set(phrasings("grow", held_out=False)) and len(seen) > 50
    held = {phrase("grow", rng, held_out=True) for _ in range(100)}
    assert held == set(phrasings("grow", held_out=True))
    with pytest.raises(ValueError, match="canonical actions"):
        phrase("fly", rng)


def test_domains_are_distinct_and_transfer_setup_is_consistent():
    assert len(DOMAINS) == 4 and TRANSFER_DOMAIN in DOMAINS
    backgrounds = [d.background(SIZE) for d in DOMAINS.values()]
    for i in range(len(backgrounds)):
        for j in range(i + 1, len(backgrounds)):
            assert np.abs(backgrounds[i].astype(int) - backgrounds[j]).mean() > 20
    assert len({d.shape for d in DOMAINS.values()}) >= 3
    assert len({d.speed for d in DOMAINS.values()}) >= 3
    for d in DOMAINS.values():
        assert len(d.actions) <= 7
        assert set(TRANSFER_HELD_OUT) <= set(d.actions)
        assert d.background(SIZE).shape == (SIZE, SIZE, 3) and d.background(SIZE).dtype == np.uint8


def test_practice_domains_show_every_action_and_look_like_no_scored_domain():
    """Training-only domains widen what training shows (backgrounds, shapes, speeds) without showing
    the transfer domain's look: none is within 20 grey levels (mean) of a scored domain's background."""
    assert set(PRACTICE_DOMAINS).isdisjoint(DOMAINS)
    for d in PRACTICE_DOMAINS.values():
        assert set(d.actions) == set(ACTIONS) and split_actions(d.name, "train") == d.actions
        for scored in DOMAINS.values():
            assert np.abs(d.background(SIZE).astype(int) - scored.background(SIZE)).mean() > 20, (d.name, scored.name)
    kinds = {d.background_kind for d in PRACTICE_DOMAINS.values()}
    assert get_domain(TRANSFER_DOMAIN).background_kind in kinds  # its kind of background, in other colours


def test_background_is_deterministic_and_read_only():
    d = DOMAINS["space"]
    assert np.array_equal(d.background(SIZE), dataclasses.replace(d).background(SIZE))
    with pytest.raises(ValueError):
        d.background(SIZE)[0, 0, 0] = 1


def test_palette_is_far_from_every_background_pixel():
    for d in ALL_DOMAINS.values():
        bg = d.background(SIZE).reshape(-1, 3).astype(float)
        for name, rgb in d.palette:
            dist = np.sqrt(((bg - np.array(rgb, float)) ** 2).sum(-1)).min()
            assert dist >= MIN_CONTRAST, (d.name, name, dist)


def test_background_neighbours_are_below_mask_threshold():
    for d in ALL_DOMAINS.values():
        bg = d.background(SIZE).astype(float)
        for axis in (0, 1):
            step = np.sqrt((np.diff(bg, axis=axis) ** 2).sum(-1)).max()
            assert step < MASK_THRESHOLD, (d.name, axis, step)


def test_domain_validation_names_bad_field():
    base = DOMAINS["meadow"]
    with pytest.raises(ValueError, match="shape"):
        dataclasses.replace(base, shape="star")
    with pytest.raises(ValueError, match="speed"):
        dataclasses.replace(base, speed=0.0)
    with pytest.raises(ValueError, match="radius_limits"):
        dataclasses.replace(base, start_radius=(1.0, 3.0))
    with pytest.raises(ValueError, match="actions"):
        dataclasses.replace(base, actions=("move_left", "fly"))


# --- config and simulator -------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"image_size": 20}, "image_size"),
        ({"image_size": 8}, "image_size"),
        ({"cond_frames": 0}, "cond_frames"),
        ({"rounds": -1}, "rounds"),
        ({"domains": ("meadow", "mars")}, "domains"),
        ({"practice": ("meadow",)}, "practice"),
    ],
)
def test_world_config_validation(kwargs, field):
    with pytest.raises(ValueError, match=f"WorldConfig.{field}"):
        WorldConfig(**kwargs)


def test_practice_domains_are_written_only_into_the_train_split(tmp_path):
    from pandora_lightning.data.manifest import load_manifest
    from pandora_lightning.world.shards import write_world

    cfg = WorldConfig(practice=("snow", "lagoon"))
    manifest = load_manifest(write_world(tmp_path / "shards", tmp_path / "w.yaml", cfg,
                                         {"train": 3, "practice": 2, "val": 1, "transfer": 1, "adapt": 1}, 8).path)
    sets = {(s.split, s.domain): s.samples for s in manifest.sets}
    assert sets[("train", "snow")] == sets[("train", "lagoon")] == 2 and sets[("train", "meadow")] == 3
    assert {d for split, d in sets if split != "train"}.isdisjoint(PRACTICE_DOMAINS)
    words = (tmp_path / "w.vocab.txt").read_text().split()
    assert {"lagoon", "snow"} <= set(words) and "cave" not in words


def test_world_config_num_frames():
    assert WorldConfig().num_frames == 14
    assert WorldConfig(cond_frames=1, round_frames=3, rounds=2).num_frames == 7


def test_simulate_is_exact():
    d = DOMAINS["space"]  # speed 1.25, grow_rate 0.5
    s = ObjectState(10.0, 12.0, 4.0, (250, 225, 30))
    right = simulate(d, s, "move_right", 3)
    assert [(t.x, t.y, t.radius) for t in right] == [(11.25, 12.0, 4.0), (12.5, 12.0, 4.0), (13.75, 12.0, 4.0)]
    up = simulate(d, s, "move_up", 2)
    assert [(t.x, t.y) for t in up] == [(10.0, 10.75), (10.0, 9.5)]
    assert [t.radius for t in simulate(d, s, "shrink", 2)] == [3.5, 3.0]
    assert all(t.color == s.color for t in simulate(d, s, "grow", 4))
    with pytest.raises(ValueError, match="not available"):
        simulate(d, s, "jump", 2)


def test_valid_actions_respect_borders_and_radius_limits():
    d = DOMAINS["meadow"]  # speed 1, grow 0.5, radius (2, 8)
    near_left = ObjectState(5.5, 16.0, 3.0, (225, 30, 35))
    acts = valid_actions(d, near_left, 4, SIZE)
    assert "move_left" not in acts and "move_right" in acts
    # One frame further from the border makes the move legal: x - r reaches exactly 1 px.
    assert "move_left" in valid_actions(d, ObjectState(8.0, 16.0, 3.0, (225, 30, 35)), 4, SIZE)
    tiny = ObjectState(16.0, 16.0, 2.5, (225, 30, 35))
    assert "shrink" not in valid_actions(d, tiny, 4, SIZE)
    assert valid_actions(d, tiny, 4, SIZE, allowed=("grow", "shrink")) == ["grow"]
    with pytest.raises(ValueError, match="allowed"):
        valid_actions(d, tiny, 4, SIZE, allowed=("fly",))


def test_valid_trajectories_never_touch_the_border():
    rng = np.random.default_rng(3)
    for d in DOMAINS.values():
        for _ in range(20):
            s = random_state(d, rng, SIZE)
            for a in valid_actions(d, s, 4, SIZE):
                frames = render_states(d, simulate(d, s, a, 4), SIZE)
                bg = d.background(SIZE)
                border = np.ones((SIZE, SIZE), bool)
                border[1:-1, 1:-1] = False
                assert np.array_equal(frames[:, border], np.broadcast_to(bg[border], frames[:, border].shape))


def test_render_draws_shape_with_expected_area_and_colour():
    for d in DOMAINS.values():
        s = ObjectState(16.3, 15.6, 5.0, d.palette[0][1])
        img = render(d, s, SIZE)
        mask = np.any(img != d.background(SIZE), axis=-1)
        area = {"disc": np.pi * 25, "square": 100.0, "diamond": 50.0}[d.shape]
        assert abs(mask.sum() - area) < 0.15 * area
        assert (img[mask] == np.array(s.color)).all()
        assert render_states(d, [s, s], SIZE).shape == (2, SIZE, SIZE, 3)


def test_sample_episode_structure():
    rng = np.random.default_rng(1)
    ep = sample_episode(CFG, "meadow", rng)
    assert ep.frames.shape == (14, SIZE, SIZE, 3) and ep.frames.dtype == np.uint8
    assert len(ep.states) == 14 and ep.domain == "meadow"
    assert [(a["start"], a["end"]) for a in ep.actions] == [(2, 6), (6, 10), (10, 14)]
    assert ep.states[0] == ep.states[1]  # static context frames
    for a in ep.actions:
        assert parse_action(a["text"]) == a["action"]
        expected = simulate(DOMAINS["meadow"], ep.states[a["start"] - 1], a["action"], 4)
        assert ep.states[a["start"] : a["end"]] == expected
    assert np.array_equal(ep.frames, render_states(DOMAINS["meadow"], ep.states, SIZE))
    assert ep.caption.startswith("a ") and "disc on a green meadow" in ep.caption
    assert ep.caption.count(", then ") == 2


def test_sample_episode_is_deterministic_by_seed_and_varied():
    a = sample_episode(CFG, "ocean", np.random.default_rng(7))
    b = sample_episode(CFG, "ocean", np.random.default_rng(7))
    assert np.array_equal(a.frames, b.frames) and a.actions == b.actions and a.caption == b.caption
    eps = [sample_episode(CFG, "ocean", np.random.default_rng(s)) for s in range(30)]
    assert len({e.states[0].color for e in eps}) >= 3
    assert len({round(e.states[0].x, 3) for e in eps}) == 30
    assert len({e.actions[0]["action"] for e in eps}) >= 4


def test_sample_episode_respects_allowed_actions():
    rng = np.random.default_rng(2)
    moves = ("move_left", "move_right", "move_up", "move_down")
    for _ in range(20):
        ep = sample_episode(CFG, "meadow", rng, allowed_actions=moves)
        assert {a["action"] for a in ep.actions} <= set(moves)
    # Two actions that are often not both valid: some round would leave one choice, which would give it away.
    with pytest.raises(ValueError, match="give the action away"):
        for _ in range(20):
            sample_episode(CFG, "desert", rng, allowed_actions=("grow", "shrink"))


def test_split_actions_semantics():
    for split in ("train", "val", "phrasings"):
        assert split_actions("meadow", split) == DOMAINS["meadow"].actions
    train = split_actions(TRANSFER_DOMAIN, "train")
    assert train and not set(train) & set(TRANSFER_HELD_OUT)
    assert split_actions(TRANSFER_DOMAIN, "val") == split_actions(TRANSFER_DOMAIN, "phrasings") == train
    assert split_actions(TRANSFER_DOMAIN, "transfer") == DOMAINS[TRANSFER_DOMAIN].actions
    assert held_out_actions(TRANSFER_DOMAIN, "transfer") == TRANSFER_HELD_OUT
    assert held_out_actions(TRANSFER_DOMAIN, "val") == held_out_actions("meadow", "train") == ()
    with pytest.raises(ValueError, match="transfer domain"):
        split_actions("meadow", "transfer")
    with pytest.raises(ValueError, match="unknown split"):
        split_actions("meadow", "test")
    with pytest.raises(ValueError, match="unknown domain"):
        split_actions("mars", "train")


# --- measurement --------------------------------------------------------------


def test_measure_states_matches_ground_truth():
    for ep in _episodes(5):
        m = measure_states(ep.frames, DOMAINS[ep.domain], SIZE)
        truth = np.array([s.as_list() for s in ep.states])
        assert m.shape == (14, 6)
        assert np.abs(m[:, :3] - truth[:, :3]).max() < 0.6
        assert np.abs(m[:, 3:] - truth[:, 3:]).max() < 1e-9


def test_measure_states_never_crashes_on_bad_frames():
    d = DOMAINS["meadow"]
    bg = np.broadcast_to(d.background(SIZE), (3, SIZE, SIZE, 3)).copy()
    assert np.isnan(measure_states(bg, d, SIZE)).all()
    noise = np.random.default_rng(0).integers(0, 256, (3, SIZE, SIZE, 3), dtype=np.uint8)
    assert np.isfinite(measure_states(noise, d, SIZE)).all()
    floats = np.full((2, SIZE, SIZE, 3), np.nan)
    assert measure_states(floats, d, SIZE).shape == (2, 6)
    with pytest.raises(ValueError, match="shape"):
        measure_states(noise[:, :16], d, SIZE)


def test_ground_truth_rounds_are_classified_correctly():
    n = 0
    for ep in _episodes(15, seed=11):
        for span, clip, cands in _rounds(ep, ep.frames):
            assert classify_round(clip, DOMAINS[ep.domain], SIZE, CFG.cond_frames, cands) == span["action"]
            n += 1
    assert n == 4 * 15 * 3


def test_ground_truth_survives_mp4_round_trip():
    for ep in _episodes(6, seed=12):
        decoded = decode_mp4(encode_mp4(ep.frames, CFG.fps))
        for span, clip, cands in _rounds(ep, decoded):
            assert classify_round(clip, DOMAINS[ep.domain], SIZE, CFG.cond_frames, cands) == span["action"]


def test_blurred_noisy_frames_are_still_classified():
    """Model-like output: 3x3 box blur plus Gaussian noise (sigma 8 levels)."""
    noise_rng = np.random.default_rng(0)
    hits = n = 0
    for ep in _episodes(8, seed=17):
        padded = np.pad(ep.frames.astype(float), ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
        blurred = sum(padded[:, i : i + SIZE, j : j + SIZE] for i in range(3) for j in range(3)) / 9
        frames = np.clip(blurred + noise_rng.normal(0, 8, blurred.shape), 0, 255).astype(np.uint8)
        for span, clip, cands in _rounds(ep, frames):
            hits += classify_round(clip, DOMAINS[ep.domain], SIZE, CFG.cond_frames, cands) == span["action"]
            n += 1
    assert hits / n >= 0.95


def test_ignored_action_scores_near_chance():
    hits, chance, n = 0, 0.0, 0
    for ep in _episodes(25, seed=13):
        for span, clip, cands in _rounds(ep, ep.frames):
            frozen = np.repeat(clip[CFG.cond_frames - 1 : CFG.cond_frames], len(clip), axis=0)
            # A little pixel noise so ties are broken the way a real model's output would break them.
            noise = np.random.default_rng(n).integers(-2, 3, frozen.shape)
            frozen = np.clip(frozen.astype(int) + noise, 0, 255).astype(np.uint8)
            hits += classify_round(frozen, DOMAINS[ep.domain], SIZE, CFG.cond_frames, cands) == span["action"]
            chance += 1.0 / len(cands)
            n += 1
    assert hits / n <= chance / n + 0.1


def test_distance_scaling_treats_every_action_alike_for_a_frozen_object():
    for d in DOMAINS.values():
        s = ObjectState(16.0, 16.0, 5.0, d.palette[0][1])
        frozen = np.tile(np.array(s.as_list()), (4, 1))
        dists = {
            a: trajectory_distance(d, np.array([t.as_list() for t in simulate(d, s, a, 4)]), frozen)
            for a in d.actions
        }
        # k frames of any action are k scaled units from standing still: mean(k**2) over k = 1..4.
        assert dists == pytest.approx({a: 7.5 for a in d.actions})
        drift = frozen.copy()
        drift[:, 3] += 255.0 / 4  # one unit of colour error per frame
        assert trajectory_distance(d, frozen, drift) == pytest.approx(1.0)


def test_a_different_rendered_action_is_recognised_as_that_action():
    rng = np.random.default_rng(14)
    checked = 0
    for ep in _episodes(10, seed=15):
        d = DOMAINS[ep.domain]
        for span, clip, cands in _rounds(ep, ep.frames):
            others = [a for a in cands if a != span["action"]]
            if not others:
                continue
            other = others[int(rng.integers(len(others)))]
            start = ep.states[span["start"] - 1]
            states = [start] * CFG.cond_frames + simulate(d, start, other, CFG.round_frames)
            wrong = render_states(d, states, SIZE)
            assert classify_round(wrong, d, SIZE, CFG.cond_frames, cands) == other
            checked += 1
    assert checked > 50


def test_classify_round_returns_none_when_object_missing():
    d = DOMAINS["desert"]
    ep = sample_episode(CFG, "desert", np.random.default_rng(4))
    clip = ep.frames[: CFG.cond_frames + CFG.round_frames].copy()
    clip[-1] = d.background(SIZE)
    assert classify_round(clip, d, SIZE, CFG.cond_frames) is None
    with pytest.raises(ValueError, match="cond_frames"):
        classify_round(clip[:2], d, SIZE, 2)


def test_classify_episode_finds_every_action():
    # The action-following metric over rollouts is tested in test_metrics.py.
    found = {}
    for ep in _episodes(3, seed=16):
        d = DOMAINS[ep.domain]
        preds = classify_episode(
            ep.frames, d, SIZE, ep.actions, lambda s, n, d=d: valid_actions(d, s, n, SIZE)
        )
        for p, span in zip(preds, ep.actions):
            found.setdefault(ep.domain, []).append(p == span["action"])
    assert set(found) == set(DOMAINS) and len(found["meadow"]) == 9
    assert all(all(hits) for hits in found.values())
