"""The console script: generate, error messages, held-out iteration (scoring is in test_score.py)."""
import numpy as np
import pytest
import torch
from PIL import Image

from pandora_lightning.cli import main
from pandora_lightning.data.dataset import iterate_split
from pandora_lightning.data.manifest import load_manifest


def test_generate_writes_video_and_contact_sheet(align_checkpoint, tmp_path, capsys):
    Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(tmp_path / "start.png")
    code = main(["generate", str(align_checkpoint), "--image", str(tmp_path / "start.png"),
                 "--actions", "move left", "grow", "--out", str(tmp_path / "out")])
    assert code == 0
    sheet = np.asarray(Image.open(tmp_path / "out" / "rollout.png"))
    # One row per round, each its 2 given + 4 new frames, upscaled 4x with 2-px gaps.
    assert sheet.shape == (2 + 2 * (128 + 2), 2 + 6 * (128 + 2), 3)
    first = sheet[2:130, 2:130]
    assert (first == 90).all(), "round 1 starts from the given image"
    assert (tmp_path / "out" / "rollout.mp4").stat().st_size > 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["--actions", " "], "round 1 (' '): the action is empty"),
        (["--actions", "move left", "--image", "{big}"], "is 48x48 but the model generates 32x32"),
        (["--actions", "move left", "again"], "round 2 ('again'): 'again' refers to an earlier round, but this checkpoint was trained without history"),
        (["--actions-file", "{missing}"], "does not exist"),
        ([], "either as --actions"),
    ],
)
def test_generate_bad_input(align_checkpoint, tmp_path, capsys, args, message):
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "start.png")
    Image.fromarray(np.zeros((48, 48, 3), np.uint8)).save(tmp_path / "big.png")
    args = [a.replace("{big}", str(tmp_path / "big.png")).replace("{missing}", str(tmp_path / "no.txt")) for a in args]
    if "--image" not in args:
        args += ["--image", str(tmp_path / "start.png")]
    assert main(["generate", str(align_checkpoint), *args]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("name, text", [
    ("a.txt", "# one per line\nmove left\n\ngrow\n"),
    ("a.json", '["move left", "grow"]'),
    ("a.yaml", "actions:\n  - move left\n  - grow\n"),
])
def test_generate_reads_an_actions_file_and_resizes_on_request(align_checkpoint, tmp_path, name, text):
    (tmp_path / name).write_text(text)
    Image.new("RGBA", (64, 40), (90, 90, 90, 255)).save(tmp_path / "start.png")
    assert main(["generate", str(align_checkpoint), "--image", str(tmp_path / "start.png"), "--resize",
                 "--actions-file", str(tmp_path / name), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "actions.txt").read_text().split("\n")[:2] == ["move left", "grow"]


def test_fit_with_unknown_key_exits_with_message(capsys):
    assert main(["fit", "recipes/tiny/align.yaml", "optim.learning_rate=1"]) == 2
    assert "unknown key 'optim.learning_rate' (valid keys here: lr, weight_decay, warmup_steps, schedule, min_lr_ratio)" in capsys.readouterr().err


def test_iterate_split_limits_each_domain(world_manifest):
    keys = [key for key, _, _ in iterate_split(load_manifest(world_manifest), "val", per_domain=1)]
    assert len(keys) == 4 and len({k.split("-")[1] for k in keys}) == 4


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_generate_on_a_device_in_a_precision(align_checkpoint, tmp_path, precision):
    from pandora_lightning.inference.generate import load_model

    Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(tmp_path / "start.png")
    common = ["--image", str(tmp_path / "start.png"), "--actions", "move left", "grow"]
    assert main(["generate", str(align_checkpoint), *common, "--out", str(tmp_path / "default")]) == 0
    assert main(["generate", str(align_checkpoint), *common, "--device", "cpu", "--precision", precision,
                 "--out", str(tmp_path / precision)]) == 0
    sheets = [np.asarray(Image.open(tmp_path / k / "rollout.png")).astype(int) for k in ("default", precision)]
    model = load_model(align_checkpoint, device="cpu", precision=precision)
    assert model.precision == precision
    frozen = model.vision.tower.embeddings.patch_embedding.weight
    trained = model.input_adapter.proj[0].weight
    assert (frozen.dtype, trained.dtype) == ({"32-true": torch.float32, "bf16-mixed": torch.bfloat16}[precision], torch.float32)
    diff = np.abs(sheets[0] - sheets[1])
    print(f"{precision} vs the checkpoint's own 32-true: max {diff.max()}, mean {diff.mean():.3f} (0..255)")
    if precision == "32-true":  # the checkpoint's own precision: the same rollout
        assert diff.max() == 0
    else:  # bf16 compute: the same picture to within rounding
        assert diff.mean() < 8


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--device", "gpu9"], "device 'gpu9' is not a device torch knows"),
        (["--device", "cuda:7"], "device 'cuda:7': "),
        (["--precision", "bf17-mixed"], "precision 'bf17-mixed' is unknown; use one of 32-true"),
    ],
)
def test_generate_bad_device_or_precision_is_one_line(align_checkpoint, tmp_path, capsys, flags, message):
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "start.png")
    args = ["generate", str(align_checkpoint), "--image", str(tmp_path / "start.png"), "--actions", "move left", *flags]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
