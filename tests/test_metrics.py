"""The scoring metrics: exact reference math, torchmetrics agreement, world ground truth, sync."""
from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from pandora_lightning.errors import PandoraError
from pandora_lightning.data.dataset import iterate_split
from pandora_lightning.data.manifest import load_manifest
from pandora_lightning.data.frames import from_numpy
from pandora_lightning.evaluation.metrics import (
    ClipEmbedder,
    FrechetVideoDistance,
    TextVideoSimilarity,
    VideoDetector,
    VideoPSNR,
    VideoSSIM,
    frechet_distance,
)
from pandora_lightning.world.metrics import ActionFollowing, StateFidelity, TemporalConsistency
from pandora_lightning.world import DOMAINS, WorldConfig, render_states, sample_episode, simulate, valid_actions

WORLD = WorldConfig()


class TinyDetector(torch.nn.Module):
    """Stands in for the TorchScript I3D: (B, 3, T, H, W) in [-1, 1] -> (B, features)."""

    def __init__(self, features: int = 16):
        super().__init__()
        self.conv = torch.nn.Conv3d(3, 8, 3, padding=1)
        self.head = torch.nn.Linear(16, features)

    def forward(self, x, rescale: bool = False, resize: bool = True, return_features: bool = True):
        h = torch.relu(self.conv(x))
        return self.head(torch.cat([h.mean((2, 3, 4)), h.amax((2, 3, 4))], dim=1))


def save_detector(path, features: int = 16) -> str:
    torch.manual_seed(0)
    torch.jit.save(torch.jit.script(TinyDetector(features)), str(path))
    return str(path)


def reference_frechet(a: np.ndarray, b: np.ndarray) -> float:
    """The usual numpy/scipy FID/FVD formula on (N, D) feature arrays."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def smooth_videos(n: int, seed: int = 0) -> torch.Tensor:
    """(n, 6, 3, 16, 16) in [-1, 1]: blurred noise, so features are not all alike."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n * 6, 3, 4, 4, generator=g)
    return (F.interpolate(x, size=16, mode="bilinear") * 2 - 1).view(n, 6, 3, 16, 16)


class _FeaturesOnly(torch.nn.Module):
    """A detector slot for metrics fed precomputed features."""

    def __init__(self, feature_dim: int):
        super().__init__()
        self.feature_dim = feature_dim


def test_frechet_distance_matches_scipy_reference():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(300, 24))
    b = rng.normal(size=(260, 24)) @ rng.normal(scale=0.4, size=(24, 24)) + 0.3
    ours = frechet_distance(
        torch.from_numpy(a.mean(0)), torch.from_numpy(np.cov(a, rowvar=False)),
        torch.from_numpy(b.mean(0)), torch.from_numpy(np.cov(b, rowvar=False)),
    )
    assert ours.dtype == torch.float64
    ref = reference_frechet(a, b)
    assert abs(float(ours) - ref) / ref < 1e-6
    # The metric, fed the same features (in two domains and two batches), agrees too.
    metric = FrechetVideoDistance(_FeaturesOnly(24), domains=("x", "y"))
    metric.update(None, real=True, domains=["x"] * 100, features=torch.from_numpy(a[:100]))
    metric.update(None, real=True, domains=["y"] * 200, features=torch.from_numpy(a[100:]))
    metric.update(None, real=False, domains=["x"] * 130 + ["y"] * 130, features=torch.from_numpy(b))
    out = metric.compute()
    assert abs(float(out["fvd"]) - ref) / ref < 1e-6
    ref_y = reference_frechet(a[100:], b[130:])
    assert abs(float(out["fvd/per_domain"][1]) - ref_y) / ref_y < 1e-6


def test_fvd_is_zero_on_itself_and_grows_with_noise(tmp_path):
    detector = VideoDetector(save_detector(tmp_path / "i3d.pt"), feature_dim=16)
    assert detector.kwargs == {"rescale": False, "resize": True, "return_features": True}
    real = smooth_videos(48)
    fvds = []
    for sigma in (0.0, 0.05, 0.1, 0.2, 0.4, 0.8):
        fake = (real + sigma * torch.randn(real.shape, generator=torch.Generator().manual_seed(1))).clamp(-1, 1)
        metric = FrechetVideoDistance(detector)
        metric.update(real, real=True)
        metric.update(fake, real=False)
        fvds.append(float(metric.compute()["fvd"]))
    assert abs(fvds[0]) < 1e-9
    assert all(later > earlier for earlier, later in zip(fvds, fvds[1:])), fvds
    # Same features as the reference computed outside the metric.
    feats_real, feats_fake = detector(real).numpy(), detector(fake).numpy()
    assert fvds[-1] == pytest.approx(reference_frechet(feats_real, feats_fake), rel=1e-6)


