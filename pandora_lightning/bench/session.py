"""`bench --only session`: what a round of a session costs, with and without the key/value cache.

- per-round wall time over `rounds` rounds (round 16 / round 1), cached with a window, cached
  without one, and re-reading the whole history every round (the reference's way); the LLM side
  (everything but the generator's sampling) is timed apart, since at tiny scale the sampler dominates;
- the cache's bytes and the process's resident memory per round;
- cached vs uncached frames (max abs difference) and fork equality;
- throughput of 8 sessions stepped in one batch vs one session, same rounds.
A checkpoint is used when given; otherwise a tiny random model with history (untrained weights
cost the same).
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from pandora_lightning.inference.session import Session, step_sessions
from pandora_lightning.models.world_model import WorldModel, WorldModelConfig

ACTIONS = ["move left", "again", "grow", "go back", "move up", "keep going", "shrink", "undo"]


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def bench_model(checkpoint: str | None = None) -> WorldModel:
    if checkpoint:
        from pandora_lightning.training.checkpoint import load_stage

        return load_stage(checkpoint).model.eval()
    torch.manual_seed(0)
    cfg = WorldModelConfig()
    cfg.llm.history_rounds = 0
    cfg.generator.num_inference_steps = 10
    model = WorldModel(cfg, ACTIONS).eval()
    torch.nn.init.normal_(model.input_adapter.proj[-1].weight, std=0.2)  # zero-initialised: would hide the frames
    torch.nn.init.normal_(model.llm.query_tokens, std=0.5)
    return model


class _SamplerClock:
    """Times the generator's sampling inside a round, so the LLM side can be told apart."""

    def __init__(self, model: WorldModel):
        self.model, self.seconds = model, 0.0
        self.inner = model.generator.sample

    def __enter__(self):
        def timed(*args, **kwargs):
            t = time.perf_counter()
            out = self.inner(*args, **kwargs)
            self.seconds += time.perf_counter() - t
            return out

        self.model.generator.sample = timed
        return self

    def __exit__(self, *exc):
        del self.model.generator.sample


