"""`pandora-lightning` (also `python -m pandora_lightning`): fit, generate, shards, demo, bench."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pandora_lightning.config import ConfigError


def _fit(args) -> None:
    from pandora_lightning.config import load_recipe
    from pandora_lightning.train import fit

    print(f"final checkpoint: {fit(load_recipe(args.recipe, args.overrides))}")


def _generate(args) -> None:
    from pandora_lightning.rollout import generate

    video, sheet = generate(args.checkpoint, args.image, args.actions, Path(args.out), args.seed, args.scale)
    print(f"wrote {video} and {sheet}")


def _shards_world(args) -> None:
    from pandora_lightning.data.manifest import write_manifest
    from pandora_lightning.data.world_shards import write_world_shards
    from pandora_lightning.world import WorldConfig

    cfg = WorldConfig(image_size=args.image_size, seed=args.seed)
    counts = {"train": args.train, "val": args.val, "transfer": args.transfer}
    records = write_world_shards(args.out, cfg, counts, samples_per_shard=args.samples_per_shard)
    manifest = write_manifest(args.manifest, "world", args.out, records)
    print(f"wrote {sum(r['samples'] for r in records)} episodes in {sum(len(r['shards']) for r in records)} shards "
          f"under {args.out}; manifest {manifest.path}")


def _demo(args) -> None:
    from pandora_lightning.demo import run_demo

    run_demo(Path(args.run_dir), quick=args.quick)


def _bench(args) -> None:
    from pandora_lightning.bench import run_bench

    run_bench(args.recipe, args.steps, Path(args.out))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pandora-lightning", description=__doc__)
    verbs = parser.add_subparsers(dest="verb", required=True)

    p = verbs.add_parser("fit", help="train one stage from a recipe")
    p.add_argument("recipe", help="recipes/<scale>/<stage>.yaml")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. trainer.max_steps=50")
    p.set_defaults(run=_fit)

    p = verbs.add_parser("generate", help="roll a checkpoint out from a start image, one action per round")
    p.add_argument("checkpoint")
    p.add_argument("--image", required=True, help="start frame (PNG/JPEG) at the model's image size")
    p.add_argument("--actions", nargs="+", required=True, help='one action per round, e.g. "move left" "grow"')
    p.add_argument("--out", default="runs/generate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=int, default=4, help="nearest-neighbour upscale of the written video")
    p.set_defaults(run=_generate)

    p = verbs.add_parser("shards", help="write WebDataset shards")
    kinds = p.add_subparsers(dest="kind", required=True)
    w = kinds.add_parser("world", help="episodes of the built-in procedural world, plus their manifest")
    w.add_argument("--out", default="data/world")
    w.add_argument("--manifest", default="data_manifests/world.yaml")
    w.add_argument("--train", type=int, default=512, help="train episodes per domain")
    w.add_argument("--val", type=int, default=32, help="held-out start states per domain")
    w.add_argument("--transfer", type=int, default=32, help="transfer-split episodes")
    w.add_argument("--samples-per-shard", type=int, default=128)
    w.add_argument("--image-size", type=int, default=32)
    w.add_argument("--seed", type=int, default=0)
    w.set_defaults(run=_shards_world)

    p = verbs.add_parser("demo", help="world shards -> align -> instruct -> multi-round rollouts + accuracy")
    p.add_argument("--run-dir", default="runs/demo")
    p.add_argument("--quick", action="store_true", help="a few steps only, to check the pipeline")
    p.set_defaults(run=_demo)

    p = verbs.add_parser("bench", help="Lightning step vs a plain PyTorch loop on the same model and batches")
    p.add_argument("--recipe", default="recipes/tiny/instruct.yaml")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--out", default="bench.json")
    p.set_defaults(run=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Lightning configures its own loggers; this only makes the project's warnings visible.
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.getLogger("pandora_lightning").addHandler(handler)
    logging.getLogger("pandora_lightning").setLevel(logging.INFO)
    try:
        args.run(args)
    except (ConfigError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
