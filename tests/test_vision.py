"""Vision preprocessing as the folder's image processor does it, and tokens pooled to an aspect-keeping grid."""
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, SiglipImageProcessor

from pandora_lightning.data.frames import from_numpy
from pandora_lightning.errors import PandoraError
from pandora_lightning.models.input_adapter import InputAdapter, InputAdapterConfig, pooled_grid
from pandora_lightning.models.vision_encoder import ImageProcessing, VisionEncoder, VisionEncoderConfig


@pytest.mark.parametrize("processor, family", [(CLIPImageProcessor(), "clip"), (SiglipImageProcessor(), "siglip")])
def test_preprocessing_matches_the_folders_image_processor(tmp_path, processor, family):
    processor.save_pretrained(tmp_path)
    rng = np.random.default_rng(0)
    image = np.asarray(Image.fromarray((rng.random((6, 10, 3)) * 255).astype(np.uint8)).resize((400, 240), Image.BICUBIC))
    expected = torch.from_numpy(np.asarray(processor(images=Image.fromarray(image), return_tensors="np")["pixel_values"]))
    ours = ImageProcessing.from_folder(tmp_path, 224, family)(from_numpy(image)[None])
    assert ours.shape == expected.shape == (1, 3, 224, 224)
    # PIL resizes in uint8, torch in float: the same image up to rounding
    assert (ours - expected).abs().mean() < 0.01


def test_non_square_frames_keep_their_aspect_when_asked(tmp_path):
    CLIPVisionModel(CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64)).save_pretrained(tmp_path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    frames = torch.rand(2, 3, 24, 40) * 2 - 1
    cropped = VisionEncoder(VisionEncoderConfig(pretrained=str(tmp_path)))
    assert cropped(frames).shape == (2, 4, 4, 32), "CLIP's processor: shortest edge 32, centre crop 32x32"
    whole = VisionEncoder(VisionEncoderConfig(pretrained=str(tmp_path), crop=False))
    assert whole.grid(24, 40) == (4, 6) and whole(frames).shape == (2, 4, 6, 32), "32x53: a 4x6 grid"


@pytest.mark.parametrize("tokens, grid, expected", [(112, (16, 16), (8, 14)), (112, (16, 25), (8, 14)), (4, (4, 4), (2, 2)),
                                                    (6, (4, 6), (2, 3)), (6, (6, 4), (3, 2)), (1, (3, 5), (1, 1))])
def test_tokens_per_frame_pool_to_the_grid_closest_to_the_aspect(tokens, grid, expected):
    assert pooled_grid(tokens, grid) == expected


def test_input_adapter_takes_any_token_count():
    adapter = InputAdapter(InputAdapterConfig(tokens_per_frame=6), 8, 16)
    assert adapter(torch.randn(2, 3, 4, 6, 8)).shape == (2, 18, 16)
    with pytest.raises(PandoraError, match="tokens_per_frame=7 cannot be pooled from a 4x6 patch grid"):
        InputAdapter(InputAdapterConfig(tokens_per_frame=7), 8, 16)(torch.randn(1, 1, 4, 6, 8))
