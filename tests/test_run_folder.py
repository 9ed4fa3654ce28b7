"""Run folders are never overwritten silently, never shared, and resumes keep the whole log; every
error a user can cause through the command line is one line."""
import json
import os
import shutil
import socket
import subprocess

import pytest

from pandora_lightning.cli import main
from pandora_lightning.errors import PandoraError
from pandora_lightning.training.fit import fit
from pandora_lightning.training.run_folder import claim_run_folder
from tests.conftest import RECIPES, tiny_recipe


def test_a_second_fit_into_a_finished_run_folder_is_refused(align_checkpoint, world_manifest, tmp_path):
    run_dir = align_checkpoint.parent.parent
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}
    with pytest.raises(PandoraError, match=f"run folder {run_dir} already holds a run .*--overwrite"):
        fit(tiny_recipe("align", world_manifest, run_dir))
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()} == before  # nothing touched
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    (copy / "notes.txt").write_text("mine")
    final = fit(tiny_recipe("align", world_manifest, copy, "trainer.max_steps=1"), overwrite=True)
    assert final.is_file() and (copy / "notes.txt").read_text() == "mine"  # only the run's own files are replaced
    assert len((copy / "logs" / "metrics.csv").read_text().splitlines()) == 2  # header + step 0: the old log is gone


def test_a_lock_stops_a_second_run_and_a_dead_runs_lock_is_taken_over(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": "now"}))
    with pytest.raises(PandoraError, match=f"run folder {run_dir} is in use by another run .pid {os.getpid()}"):
        claim_run_folder(run_dir, None, False)
    gone = subprocess.Popen(["true"])
    gone.wait()
    (run_dir / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": gone.pid, "started": "then"}))
    lock = claim_run_folder(run_dir, None, False)
    assert json.loads((run_dir / ".lock").read_text())["pid"] == os.getpid()
    lock.release()
    assert not (run_dir / ".lock").exists()


def test_resume_from_last_with_nothing_to_resume_is_an_error(world_manifest, tmp_path):
    with pytest.raises(PandoraError, match="trainer.resume_from=last, but .* holds no last.ckpt"):
        fit(tiny_recipe("align", world_manifest, tmp_path / "new", "trainer.resume_from=last"))
    assert not (tmp_path / "new").exists()


BAD_INPUTS = {
    "recipe-is-a-png": (["fit", "{tmp}/r.png"], 2, "is not a YAML text file"),
    "recipe-is-a-list": (["fit", "{tmp}/list.yaml"], 2, "holds a YAML list, not a mapping"),
    "max-steps-minus-one": (["fit", "{recipes}/tiny/align.yaml", "trainer.max_steps=-1"], 2, "trainer.max_steps=-1 must be >= 1"),
    "fsdp-on-cpu": (["fit", "{recipes}/tiny/align.yaml", "data.manifest={manifest}", "run_dir={tmp}/fsdp",
                     "trainer.strategy=fsdp", "trainer.accelerator=cpu"], 2, "trainer: "),
    "resume-last-with-nothing": (["fit", "{recipes}/tiny/align.yaml", "data.manifest={manifest}", "run_dir={tmp}/none",
                                  "trainer.resume_from=last"], 2, "holds no last.ckpt"),
    "unknown-recipe-key": (["fit", "{recipes}/tiny/align.yaml", "trainer.max_stepz=3"], 2, "did you mean max_steps"),
    "generate-scale-0": (["generate", "{tmp}/none.ckpt", "--image", "{tmp}/r.png", "--actions", "go", "--scale", "0"], 2,
                         "--scale 0"),
    "generate-image-not-an-image": (["generate", "{tmp}/none.ckpt", "--image", "{tmp}/list.yaml", "--actions", "go"], 2,
                                    "cannot be read"),
    "generate-missing-checkpoint": (["generate", "{tmp}/none.ckpt", "--image", "{tmp}/img.png", "--actions", "go"], 2,
                                    "does not exist"),
    "score-missing-checkpoint": (["score", "{tmp}/none.ckpt", "--manifest", "{manifest}"], 2, "does not exist"),
    "verify-nothing-there": (["shards", "verify", "{tmp}/nothing"], 2, "no shards found"),
    "verify-pipe-without-opt-in": (["shards", "verify", "pipe:cat x.tar"], 2, "--allow-commands"),
    "unknown-verb": (["frobnicate"], 2, "invalid choice"),
    "bad-flag-value": (["shards", "world", "--train", "many"], 2, "invalid int value"),
}


@pytest.mark.parametrize("case", BAD_INPUTS, ids=BAD_INPUTS.keys())
def test_every_cli_error_is_one_line(case, tmp_path, world_manifest, capsys):
    from PIL import Image

    (tmp_path / "r.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00 not really")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    Image.new("RGB", (32, 32)).save(tmp_path / "img.png")
    argv, code, message = BAD_INPUTS[case]
    argv = [a.format(tmp=tmp_path, recipes=RECIPES, manifest=world_manifest) for a in argv]
    with pytest.raises(SystemExit) if case in ("unknown-verb", "bad-flag-value") else _nothing() as exit_info:
        rc = main(argv)
    rc = exit_info.value.code if exit_info else rc
    err = capsys.readouterr().err.strip().splitlines()
    print(f"| `pandora-lightning {' '.join(argv)}` | {rc} | {err[-1] if err else ''} |")
    assert rc == code and len([line for line in err if line.startswith("error:")]) == 1 and message in err[-1]
    assert "Traceback" not in "\n".join(err)


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def test_debug_shows_the_traceback(tmp_path):
    (tmp_path / "list.yaml").write_text("- a\n")
    with pytest.raises(PandoraError, match="holds a YAML list"):
        main(["fit", str(tmp_path / "list.yaml"), "--debug"])
