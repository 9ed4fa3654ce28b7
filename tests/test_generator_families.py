"""Each generator family against its own diffusers pipeline and its scheduler's formulas, on tiny fp16 folders."""
from __future__ import annotations

import pytest
import torch
from diffusers import I2VGenXLPipeline, StableVideoDiffusionPipeline, WanImageToVideoPipeline, WanPipeline
from diffusers.models.autoencoders import vae as vae_module

from tests.generator_folders import PUBLISHED, i2vgen_xl, published, svd, wan
from pandora_lightning.models.generator import GeneratorConfig, build_generator

H, W = 16, 32  # non-square, as every test here
BUILDERS = {"i2vgen-xl": i2vgen_xl, "svd": svd, "wan": wan, "wan-i2v": lambda f: wan(f, image_to_video=True)}
CLIPS = {"i2vgen-xl": (3, 1), "svd": (3, 1), "wan": (5, 1), "wan-i2v": (5, 1)}  # (frames, cond_frames)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("generators")
    return {name: build(root / name) for name, build in BUILDERS.items()}


def generator(folders, name, **overrides):
    frames, cond = CLIPS[name]
    cfg = GeneratorConfig(pretrained=str(folders[name]), frames=frames, cond_frames=cond, height=H, width=H, num_inference_steps=2, **overrides)
    return build_generator(cfg).eval()  # fp16 weights, computed in fp32


def given_frames(batch=1, k=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, k, 3, H, W), generator=g) / 127.5 - 1  # exact in uint8, like decoded video


@pytest.mark.parametrize("name", ["i2vgen-xl", "svd", "wan", "wan-i2v"])
def test_sample_equals_the_family_pipeline(folders, name, monkeypatch):
    gen = generator(folders, name)
    given = given_frames()
    tokens = gen.context_tokens or 7
    torch.manual_seed(1)
    context, uncond = torch.randn(2, 1, tokens, gen.context_dim)
    ours = gen.sample(given, context, generator=torch.Generator().manual_seed(7), uncond_context=uncond)
    image, frames = (given[:, 0] + 1) / 2, gen.cfg.frames
    common = dict(height=H, width=W, num_frames=frames, num_inference_steps=2, generator=torch.Generator().manual_seed(7), output_type="pt")
    if name == "svd":
        pipe = StableVideoDiffusionPipeline.from_pretrained(folders[name], torch_dtype=torch.float32)
        # the encode step replaced: our context is what the CLIP image embedding was (zeros unconditional, as the pipeline)
        monkeypatch.setattr(pipe, "_encode_image", lambda image, device, n, guide: torch.cat([torch.zeros_like(context), context]) if guide else context)
        ref = pipe(image=image, **common).frames
    elif name == "i2vgen-xl":
        pipe = I2VGenXLPipeline.from_pretrained(folders[name], torch_dtype=torch.float32)
        embeds = gen.image_embedding(given[:, 0])  # PIL resizing replaced by ours: same tensor into the image stream
        monkeypatch.setattr(pipe, "_encode_image", lambda image, device, n: torch.cat([torch.zeros_like(embeds), embeds]))
        monkeypatch.setattr(vae_module.DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mode())
        ref = pipe(image=image, prompt_embeds=context, negative_prompt_embeds=uncond, **common).frames
    else:
        if name == "wan-i2v":
            pipe = WanImageToVideoPipeline.from_pretrained(folders[name], torch_dtype=torch.float32)
            embeds = gen.image_embedding(given[:, 0])
            monkeypatch.setattr(pipe, "encode_image", lambda image, device: embeds)
        else:  # a text-to-video transformer conditions as Wan2.2-TI2V: the pipeline with expand_timesteps
            base = WanPipeline.from_pretrained(folders[name], torch_dtype=torch.float32)
            pipe = WanImageToVideoPipeline(tokenizer=base.tokenizer, text_encoder=base.text_encoder, vae=base.vae,
                                           scheduler=base.scheduler, transformer=base.transformer, expand_timesteps=True)
        ref = pipe(image=image, prompt_embeds=context, negative_prompt_embeds=uncond, **common).frames
    assert gen.guidance_scale > 1  # the families' own default guidance was exercised
    assert ours.shape == ref.shape == (1, frames, 3, H, W)
    print(f"{name}: max |sample - pipeline| = {(ours - (ref * 2 - 1)).abs().max().item():.1e} over {tuple(ours.shape)}")
    torch.testing.assert_close(ours, ref * 2 - 1, atol=1e-4, rtol=0)


