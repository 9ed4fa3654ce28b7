"""Sessions: a person steers the world model one action at a time, and the model remembers.

A `Session` holds one episode: its start frames, every round so far (action, frames, noise state)
and, for a model with history (`llm.history_rounds` != 1), the LLM's key/value cache of the rounds
it may still read. `step(action)` encodes only what is new (the frames generated since the last
round and the new action) and renders the next clip; `fork()` branches a counterfactual episode
that shares everything up to the branch point; `step_sessions` advances many sessions in one
batched model call. Noise comes from each session's own generator, seeded by the session's seed,
so a session's frames do not depend on which other sessions it was batched with.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from pandora_lightning.errors import PandoraError
from pandora_lightning.models.history import RoundCache, trim
from pandora_lightning.models.world_model import WorldModel

MAX_ACTION_CHARS = 300
# (action text, model) -> raises PandoraError when this model cannot follow the action; composed by
# the caller (the CLI adds the built-in world's rule for actions that refer to earlier rounds).
ActionCheck = Callable[[str, WorldModel], None]


@dataclass(frozen=True)
class Round:
    action: str
    given: torch.Tensor  # (Tc, 3, H, W): the frames the round was conditioned on
    clip: torch.Tensor  # (F, 3, H, W): the frames it generated
    rng_state: torch.Tensor  # the session's noise generator after the round
    tokens: int  # real LLM tokens the round added (positions of later rounds count on from here)
    answer: torch.Tensor | None = None  # (N, Dctx): the round's generator context, which the next round reads (llm.previous_answer)


class Session:
    """One episode steered round by round. Frames are (T, 3, H, W) in [-1, 1]."""

    def __init__(
        self,
        model: WorldModel,
        start_frames: torch.Tensor,
        seed: int = 0,
        window: int | None = None,
        cache: bool = True,
        check_action: ActionCheck | None = None,
        strict: bool = True,
    ):
        """start_frames (3, H, W) or (T0, 3, H, W): the last `model.cond_frames` condition round 1 (the first
        frame repeated when there are fewer). window: rounds the LLM reads (default: the model's
        `llm.history_rounds`). cache=False re-reads the whole history every round (the reference's way;
        same frames, for comparison). strict=False lets over-long actions through (the LLM keeps their
        last llm.max_text_tokens tokens) and frames of any size the generator takes, as scoring needs."""
        self.model, self.seed, self.cache, self.check_action, self.strict = model, seed, cache, check_action, strict
        self.window = model.history_rounds if window is None else int(window)
        if self.window < 0:
            raise PandoraError(f"session window={self.window} must be >= 0 (1 = no history, 0 = every round)")
        self.start = _start_frames(model, start_frames, check_size=strict)
        self.records: list[Round] = []
        self.rng = torch.Generator().manual_seed(seed)  # on the CPU: the same noise on every device
        self.history: tuple[RoundCache, ...] | None = ()  # None: rebuild before the next round
        self.tokens: torch.Tensor | None = None  # (Tc, K, D): LLM embeddings of the current given frames
        self.fresh = self.start  # frames not encoded yet
        self.closed = False

    @property
    def rounds(self) -> int:
        return len(self.records)

    @property
    def actions(self) -> list[str]:
        return [r.action for r in self.records]

    @property
    def frames(self) -> torch.Tensor:
        """The episode so far: (Tc + rounds * F, 3, H, W)."""
        return torch.cat([self.start, *(r.clip for r in self.records)])

    @property
    def cache_bytes(self) -> int:
        return sum(r.nbytes for r in self.history or ())

    def given(self) -> torch.Tensor:
        """The frames the next round is conditioned on: the last `model.cond_frames`, (Tc, 3, H, W).

        Read from the last rounds only: concatenating the whole episode would make every round
        cost more than the one before."""
        n, parts, have = self.model.cond_frames, [], 0
        for r in reversed(self.records):
            parts.append(r.clip)
            have += len(r.clip)
            if have >= n:
                break
        else:
            parts.append(self.start)
        return torch.cat(parts[::-1])[-n:]

    def step(self, action: str) -> torch.Tensor:
        """Render the next round: returns its new frames (F, 3, H, W)."""
        return step_sessions([self], [action])[0]

    def fork(self, at_round: int | None = None) -> Session:
        """A new session that shares this one's first `at_round` rounds (default: all) and continues from there.

        From the last round the fork shares the cache as it is; from an earlier one it replays the
        LLM over the shared rounds on its first step (no frames are generated again). Given the same
        actions the fork renders the same frames as this session did.
        """
        self._check_open("fork")
        at = self.rounds if at_round is None else at_round
        if not 0 <= at <= self.rounds:
            raise PandoraError(f"cannot fork at round {at}: this session has rounds 0..{self.rounds}")
        child = Session.__new__(Session)
        child.__dict__.update(self.__dict__)
        child.records = self.records[:at]
        child.rng = torch.Generator()
        child.rng.set_state(self.records[at - 1].rng_state if at else torch.Generator().manual_seed(self.seed).get_state())
        if at < self.rounds:
            child.history, child.tokens, child.fresh = None, None, None
        return child

    def close(self) -> None:
        """Free the cache; the frames stay readable, stepping or forking is refused."""
        self.closed, self.history, self.tokens, self.fresh = True, (), None, None

    def _check_open(self, what: str) -> None:
        if self.closed:
            raise PandoraError(f"cannot {what} a closed session (it has {self.rounds} rounds); fork an open one or start a new one")

    def _check(self, action: str) -> str:
        self._check_open("step")
        if not isinstance(action, str) or not action.strip():
            raise PandoraError("the action is empty: type what should happen next, e.g. 'move left'")
        if not self.strict:
            return action
        action = " ".join(action.split())
        if len(action) > MAX_ACTION_CHARS:
            raise PandoraError(f"the action is {len(action)} characters long; at most {MAX_ACTION_CHARS} are accepted")
        llm = self.model.llm
        tokens = len(llm.tokenizer(action, add_special_tokens=True).input_ids)
        if tokens > llm.cfg.max_text_tokens:
            raise PandoraError(
                f"the action is {tokens} tokens long; this model reads at most {llm.cfg.max_text_tokens} "
                f"(llm.max_text_tokens): say it in fewer words"
            )
        if self.check_action is not None:
            self.check_action(action, self.model)
        return action


def _start_frames(model: WorldModel, frames: torch.Tensor, check_size: bool = True) -> torch.Tensor:
    frames = frames[None] if frames.dim() == 3 else frames
    size = tuple(model.cfg.generator.size)
    if frames.dim() != 4 or frames.shape[1] != 3 or frames.shape[0] < 1:
        raise PandoraError(f"start frames must be (3, H, W) or (T, 3, H, W) RGB in [-1, 1], got shape {tuple(frames.shape)}")
    if check_size and tuple(frames.shape[-2:]) != size:
        raise PandoraError(
            f"start frames are {frames.shape[-2]}x{frames.shape[-1]} but the model generates {size[0]}x{size[1]} frames "
            f"(height x width); resize them first"
        )
    param = next(model.parameters())
    frames = frames.to(param.device, torch.float32)
    n = model.cond_frames
    if frames.shape[0] < n:
        frames = torch.cat([frames[:1].expand(n - frames.shape[0], -1, -1, -1), frames])
    return frames[-n:]


def step_sessions(sessions: list[Session], actions: list[str]) -> list[torch.Tensor]:
    """One round for many sessions in batched model calls; actions[i] steers sessions[i]. Returns each new clip."""
    if len(sessions) != len(actions) or not sessions:
        raise PandoraError(f"step_sessions needs one action per session, got {len(actions)} for {len(sessions)}")
    if len({id(s) for s in sessions}) != len(sessions):
        raise PandoraError("a session appears twice in one step; fork it to run two branches")
    model = sessions[0].model
    if any(s.model is not model for s in sessions):
        raise PandoraError("sessions stepped together must share one model")
    actions = [s._check(a) for s, a in zip(sessions, actions)]
    clips: dict[int, torch.Tensor] = {}
    groups: dict[tuple[int, bool], list[int]] = {}
    for i, s in enumerate(sessions):
        groups.setdefault((s.window, s.cache or s.window == 1), []).append(i)
    with torch.no_grad():
        for (window, cached), index in groups.items():
            group = [sessions[i] for i in index]
            out = _step_group(model, group, [actions[i] for i in index], window, cached)
            clips.update(zip(index, out))
    return [clips[i] for i in range(len(sessions))]


def _step_group(model: WorldModel, sessions: list[Session], actions: list[str], window: int, cached: bool) -> list[torch.Tensor]:
    given = torch.stack([s.given() for s in sessions])
    guided = model.generator.needs_uncond_context
    tokens = None
    if window == 1 and not model.reads_answer:  # no history: each round on its own (exactly the single-round model)
        if guided:
            context, uncond = model.context(torch.cat([given, given]), [*actions, *[""] * len(actions)]).chunk(2)
        else:
            context, uncond = model.context(given, actions), None
    elif cached:
        context, uncond, tokens = _cached_contexts(model, sessions, actions, window, guided)
    else:
        context, uncond = _uncached_contexts(model, sessions, actions, window, guided)
    clips = model.generator.sample(given, context, generator=[s.rng for s in sessions], uncond_context=uncond)
    out = []
    for i, (s, action) in enumerate(zip(sessions, actions)):
        clip = clips[i, model.cond_frames :]
        added = tokens[i] if tokens is not None else 0
        answer = context[i].clone() if model.reads_answer else None  # a copy: a view keeps the batch's contexts alive
        s.records = [*s.records, Round(action, given[i], clip, s.rng.get_state(), added, answer)]
        s.fresh = clip[-min(model.new_frames, model.cond_frames) :]
        out.append(clip)
    return out


def _encode_fresh(model: WorldModel, sessions: list[Session]) -> None:
    """Bring every session's state tokens up to date, encoding only frames the vision encoder has not seen."""
    for s in sessions:
        if s.history is None:
            _replay(model, s)
    todo = [s for s in sessions if s.fresh is not None and len(s.fresh)]
    if not todo:
        return
    counts = [len(s.fresh) for s in todo]
    encoded = model.state_tokens(torch.cat([s.fresh for s in todo])[None])[0].split(counts)
    for s, new in zip(todo, encoded):
        s.tokens = new if s.tokens is None else torch.cat([s.tokens, new])[-model.cond_frames :]
        s.fresh = None


