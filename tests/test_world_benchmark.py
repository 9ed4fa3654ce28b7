"""The world as a benchmark: disjoint splits, a sampler that gives nothing away, the strict metric,
the text-ignoring baseline and the phrasing grammar."""
from __future__ import annotations

import dataclasses
import hashlib
from collections import Counter, defaultdict

import numpy as np
import pytest

from pandora_lightning.data.video import decode_mp4, encode_mp4
from pandora_lightning.world import (
    DOMAINS,
    MIN_OPTIONS,
    SPLITS,
    TRANSFER_DOMAIN,
    TRANSFER_HELD_OUT,
    ObjectState,
    WorldConfig,
    measure_states,
    parse_action,
    phrasings,
    render_states,
    sample_episode,
    simulate,
    split_actions,
    valid_actions,
)
from pandora_lightning.world.baseline import best_baseline, text_ignoring_baselines
from pandora_lightning.world.drift import exact_drawer_psnr
from pandora_lightning.world.domains import ALL_DOMAINS, HELD_OUT_SHADES, MIN_CONTRAST, PRACTICE_DOMAINS, TRAIN_SHADES, get_domain, shade
from pandora_lightning.world.measure import RATE_TOLERANCE, judge_round
from pandora_lightning.world.phrasing import CORES
from pandora_lightning.world.simulator import BORDER_MARGIN, HELD_OUT_SPLITS, SAMPLING_SLACK

SIZE = 32
CFG = WorldConfig(held_out_rounds=8)


def _split_domains(split):
    if split == "train":
        return [*DOMAINS, *PRACTICE_DOMAINS]
    return [TRANSFER_DOMAIN] if split in ("transfer", "adapt") else list(DOMAINS)


def _meta(ep, split):
    """The shard JSON fields the metrics read."""
    return {"domain": ep.domain, "split": split, "actions": ep.actions, "image_size": SIZE,
            "states": [[round(v, 4) for v in s.as_list()] for s in ep.states]}


def _episodes(split, per_domain, seed=0):
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    return [sample_episode(CFG, d, rng, split=split) for d in _split_domains(split) for _ in range(per_domain)]


# --- splits disjoint by construction -------------------------------------------------------------


@pytest.mark.parametrize("split", SPLITS)
def test_every_state_of_every_domain_offers_two_valid_actions(split):
    """A grid over the whole state space the sampler can reach (radius within the limits less the
    slack, object clear of the border by the margin plus the slack): never fewer than MIN_OPTIONS."""
    eps = 1e-6
    for name in _split_domains(split):
        d, allowed = ALL_DOMAINS[name], split_actions(name, split)
        lo, hi = d.radius_limits[0] + SAMPLING_SLACK + eps, d.radius_limits[1] - SAMPLING_SLACK - eps
        margin = BORDER_MARGIN + SAMPLING_SLACK + eps
        for r in np.linspace(lo, hi, 9):
            centres = np.linspace(r + margin, SIZE - r - margin, 11)
            for x in centres:
                for y in centres:
                    options = valid_actions(d, ObjectState(x, y, r, (0, 0, 0)), CFG.round_frames, SIZE, allowed, SAMPLING_SLACK)
                    assert len(options) >= MIN_OPTIONS, (name, split, x, y, r, options)


def test_actions_are_uniform_over_the_valid_ones():
    """Given the valid set, no action is favoured: the state tells nothing beyond validity."""
    cells: dict[tuple, Counter] = defaultdict(Counter)
    rng = np.random.default_rng(5)
    for _ in range(150):
        ep = sample_episode(CFG, "space", rng, split="val")
        for span in ep.actions:
            valid = valid_actions(DOMAINS["space"], ep.states[span["start"] - 1], 4, SIZE, None, SAMPLING_SLACK)
            assert span["action"] in valid and len(valid) >= MIN_OPTIONS
            cells[tuple(valid)][span["action"]] += 1
    big = [c for c in cells.values() if sum(c.values()) >= 100]
    assert big
    for counts in big:
        n, k = sum(counts.values()), len(counts)
        chi2 = sum((v - n / k) ** 2 / (n / k) for v in counts.values())
        assert chi2 < 20.5, counts  # 5 degrees of freedom at most: p < 0.001


