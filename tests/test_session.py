"""Sessions: history through the LLM with a key/value cache, forks, batching, bad input."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pandora_lightning.errors import PandoraError
from pandora_lightning.inference.rollout import rollout
from pandora_lightning.inference.session import Session, step_sessions
from pandora_lightning.models.history import history_mask
from pandora_lightning.models.llm import LLMConfig
from pandora_lightning.models.world_model import WorldModel, WorldModelConfig
from pandora_lightning.recipe import load_recipe
from pandora_lightning.training.parallel import apply_activation_checkpointing

WORDS = ["move left", "move right", "grow", "shrink", "again", "go back", "now move up a bit"]


def tiny_model(history_rounds: int = 0, steps: int = 2, previous_answer: bool = False) -> WorldModel:
    torch.manual_seed(0)
    cfg = WorldModelConfig()
    cfg.llm.history_rounds = history_rounds
    cfg.llm.previous_answer = previous_answer
    cfg.generator.num_inference_steps = steps
    model = WorldModel(cfg, WORDS).eval()
    # The zero-initialised parts would hide the frames and the queries from the LLM.
    torch.nn.init.normal_(model.input_adapter.proj[-1].weight, std=0.2)
    torch.nn.init.normal_(model.llm.query_tokens, std=0.5)
    if previous_answer:  # a previous answer as large as the other tokens
        torch.nn.init.normal_(model.answer_adapter.weight, std=1.0)
    return model


# Every session test runs on a model whose rounds read earlier rounds only, and on one whose rounds
# also read the previous round's answer (llm.previous_answer).
@pytest.fixture(scope="module", params=[False, True], ids=["history", "history+answer"])
def model(request) -> WorldModel:
    return tiny_model(previous_answer=request.param)


def start_frame(seed: int = 0) -> torch.Tensor:
    return torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_banded_mask_limits_each_round_to_its_window():
    rounds = torch.tensor([0, 0, 1, 1, 2])
    allowed = history_mask(torch.ones(1, 5), rounds, 2, torch.float32)[0, 0] == 0
    # the last token (round 2) sees round 1 and itself, not round 0; causal within
    assert allowed[4].tolist() == [False, False, True, True, True]
    assert allowed[2].tolist() == [True, True, True, False, False]
    assert (history_mask(torch.ones(1, 5), rounds, 0, torch.float32) == 0)[0, 0, 4].all()


@pytest.mark.parametrize("window", [0, 2, 4])
def test_cached_rounds_equal_rereading_the_whole_history(model, window):
    cached = Session(model, start_frame(), seed=3, window=window)
    reread = Session(model, start_frame(), seed=3, window=window, cache=False)
    held = []
    for action in ["move left", "again", "grow", "go back", "shrink"]:
        cached.step(action)
        reread.step(action)
        held.append(len(cached.history))
    assert (cached.frames - reread.frames).abs().max() < 1e-5
    # the cache fills up to window - 1 rounds, then drops the oldest (keeps all without a window)
    assert held == [min(r, window - 1) if window else r for r in range(1, 6)]


def test_history_reaches_the_last_round_only_within_the_window(model):
    """The same last round after a different earlier action: other query states with history, the same without."""
    states = torch.randn(1, 2, model.cond_frames * 4, model.llm.hidden_size)
    with torch.no_grad():
        def last(first: str, window: int) -> torch.Tensor:
            return model.llm.read_rounds(states, [[first], ["again"]], window)[0, -1]

        assert (last("move left", 0) - last("grow", 0)).abs().max() > 1e-3
        assert (last("move left", 1) - last("grow", 1)).abs().max() < 1e-5  # float noise only


def test_training_reads_a_window_as_a_session_plays_it():
    """With llm.previous_answer, training's round_contexts on a session's own frames gives the session's
    contexts, and the previous answer reaches the next round even where the window holds no earlier round."""
    model = tiny_model(history_rounds=2, previous_answer=True)
    actions = ["move left", "again", "grow", "go back", "shrink"]
    s = Session(model, start_frame(), seed=5)
    for action in actions:
        s.step(action)
    with torch.no_grad():
        trained = model.round_contexts(s.frames[None], [[a] for a in actions])[0]
        played = torch.stack([r.answer for r in s.records])
        assert (trained - played).abs().max() < 1e-5
        states = torch.randn(1, model.cond_frames * 4, model.llm.hidden_size).expand(2, -1, -1)  # one state, two answers
        answers = model.answer_tokens(torch.randn(2, *played.shape[1:]), 2)
        alike = model.answer_tokens(torch.stack([played[0], played[0]]), 2)
        queries, _ = model.llm.step(states, ["again", "again"], [(), ()], [0, 0], answers)
        same, _ = model.llm.step(states, ["again", "again"], [(), ()], [0, 0], alike)
    assert (queries[0] - queries[1]).abs().max() > 1e-3  # another answer, another reading
    assert (same[0] - same[1]).abs().max() < 1e-5


def test_training_with_activation_checkpointing_reads_the_same_rounds():
    """Checkpointing turns the transformers cache off: training then re-reads each round's window (same
    contexts, same gradients)."""
    frames = torch.rand(2, 2 + 4 * 4, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    texts = [["move left", "grow"], ["again", "again"], ["go back", "shrink"], ["again", "move right"]]
    runs = []
    for checkpointing in (False, True):
        model = tiny_model(history_rounds=3, previous_answer=True).train()
        if checkpointing:
            assert "llm.model" in apply_activation_checkpointing(model, ["llm"])
        contexts = model.round_contexts(frames, texts)
        contexts.square().mean().backward()
        runs.append((contexts.detach(), model.answer_adapter.weight.grad, model.llm.query_tokens.grad))
    (cached, *grads), (reread, *regrads) = runs
    assert (cached - reread).abs().max() < 1e-5
    for g, r in zip(grads, regrads):
        assert g.abs().max() > 0 and (g - r).norm() < 1e-2 * g.norm()  # float rounding of the other order


def test_previous_answer_needs_history_and_multi_round_training():
    with pytest.raises(PandoraError, match="history_rounds=1 reads no earlier round"):
        LLMConfig(history_rounds=1, previous_answer=True)
    recipe = Path(__file__).resolve().parents[1] / "recipes/tiny-history/instruct.yaml"
    with pytest.raises(PandoraError, match="set data.rounds to 2 or more"):
        load_recipe(recipe, ["model.llm.previous_answer=true", "data.rounds=1"])


def test_a_fork_shares_the_past_and_continues_exactly(model):
    parent = Session(model, start_frame(), seed=7)
    for action in ["move left", "grow", "again", "shrink"]:
        parent.step(action)
    tip = parent.fork()
    early = parent.fork(at_round=2)
    other = parent.fork(at_round=2)
    assert torch.equal(early.frames, parent.frames[: early.frames.shape[0]])
    for action in ["again", "shrink"]:
        early.step(action)
    assert torch.equal(early.frames, parent.frames)  # the replayed cache continues exactly
    other.step("move right")
    branch = model.cond_frames + 2 * model.new_frames
    assert torch.equal(other.frames[:branch], parent.frames[:branch])
    assert (other.frames[branch:] - parent.frames[branch : other.frames.shape[0]]).abs().max() > 1e-3
    a, b = tip.step("grow"), parent.step("grow")
    assert torch.equal(a, b)


def test_batched_sessions_match_sessions_alone(model):
    alone = [Session(model, start_frame(i), seed=i) for i in range(3)]
    together = [Session(model, start_frame(i), seed=i) for i in range(3)]
    together[2] = together[2].fork()  # a fork and sessions at different rounds batch too
    for i, s in enumerate(alone):
        s.step(WORDS[i])
    step_sessions(together, WORDS[:3])
    together[0].step("grow")
    alone[0].step("grow")
    step_sessions(together, ["shrink", "again", "go back"])
    for s, a in zip(["shrink", "again", "go back"], alone):
        a.step(s)
    for a, t in zip(alone, together):
        assert (a.frames - t.frames).abs().max() < 1e-5


def test_without_history_a_session_is_the_single_round_model():
    model = tiny_model(history_rounds=1)
    start = torch.stack([start_frame(0), start_frame(1)])
    video = rollout(model, start, [["move left", "grow"], ["again", "shrink"]], seed=4)
    # the single-round model by hand: each round reads only its given frames and its text
    rng = [torch.Generator().manual_seed(4 + b) for b in range(2)]
    frames = start[:, None].expand(-1, model.cond_frames, -1, -1, -1)
    with torch.no_grad():
        for texts in (["move left", "grow"], ["again", "shrink"]):
            given = frames[:, -model.cond_frames :]
            clip = model.generator.sample(given, model.context(given, texts), generator=rng)
            frames = torch.cat([frames, clip[:, model.cond_frames :]], 1)
    assert torch.equal(video, frames)


def test_window_keeps_the_cache_flat(model):
    s = Session(model, start_frame(), window=3)
    sizes = []
    for i in range(6):
        s.step(WORDS[i % 2])  # actions of one length: equal rounds
        sizes.append(s.cache_bytes)
    assert sizes[0] < sizes[1] == sizes[5] and len(s.history) == 2


def test_bad_input_is_one_clear_line(model):
    s = Session(model, start_frame())
    with pytest.raises(PandoraError, match="empty"):
        s.step("   ")
    with pytest.raises(PandoraError, match="tokens long"):
        s.step("move " * 40)
    with pytest.raises(PandoraError, match="32x32"):
        Session(model, torch.zeros(3, 16, 24))

    def no_history(action, model):
        if action == "again":
            raise PandoraError("'again' refers to an earlier round")

    with pytest.raises(PandoraError, match="earlier round"):
        Session(model, start_frame(), check_action=no_history).step("again")
    s.close()
    with pytest.raises(PandoraError, match="closed session"):
        s.fork()
    with pytest.raises(PandoraError, match="closed session"):
        s.step("grow")
