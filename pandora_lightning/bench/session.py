"""`bench --only session`: what a round of a session costs, with and without the key/value cache.

- per-round wall time over `rounds` rounds (round 16 / round 1), cached with a window, cached
  without one, and re-reading the whole history every round (the reference's way); the LLM side
  (everything but the generator's sampling) is timed apart, since at tiny scale the sampler dominates;
- the cache's bytes and the process's resident memory per round;
- cached vs uncached frames (max abs difference) and fork equality;
- throughput of 8 sessions stepped in one batch vs one session, same rounds, beside the
  generator's own batch scaling (its `sample` alone at batch 8 vs 1: the most batching can give).
A checkpoint is used when given; otherwise a tiny random model with history and the previous answer (untrained weights
cost the same). Per-round times are medians over `repeats` sessions, and on the CPU each round's
process CPU time is measured beside its wall time: on a shared machine the wall time of the same
work varies by +-10% from round to round, more than the effect measured, while the CPU time this
process spent does not depend on what else runs. On a GPU every timed call ends with a synchronize.
"""
from __future__ import annotations

import statistics
import time
from contextlib import contextmanager
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


def bench_model(checkpoint: str | None = None, device: str | torch.device = "cpu", steps: int = 10) -> WorldModel:
    if checkpoint:
        from pandora_lightning.training.checkpoint import load_stage

        return load_stage(checkpoint, device).model.eval()
    torch.manual_seed(0)
    cfg = WorldModelConfig()
    cfg.llm.history_rounds = 0
    cfg.llm.previous_answer = True  # as recipes/tiny-history
    cfg.generator.num_inference_steps = steps
    model = WorldModel(cfg, ACTIONS).eval()
    torch.nn.init.normal_(model.input_adapter.proj[-1].weight, std=0.2)  # zero-initialised: would hide the frames
    torch.nn.init.normal_(model.llm.query_tokens, std=0.5)
    torch.nn.init.normal_(model.answer_adapter.weight, std=1.0)  # an answer token as large as the others
    return model.to(device)


def _device(model: WorldModel) -> torch.device:
    return next(model.parameters()).device


def _sync(model: WorldModel) -> None:
    device = _device(model)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _SamplerClock:
    """Times the generator's sampling inside a round, so the LLM side can be told apart."""

    def __init__(self, model: WorldModel):
        self.model, self.seconds = model, 0.0
        self.inner = model.generator.sample

    def __enter__(self):
        def timed(*args, **kwargs):
            _sync(self.model)
            t = time.perf_counter()
            out = self.inner(*args, **kwargs)
            _sync(self.model)
            self.seconds += time.perf_counter() - t
            return out

        self.model.generator.sample = timed
        return self

    def __exit__(self, *exc):
        del self.model.generator.sample


def _memory_mb(model: WorldModel) -> float:
    device = _device(model)
    if device.type == "cuda":
        return round(torch.cuda.memory_allocated(device) / 2**20, 2)
    return round(_rss_mb(), 1)