def test_held_out_colours_are_reserved():
    """No shaded colour of a held-out split is a colour training can draw, in any domain."""
    assert not set(TRAIN_SHADES) & set(HELD_OUT_SHADES)
    for d in ALL_DOMAINS.values():
        bg = d.background(SIZE).reshape(-1, 3).astype(float)
        train = {shade(rgb, s) for _, rgb in d.palette for s in TRAIN_SHADES}
        held = {shade(rgb, s) for _, rgb in d.palette for s in HELD_OUT_SHADES}
        assert not train & held, d.name
        for colour in train | held:
            assert np.sqrt(((bg - np.array(colour, float)) ** 2).sum(-1)).min() >= MIN_CONTRAST, (d.name, colour)


def test_recoloured_training_clips_never_show_a_held_out_background():
    """`demo --practice` recolours training clips (data.recolor: channel orders and inversions) away
    from the transfer domain's colour (data.recolor_avoid): no recoloured background of any other
    domain comes within 40 grey levels (mean) of the desert's sand, so no recoloured clip shows the
    held-out grow/shrink in the desert's look (an inverted ocean would be sand: 20 apart)."""
    import random

    import torch

    from pandora_lightning.data.dataset import recolor
    from pandora_lightning.world.demo import transfer_look

    sand = get_domain(TRANSFER_DOMAIN).background(SIZE).astype(int)
    rng = random.Random(0)
    for d in ALL_DOMAINS.values():
        clip = torch.from_numpy(d.background(SIZE).transpose(2, 0, 1).copy())[None]
        looks = set()
        for _ in range(300):
            out = recolor(clip, rng, avoid=(tuple(transfer_look(SIZE)),))[0].permute(1, 2, 0).numpy().astype(int)
            looks.add(out.tobytes())
            if d.name != TRANSFER_DOMAIN:
                assert np.abs(out - sand).mean() > 40, d.name
        assert len(looks) >= 24, d.name  # most of the 48 recolourings remain


def test_held_out_frames_never_repeat_a_training_frame():
    def digests(episodes):
        return {hashlib.sha1(frame.tobytes()).hexdigest() for ep in episodes for frame in ep.frames}

    train = digests(_episodes("train", 40))
    assert set(HELD_OUT_SPLITS) == set(SPLITS) - {"train", "adapt"}  # adapt is the adapt stage's training data
    for split in HELD_OUT_SPLITS:
        held = _episodes(split, 10)
        assert not digests(held) & train, split


def test_splits_use_their_actions_and_phrasings():
    for split in SPLITS:
        for ep in _episodes(split, 6):
            assert {a["action"] for a in ep.actions} <= set(split_actions(ep.domain, split))
            held_out_text = [t["text"] in phrasings(t["action"], held_out=True) for t in ep.actions]
            assert all(held_out_text) if split == "phrasings" else not any(held_out_text)
            assert len(ep.actions) == CFG.rounds_for(split)
    transfer = [a["action"] for ep in _episodes("transfer", 8) for a in ep.actions]
    assert set(TRANSFER_HELD_OUT) <= set(transfer)  # the transfer split does ask for them
    train = {a["action"] for ep in _episodes("train", 30) if ep.domain == TRANSFER_DOMAIN for a in ep.actions}
    assert train and not train & set(TRANSFER_HELD_OUT)


