"""Images to classify, as float32 (N, C, H, W) in [0, 1], checked against the model's (C, H, W) before anything
runs: an `.npy` array (uint8 0..255 or float in [0, 1]; (N, C, H, W), or (N, H, W) for one channel) or a folder of
PNG/JPEG images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from kiln.core.errors import InputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class UnreadableInput(InputError):
    """The input is missing, empty, or a file that cannot be read as an array or image."""


class ShapeMismatch(InputError):
    """The images' size or channel count differs from the model's input."""


def _as_pixels(array: np.ndarray, source: Path) -> np.ndarray:
    """uint8 0..255 or float 0..1 -> float32 in [0, 1]."""
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    if not np.issubdtype(array.dtype, np.floating):
        raise UnreadableInput(f"{source}: dtype {array.dtype}; expected uint8 (0..255) or float in [0, 1]")
    if not (np.isfinite(array).all() and array.min() >= 0 and array.max() <= 1):
        raise UnreadableInput(f"{source}: float pixels must lie in [0, 1] (got {array.min()}..{array.max()})")
    return array.astype(np.float32)


def read_array(path: Path, chw: tuple[int, int, int]) -> np.ndarray:
    """An `.npy` array as float32 (N, C, H, W), checked against the model's (C, H, W)."""
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise UnreadableInput(f"{path}: not a readable .npy array ({exc})") from None
    if not isinstance(array, np.ndarray):
        raise UnreadableInput(f"{path}: an .npz archive, not a single .npy array")
    shape = array.shape
    if array.ndim == 3 and chw[0] == 1:
        array = array[:, None]
    if array.ndim != 4 or array.shape[1:] != chw:
        expected = f"(N, {chw[0]}, {chw[1]}, {chw[2]})" + (f" or (N, {chw[1]}, {chw[2]})" if chw[0] == 1 else "")
        raise ShapeMismatch(
            f"{path}: array of shape {shape}, but the model expects {expected}, "
            f"i.e. {chw[0]} channel(s) of {chw[1]}x{chw[2]} pixels"
        )
    if len(array) == 0:
        raise UnreadableInput(f"{path}: holds no images")
    return _as_pixels(array, path)


def read_folder(folder: Path, chw: tuple[int, int, int]) -> tuple[list[str], np.ndarray]:
    """(file names, float32 (N, C, H, W)) of the PNG/JPEG images in `folder`, converted to the model's channels."""
    mode = {1: "L", 3: "RGB"}.get(chw[0])
    if mode is None:
        raise ShapeMismatch(f"the model takes {chw[0]} channels; image folders can feed only 1 (L) or 3 (RGB)")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UnreadableInput(f"{folder}: no PNG or JPEG images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
    pixels = []
    for file in files:
        try:
            with Image.open(file) as image:
                converted = image.convert(mode)
        except (OSError, SyntaxError, ValueError) as exc:
            raise UnreadableInput(f"{file}: not a readable image ({exc})") from None
        if converted.size != (chw[2], chw[1]):
            width, height = converted.size
            raise ShapeMismatch(f"{file}: image is {width}x{height} pixels, the model expects {chw[2]}x{chw[1]}")
        pixels.append(np.asarray(converted).reshape(chw[1], chw[2], chw[0]).transpose(2, 0, 1))
    return [file.name for file in files], _as_pixels(np.stack(pixels), folder)


def read_input(path: Path, chw: tuple[int, int, int]) -> tuple[list[str], np.ndarray]:
    """(item names, float32 images) from an `.npy` file (items are indices) or a folder of images."""
    if path.is_dir():
        return read_folder(path, chw)
    if not path.exists():
        raise UnreadableInput(f"{path}: no such file or folder")
    if path.suffix.lower() != ".npy":
        raise UnreadableInput(f"{path}: expected an .npy array or a folder of PNG/JPEG images")
    images = read_array(path, chw)
    return [str(index) for index in range(len(images))], images