def _answers(model: WorldModel, records: list[list[Round]]) -> torch.Tensor | None:
    """Each sequence's previous-answer token (B, Dllm) from its last round (None: the model reads no answer)."""
    if not model.reads_answer:
        return None
    last = [r[-1].answer if r else None for r in records]
    some = next((a for a in last if a is not None), None)
    if some is None:  # no sequence has a round yet
        return model.answer_tokens(None, len(records))
    # a sequence without a round reads the all-zero answer, as answer_tokens(None) gives it
    return model.answer_tokens(torch.stack([torch.zeros_like(some) if a is None else a for a in last]), len(records))


def _cached_contexts(model: WorldModel, sessions: list[Session], actions: list[str], window: int, guided: bool):
    _encode_fresh(model, sessions)
    states = torch.stack([s.tokens.flatten(0, 1) for s in sessions])
    histories = [s.history for s in sessions]
    positions = [sum(r.tokens for r in s.records) for s in sessions]
    answers = _answers(model, [s.records for s in sessions])
    texts = list(actions)
    if guided:  # the empty text on the same history, in the same batch; its keys are not kept
        states, histories, positions = torch.cat([states, states]), histories * 2, positions * 2
        answers = None if answers is None else torch.cat([answers, answers])
        texts += [""] * len(actions)
    queries, new = model.llm.step(states, texts, histories, positions, answers)
    for s, rc in zip(sessions, new):
        s.history = trim((*s.history, rc), window)
    contexts = model.output_adapter(queries)
    context, uncond = contexts.chunk(2) if guided else (contexts, None)
    return context, uncond, [rc.tokens for rc in new[: len(sessions)]]


