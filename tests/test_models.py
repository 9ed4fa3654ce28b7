"""Components built from tiny configs and from local pretrained directories."""
from pathlib import Path

import pytest
import torch
from diffusers import UNetSpatioTemporalConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaForCausalLM, SiglipVisionConfig, SiglipVisionModel

from tests.generator_folders import svd
from pandora_lightning.errors import PandoraError
from pandora_lightning.recipe import load_recipe
from pandora_lightning.models.generator import GeneratorConfig, build_generator
from pandora_lightning.models.llm import LLMBackbone, LLMConfig
from pandora_lightning.models.text_encoder import TextEncoder, TextEncoderConfig
from pandora_lightning.models.tokenizer import build_word_tokenizer, words_of
from pandora_lightning.inference.rollout import rollout
from pandora_lightning.models.world_model import WorldModel, WorldModelConfig
from pandora_lightning.training.stage import AlignStage

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ["move left", "go right", "a red disc on a green meadow grows"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return WorldModel(WorldModelConfig(generator=GeneratorConfig(num_inference_steps=2)), words_of(CORPUS)).eval()


def test_context_shape(model):
    frames = torch.rand(3, 2, 3, 32, 32) * 2 - 1
    context = model.context(frames, ["move left", "go right", "grows"])
    assert context.shape == (3, model.cfg.output_adapter.num_queries, model.generator.context_dim)


def test_query_states_do_not_depend_on_padding(model):
    state = torch.randn(1, 8, model.llm.hidden_size)
    alone = model.llm(state, ["move left"])
    padded = model.llm(state.expand(2, -1, -1), ["move left", "a red disc on a green meadow grows"])
    torch.testing.assert_close(alone[0], padded[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(padded[0], padded[1], atol=1e-3), "the text must reach the query states"


def test_rollout_keeps_start_and_conditions_each_round(model):
    start = torch.rand(2, 3, 32, 32) * 2 - 1
    video = rollout(model, start, [["move left", "grows"], ["go right", "go right"]], seed=1)
    assert video.shape == (2, 2 + 2 * 4, 3, 32, 32)
    torch.testing.assert_close(video[:, 0], start)
    torch.testing.assert_close(video[:, 1], start)
    again = rollout(model, start, [["move left", "grows"], ["go right", "go right"]], seed=1)
    torch.testing.assert_close(video, again)


def test_rollout_noise_does_not_depend_on_the_batch(model):
    start = torch.rand(2, 3, 32, 32) * 2 - 1
    both = rollout(model, start, [["move left", "grows"]], seed=5)
    second = rollout(model, start[1:], [["grows"]], seed=6)  # sample 1 of the batch draws from seed + 1
    torch.testing.assert_close(both[1:], second, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("actions", [[], [["move left"]]])
def test_rollout_rejects_bad_action_lists(model, actions):
    with pytest.raises(ValueError, match="one list of 2 action texts per round"):
        rollout(model, torch.zeros(2, 3, 32, 32), actions)


def test_generator_sample_returns_given_frames_first():
    gen = build_generator(GeneratorConfig(num_inference_steps=2)).eval()
    given = torch.rand(2, 2, 3, 32, 32) * 2 - 1
    clip = gen.sample(given, torch.randn(2, 8, 64))
    assert clip.shape == (2, 6, 3, 32, 32)
    torch.testing.assert_close(clip[:, :2], given)
    assert clip.abs().max() <= 1


def test_pixel_space_encode_decode_is_exact():
    gen = build_generator(GeneratorConfig())
    frames = torch.rand(2, 6, 3, 32, 32) * 2 - 1
    latents = gen.encode(frames)
    assert latents.shape == (2, 6, 12, 16, 16)
    torch.testing.assert_close(gen.decode(latents), frames)


def test_2d_unet_generates_each_frame_from_its_own_channels():
    gen = build_generator(GeneratorConfig(unet="2d", num_inference_steps=2)).eval()
    assert type(gen.unet).__name__ == "UNet2DConditionModel" and gen.unet.config.in_channels == 6 * 25
    given = torch.rand(2, 2, 3, 32, 32) * 2 - 1
    clip = gen.sample(given, torch.randn(2, 8, 64))
    assert clip.shape == (2, 6, 3, 32, 32)
    torch.testing.assert_close(clip[:, :2], given)
    # The UNet's output channels are frame-major: silencing all but frame 4's 12 output channels
    # leaves the prediction non-zero at frame 4 only.
    with torch.no_grad():
        keep = torch.zeros(6 * 12, dtype=torch.bool)
        keep[4 * 12 : 5 * 12] = True
        gen.unet.conv_out.weight[~keep] = 0
        gen.unet.conv_out.bias[~keep] = 0
        noisy = torch.randn(2, 6, 12, 16, 16)
        out = gen.denoise(noisy, torch.tensor([500, 500]), gen.condition(gen.encode(clip)), torch.randn(2, 8, 64))
    assert out.shape == noisy.shape
    assert out[:, 4].abs().sum() > 0 and out[:, [0, 1, 2, 3, 5]].abs().sum() == 0


def test_tiny_unet_option_is_checked():
    with pytest.raises(PandoraError, match="'spatiotemporal' or '2d'"):
        GeneratorConfig(unet="3d")


def test_timestep_power_draws_more_of_the_high_noise_levels():
    frames = torch.rand(512, 6, 3, 32, 32) * 2 - 1
    drawn = {}
    for power in (1.0, 2.0):
        gen = build_generator(GeneratorConfig(timestep_power=power))
        seen = []
        gen.denoise = lambda noisy, t, cond, context: seen.append(t) or torch.zeros_like(noisy)
        torch.manual_seed(0)
        gen(frames, torch.randn(512, 8, 64))
        drawn[power] = seen[0].float()
    assert 0 <= drawn[2.0].min() and drawn[2.0].max() < 1000
    # uniform: mean ~500; linear ramp towards T: mean ~2/3 T
    assert abs(drawn[1.0].mean() - 500) < 40 and abs(drawn[2.0].mean() - 667) < 40


def test_sampler_timesteps_train_that_share_of_clips_at_the_levels_the_sampler_visits():
    frames = torch.rand(1000, 6, 3, 32, 32) * 2 - 1
    gen = build_generator(GeneratorConfig(sampler_timesteps=0.5, num_inference_steps=10))
    seen = []
    gen.denoise = lambda noisy, t, cond, context: seen.append(t) or torch.zeros_like(noisy)
    torch.manual_seed(0)
    gen(frames, torch.randn(1000, 8, 64))
    levels = set(range(99, 1000, 100))  # 10 trailing DDIM steps: 999, 899, ... 99
    gen.sample_scheduler.set_timesteps(10)
    assert set(gen.sample_scheduler.timesteps.tolist()) == levels
    on_levels = sum(t in levels for t in seen[0].tolist())
    assert 450 < on_levels < 560  # half the clips, plus the uniform draws that land on a level (1%)
    assert len(set(seen[0].tolist()) - levels) > 300  # the other half stays uniform


@pytest.mark.parametrize("bad", [{"timestep_power": 0.0}, {"cond_noise": -0.1}, {"cond_blur": 1.5}, {"cond_blur": -0.1},
                                 {"sampler_timesteps": 1.5}, {"cond_draft": 1.5}, {"cond_draft": -0.5}, {"cond_draft_noise": 0.0},
                                 {"pretrained": "x", "family": "svd", "timestep_power": 2.0}])
def test_tiny_noise_options_are_checked(bad):
    with pytest.raises(PandoraError, match="timestep_power|cond_blur|sampler_timesteps|cond_draft"):
        GeneratorConfig(**bad)


@pytest.mark.parametrize("option", [{"cond_noise": 0.5}, {"cond_blur": 1.0}])
def test_cond_noise_and_blur_corrupt_only_the_given_frames_in_training(option):
    gen = build_generator(GeneratorConfig(prediction_type="sample", **option))
    frames = torch.rand(4, 6, 3, 32, 32) * 2 - 1
    conds = []
    gen.denoise = lambda noisy, t, cond, context: conds.append(cond) or torch.zeros_like(noisy)
    clean = gen.condition(gen.encode(frames))
    gen.eval()
    _, target_eval = gen(frames, torch.randn(4, 8, 64))
    torch.testing.assert_close(conds[-1], clean)  # no corruption at evaluation
    gen.train()
    _, target = gen(frames, torch.randn(4, 8, 64))
    assert not torch.allclose(conds[-1], clean)
    # the target is the clean clip relative to the corrupted last given frame: target + anchor = clean frames
    anchor = conds[-1][:, -1:, :-1]
    torch.testing.assert_close(target + anchor, gen.encode(frames)[:, 2:])
    torch.testing.assert_close(target_eval + clean[:, -1:, :-1], gen.encode(frames)[:, 2:])


def test_cond_blur_softens_edges_of_the_given_frames_only():
    torch.manual_seed(0)  # the per-clip weights are drawn: fixed, so no draw of exactly 0 can make this flaky
    gen = build_generator(GeneratorConfig(cond_blur=1.0))
    frames = -torch.ones(8, 6, 3, 32, 32)
    frames[..., 8:16, 8:16] = 1.0  # a sharp square on every frame
    out = gen.blur_given(frames)
    torch.testing.assert_close(out[:, 2:], frames[:, 2:])  # the new frames (the target) stay sharp
    edge = lambda x: (x[..., :, 1:] - x[..., :, :-1]).abs().amax(dim=(-3, -2, -1))  # steepest step per frame
    assert (edge(out[:, :2]) < 2.0).all() and (edge(out[:, :2]) > 1.0).all()  # softened, by a weight in (0, 1) per clip
    torch.testing.assert_close(out[:, 0].mean(), frames[:, 0].mean(), atol=1e-6, rtol=0)  # blurring moves no mass
    flat = torch.full((2, 6, 3, 32, 32), 0.3)
    torch.testing.assert_close(gen.blur_given(flat), flat)  # a flat frame is its own blur (replicate padding)
    assert (edge(build_generator(GeneratorConfig(cond_blur=0.0)).blur_given(frames)[:, :2]) == 2.0).all()


@pytest.mark.parametrize("kind", ["sample", "epsilon", "v_prediction"])
def test_draft_is_the_x0_prediction_for_every_prediction_type(kind):
    """A UNet that predicts its target exactly drafts the real clip back, whatever it predicts (x0, noise
    or velocity): the draft turns each into x0, from noise levels in the lowest cond_draft_noise share of the
    schedule. One that predicts a zero change drafts the last given frame."""
    torch.manual_seed(0)
    gen = build_generator(GeneratorConfig(prediction_type=kind, cond_draft_noise=0.1))
    levels = []
    frames = torch.rand(4, 6, 3, 32, 32) * 2 - 1
    x0 = gen.encode(frames) - gen.anchor(gen.encode(frames))
    ab_of = lambda t: gen.train_scheduler.alphas_cumprod[t].view(-1, 1, 1, 1, 1)

    def exact(noisy, t, cond, context):
        levels.append(t)
        ab = ab_of(t)
        noise = (noisy - ab.sqrt() * x0) / (1 - ab).sqrt()
        return {"sample": x0, "epsilon": noise, "v_prediction": ab.sqrt() * noise - (1 - ab).sqrt() * x0}[kind]

    gen.denoise = exact
    draft = gen.draft(frames, torch.randn(4, 8, 64))
    assert torch.equal(draft[:, :2], frames[:, :2])  # the given frames are kept as they are
    torch.testing.assert_close(draft, frames, atol=2e-3, rtol=0)
    assert 0 <= int(levels[0].min()) and int(levels[0].max()) < 100  # the lowest tenth of 1000 training levels
    if kind == "sample":
        gen.denoise = lambda noisy, t, cond, context: torch.zeros_like(noisy)
        torch.testing.assert_close(gen.draft(frames, torch.randn(4, 8, 64))[:, 2:], frames[:, 1:2].expand(-1, 4, -1, -1, -1))


def test_cond_draft_hands_each_round_the_draft_of_the_round_before(tmp_path):
    """With cond_draft 1 every round after a window's first is given the last frames of the generator's
    draft of the round before; the first round's given frames and every round's new frames stay real."""
    recipe = load_recipe(ROOT / "recipes/tiny-history/instruct.yaml",
                         ["vocabulary=null", "init_from=null", "model.generator.cond_draft=1.0", f"run_dir={tmp_path}"])
    from pandora_lightning.training.stage import InstructStage

    stage = InstructStage.from_recipe(recipe, vocabulary=words_of(CORPUS)).train()
    drafted = []

    def draft(clips, context):
        drafted.append((clips.clone(), context))
        return clips + 0.5  # a recognisable draft: the real clip shifted
    stage.model.generator.draft = draft
    clips = torch.rand(2, 4, 6, 3, 32, 32) * 2 - 1  # a window of 4 rounds
    context = torch.randn(2, 4, 8, 64)
    out = stage.drafted_given(clips, context)
    assert torch.equal(drafted[0][0], clips[:, :3].flatten(0, 1))  # rounds 1-3 are drafted, from their own context
    assert torch.equal(drafted[0][1], context[:, :3].flatten(0, 1))
    assert torch.equal(out[:, 0], clips[:, 0])
    assert torch.equal(out[:, 1:, 2:], clips[:, 1:, 2:])  # the targets stay real
    torch.testing.assert_close(out[:, 1:, :2], clips[:, :3, -2:] + 0.5)  # the end of the round before's draft
    stage.model.generator.cfg.cond_draft = 0.0
    assert torch.equal(stage.drafted_given(clips, context), clips)


def test_missing_pretrained_path_is_a_clear_error(tmp_path):
    with pytest.raises(PandoraError, match="not a local directory.*no hub access"):
        LLMBackbone(LLMConfig(pretrained="meta-llama/Llama-2-7b-chat-hf"))
    (tmp_path / "unet").mkdir()
    with pytest.raises(PandoraError, match="cannot tell its family; looked for model_index.json"):
        build_generator(GeneratorConfig(pretrained=str(tmp_path)))


def _save_pretrained_dirs(root: Path) -> dict[str, Path]:
    """Tiny random weights written in the transformers/diffusers formats a user with real weights has."""
    torch.manual_seed(0)
    SiglipVisionModel(
        SiglipVisionConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    ).save_pretrained(root / "vision")
    tokenizer = build_word_tokenizer(words_of(CORPUS))
    LlamaForCausalLM(
        LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    ).save_pretrained(root / "llm")
    tokenizer.save_pretrained(root / "llm")
    video = svd(root / "video")  # an SVD release's layout, fp16, cross-attention width 32
    # The video model's own text encoder, with its tokenizer in the same folder.
    CLIPTextModel(
        CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, max_position_embeddings=16, bos_token_id=2, eos_token_id=0, pad_token_id=0)
    ).save_pretrained(video / "text_encoder")
    tokenizer.save_pretrained(video / "text_encoder")
    return {"vision": root / "vision", "llm": root / "llm", "video": video}


def test_world_model_from_pretrained_dirs_through_a_recipe(tmp_path):
    dirs = _save_pretrained_dirs(tmp_path)
    recipe = load_recipe(
        ROOT / "recipes/tiny/align.yaml",
        [
            f"model.vision.pretrained={dirs['vision']}",
            f"model.llm.pretrained={dirs['llm']}",
            f"model.generator.pretrained={dirs['video']}",
            "model.generator.num_inference_steps=2",
            "model.text_encoder.enabled=true",
            f"model.text_encoder.pretrained={dirs['video'] / 'text_encoder'}",
            "trainable=[input_adapter.*,output_adapter.*,llm.query_tokens]",
            "loss.context=adapter",
            "trainer.precision=32-true",  # compared with the saved weights in float32, stepped outside a Trainer
        ],
    )
    stage = AlignStage.from_recipe(recipe)
    model = stage.model
    assert model.llm.hidden_size == 32 and model.vision.hidden_size == 32
    assert model.generator.family == "svd" and model.generator.vae.config.latent_channels == 4
    assert model.generator.context_dim == 32 and model.output_adapter.proj_out.out_features == 32
    # Loaded, not re-initialised: the UNet weights equal the saved (fp16) ones.
    saved = UNetSpatioTemporalConditionModel.from_pretrained(dirs["video"] / "unet")
    torch.testing.assert_close(model.generator.unet.conv_in.weight, saved.conv_in.weight.float())
    saved_text = CLIPTextModel.from_pretrained(dirs["video"] / "text_encoder")
    torch.testing.assert_close(model.text_encoder.model.embeddings.token_embedding.weight,
                               saved_text.embeddings.token_embedding.weight)
    batch = {"frames": torch.randint(0, 255, (2, 6, 3, 32, 32), dtype=torch.uint8), "text": ["move left", "go right"]}
    parts = stage.losses(batch)
    assert set(parts) == {"loss", "diffusion", "distill"}
    parts["loss"].backward()
    assert torch.isfinite(parts["loss"])
    assert model.output_adapter.proj_out.weight.grad is not None and model.generator.unet.conv_in.weight.grad is None
    video = rollout(model, torch.zeros(1, 3, 32, 32), [["move left"]])
    assert video.shape == (1, 6, 3, 32, 32)


def test_tiny_text_encoder_gives_one_embedding_per_query_slot():
    encoder = TextEncoder(TextEncoderConfig(enabled=True), num_tokens=8, width=64, vocabulary=words_of(CORPUS))
    out = encoder(["move left", "a red disc on a green meadow grows", ""])
    assert out.shape == (3, 8, 64)
    assert (out[0] - out[1]).abs().mean() > 0.1, "different texts must get different embeddings"


def test_text_encoder_that_does_not_fit_the_generator_is_rejected(tmp_path):
    tokenizer = build_word_tokenizer(words_of(CORPUS))
    CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, max_position_embeddings=16, bos_token_id=2, eos_token_id=0,
                                 pad_token_id=0)).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="32-wide embeddings but the generator's cross-attention takes 64"):
        TextEncoder(TextEncoderConfig(enabled=True, pretrained=str(tmp_path)), num_tokens=8, width=64)
    with pytest.raises(ValueError, match="at most 16 tokens but output_adapter.num_queries=77"):
        TextEncoder(TextEncoderConfig(enabled=True, pretrained=str(tmp_path)), num_tokens=77, width=32)