def _one_session(model: WorldModel, rounds: int, window: int, cache: bool, seed: int) -> dict:
    start = torch.rand(3, *model.cfg.generator.size, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    s = Session(model, start.to(_device(model)), seed=seed, window=window, cache=cache)
    wall, cpu, llm, cache_bytes, memory = [], [], [], [], []
    with _SamplerClock(model) as clock:
        for r in range(rounds):
            clock.seconds = 0.0
            _sync(model)
            t, c = time.perf_counter(), time.process_time()
            s.step(ACTIONS[r % len(ACTIONS)])
            _sync(model)
            wall.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
            llm.append(wall[-1] - clock.seconds)
            cache_bytes.append(s.cache_bytes)
            memory.append(_memory_mb(model))
    return {"wall_s": wall, "cpu_s": cpu, "llm_side_s": llm, "cache_bytes": cache_bytes, "memory_mb": memory, "frames": s.frames}


def run_rounds(model: WorldModel, rounds: int, window: int, cache: bool, seed: int = 0, repeats: int = 1) -> dict:
    """`repeats` sessions of `rounds` rounds (same seed, so the same work); per round the median time."""
    runs = [_one_session(model, rounds, window, cache, seed) for _ in range(repeats)]
    out = dict(runs[-1])
    for key in ("wall_s", "cpu_s", "llm_side_s"):
        out[key] = [statistics.median(r[key][i] for r in runs) for i in range(rounds)]
    return out


def _ratio(values: list[float]) -> float:
    return round(values[-1] / values[0], 3)


def run_session_bench(
    checkpoint: str | None = None, rounds: int = 16, window: int = 4, batch: int = 8, batch_rounds: int = 4,
    device: str | torch.device = "cpu", repeats: int = 3, steps: int = 10,
) -> dict:
    """steps: the tiny random model's denoising steps (a checkpoint keeps its own)."""
    model = bench_model(checkpoint, device, steps)
    with torch.no_grad():
        run_rounds(model, 2, window, True)  # warm-up
        runs = {
            f"cached_window_{window}": run_rounds(model, rounds, window, True, repeats=repeats),
            "cached_no_window": run_rounds(model, rounds, 0, True, repeats=repeats),
            "uncached_no_window": run_rounds(model, rounds, 0, False, repeats=repeats),
        }
        out: dict = {"rounds": rounds, "model": checkpoint or "tiny random: whole history, previous answer", "runs": {},
                     "device": _device_name(model), "repeats": repeats}
        for name, run in runs.items():
            out["runs"][name] = {
                "round1_s": round(run["wall_s"][0], 4), f"round{rounds}_s": round(run["wall_s"][-1], 4),
                "ratio_last_over_first": _ratio(run["wall_s"]),
                "ratio_last_over_second": round(run["wall_s"][-1] / run["wall_s"][1], 3),
                "median_s": round(statistics.median(run["wall_s"]), 4),
                "cpu_round1_s": round(run["cpu_s"][0], 4), f"cpu_round{rounds}_s": round(run["cpu_s"][-1], 4),
                "cpu_ratio_last_over_first": _ratio(run["cpu_s"]),
                "ratio_last4_over_first4": round(sum(run["wall_s"][-4:]) / sum(run["wall_s"][:4]), 3),
                "llm_side_round1_s": round(run["llm_side_s"][0], 4), f"llm_side_round{rounds}_s": round(run["llm_side_s"][-1], 4),
                "llm_side_ratio": _ratio(run["llm_side_s"]),
                "cache_bytes_per_round": run["cache_bytes"], "memory_mb_per_round": run["memory_mb"],
            }
        out["cached_vs_uncached_max_abs"] = float((runs["cached_no_window"]["frames"] - runs["uncached_no_window"]["frames"]).abs().max())
        window_ref = run_rounds(model, rounds, window, False)
        out["cached_vs_uncached_window_max_abs"] = float((runs[f"cached_window_{window}"]["frames"] - window_ref["frames"]).abs().max())
        if _device(model).type == "cuda":
            with _exact_fp32():
                out["exact_fp32"] = {
                    "cached_vs_uncached_max_abs": _max_abs(model, rounds, 0),
                    "cached_vs_uncached_window_max_abs": _max_abs(model, rounds, window),
                }
        out["fork"] = _fork_check(model)
        out["batch"] = _batch_bench(model, batch, batch_rounds)
    return out


def _max_abs(model: WorldModel, rounds: int, window: int) -> float:
    cached, uncached = (run_rounds(model, rounds, window, cache)["frames"] for cache in (True, False))
    return float((cached - uncached).abs().max())


@contextmanager
def _exact_fp32():
    """fp32 convolutions and matrix products without TF32. PyTorch lets cuDNN convolutions round their
    inputs to TF32 (10-bit mantissa) by default: two computations of the same round that differ in the
    last bit (a cached and an uncached attention, different kernels) can then round a UNet input apart
    by ~1e-3, and the 10 denoising steps of 16 rounds carry that on."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _device_name(model: WorldModel) -> str:
    device = _device(model)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu, {torch.get_num_threads()} threads"


def _fork_check(model: WorldModel) -> dict:
    start = torch.rand(3, *model.cfg.generator.size, generator=torch.Generator().manual_seed(1)) * 2 - 1
    start = start.to(_device(model))
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
    device = _device(model)
    starts = [(torch.rand(3, *model.cfg.generator.size, generator=torch.Generator().manual_seed(i)) * 2 - 1).to(device)
              for i in range(batch)]

    def timed(sessions_per_call: int) -> tuple[float, float]:
        sessions = [Session(model, starts[i], seed=i) for i in range(sessions_per_call)]
        _sync(model)
        t, c = time.perf_counter(), time.process_time()
        for r in range(rounds):
            step_sessions(sessions, [ACTIONS[(r + i) % len(ACTIONS)] for i in range(sessions_per_call)])
        _sync(model)
        return time.perf_counter() - t, time.process_time() - c

    def sampler(n: int) -> tuple[float, float]:  # the generator alone, on contexts made once
        given = torch.stack([s[None].expand(model.cond_frames, -1, -1, -1) for s in starts[:n]])
        context = model.context(given, ACTIONS[:1] * n)
        _sync(model)
        t, c = time.perf_counter(), time.process_time()
        model.generator.sample(given, context, generator=[torch.Generator().manual_seed(i) for i in range(n)])
        _sync(model)
        return time.perf_counter() - t, time.process_time() - c

    timed(1), timed(batch), sampler(1), sampler(batch)  # warm-up
    # alternated, so that a change in the machine's load hits both alike; the best of 3 each
    pairs = [(timed(1), timed(batch), sampler(1), sampler(batch)) for _ in range(3)]
    out = {"sessions": batch, "rounds": rounds}
    for clock, k in (("", 0), ("cpu_", 1)):
        one, many, s1, sb = (min(p[i][k] for p in pairs) for i in range(4))
        single, batched = one / rounds, many / (rounds * batch)
        out |= {f"{clock}one_session_s_per_round": round(single, 4), f"{clock}batched_s_per_session_round": round(batched, 4),
                f"{clock}throughput_ratio": round(single / batched, 2), f"{clock}sampler_alone_ratio": round(s1 / (sb / batch), 2)}
    return out


def print_session_bench(out: dict) -> None:
    print(f"\n=== bench: sessions, {out['rounds']} rounds ({out['model']}; {out['device']}; per-round medians of "
          f"{out['repeats']} sessions) ===")
    n = out["rounds"]
    for name, r in out["runs"].items():
        last = r[f"round{n}_s"]
        print(f"{name:>22}: round 1 {r['round1_s']:.3f} s, round {n} {last:.3f} s, "
              f"ratio {r['ratio_last_over_first']} (over round 2: {r['ratio_last_over_second']}; last 4 / first 4 rounds: "
              f"{r['ratio_last4_over_first4']}); CPU time ratio {r['cpu_ratio_last_over_first']}; LLM side {1e3 * r['llm_side_round1_s']:.1f} -> "
              f"{1e3 * r[f'llm_side_round{n}_s']:.1f} ms (ratio {r['llm_side_ratio']}); "
              f"cache bytes {r['cache_bytes_per_round'][0]} -> {r['cache_bytes_per_round'][-1]}, "
              f"memory {r['memory_mb_per_round'][0]} -> {r['memory_mb_per_round'][-1]} MB")
    print(f"cached vs uncached frames, max abs: {out['cached_vs_uncached_max_abs']:.2e} (no window), "
          f"{out['cached_vs_uncached_window_max_abs']:.2e} (window)")
    if "exact_fp32" in out:
        e = out["exact_fp32"]
        print(f"the same without TF32 (torch.backends.cudnn.allow_tf32 = False): {e['cached_vs_uncached_max_abs']:.2e} "
              f"(no window), {e['cached_vs_uncached_window_max_abs']:.2e} (window)")
    print(f"fork: {out['fork']}")
    b = out["batch"]
    for clock, what in (("", "wall"), ("cpu_", "CPU time")):
        print(f"batch ({what}): {b['sessions']} sessions in one call {b[clock + 'batched_s_per_session_round']} s per session-round "
              f"vs one session {b[clock + 'one_session_s_per_round']} s per round: {b[clock + 'throughput_ratio']}x throughput "
              f"(the generator's sample alone, batch {b['sessions']} vs 1: {b[clock + 'sampler_alone_ratio']}x)")