def test_fvd_detector_bad_files_are_named(tmp_path):
    with pytest.raises(PandoraError, match="missing.pt' does not exist"):
        VideoDetector(tmp_path / "missing.pt")
    torch.save(TinyDetector().state_dict(), tmp_path / "weights.pt")
    with pytest.raises(PandoraError, match="weights.pt' is not a TorchScript file"):
        VideoDetector(tmp_path / "weights.pt")
    detector = VideoDetector(save_detector(tmp_path / "small.pt", features=16))  # expects I3D's 400
    metric = FrechetVideoDistance(detector)
    with pytest.raises(PandoraError, match=r"small.pt' gives features of shape \(2, 16\); expected \(batch, 400\)"):
        metric.update(smooth_videos(2), real=True)


def test_psnr_ssim_agree_with_torchmetrics_functional():
    g = torch.Generator().manual_seed(0)
    target = torch.rand(3, 4, 3, 16, 16, generator=g) * 2 - 1
    preds = (target + 0.2 * torch.randn(target.shape, generator=g)).clamp(-1, 1)
    domains = ["a", "b", "a"]
    psnr, ssim = VideoPSNR(("a", "b"), frames_per_round=2), VideoSSIM(("a", "b"), frames_per_round=2)
    psnr.update(preds[:2], target[:2], domains[:2])
    psnr.update(preds[2:], target[2:], domains[2:])
    ssim.update(preds, target, domains)
    unit_p, unit_t = (preds + 1) / 2, (target + 1) / 2
    for metric, fn in ((psnr, peak_signal_noise_ratio), (ssim, structural_similarity_index_measure)):
        ref = torch.tensor([[float(fn(unit_p[b, t][None], unit_t[b, t][None], data_range=1.0)) for t in range(4)]
                            for b in range(3)], dtype=torch.float64)
        out = metric.compute()
        name = metric.name
        torch.testing.assert_close(out[name], ref.mean(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out[f"{name}/per_frame"], ref.mean(0), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out[f"{name}/per_round"], ref.view(3, 2, 2).mean((0, 2)), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out[f"{name}/per_domain"], torch.stack([ref[[0, 2]].mean(), ref[1].mean()]),
                                   rtol=1e-5, atol=1e-6)
    # uint8 input means the same frames.
    as_uint8 = VideoPSNR()
    as_uint8.update(((preds + 1) * 127.5).round().byte(), ((target + 1) * 127.5).round().byte())
    assert float(as_uint8.compute()["psnr"]) == pytest.approx(float(psnr.compute()["psnr"]), abs=0.05)


def test_metric_states_sum_across_processes():
    """Two 'ranks' hold halves of the data; syncing (a fake all-gather) gives the one-process result."""
    g = torch.Generator().manual_seed(0)
    target = torch.rand(4, 3, 3, 16, 16, generator=g) * 2 - 1
    preds = (target + 0.3 * torch.rand(target.shape, generator=g)).clamp(-1, 1)
    whole = VideoPSNR(frames_per_round=3)
    whole.update(preds, target)
    peer = VideoPSNR(frames_per_round=3)
    peer.update(preds[2:], target[2:])
    peer_states = itertools.cycle([getattr(peer, name) for name in peer._defaults])  # same order every sync
    rank0 = VideoPSNR(frames_per_round=3, dist_sync_fn=lambda t, group=None: [t, next(peer_states)],
                      distributed_available_fn=lambda: True)
    rank0.update(preds[:2], target[:2])
    assert rank0.report() == whole.report()


def world_videos(per_domain: int, seed: int, policy: str):
    """Simulated videos of world episodes: 'given' follows each round's action, 'ignore' draws a random
    valid action instead, 'frozen' never moves. -> ((B, T, 3, H, W) uint8, episode dicts)."""
    rng = np.random.default_rng(seed)
    videos, episodes = [], []
    for name in DOMAINS:
        for _ in range(per_domain):
            ep = sample_episode(WORLD, name, rng)
            states = list(ep.states[: WORLD.cond_frames])
            for span in ep.actions:
                if policy == "given":
                    action = span["action"]
                elif policy == "ignore":
                    options = valid_actions(DOMAINS[name], states[-1], WORLD.round_frames, WORLD.image_size)
                    action = options[int(rng.integers(len(options)))]
                else:
                    states += [states[-1]] * WORLD.round_frames
                    continue
                states += simulate(DOMAINS[name], states[-1], action, WORLD.round_frames)
            videos.append(render_states(DOMAINS[name], states, WORLD.image_size))
            episodes.append({"domain": name, "actions": ep.actions})
    return torch.from_numpy(np.stack(videos)).permute(0, 1, 4, 2, 3), episodes


def test_ground_truth_world_videos_score_perfectly(world_manifest):
    metric = ActionFollowing(WORLD.cond_frames, WORLD.round_frames)
    temporal = TemporalConsistency(WORLD.cond_frames, WORLD.round_frames)
    for split in ("val", "transfer"):
        for _, frames, meta in iterate_split(load_manifest(world_manifest), split):
            metric.update(from_numpy(frames)[None], [meta])  # decoded from the shards' mp4
            temporal.update(from_numpy(frames)[None], [meta])
    report = metric.report()["action_following"]
    assert report["count"] == 3 * (4 * 2 + 2)
    assert report["overall"] == 1.0 and report["per_round"] == [1.0, 1.0, 1.0]
    assert report["per_domain"] == {d: 1.0 for d in DOMAINS}
    assert all(v["overall"] == 1.0 for v in temporal.report().values())


@pytest.mark.parametrize("policy", ["ignore", "frozen"])
def test_videos_that_ignore_the_action_score_near_chance(policy):
    videos, episodes = world_videos(per_domain=12, seed=3, policy=policy)
    given = ActionFollowing(WORLD.cond_frames, WORLD.round_frames)
    given.update(*world_videos(per_domain=3, seed=3, policy="given"))
    assert float(given.compute()["action_following"]) == 1.0
    metric = ActionFollowing(WORLD.cond_frames, WORLD.round_frames)
    metric.update(videos, episodes)
    accuracy = float(metric.compute()["action_following"])
    assert accuracy < 0.4, accuracy  # chance is 1/6 over six actions (about 1/5 over the valid ones)
    confusion = metric.confusion_table()
    assert sum(sum(row.values()) for row in confusion.values()) == 12 * 4 * 3


def test_temporal_consistency_sees_a_lost_object_and_a_stained_background():
    videos, episodes = world_videos(per_domain=2, seed=5, policy="given")
    recoloured = videos.clone()
    start_of_round_2 = WORLD.cond_frames + WORLD.round_frames
    recoloured[:, start_of_round_2:] = 255 - recoloured[:, start_of_round_2:]  # a different object and scene
    metric = TemporalConsistency(WORLD.cond_frames, WORLD.round_frames)
    metric.update(recoloured, episodes)
    out = metric.report()
    assert out["temporal_object"]["per_round"] == [1.0, 0.0, 0.0]
    assert out["temporal_background"]["per_round"][0] == 1.0 > out["temporal_background"]["per_round"][1]
    # Tint the background in the top 8 rows of every generated frame by 54 levels: beyond the background
    # tolerance (40) but below the object threshold (80), so the object is still measured as it is.
    stained = videos.clone().short()
    tint = torch.tensor([45, -30, 0]).view(3, 1, 1)
    for video, ep in zip(stained, episodes):
        background = torch.tensor(DOMAINS[ep["domain"]].background(WORLD.image_size)).permute(2, 0, 1)
        for frame in video[WORLD.cond_frames :]:
            is_background = (frame == background).all(0)
            frame[:, :8] = torch.where(is_background[:8], frame[:, :8] + tint, frame[:, :8])
    stained = stained.clamp(0, 255).byte()
    metric = TemporalConsistency(WORLD.cond_frames, WORLD.round_frames)
    metric.update(stained, episodes)
    out = metric.report()
    assert out["temporal_object"]["overall"] == 1.0
    assert 0.7 < out["temporal_background"]["overall"] < 0.95


def test_psnr_at_state_judges_drawing_not_where_the_object_went():
    # Drawn perfectly, but 1 px further right in round 1, 2 px in round 2, ... (as a rollout's position
    # errors add up): ground-truth PSNR falls round by round, the PSNR at the state shown does not.
    rng = np.random.default_rng(5)
    truth, drifted, episodes = [], [], []
    for name in DOMAINS:
        for _ in range(2):
            ep = sample_episode(WORLD, name, rng)
            shifted = [s if t < WORLD.cond_frames else
                       dataclasses.replace(s, x=s.x + 1 + (t - WORLD.cond_frames) // WORLD.round_frames)
                       for t, s in enumerate(ep.states)]
            truth.append(ep.frames)
            drifted.append(render_states(DOMAINS[name], shifted, WORLD.image_size))
            episodes.append({"domain": name, "actions": ep.actions})
    videos, drifted = (torch.from_numpy(np.stack(v)).permute(0, 1, 4, 2, 3) for v in (truth, drifted))
    truth_psnr = [float(peak_signal_noise_ratio(drifted[:, s].float(), videos[:, s].float(), data_range=255.0))
                  for s in (slice(2, 6), slice(6, 10), slice(10, 14))]
    assert truth_psnr[0] > truth_psnr[1] > truth_psnr[2]
    metric = StateFidelity(WORLD.cond_frames, WORLD.round_frames)
    metric.update(drifted, episodes)
    per_round = metric.report()["psnr_at_state"]["per_round"]
    assert min(per_round) > 35 and max(per_round) - min(per_round) < 3, per_round
    # Blurred from round 2 on (soft rims, as compounding rounds draw them): round 1 stays, rounds 2-3 fall.
    blurred = videos.float()
    late = blurred[:, WORLD.cond_frames + WORLD.round_frames :].flatten(0, 1)
    kernel = torch.full((3, 1, 3, 3), 1 / 9)
    blurred[:, WORLD.cond_frames + WORLD.round_frames :] = F.conv2d(F.pad(late, (1, 1, 1, 1), mode="replicate"), kernel,
                                                                   groups=3).unflatten(0, blurred.shape[:1] + (-1,))
    metric = StateFidelity(WORLD.cond_frames, WORLD.round_frames)
    metric.update(blurred.round().byte(), episodes)
    report = metric.report()["psnr_at_state"]
    assert report["per_round"][0] > 35 > 25 > report["per_round"][1], report["per_round"]
    assert set(report["per_domain"]) == set(DOMAINS) and report["count"] == len(episodes) * 3 * WORLD.round_frames
    # a rollout whose start shows no object has no state to draw at: left out, not a crash
    empty = videos.clone()
    empty[0, : WORLD.cond_frames] = torch.from_numpy(DOMAINS[episodes[0]["domain"]].background(WORLD.image_size)).permute(2, 0, 1)
    metric = StateFidelity(WORLD.cond_frames, WORLD.round_frames)
    metric.update(empty, episodes)
    assert metric.report()["psnr_at_state"]["count"] == (len(episodes) - 1) * 3 * WORLD.round_frames


def tiny_clip(path) -> str:
    from transformers import CLIPConfig, CLIPModel

    from pandora_lightning.models.tokenizer import build_word_tokenizer, words_of

    tokenizer = build_word_tokenizer(words_of(["a red disc moves left", "a blue square grows"]))
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16, eos_token_id=2, bos_token_id=1, pad_token_id=0),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_text_video_similarity_matches_clip_forward(tmp_path):
    embedder = ClipEmbedder(tiny_clip(tmp_path / "clip"))
    videos = (torch.rand(2, 3, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    texts = ["a red disc moves left", "a blue square grows"]
    metric = TextVideoSimilarity(embedder, domains=("meadow", "space"))
    metric.update(videos, texts, ["meadow", "space"])
    out = metric.compute()
    # Reference: CLIPModel's own forward (logits = exp(logit_scale) * cosine), same preprocessing.
    model, tok = embedder.model, embedder.tokenizer
    pixels = embedder.processing(videos.flatten(0, 1))  # 32x32 frames: the tower's size, nothing to resize or crop
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], pixel_values=pixels).logits_per_image
    cosine = logits.view(2, 3, 2) / model.logit_scale.exp()
    expected = torch.stack([(100 * cosine[b, :, b]).clamp(min=0).mean() for b in range(2)]).double()
    torch.testing.assert_close(out["clip_score/per_domain"], expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out["clip_score"], expected.mean(), rtol=1e-4, atol=1e-4)
    with pytest.raises(PandoraError, match="nowhere' is not a directory written by save_pretrained"):
        ClipEmbedder(tmp_path / "nowhere")


def test_clip_score_crops_non_square_frames_as_the_folders_processor_does(tmp_path):
    """A 48x80 frame: shortest side to the tower's 32, then its centre 32x32 (never squashed to a square)."""
    from PIL import Image
    from transformers import CLIPImageProcessor

    path = tiny_clip(tmp_path / "clip")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    embedder = ClipEmbedder(path)
    smooth = F.interpolate(torch.rand(2, 3, 6, 10, generator=torch.Generator().manual_seed(0)), size=(48, 80), mode="bilinear")
    frames = (smooth * 255).round() / 255
    reference = CLIPImageProcessor.from_pretrained(path)(
        images=[Image.fromarray((f * 255).round().byte().permute(1, 2, 0).numpy()) for f in frames], return_tensors="pt"
    ).pixel_values
    pixels = embedder.processing(frames * 2 - 1)
    assert pixels.shape == reference.shape == (2, 3, 32, 32)
    assert (pixels - reference).abs().max() < 0.05, "transformers' own CLIP processor (PIL) gives the same pixels"
    # A frame already 32 high: only the centre is seen, so what lies beside it does not count.
    wide = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(1))
    beside = wide.clone()
    beside[..., :8], beside[..., 40:] = 1.0, 0.0
    torch.testing.assert_close(embedder.images(beside), embedder.images(wide))
    torch.testing.assert_close(embedder.images(wide), embedder.images(wide[..., 8:40].contiguous()))
    squashed = F.interpolate(wide, size=(32, 32), mode="bicubic", antialias=True, align_corners=False)
    assert (embedder.images(squashed) - embedder.images(wide)).abs().max() > 1e-3
