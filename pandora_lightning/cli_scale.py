"""The scale-out verbs of `pandora-lightning`: consolidate, slurm, plan (added to the parser in cli.py)."""
from __future__ import annotations

import sys
from pathlib import Path


def _consolidate(args) -> None:
    from pandora_lightning.training.sharded import consolidate

    print(f"wrote {consolidate(args.checkpoint, args.out)}")


def _slurm(args) -> None:
    from pandora_lightning.recipe import load_recipe
    from pandora_lightning.training.cluster import SlurmJob, sbatch_script, submit

    recipe = load_recipe(args.recipe, args.overrides)  # refuses a bad recipe now, not on the cluster
    job = SlurmJob(args.recipe, args.nodes, args.gpus_per_node, args.time, tuple(args.overrides), args.partition,
                   args.account, args.job_name, args.cpus_per_task, args.mem, args.setup or "")
    script = sbatch_script(job, recipe.run_dir, args.python or sys.executable)
    out = Path(args.out or Path(recipe.run_dir) / "slurm" / "job.sbatch")
    out.parent.mkdir(parents=True, exist_ok=True)
    (Path(recipe.run_dir) / "slurm").mkdir(parents=True, exist_ok=True)  # SLURM does not create log folders
    out.write_text(script)
    print(script)
    print(f"# written to {out}")
    if args.submit:
        print(submit(out))


def _plan(args) -> None:
    from pandora_lightning.recipe import load_recipe
    from pandora_lightning.training.plan import format_plan, make_plan

    plan = make_plan(load_recipe(args.recipe, args.overrides), args.gpus, args.gpu_memory, args.batch_size)
    print(format_plan(plan))


def add_verbs(verbs) -> None:
    p = verbs.add_parser("consolidate", help="sharded (fsdp2) checkpoint folder -> the model file that score/generate/export read")
    p.add_argument("checkpoint", help="a checkpoint folder, e.g. runs/x/instruct/checkpoints/last.ckpt")
    p.add_argument("--out", help="file to write (default <name>.safetensors beside the folder)")
    p.set_defaults(run=_consolidate)

    p = verbs.add_parser("slurm", help="write (and submit) an sbatch script that runs a recipe on N nodes x G GPUs")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="key=value recipe overrides for the job")
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--gpus-per-node", type=int, required=True)
    p.add_argument("--time", required=True, help="wall-clock limit, e.g. 24:00:00 (the job requeues itself at the limit)")
    p.add_argument("--partition")
    p.add_argument("--account")
    p.add_argument("--job-name")
    p.add_argument("--cpus-per-task", type=int, default=8, help="CPU cores per GPU task (data-loader workers)")
    p.add_argument("--mem", help="memory per node, e.g. 0 (all) or 480G")
    p.add_argument("--setup", help='shell line run before srun, e.g. "source .venv/bin/activate"')
    p.add_argument("--python", help="python on the compute nodes (default: this one)")
    p.add_argument("--out", help="script path (default <run folder>/slurm/job.sbatch)")
    p.add_argument("--submit", action="store_true", help="sbatch the script")
    p.set_defaults(run=_slurm)

    p = verbs.add_parser("plan", help="parameters per component and peak memory per GPU for ddp/fsdp2, measured on meta")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--gpus", type=int, required=True, help="GPUs in the job (all nodes)")
    p.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU")
    p.add_argument("--batch-size", type=int, help="per-GPU batch (default: the recipe's data.batch_size)")
    p.set_defaults(run=_plan)
