"""Checks shared by every component that reads pretrained weights from a local directory."""
from __future__ import annotations

from pathlib import Path


def local_dir(path: str, what: str, must_contain: str = "config.json") -> Path:
    """Return `path` as a directory holding `must_contain`, or raise a clear error.

    Nothing is ever fetched from a hub: a value that is not an existing local directory
    (for example a hub id such as "openai/clip-vit-large-patch14") is rejected here.
    """
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{what}: pretrained path '{path}' is not a local directory. Download the weights "
            f"beforehand and point the recipe at the folder (no hub access at run time), "
            f"or set it to null to build the tiny random config."
        )
    if not (folder / must_contain).is_file():
        raise FileNotFoundError(
            f"{what}: '{folder}' has no {must_contain}; expected a folder written by "
            f"save_pretrained() in the transformers/diffusers format."
        )
    return folder