def test_i2vgen_xl_loss_is_the_v_prediction_loss(folders):
    gen = generator(folders, "i2vgen-xl")
    frames, context = given_frames(2, 3, seed=3), torch.randn(2, 16, gen.context_dim)
    t = torch.tensor([10, 999])
    noise = torch.randn(2, 3, 4, H // 2, W // 2)
    pred, target = gen(frames, context, noise=noise, timesteps=t)
    # by hand: scaled-linear betas rescaled to zero terminal SNR, x_t = a x0 + s noise, v = a noise - s x0
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    sqrt_ab = torch.cumprod(1 - betas, 0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    a = sqrt_ab[t].float().view(2, 1, 1, 1, 1)
    s = (1 - a**2).sqrt()
    x0 = gen.encode(frames)
    embeds = gen.image_embedding(frames[:, 0])
    by_hand = gen.unet_out(a * x0 + s * noise, t, context, gen.image_latents(x0[:, :1]), embeds)
    v = a * noise - s * x0
    loss = torch.nn.functional.mse_loss(pred, target)
    assert abs(loss.item() - torch.nn.functional.mse_loss(by_hand[:, 1:], v[:, 1:]).item()) < 1e-6
    assert target.shape == (2, 2, 4, H // 2, W // 2)


def test_svd_loss_is_the_edm_loss(folders):
    gen = generator(folders, "svd")
    frames, context = given_frames(2, 3, seed=4), torch.randn(2, 1, gen.context_dim)
    sigma = torch.tensor([0.5, 20.0])
    noise = torch.randn(2, 3, 4, H // 2, W // 2)
    torch.manual_seed(5)  # the noise augmentation of the given frame
    pred, target = gen(frames, context, noise=noise, sigma=sigma)
    # by hand (Karras et al. with SVD's v-parametrisation): D = c_skip x + c_out F(c_in x, log(s)/4); loss = w(s) |D - x0|^2
    torch.manual_seed(5)
    cond = gen.condition(frames[:, :1], torch.randn_like(frames[:, :1]))
    s = sigma.view(2, 1, 1, 1, 1)
    x0 = gen.encode(frames)
    x = x0 + s * noise
    out = gen.unet_out(x / (s**2 + 1).sqrt(), sigma.log() / 4, cond, context)
    denoised = x / (s**2 + 1) - s / (s**2 + 1).sqrt() * out
    weight = (s**2 + 1) / s**2
    by_hand = (weight * (denoised - x0) ** 2)[:, 1:].mean()
    assert abs(torch.nn.functional.mse_loss(pred, target).item() - by_hand.item()) < 1e-6


@pytest.mark.parametrize("name", ["wan", "wan-i2v"])
def test_wan_loss_is_the_flow_matching_loss(folders, name):
    gen = generator(folders, name)
    frames = given_frames(2, 5, seed=6)
    context = torch.randn(2, gen.context_tokens or 7, gen.context_dim)
    sigma = torch.tensor([0.25, 0.9])
    noise = torch.randn(2, 16, 2, H // 8, W // 8)
    pred, target = gen(frames, context, noise=noise, sigma=sigma)
    # by hand: x_s = (1 - s) x0 + s noise at timestep 1000 s, target noise - x0, on the latent frames after the given one
    x0 = gen.encode(frames)
    s = sigma.view(2, 1, 1, 1, 1)
    cond = gen.condition(frames[:, :1])
    out = gen.model_out((1 - s) * x0 + s * noise, 1000 * sigma, cond, context, gen.image_embedding(frames[:, 0]))
    by_hand = torch.nn.functional.mse_loss(out[:, :, 1:], (noise - x0)[:, :, 1:])
    assert abs(torch.nn.functional.mse_loss(pred, target).item() - by_hand.item()) < 1e-6


@pytest.mark.parametrize("family", ["i2vgen-xl", "svd", "wan"])
def test_published_configuration_builds_on_the_meta_device(tmp_path, family):
    frames, cond = {"wan": (81, 1)}.get(family, (16, 1))
    cfg = GeneratorConfig(pretrained=str(published(family, tmp_path / family)), frames=frames, cond_frames=cond, height=320, width=320)
    gen = build_generator(cfg, init="meta")
    parts = {name: module for name, module in gen.named_children()}
    if gen.has_text_teacher:
        parts["text_encoder"] = gen.teacher({"wan": 512}.get(family, 77), init="meta").model
    counts = {name: sum(p.numel() for p in module.parameters()) for name, module in parts.items()}
    # all weights on the meta device (diffusers' AlphaBlender makes its scalar mix factors on the CPU)
    assert sum(p.numel() for p in gen.parameters() if not p.is_meta) < 100
    lines = [f"{family} {name}: {n / 1e6:,.1f} M" + (f" (published {PUBLISHED[family][name] / 1e6:,.0f} M)" if name in PUBLISHED[family] else "")
             for name, n in counts.items()]
    print("\n".join(lines), f"\n{family} total: {sum(counts.values()) / 1e9:.3f} B")
    for name, figure in PUBLISHED[family].items():
        # "1.3B" is the release's name for 1.42 B (its own rounding); the others are stated to 2-3 digits
        assert abs(counts[name] - figure) / figure < (0.1 if figure == 1.3e9 else 0.01), (name, counts[name], figure)