def test_sampler_refuses_a_domain_that_would_give_the_action_away():
    cramped = dataclasses.replace(DOMAINS["meadow"], radius_limits=(2.0, 14.0), start_radius=(11.0, 12.0))
    with pytest.raises(ValueError, match="give the action away"):
        from pandora_lightning.world import simulator

        states = simulator._sample_actions(3, CFG, cramped, ObjectState(16.0, 16.0, 12.5, (225, 30, 35)),
                                           np.random.default_rng(0), cramped.actions)
        del states


# --- the text-ignoring baseline ------------------------------------------------------------------


def _baseline(episodes, split):
    metas = [_meta(ep, split) for ep in episodes]
    rounds = [len(m["actions"]) for m in metas]
    values = text_ignoring_baselines(metas, rounds)
    groups = np.array([m["domain"] for m, n in zip(metas, rounds) for _ in range(n)])
    return values, groups


def test_text_ignoring_baseline_is_low_on_held_out_episodes():
    values, groups = _baseline(_episodes("val", 16, seed=3), "val")
    overall, per_domain = best_baseline(values, groups)
    assert overall <= 0.30 and all(acc <= 0.40 for acc, _ in per_domain.values()), per_domain
    # The exact expectation of guessing among the valid actions is the floor every predictor beats on average.
    assert 0.15 < values["valid_uniform"].mean() < 0.30


def test_text_ignoring_baseline_finds_a_leaky_sampler():
    """The old desert: only grow/shrink, alternating. A text-ignoring predictor must score ~1."""
    leaky = []
    rng = np.random.default_rng(0)
    for _ in range(16):
        ep = sample_episode(CFG, "meadow", rng, split="val")
        d, state = DOMAINS["meadow"], ep.states[0]
        states, actions = [state] * CFG.cond_frames, []
        for r, action in enumerate(["grow", "shrink"] * 4):
            actions.append({"action": action, "text": action, "start": 2 + 4 * r, "end": 6 + 4 * r})
            states += simulate(d, states[-1], action, 4)
        leaky.append(dataclasses.replace(ep, states=states, actions=actions))
    values, groups = _baseline(leaky, "val")
    overall, per_domain = best_baseline(values, groups)
    assert overall > 0.8 and per_domain["meadow"][1] == "majority_state"


# --- the strict metric ---------------------------------------------------------------------------


def _judge_all(episodes, frames_of):
    strict, lenient = [], []
    for ep in episodes:
        frames, d = frames_of(ep), DOMAINS[ep.domain]
        reference = measure_states(frames[:1], d, SIZE)[0]
        for span in ep.actions:
            verdict = judge_round(frames[span["start"] - 1 : span["end"]], d, SIZE, 1, span["action"], reference)
            strict.append(verdict.strict)
            lenient.append(verdict.lenient == span["action"])
    return np.mean(strict), np.mean(lenient)


def _at_rate(factor):
    """Each round carried out at ``factor`` times the commanded rate (from where the last one ended)."""

    def frames_of(ep):
        d, states = DOMAINS[ep.domain], [ep.states[0]] * CFG.cond_frames
        for span in ep.actions:
            s0 = states[-1]
            for t in simulate(d, s0, span["action"], CFG.round_frames):
                states.append(ObjectState(s0.x + (t.x - s0.x) * factor, s0.y + (t.y - s0.y) * factor,
                                          s0.radius + (t.radius - s0.radius) * factor, s0.color))
        return render_states(d, states, SIZE)

    return frames_of


def test_strict_metric_passes_ground_truth_even_after_video_coding():
    episodes = _episodes("val", 5, seed=8)
    assert _judge_all(episodes, lambda ep: ep.frames) == (1.0, 1.0)
    assert _judge_all(episodes, lambda ep: decode_mp4(encode_mp4(ep.frames, CFG.fps))) == (1.0, 1.0)