def run_rounds(model: WorldModel, rounds: int, window: int, cache: bool, seed: int = 0) -> dict:
    start = torch.rand(3, *model.cfg.generator.size, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    s = Session(model, start, seed=seed, window=window, cache=cache)
    wall, llm, cache_bytes, rss = [], [], [], []
    with _SamplerClock(model) as clock:
        for r in range(rounds):
            clock.seconds = 0.0
            t = time.perf_counter()
            s.step(ACTIONS[r % len(ACTIONS)])
            wall.append(time.perf_counter() - t)
            llm.append(wall[-1] - clock.seconds)
            cache_bytes.append(s.cache_bytes)
            rss.append(round(_rss_mb(), 1))
    return {"wall_s": wall, "llm_side_s": llm, "cache_bytes": cache_bytes, "rss_mb": rss, "frames": s.frames}


def _ratio(values: list[float]) -> float:
    # The first round pays one-time costs (allocator warm-up); compare round 16 with round 2 too.
    return round(values[-1] / values[0], 3)


def run_session_bench(checkpoint: str | None = None, rounds: int = 16, window: int = 4, batch: int = 8, batch_rounds: int = 4) -> dict:
    model = bench_model(checkpoint)
    with torch.no_grad():
        run_rounds(model, 2, window, True)  # warm-up
        runs = {
            f"cached_window_{window}": run_rounds(model, rounds, window, True),
            "cached_no_window": run_rounds(model, rounds, 0, True),
            "uncached_no_window": run_rounds(model, rounds, 0, False),
        }
        out: dict = {"rounds": rounds, "model": checkpoint or "tiny random, history_rounds=0", "runs": {}}
        for name, run in runs.items():
            out["runs"][name] = {
                "round1_s": round(run["wall_s"][0], 4), f"round{rounds}_s": round(run["wall_s"][-1], 4),
                "ratio_last_over_first": _ratio(run["wall_s"]),
                "ratio_last_over_second": round(run["wall_s"][-1] / run["wall_s"][1], 3),
                "median_s": round(statistics.median(run["wall_s"]), 4),
                "llm_side_round1_s": round(run["llm_side_s"][0], 4), f"llm_side_round{rounds}_s": round(run["llm_side_s"][-1], 4),
                "llm_side_ratio": _ratio(run["llm_side_s"]),
                "cache_bytes_per_round": run["cache_bytes"], "rss_mb_per_round": run["rss_mb"],
            }
        out["cached_vs_uncached_max_abs"] = float((runs["cached_no_window"]["frames"] - runs["uncached_no_window"]["frames"]).abs().max())
        window_ref = run_rounds(model, rounds, window, False)
        out["cached_vs_uncached_window_max_abs"] = float((runs[f"cached_window_{window}"]["frames"] - window_ref["frames"]).abs().max())
        out["fork"] = _fork_check(model)
        out["batch"] = _batch_bench(model, batch, batch_rounds)
    return out


def _fork_check(model: WorldModel) -> dict:
    start = torch.rand(3, *model.cfg.generator.size, generator=torch.Generator().manual_seed(1)) * 2 - 1
    parent = Session(model, start, seed=1)
    for a in ACTIONS[:6]:
        parent.step(a)
    same, other = parent.fork(at_round=3), parent.fork(at_round=3)
    for a in ACTIONS[3:6]:
        same.step(a)
    other.step("shrink")
    branch = model.cond_frames + 3 * model.new_frames
    return {
        "shared_prefix_equal": bool(torch.equal(other.frames[:branch], parent.frames[:branch])),
        "same_actions_reproduce_parent": bool(torch.equal(same.frames, parent.frames)),
        "other_action_max_abs_diff": float((other.frames[branch:] - parent.frames[branch : branch + model.new_frames]).abs().max()),
    }


def _batch_bench(model: WorldModel, batch: int, rounds: int) -> dict:
    starts = [torch.rand(3, *model.cfg.generator.size, generator=torch.Generator().manual_seed(i)) * 2 - 1 for i in range(batch)]

    def timed(sessions_per_call: int) -> float:
        sessions = [Session(model, starts[i], seed=i) for i in range(sessions_per_call)]
        t = time.perf_counter()
        for r in range(rounds):
            step_sessions(sessions, [ACTIONS[(r + i) % len(ACTIONS)] for i in range(sessions_per_call)])
        return time.perf_counter() - t

    timed(1)  # warm-up
    one = [timed(1) for _ in range(2)]
    many = [timed(batch) for _ in range(2)]
    single, batched = min(one) / rounds, min(many) / (rounds * batch)
    return {"sessions": batch, "rounds": rounds, "one_session_s_per_round": round(single, 4),
            "batched_s_per_session_round": round(batched, 4), "throughput_ratio": round(single / batched, 2)}


def print_session_bench(out: dict) -> None:
    print(f"\n=== bench: sessions, {out['rounds']} rounds ({out['model']}) ===")
    n = out["rounds"]
    for name, r in out["runs"].items():
        last = r[f"round{n}_s"]
        print(f"{name:>22}: round 1 {r['round1_s']:.3f} s, round {n} {last:.3f} s, "
              f"ratio {r['ratio_last_over_first']} (over round 2: {r['ratio_last_over_second']}); LLM side ratio {r['llm_side_ratio']}; "
              f"cache bytes {r['cache_bytes_per_round'][0]} -> {r['cache_bytes_per_round'][-1]}, "
              f"RSS {r['rss_mb_per_round'][0]} -> {r['rss_mb_per_round'][-1]} MB")
    print(f"cached vs uncached frames, max abs: {out['cached_vs_uncached_max_abs']:.2e} (no window), "
          f"{out['cached_vs_uncached_window_max_abs']:.2e} (window)")
    print(f"fork: {out['fork']}")
    b = out["batch"]
    print(f"batch: {b['sessions']} sessions in one call {b['batched_s_per_session_round']} s per session-round vs one session "
          f"{b['one_session_s_per_round']} s per round: {b['throughput_ratio']}x throughput")
