"""`bench --only session` end to end on a tiny model: every figure the closing note quotes is there and sane."""
from pandora_lightning.bench.session import print_session_bench, run_session_bench


def test_session_bench_reports_round_costs_cache_forks_and_batching(capsys):
    out = run_session_bench(rounds=3, window=2, batch=2, batch_rounds=1, repeats=1, steps=1)
    runs = out["runs"]
    assert set(runs) == {"cached_window_2", "cached_no_window", "uncached_no_window"}
    # with a window the cache stops growing once it holds window - 1 rounds; without one it grows every round
    windowed, unbounded = runs["cached_window_2"]["cache_bytes_per_round"], runs["cached_no_window"]["cache_bytes_per_round"]
    assert unbounded[0] < unbounded[1] < unbounded[2] and 0 < windowed[2] < unbounded[1] < unbounded[2]
    assert runs["uncached_no_window"]["cache_bytes_per_round"] == [0, 0, 0]
    for run in runs.values():
        assert run["round1_s"] > 0 and run["cpu_round3_s"] > 0 and run["ratio_last_over_first"] > 0
    assert out["cached_vs_uncached_max_abs"] < 1e-5 and out["cached_vs_uncached_window_max_abs"] < 1e-5
    assert out["fork"]["shared_prefix_equal"] and out["fork"]["same_actions_reproduce_parent"]
    assert out["fork"]["other_action_max_abs_diff"] > 0
    batch = out["batch"]
    assert batch["sessions"] == 2 and batch["throughput_ratio"] > 0 and batch["cpu_sampler_alone_ratio"] > 0
    print_session_bench(out)
    printed = capsys.readouterr().out
    assert "cached_window_2: round 1" in printed and "batch (CPU time): 2 sessions in one call" in printed


def test_exact_fp32_turns_tf32_off_and_restores_the_settings():
    import torch

    from pandora_lightning.bench.session import _exact_fp32

    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = True
    try:
        with _exact_fp32():
            assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
        assert torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before