def test_strict_metric_rejects_the_wrong_rate_that_the_lenient_one_accepts():
    episodes = _episodes("val", 2, seed=9)
    assert 1 - RATE_TOLERANCE < 0.8 and 1 + RATE_TOLERANCE > 1.2
    # Within the tolerance; hard-edged rendering quantises a square's radius to half pixels, so not always.
    assert _judge_all(episodes, _at_rate(0.8))[0] >= 0.9
    for factor in (0.0, 0.25, 0.5, 1.5, 2.0):
        strict, lenient = _judge_all(episodes, _at_rate(factor))
        assert strict <= 0.05, factor
        if factor in (0.25, 0.5, 1.5):
            assert lenient >= 0.95, factor  # why the lenient figure alone proves little


def test_strict_metric_needs_the_object_kept():
    ep = _episodes("val", 1, seed=10)[0]
    d, span = DOMAINS[ep.domain], ep.actions[0]
    clip = ep.frames[span["start"] - 1 : span["end"]].copy()
    reference = measure_states(clip[:1], d, SIZE)[0]
    assert judge_round(clip, d, SIZE, 1, span["action"], reference).strict
    recoloured = clip.copy()
    mask = np.any(clip[-1] != d.background(SIZE), axis=-1)
    recoloured[-1][mask] = (np.array(ep.states[0].color) + 90) % 256  # same motion, another object
    verdict = judge_round(recoloured, d, SIZE, 1, span["action"], reference)
    assert not verdict.kept and not verdict.strict
    gone = clip.copy()
    gone[2] = d.background(SIZE)
    verdict = judge_round(gone, d, SIZE, 1, span["action"], reference)
    assert not verdict.found and not verdict.strict


def test_another_action_never_passes_strictly():
    rng = np.random.default_rng(11)
    checked = 0
    for ep in _episodes("val", 4, seed=12):
        d = DOMAINS[ep.domain]
        reference = np.array(ep.states[0].as_list())
        for span in ep.actions:
            start = ep.states[span["start"] - 1]
            others = [a for a in valid_actions(d, start, 4, SIZE) if a != span["action"]]
            other = others[int(rng.integers(len(others)))]
            frames = render_states(d, [start] + simulate(d, start, other, 4), SIZE)
            assert not judge_round(frames, d, SIZE, 1, span["action"], reference).strict
            checked += 1
    assert checked >= 100


# --- phrasings -----------------------------------------------------------------------------------


def test_phrasing_grammar_holds_out_combinations_of_known_words():
    train_words = {w for a in CORES for t in phrasings(a, held_out=False) for w in t.split()}
    for action, cores in CORES.items():
        train, held = set(phrasings(action, False)), set(phrasings(action, True))
        assert len(train) >= 60 and len(held) >= 10 and not train & held
        assert set(cores) <= train  # bare cores are always trained
        for text in held:
            assert set(text.split()) <= train_words, text
        for text in train | held:
            assert parse_action(text) == action
            assert parse_action(" " + text.upper().replace(" ", "  ") + "!") == action
        assert parse_action(action) == action
    with pytest.raises(ValueError, match="opener"):
        parse_action("teleport")


def test_an_exact_drawer_that_lands_slightly_off_loses_psnr_round_by_round():
    # Why "psnr_at_state" exists: against the ground truth, tiny position misses that add up over rounds
    # cost a drawer that never blurs more PSNR between round 1 and 3 than a 1 dB drift budget allows.
    cfg = WorldConfig(held_out_rounds=4)
    rng = np.random.default_rng(0)
    episodes = [sample_episode(cfg, d, rng, split="val") for d in DOMAINS for _ in range(12)]
    assert np.isinf(exact_drawer_psnr(episodes, 0.0, cfg)).all()  # no miss: the ground truth itself
    for miss in (0.05, 0.2):
        psnr = exact_drawer_psnr(episodes, miss, cfg)
        assert len(psnr) == 4 and psnr[0] - psnr[2] > 1.5, (miss, psnr)
    assert exact_drawer_psnr(episodes, 0.2, cfg)[0] < exact_drawer_psnr(episodes, 0.05, cfg)[0]
