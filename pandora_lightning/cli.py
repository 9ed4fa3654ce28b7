"""`pandora-lightning` (also `python -m pandora_lightning`): fit, generate, play, score, export, shards, demo, bench."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from pandora_lightning.cli_scale import add_verbs as add_scale_verbs
from pandora_lightning.errors import PandoraError


def _fit(args) -> None:
    from pandora_lightning.recipe import load_recipe, score_callbacks
    from pandora_lightning.training.fit import fit
    from pandora_lightning.world.metrics import WORLD_METRICS

    from pandora_lightning.training.parallel import leave_process

    recipe = load_recipe(args.recipe, args.overrides)
    print(f"final checkpoint: {fit(recipe, score_callbacks(recipe, [WORLD_METRICS]), overwrite=args.overwrite)}")
    leave_process(0)  # a rank of a multi-process run ends here, past Python's shutdown


def _generate(args) -> None:
    from pandora_lightning.inference.generate import generate

    from pandora_lightning.inference.generate import read_actions_file
    from pandora_lightning.world.history import check_history_action

    if bool(args.actions) == bool(args.actions_file):
        raise PandoraError("give the actions either as --actions 'move left' 'grow' ... or as --actions-file FILE (one per round)")
    actions = args.actions or read_actions_file(args.actions_file)
    video, sheet = generate(
        args.checkpoint, args.image, actions, Path(args.out), args.seed, args.scale, args.resize, check_history_action,
        args.adapter, args.device, args.precision,
    )
    print(f"wrote {video} and {sheet}")


def _play(args) -> None:
    import numpy as np

    from pandora_lightning.inference.generate import load_model, read_start_image
    from pandora_lightning.inference.play import Play, serve, terminal
    from pandora_lightning.training.precision import resolve_device
    from pandora_lightning.world import DOMAINS, random_state, render
    from pandora_lightning.world.domains import ACTIONS
    from pandora_lightning.world.history import HISTORY_ACTIONS, check_history_action

    model = load_model(args.checkpoint, args.adapter, resolve_device(args.device), args.precision)
    size = tuple(model.cfg.generator.size)
    rng = np.random.default_rng(args.seed)
    # Example start images: a random state in each built-in world domain (the world is square).
    side = size[0]
    starts = [render(d, random_state(d, rng, side), side) for d in DOMAINS.values()] if size == (side, side) and side >= 16 else []
    examples = [p[0] for p in ACTIONS.values()] + ([p[0] for p in HISTORY_ACTIONS.values()] if model.history_rounds != 1 else [])
    play = Play(model, starts, examples, check_history_action, args.seed, str(args.checkpoint))
    if args.terminal:
        if args.image:
            start, note = read_start_image(args.image, size, args.resize)
            if note:
                print(f"start image: {note}")
        elif starts:
            start = starts[0]
        else:
            raise PandoraError("--terminal needs --image START.png (no example start image at this frame size)")
        terminal(play, start, Path(args.out), color=not args.no_color)
        return
    server = serve(play, args.host, args.port)
    print(f"play: open http://{args.host}:{server.server_port}/ (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def _export(args) -> None:
    from pandora_lightning.training.export import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.out, args.adapter or [], args.merge, args.dtype, args.overwrite)
    manifest = json.loads((out / "export.json").read_text())
    print(f"exported {args.checkpoint} to {out} (what is where: {out / 'README.md'}, {out / 'export.json'})")
    for name, part in manifest["parts"].items():
        kind = " ".join(str(part[k]) for k in ("library", "class", "dtype") if k in part)
        print(f"  {name:<16} {part['path']}{f'  ({kind})' if kind else ''}")
    for name, components in manifest["adapters"].items():
        print(f"  LoRA {name!r:<11} " + ", ".join(components.values()) + "  (peft)")
    if manifest.get("merged_adapter"):
        print(f"  LoRA {manifest['merged_adapter']!r} merged into the weights")


def _shards_world(args) -> None:
    from pandora_lightning.world import WorldConfig
    from pandora_lightning.world.domains import PRACTICE_DOMAINS
    from pandora_lightning.world.shards import write_world
    from pandora_lightning.world.vocabulary import vocabulary_path

    cfg = WorldConfig(image_size=args.image_size, seed=args.seed, rounds=args.rounds, history=args.history,
                      held_out_rounds=args.held_out_rounds, practice=tuple(PRACTICE_DOMAINS) if args.practice else ())
    counts = {"train": args.train, "val": args.val, "transfer": args.transfer, "adapt": args.adapt,
              "phrasings": args.phrasings, "practice": args.practice}
    manifest = write_world(args.out, args.manifest, cfg, counts, samples_per_shard=args.samples_per_shard, progress=True)
    print(f"wrote {sum(s.samples for s in manifest.sets)} episodes in {sum(len(s.shards) for s in manifest.sets)} shards "
          f"under {args.out}; manifest {manifest.path}; vocabulary {vocabulary_path(args.manifest)}")


def _parse_size(text: str) -> tuple[int, int]:
    height, _, width = text.lower().partition("x")
    try:
        return int(height), int(width or height)
    except ValueError:
        raise PandoraError(f"--size must look like 32 or 320x512 (height x width), got '{text}'") from None


def _parse_bytes(text: str) -> int:
    units = {"kb": 2**10, "mb": 2**20, "gb": 2**30, "b": 1}
    lowered = text.lower().strip()
    unit = next((u for u in units if lowered.endswith(u)), "")
    try:
        return int(float(lowered.removesuffix(unit) if unit else lowered) * units.get(unit, 1))
    except ValueError:
        raise PandoraError(f"--shard-size must look like 256MB, 1GB or a byte count, got '{text}'") from None


def _shards_build(args) -> None:
    from pandora_lightning.data.tools.build import BuildSettings, build_shards

    size, frames = args.size, args.frames
    if args.recipe:
        from pandora_lightning.recipe import load_recipe

        gen = load_recipe(args.recipe).model.generator
        size, frames = size or f"{gen.height}x{gen.width}", frames or gen.frames
    settings = BuildSettings(
        frames=frames or 16, fps=args.fps, size=_parse_size(size or "32"), stride=args.stride,
        max_clips=args.max_clips, shard_bytes=_parse_bytes(args.shard_size), domain=args.domain,
    )
    summary = build_shards(args.index, args.out, settings, args.workers, args.manifest, args.name, not args.quiet)
    print(f"{summary['clips_written']} clips from {summary['rows'] - summary['rows_already_done'] - summary['errors']} videos "
          f"in {summary['seconds']} s ({summary['clips_per_s']} clips/s); {summary['rows_already_done']} videos were already "
          f"in finished shards; {summary['samples']} samples in {summary['shards']} shards under {args.out}")
    print(f"index {Path(args.out) / 'index.jsonl'}; manifest {summary['manifest']}")
    if summary["errors"]:
        from pandora_lightning.data.tools.build import cause_counts

        by_cause: dict[str, list[str]] = {}
        for failed in summary["failed"]:
            by_cause.setdefault(failed["cause"], []).append(failed["video"])
        print(f"{summary['errors']} of the {summary['rows']} videos could not be used (details in "
              f"{Path(args.out) / 'errors.jsonl'}):")
        for cause, videos in by_cause.items():
            print(f"  {cause} ({len(videos)}): {', '.join(videos[:20])}{' ...' if len(videos) > 20 else ''}")
        if not args.allow_errors:
            raise PandoraError(
                f"shards build: {summary['errors']} of {summary['rows']} videos failed ({cause_counts(summary['failed'])}); "
                f"the shards and manifest hold the others: fix the videos and run the same command again (finished "
                f"rows are kept), or pass --allow-errors to accept the build as it is"
            )


def _shards_encode(args) -> None:
    from pandora_lightning.recipe import load_recipe
    from pandora_lightning.training.precompute import run_encode

    recipe = load_recipe(args.recipe, args.overrides)
    out = args.out or str(Path(args.manifest).with_suffix("")) + "-encoded"
    summary = run_encode(args.manifest, recipe, args.recipe, out, args.out_manifest, args.device, args.dtype, not args.quiet,
                         args.split)
    record = summary["record"]
    print(f"encoded {summary['samples']} samples into {summary['shards']} shards under {out} on {summary['device']} "
          f"({record.height}x{record.width}, {record.dtype}); manifest {summary['manifest']}")
    print("encoders: " + ", ".join(f"{k} {record.folders.get(k, v)}" for k, v in record.encoders.items()))
    if record.needs_frames:
        print(f"generator family {record.family} works on pixels (no VAE): its frames are still decoded from the mp4")
    for where, why in summary["skipped"]:
        print(f"skipped corrupt sample {where}: {why}")
    print(f"train from them: data.manifest={summary['manifest']} data.precomputed=true")


def _shards_inspect(args) -> None:
    from pandora_lightning.data.tools.checks import format_table, inspect_shards

    report = inspect_shards(args.sources, args.split, args.sheet, args.samples, seed=args.seed,
                            allow_commands=args.allow_commands)
    print(format_table(report))
    print(f"{report['samples']} samples")
    for url, key, why in report["unreadable"]:
        print(f"unreadable: {url}:{key}: {why}")
    if report.get("sheet"):
        print(f"contact sheet {report['sheet']}, one row per sample:\n  " + "\n  ".join(report["sheet_keys"]))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


def _shards_verify(args) -> int:
    from pandora_lightning.data.tools.verify import has_problems, problem_lines, verify_shards

    report = verify_shards(args.sources, args.split, args.min_frames, args.workers, not args.quiet, args.allow_commands)
    print("\n".join(problem_lines(report)))
    return 1 if has_problems(report) else 0


def _demo(args) -> None:
    from pandora_lightning.world.demo import run_demo, run_seeds

    if args.seeds < 1:
        raise PandoraError(f"demo --seeds {args.seeds}: give at least 1 training seed")
    if args.quick and args.long:
        raise PandoraError("demo --quick --long: choose one (--quick checks the pipeline in a few steps, --long trains longer)")
    if args.history and args.practice:
        raise PandoraError("demo --history --practice: choose one (the practice world has no history rounds)")
    default = ("runs/demo-quick" if args.quick else "runs/demo-history" if args.history else
               "runs/demo-practice" if args.practice else "runs/demo")
    run_dir = Path(args.run_dir or default + ("-long" if args.long else ""))
    options = dict(quick=args.quick, overwrite=args.overwrite, history=args.history, long=args.long, practice=args.practice)
    if args.seeds == 1:
        run_demo(run_dir, **options)
    else:
        run_seeds(run_dir, args.seeds, **options)


def _bench(args) -> None:
    if args.only == "session":  # its own figures and file: the session costs, not the training step
        from pandora_lightning.bench.session import print_session_bench, run_session_bench

        from pandora_lightning.training.precision import resolve_device

        out = run_session_bench(args.checkpoint, rounds=args.rounds, device=resolve_device(args.device), repeats=args.repeats)
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
        print_session_bench(out)
        return
    from pandora_lightning.bench.train import run_bench

    run_bench(args.recipe, args.steps, Path(args.out),
              parts=(args.only,) if args.only else ("train", "data", "precompute", "startup", "unet"))


def _score(args) -> None:
    from pandora_lightning.evaluation.config import ScoreConfig, load_score_config
    from pandora_lightning.evaluation.score import print_scores, run_score
    from pandora_lightning.world.metrics import WORLD_METRICS

    # Lightning names checkpoints like epoch=0-step=500.ckpt, so '=' alone does not make an override;
    # with --compare, NEWNAME=PATH names an adapter.
    keys = set(ScoreConfig.__dataclass_fields__)
    overrides = [a for a in args.args if a.split("=", 1)[0] in keys
                 or ("=" in a and not a.endswith(".ckpt") and not Path(a).exists()
                     and not (args.compare and Path(a.split("=", 1)[1]).exists()))]
    checkpoints = [a for a in args.args if a not in overrides]
    adapters = checkpoints[1:] if args.compare else []
    if args.compare and not adapters:
        raise PandoraError("score --compare takes the base checkpoint, then one or more adapters (NAME or folder)")
    if len(checkpoints) > 1 and not args.compare:
        raise PandoraError(f"score takes one checkpoint, got {checkpoints} (before/after an adapter: score --compare BASE ADAPTER)")
    flags = ("manifest", "splits", "per_domain", "batch_size", "seed", "fvd_detector", "fvd_feature_dim", "clip_model", "out",
             "save_videos", "num_inference_steps", "allow_commands", "adapter", "device", "precision")
    values = {k: getattr(args, k) for k in flags if getattr(args, k) is not None}
    if checkpoints:
        values["checkpoint"] = checkpoints[0]
    cfg = load_score_config(args.recipe, overrides, values)
    if args.compare:
        from pandora_lightning.evaluation.compare import print_compare, run_compare

        print_compare(run_compare(cfg, adapters, plugins=[WORLD_METRICS]))
    else:
        print_scores(run_score(cfg, plugins=[WORLD_METRICS]))


ALLOW_COMMANDS_HELP = ("read pipe: and URL shard sources: they RUN COMMANDS (pipe: a shell command, URLs curl and the "
                       "like); only for manifests you trust")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pandora-lightning", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (allowed anywhere)")
    verbs = parser.add_subparsers(dest="verb", required=True)

    p = verbs.add_parser("fit", help="train one stage from a recipe")
    p.add_argument("recipe", help="recipes/<scale>/<stage>.yaml")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. trainer.max_steps=50")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in the run folder (its "
                   "checkpoints, logs, recipe and scores are deleted); without it a used run folder is refused")
    p.set_defaults(run=_fit)

    p = verbs.add_parser("generate", help="roll a checkpoint out from a start image, one action per round")
    p.add_argument("checkpoint")
    p.add_argument("--image", required=True, help="start frame (PNG/JPEG) at the model's image size")
    p.add_argument("--actions", nargs="+", help='one action per round, e.g. "move left" "grow" "again"')
    p.add_argument("--actions-file", help="one action per round: .txt (a line each), .json or .yaml (a list)")
    p.add_argument("--resize", action="store_true", help="scale a start image of another size (centre crop) instead of refusing it")
    p.add_argument("--out", default="runs/generate")
    p.add_argument("--adapter", help="run a LoRA adapter on the checkpoint: an adapter folder, or an adapt run's name "
                                      "(runs/<name>/adapt/NAME beside the checkpoint's run)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=int, default=4, help="nearest-neighbour upscale of the written video")
    p.add_argument("--device", help="cpu, cuda, cuda:N (default: a GPU when there is one)")
    p.add_argument("--precision", help="32-true, bf16-mixed, 16-mixed, bf16-true (default: the checkpoint's training precision)")
    p.set_defaults(run=_generate)

    p = verbs.add_parser("play", help="steer a checkpoint round by round in a local web page (or --terminal)")
    p.add_argument("checkpoint")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0 = any free port")
    p.add_argument("--seed", type=int, default=0, help="noise seed of new sessions (the page can change it)")
    p.add_argument("--adapter", help="run a LoRA adapter on the checkpoint: an adapter folder, or an adapt run's name "
                                      "(runs/<name>/adapt/NAME beside the checkpoint's run)")
    p.add_argument("--device", help="cpu, cuda, cuda:N (default: a GPU when there is one)")
    p.add_argument("--precision", help="32-true, bf16-mixed, 16-mixed, bf16-true (default: the checkpoint's training precision)")
    p.add_argument("--terminal", action="store_true", help="play in the terminal instead: type actions, :fork K, :save, :quit")
    p.add_argument("--image", help="terminal mode: the start image (default: an example world frame)")
    p.add_argument("--resize", action="store_true", help="terminal mode: scale a start image of another size")
    p.add_argument("--out", default="runs/play", help="terminal mode: where :save writes the episode")
    p.add_argument("--no-color", action="store_true", help="terminal mode: do not draw frames with ANSI colours")
    p.set_defaults(run=_play)

    p = verbs.add_parser("export", help="write a checkpoint as folders that plain transformers / diffusers / peft open")
    p.add_argument("checkpoint")
    p.add_argument("out", help="the export folder (new or empty; --overwrite replaces an earlier export)")
    p.add_argument("--adapter", action="append", help="a LoRA adapter trained on this checkpoint (a folder, or an adapt run's "
                                                      "name); repeatable")
    p.add_argument("--merge", action="store_true", help="fold the LoRA into the base weights (peft's merge) instead of "
                                                       "writing peft adapter folders")
    p.add_argument("--dtype", default="auto", help="auto (each part as its pretrained folder stores it; float32 where "
                                                   "training or a merge changed it), float32, bfloat16 or float16")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export in the folder")
    p.set_defaults(run=_export)

    p = verbs.add_parser("shards", help="write WebDataset shards")
    kinds = p.add_subparsers(dest="kind", required=True)
    w = kinds.add_parser("world", help="episodes of the built-in procedural world, plus their manifest")
    w.add_argument("--out", default="data/world")
    w.add_argument("--manifest", default="data_manifests/world.yaml")
    w.add_argument("--train", type=int, default=512, help="train episodes per domain")
    w.add_argument("--val", type=int, default=32, help="held-out start states per domain")
    w.add_argument("--transfer", type=int, default=32, help="transfer-split episodes")
    w.add_argument("--adapt", type=int, default=48, help="adaptation-split episodes (the transfer domain, all its actions)")
    w.add_argument("--phrasings", type=int, default=8, help="held-out start states steered by held-out phrasings, per domain")
    w.add_argument("--held-out-rounds", type=int, default=8, help="rounds of every held-out episode (train: 3)")
    w.add_argument("--practice", type=int, default=0,
                   help="train episodes per practice domain (training-only backgrounds, shapes and speeds; 0 = none)")
    w.add_argument("--samples-per-shard", type=int, default=128)
    w.add_argument("--image-size", type=int, default=32)
    w.add_argument("--rounds", type=int, default=3, help="action rounds per episode")
    w.add_argument("--history", type=float, default=0.0,
                   help="share of later rounds said as 'again' / 'go back' (actions that refer to the previous round)")
    w.add_argument("--seed", type=int, default=0)
    w.set_defaults(run=_shards_world)

    b = kinds.add_parser("build", help="cut, resize and re-encode a folder of videos (JSONL/CSV index) into shards")
    b.add_argument("index", help="JSONL or CSV: video, caption, actions, domain, split, start, end, key")
    b.add_argument("--out", required=True, help="folder for the shards, index.jsonl, errors.jsonl and build.json")
    b.add_argument("--manifest", help="manifest to write (default <out>/manifest.yaml)")
    b.add_argument("--name", help="manifest name (default: the out folder's name)")
    b.add_argument("--recipe", help="take --size and --frames from this recipe's generator")
    b.add_argument("--size", help="clip size, 32 or HxW like 320x512 (default 32)")
    b.add_argument("--frames", type=int, help="frames per clip (default 16)")
    b.add_argument("--fps", type=float, default=8.0)
    b.add_argument("--stride", type=int, default=0, help="frames between clip starts (default: clips back to back)")
    b.add_argument("--max-clips", type=int, default=0, help="clips per video at most (0: all)")
    b.add_argument("--shard-size", default="256MB", help="target shard size, e.g. 256MB")
    b.add_argument("--domain", default="default", help="domain of rows that name none")
    b.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 1)), help="processes cutting videos")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    b.add_argument("--allow-errors", action="store_true", help="exit 0 even when some videos could not be used")
    b.set_defaults(run=_shards_build)

    e = kinds.add_parser("encode", help="add the recipe's frozen encoders' outputs (VAE latents, vision features, teacher "
                                        "text embeddings) to copies of a manifest's shards, for data.precomputed=true")
    e.add_argument("manifest", help="the manifest of the raw shards")
    e.add_argument("--recipe", required=True, help="the recipe whose encoders (and frame size) to use")
    e.add_argument("overrides", nargs="*", help="key=value recipe overrides")
    e.add_argument("--out", help="folder for the encoded shards (default: <manifest>-encoded)")
    e.add_argument("--out-manifest", help="manifest to write (default <out>/manifest.yaml)")
    e.add_argument("--device", help="cpu, cuda, cuda:N (default: a GPU when there is one)")
    e.add_argument("--dtype", default="float32", help="float32 (default), float16 or bfloat16: the stored tensors")
    e.add_argument("--split", action="append", help="only this split (repeatable; default: all of them)")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    e.set_defaults(run=_shards_encode)

    i = kinds.add_parser("inspect", help="counts, durations and domains of shards, and a contact sheet of random samples")
    i.add_argument("sources", nargs="+", help="a manifest .yaml, a folder of .tar shards, or shard files")
    i.add_argument("--split", help="only this split of a manifest")
    i.add_argument("--sheet", help="write a contact sheet PNG of random samples here")
    i.add_argument("--samples", type=int, default=8, help="samples on the contact sheet")
    i.add_argument("--seed", type=int, default=0)
    i.add_argument("--json", help="also write the report as JSON")
    i.add_argument("--allow-commands", action="store_true", help=ALLOW_COMMANDS_HELP)
    i.set_defaults(run=_shards_inspect)

    v = kinds.add_parser("verify", help="decode every sample and reconcile with index.jsonl and the manifest; list "
                                        "corrupt and lost samples by key (exit status 1 if any)")
    v.add_argument("sources", nargs="+", help="a manifest .yaml, a folder of .tar shards, or shard files")
    v.add_argument("--split", help="only this split of a manifest")
    v.add_argument("--min-frames", type=int, default=1, help="a clip with fewer frames is corrupt")
    v.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 1)))
    v.add_argument("--quiet", action="store_true", help="no progress bar")
    v.add_argument("--allow-commands", action="store_true", help=ALLOW_COMMANDS_HELP)
    v.set_defaults(run=_shards_verify)

    p = verbs.add_parser("demo", help="world shards -> align -> instruct -> multi-round rollouts + accuracy")
    p.add_argument("--run-dir", help="default runs/demo (runs/demo-quick with --quick, runs/demo-history with --history, -long added with --long)")
    p.add_argument("--quick", action="store_true", help="a few steps only, to check the pipeline")
    p.add_argument("--long", action="store_true",
                   help="align 2x and instruct 4x the recipes' steps (about 27 minutes here): the world benchmark's in-domain bars")
    p.add_argument("--history", action="store_true",
                   help="the history demo: 'again' / 'go back' actions, an LLM that reads earlier rounds (recipes/tiny-history)")
    p.add_argument("--practice", action="store_true",
                   help="the transfer demo: the history demo's model (recipes/tiny-history, 3-round windows) trained "
                        "beside the world's practice domains, the instruct stage on recoloured clips too (data.recolor), then "
                        "a polish stage on the scored domains alone (its own drafts given to later rounds, its weights averaged)")
    p.add_argument("--seeds", type=int, default=1, help="train with seeds 0..N-1 and report each and their spread")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier demo in the run folder")
    p.set_defaults(run=_demo)

    p = verbs.add_parser("bench", help="Lightning step vs a plain PyTorch loop; shard vs per-file loaders; shards build speed")
    p.add_argument("--recipe", default="recipes/tiny/instruct.yaml")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--out", default="bench.json")
    p.add_argument("--only", choices=["train", "data", "session", "precompute", "startup", "unet"],
                   help="only the training-step or only the data-path figures; session: per-round cost with and without the "
                        "cache; precompute: a step from precomputed inputs vs from frames; startup: host memory per rank of "
                        "an fsdp2 start-up, whole model per rank vs own shards (parallel.meta_init); unet: a training step of the "
                        "tiny generator's 2d UNet vs the spatio-temporal one")
    p.add_argument("--checkpoint", help="--only session: a checkpoint to time (default: a tiny random model with history)")
    p.add_argument("--rounds", type=int, default=16, help="--only session: rounds per session")
    p.add_argument("--repeats", type=int, default=3, help="--only session: sessions per figure (per-round medians)")
    p.add_argument("--device", default="cpu", help="--only session: cpu, cuda, cuda:N, auto")
    p.set_defaults(run=_bench)

    p = verbs.add_parser("score", help="roll a checkpoint out on held-out samples; write scores.json, scores.md, plots")
    p.add_argument("args", nargs="*", metavar="CHECKPOINT | key=value", help="the checkpoint, then score-recipe overrides")
    p.add_argument("--recipe", help="a score recipe, e.g. recipes/tiny/score.yaml")
    p.add_argument("--manifest", help="data manifest (default: the one the checkpoint was trained on)")
    p.add_argument("--split", dest="splits", action="append", help="split to score (repeatable; default: every non-train split)")
    p.add_argument("--per-domain", type=int, help="episodes per domain and split (0 = all; default 16)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--fvd-detector", help="TorchScript I3D file; FVD is skipped without it")
    p.add_argument("--fvd-feature-dim", type=int, help="features the detector gives per clip (I3D: 400)")
    p.add_argument("--clip-model", help="local CLIP directory (save_pretrained); clip_score is skipped without it")
    p.add_argument("--out", help="output folder (default <run folder>/scores/<checkpoint name>)")
    p.add_argument("--save-videos", action="store_true", default=None, help="also write an mp4 per rollout")
    p.add_argument("--num-inference-steps", type=int, help="sampler steps per round (default: the checkpoint's)")
    p.add_argument("--device", help="cpu, cuda, cuda:N (default: a GPU when there is one)")
    p.add_argument("--precision", help="32-true, bf16-mixed, 16-mixed, bf16-true (default: the checkpoint's training precision)")
    p.add_argument("--allow-commands", action="store_true", default=None, help=ALLOW_COMMANDS_HELP)
    p.add_argument("--adapter", help="run a LoRA adapter on the checkpoint (a folder, or an adapt run's name)")
    p.add_argument("--compare", action="store_true",
                   help="CHECKPOINT ADAPTER [ADAPTER ...]: the base and each adapter on the same episodes, one before/after table")
    p.set_defaults(run=_score)
    add_scale_verbs(verbs)
    return parser


class _Parser(argparse.ArgumentParser):
    """Usage mistakes are one line too (argparse prints the whole usage first)."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def one_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    if isinstance(err, OSError) and err.strerror:
        return f"{err.strerror}: {err.filename}" if err.filename else err.strerror
    text = lines[0] if lines else type(err).__name__
    return text + (" ..." if len(lines) > 1 else "")


def main(argv: list[str] | None = None) -> int:
    """Run one verb. Every error ends in one line on stderr (exit status 2; 3 for an unexpected one,
    which may be a bug); `--debug` anywhere on the command line shows the traceback instead."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or bool(os.environ.get("PANDORA_DEBUG"))
    args = build_parser().parse_args([a for a in argv if a != "--debug"])
    # Lightning configures its own loggers; this only makes the project's warnings visible.
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.getLogger("pandora_lightning").addHandler(handler)
    logging.getLogger("pandora_lightning").setLevel(logging.INFO)
    try:
        return args.run(args) or 0
    except KeyboardInterrupt:
        if debug:
            raise
        print("error: interrupted", file=sys.stderr)
        return 130
    except (PandoraError, OSError) as err:
        if debug:
            raise
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001 - the last line of defence: one line, the traceback on --debug
        if debug:
            raise
        print(f"error: {type(err).__name__}: {one_line(err)} (unexpected; rerun with --debug for the traceback)",
              file=sys.stderr)
        return 3
