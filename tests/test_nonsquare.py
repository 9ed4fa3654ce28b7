"""Non-square frames end to end: `shards build` at 24x40, `fit`, `generate` and `score` on them."""
import json

import numpy as np
import pytest
from PIL import Image

from pandora_lightning.cli import main
from pandora_lightning.errors import PandoraError
from pandora_lightning.models.generator import GeneratorConfig
from pandora_lightning.data.video import write_mp4
from pandora_lightning.world import WorldConfig, sample_episode

FPS, HEIGHT, WIDTH = 8, 24, 40


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """World episodes as 32x32 source videos, built into 24x40 shards (train and val)."""
    root = tmp_path_factory.mktemp("videos")
    rng = np.random.default_rng(1)
    rows = []
    for i in range(6):
        domain = ("meadow", "space")[i % 2]
        ep = sample_episode(WorldConfig(), domain, rng)
        write_mp4(root / f"clip{i}.mp4", ep.frames, fps=FPS)
        rows.append({"video": f"clip{i}.mp4", "caption": ep.caption, "domain": domain, "split": "val" if i >= 4 else "train",
                     "actions": [{"text": a["text"], "start": a["start"] / FPS, "end": a["end"] / FPS} for a in ep.actions]})
    (root / "index.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path_factory.mktemp("shards")
    manifest = out / "clips.yaml"
    assert main(["shards", "build", str(root / "index.jsonl"), "--out", str(out / "data"), "--size", f"{HEIGHT}x{WIDTH}",
                 "--frames", "14", "--fps", str(FPS), "--workers", "1", "--manifest", str(manifest), "--quiet"]) == 0
    return manifest


def test_fit_generate_and_score_at_24x40(shards, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["fit", "recipes/tiny/instruct.yaml", f"data.manifest={shards}", f"run_dir={run}", "init_from=null",
                 "data.batch_size=2", "data.num_workers=0", "data.shuffle_buffer=4", "trainer.max_steps=2",
                 "trainer.progress_bar=false", f"model.generator.height={HEIGHT}", f"model.generator.width={WIDTH}",
                 "model.generator.num_inference_steps=2"]) == 0, capsys.readouterr().err
    ckpt = run / "checkpoints" / "final.safetensors"

    Image.fromarray(np.full((HEIGHT, WIDTH, 3), 90, np.uint8)).save(tmp_path / "start.png")
    assert main(["generate", str(ckpt), "--image", str(tmp_path / "start.png"), "--actions", "move left", "grow",
                 "--out", str(tmp_path / "gen"), "--scale", "1"]) == 0
    sheet = np.asarray(Image.open(tmp_path / "gen" / "rollout.png"))
    # 2 rounds of 2 given + 4 new frames, 24 x 40 each with 2-px gaps
    assert sheet.shape == (2 + 2 * (HEIGHT + 2), 2 + 6 * (WIDTH + 2), 3)
    assert (sheet[2 : 2 + HEIGHT, 2 : 2 + WIDTH] == 90).all()

    Image.fromarray(np.zeros((WIDTH, HEIGHT, 3), np.uint8)).save(tmp_path / "turned.png")
    assert main(["generate", str(ckpt), "--image", str(tmp_path / "turned.png"), "--actions", "grow"]) == 2
    assert "is 40x24 but the model generates 24x40 frames (height x width)" in capsys.readouterr().err

    assert main(["score", str(ckpt), "--manifest", str(shards), "--split", "val", "--num-inference-steps", "1",
                 "--out", str(tmp_path / "scores")]) == 0, capsys.readouterr().err
    scores = json.loads((tmp_path / "scores" / "scores.json").read_text())
    val = scores["splits"]["val"]
    assert val["episodes"] == 2 and {"psnr", "ssim"} <= set(val["metrics"])


@pytest.mark.parametrize("size, multiple", [((24, 42), 4), ((30, 40), 4)])
def test_sizes_the_unet_cannot_take_name_the_multiple(size, multiple):
    with pytest.raises(PandoraError, match=f"{size[0]}x{size[1]}: both must be multiples of {multiple}"):
        GeneratorConfig(height=size[0], width=size[1])
