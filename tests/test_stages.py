"""The two stages: trainable sets, freezing, 2-step fits from shards, checkpoints."""
from pathlib import Path

import pytest
import torch

from pandora_lightning.errors import PandoraError
from pandora_lightning.recipe import load_recipe
from pandora_lightning.training.checkpoint import init_from, load_stage
from pandora_lightning.training.stage import STAGES
from pandora_lightning.training.fit import fit
from pandora_lightning.training.precision import compute_dtype
from tests.conftest import tiny_recipe

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).parent / "golden"


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_trainable_parameter_names_are_pinned(stage):
    module = STAGES[stage].from_recipe(load_recipe(ROOT / f"recipes/tiny/{stage}.yaml"))
    expected = (GOLDEN / f"trainable_{stage}.txt").read_text().split()
    assert module.trainable_names == expected
    actual = sorted(f"model.{n}" for n, p in module.model.named_parameters() if p.requires_grad)
    assert actual == [f"model.{n}" for n in expected]
    optimizer = module.configure_optimizers()["optimizer"]
    optimised = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert optimised == {id(p) for p in module.parameters() if p.requires_grad}


def test_frozen_components_stay_in_eval_mode():
    module = STAGES["align"].from_recipe(load_recipe(ROOT / "recipes/tiny/align.yaml"))
    module.train()
    assert not module.model.vision.training and not module.model.vision.tower.encoder.training
    assert module.model.llm.model.training and module.model.generator.unet.training
    instruct = STAGES["instruct"].from_recipe(load_recipe(ROOT / "recipes/tiny/instruct.yaml")).train()
    embed = instruct.model.llm.model.get_input_embeddings()  # LoRA trains beside the frozen base
    assert not embed.training and not embed.weight.requires_grad and instruct.model.llm.model.training
    assert all(not p.requires_grad for p in module.model.vision.parameters())


def test_unknown_trainable_pattern_is_rejected():
    recipe = load_recipe(ROOT / "recipes/tiny/align.yaml", ["trainable=[output_adaptor.*]"])
    with pytest.raises(PandoraError, match=r"match no parameter.*output_adapter"):
        STAGES["align"].from_recipe(recipe)


def test_align_fit_writes_checkpoint_and_logs(align_checkpoint):
    run_dir = align_checkpoint.parents[1]
    assert align_checkpoint.is_file()
    assert (run_dir / "recipe.yaml").is_file()
    assert (run_dir / "trainable.txt").read_text().split() == (GOLDEN / "trainable_align.txt").read_text().split()
    metrics = (run_dir / "logs" / "metrics.csv").read_text()
    assert "train/loss" in metrics
    module = load_stage(align_checkpoint)
    assert module.stage == "align" and not module.training


def test_instruct_starts_from_align_and_trains(world_manifest, align_checkpoint, tmp_path):
    aligned = load_stage(align_checkpoint).model
    recipe = tiny_recipe("instruct", world_manifest, tmp_path / "instruct", f"init_from={align_checkpoint}")
    final = fit(recipe)
    tuned = load_stage(final).model
    assert tuned.llm.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.shape[0] == recipe.lora.llm.rank
    # Frozen LLM base weights came from align unchanged (cast to the recipe's compute dtype, as every
    # frozen weight is); the trained generator moved.
    frozen = tuned.llm.model.model.layers[0].self_attn.q_proj.base_layer.weight
    assert frozen.dtype == compute_dtype(recipe.trainer.precision)
    torch.testing.assert_close(frozen, aligned.llm.model.model.layers[0].self_attn.q_proj.weight.to(frozen.dtype), rtol=0, atol=0)
    vision = tuned.vision.tower.embeddings.patch_embedding.weight
    torch.testing.assert_close(vision, aligned.vision.tower.embeddings.patch_embedding.weight.to(vision.dtype), rtol=0, atol=0)
    assert not torch.equal(tuned.generator.unet.conv_in.weight, aligned.generator.unet.conv_in.weight)


def test_init_from_a_mismatched_checkpoint_is_refused(world_manifest, align_checkpoint, tmp_path):
    recipe = tiny_recipe("instruct", world_manifest, tmp_path / "i", "model.llm.num_layers=1")
    module = STAGES["instruct"].from_recipe(recipe)
    with pytest.raises(PandoraError, match="does not match this recipe's model"):
        init_from(module, align_checkpoint)


def test_bad_checkpoint_files_are_named(tmp_path):
    with pytest.raises(PandoraError, match="does not exist"):
        load_stage(tmp_path / "none.ckpt")
    (tmp_path / "junk.ckpt").write_bytes(b"junk")
    with pytest.raises(PandoraError, match="junk.ckpt' cannot be read"):
        load_stage(tmp_path / "junk.ckpt")
    torch.save({"state_dict": {}}, tmp_path / "other.ckpt")
    with pytest.raises(PandoraError, match="not a pandora-lightning stage checkpoint"):
        load_stage(tmp_path / "other.ckpt")