def _uncached_contexts(model: WorldModel, sessions: list[Session], actions: list[str], window: int, guided: bool):
    """Every round of every session read again from its frames (the reference's way)."""
    contexts, unconds = [], []
    for s, action in zip(sessions, actions):
        givens = torch.stack([*(r.given for r in s.records), s.given()])
        states = model.state_tokens(givens).flatten(1, 2)[None]
        past = [[r.action] for r in s.records]
        answers = None
        if model.reads_answer:
            answers = torch.cat([_answers(model, [s.records[:i]]) for i in range(len(s.records) + 1)])[None]
        variants = [[*past, [action]], *([[*past, [""]]] if guided else [])]
        for texts, out in zip(variants, (contexts, unconds)):
            out.append(model.output_adapter(model.llm.read_rounds(states, texts, window, answers)[0, -1:])[0])
    return torch.stack(contexts), torch.stack(unconds) if guided else None


def _replay(model: WorldModel, s: Session) -> None:
    """Rebuild a fork's cache from its rounds: the LLM reads them one by one as the parent did (no frames rendered)."""
    s.history, s.tokens, s.fresh = (), None, s.start
    position = 0
    for i, r in enumerate(s.records):
        _encode_fresh(model, [s])
        answers = _answers(model, [s.records[:i]])
        _, (rc,) = model.llm.step(s.tokens.flatten(0, 1)[None], [r.action], [s.history], [position], answers)
        position += rc.tokens
        s.history = trim((*s.history, rc), s.window)
        s.fresh = r.clip[-min(model.new_frames, model.cond_frames) :]