def test_guided_rollout_runs_two_contexts_and_differs_from_unguided():
    torch.manual_seed(0)
    cfg = WorldModelConfig(generator=GeneratorConfig(num_inference_steps=2))
    model = WorldModel(cfg, words_of(CORPUS)).eval()
    start = torch.rand(2, 3, 32, 32) * 2 - 1
    plain = rollout(model, start, [["move left", "go right"]], seed=3)
    calls = []
    model.generator.unet.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]))
    cfg.generator.guidance_scale = 3.0
    guided = rollout(model, start, [["move left", "go right"]], seed=3)
    assert calls == [4, 4], "one UNet call a step on the text and the empty-text batch together"
    assert not torch.allclose(plain, guided)


def test_generator_folder_of_another_family_is_refused(tmp_path):
    folder = svd(tmp_path / "svd")
    with pytest.raises(PandoraError, match="generator.family=wan but .* holds a svd model; set generator.family=svd or null"):
        build_generator(GeneratorConfig(family="wan", pretrained=str(folder)))


def test_unet_bench_times_the_recipe_unet_against_the_spatiotemporal_ones():
    from pandora_lightning.bench.unet import run_unet_bench

    out = run_unet_bench(str(ROOT / "recipes/tiny/instruct.yaml"), steps=1)
    assert list(out["steps"]) == ["2d [64, 128] (recipe)", "spatiotemporal [64, 128]", "spatiotemporal [32, 64]"]
    for name, cfg in [("2d [64, 128] (recipe)", {"unet": "2d", "block_out_channels": [64, 128]}),
                      ("spatiotemporal [32, 64]", {"block_out_channels": [32, 64]})]:
        built = build_generator(GeneratorConfig(prediction_type="sample", **cfg))
        assert out["steps"][name]["parameters"] == sum(p.numel() for p in built.parameters())
    assert all(row["seconds"] > 0 for row in out["steps"].values())