def test_distillation_pulls_the_adapter_towards_the_text_encoder():
    recipe = load_recipe(
        ROOT / "recipes/tiny/align.yaml",
        # fp32: the steps below run outside a Trainer, so without the autocast a bf16 recipe runs under
        ["loss.context=teacher", "loss.distill_weight=1.0", "loss.text_dropout=0.0", "trainable=[output_adapter.*]",
         "trainer.precision=32-true"],
    )
    module = STAGES["align"].from_recipe(recipe).train()
    batch = {"frames": torch.randint(0, 255, (4, 6, 3, 32, 32), dtype=torch.uint8),
             "text": ["move left", "go right", "grow", "shrink a bit"]}
    optimizer = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=1e-2)
    first = None
    for _ in range(15):
        parts = module.losses(batch)
        first = first if first is not None else parts["distill"].item()
        optimizer.zero_grad()
        parts["loss"].backward()
        # The teacher is a fixed target: no gradient reaches it.
        assert module.model.text_encoder.model.final_layer_norm.weight.grad is None
        optimizer.step()
    assert parts["distill"].item() < 0.5 * first
    with torch.no_grad():
        teacher = module.model.teacher_context(batch["text"])
    assert not any(p.requires_grad for p in module.model.text_encoder.parameters()), "the tiny teacher stays frozen"
    assert teacher.shape == (4, recipe.model.output_adapter.num_queries, module.model.generator.context_dim)


def test_learning_rate_warms_up_then_decays_by_cosine_to_the_floor():
    from pandora_lightning.training.recipe import OptimConfig
    from pandora_lightning.training.stage import lr_factor

    cosine = OptimConfig(lr=1.0, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    factors = [lr_factor(cosine, 110, step) for step in range(111)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[60] == pytest.approx(0.55)  # half way through the decay: the mean of 1 and the floor
    assert factors[110] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(factors[9:], factors[10:]))
    constant = OptimConfig(lr=1.0, warmup_steps=10)
    assert [lr_factor(constant, 110, s) for s in (4, 50, 110)] == [0.5, 1.0, 1.0]
    with pytest.raises(ValueError, match="optim.schedule='linear' must be 'constant' or 'cosine'"):
        OptimConfig(schedule="linear")


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_bf16_training_on_cpu_runs_attention_through_the_math_kernel(precision):
    """PyTorch's flash-attention backward in bf16 on CPU is several times slower than in fp32 (docs/demo-model.md,
    "Noise on the given frames, bf16 steps"): bf16 training steps there take the math kernel, fp32 keeps flash."""
    from torch.nn.functional import scaled_dot_product_attention

    from pandora_lightning.training.precision import training_attention

    q = torch.randn(2, 2, 16, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
        default = scaled_dot_product_attention(q, q, q).grad_fn.name()
        with training_attention(precision, "cpu"):
            chosen = scaled_dot_product_attention(q, q, q)
    assert "Flash" in default  # what PyTorch picks by itself, in both precisions
    assert ("Flash" in chosen.grad_fn.name()) == (precision == "32-true")
    chosen.float().sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_cpu_steps_use_fused_adamw_and_still_clip_in_bf16(world_manifest, tmp_path):
    """On CPU the optimizer is AdamW's fused kernel (a third of the per-tensor loop's time here; docs/demo-model.md,
    "Fused optimizer steps"). Lightning's mixed-precision plugin refuses to clip the gradients of a fused optimizer, so
    the stage clips them itself: a bf16 fit with clipping runs, and the clip bounds the norm."""
    import lightning as L

    seen = {}

    class Optimizer(L.Callback):
        def on_before_optimizer_step(self, trainer, module, optimizer):
            seen["fused"] = optimizer.defaults["fused"]

    recipe = tiny_recipe("align", world_manifest, tmp_path / "align", "trainer.precision=bf16-mixed",
                         "trainer.gradient_clip_val=1.0e-3")
    fit(recipe, callbacks=[Optimizer()])
    assert seen["fused"] is True

    module = STAGES["align"].from_recipe(recipe)
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, fused=True)
    for algorithm, bound in (("norm", 0.5), ("value", 0.01)):
        for p in params:
            p.grad = torch.full_like(p, 3.0)
        module.configure_gradient_clipping(optimizer, bound, algorithm)
        grads = torch.cat([p.grad.flatten() for p in params])
        if algorithm == "norm":
            assert grads.norm().item() == pytest.approx(bound, rel=1e-2)  # from 3 x sqrt(numel), thousands
        else:
            assert grads.abs().max().item() == pytest.approx(bound)
