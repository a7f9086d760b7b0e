"""Small helpers: image grids for looking at results, and atomic writes of files and folders."""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image

__all__ = ["atomic_output", "image_grid", "replace_path", "to_pil_image"]


def image_grid(
    images: list[Image.Image], cols: int | None = None, padding: int = 2, scale: int = 1, background: int = 64
) -> Image.Image:
    """Tile images into one picture with a gap between cells, enlarged without smoothing.

    Args:
        images (`list[PIL.Image.Image]`): images of one size and mode.
        cols (`int`, *optional*): number of columns; defaults to a near-square grid.
        padding (`int`, defaults to 2): gap between cells and around the grid, in output pixels.
        scale (`int`, defaults to 1): integer enlargement of each image (nearest neighbour, so pixels stay sharp).
        background (`int`, defaults to 64): grey level of the gaps.
    """
    if not images:
        raise ValueError("image_grid needs at least one image.")
    size, mode = images[0].size, images[0].mode
    if any(img.size != size or img.mode != mode for img in images):
        raise ValueError("image_grid needs images of one size and mode.")
    if scale < 1 or padding < 0:
        raise ValueError(f"scale must be >= 1 and padding >= 0, got scale={scale}, padding={padding}.")
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = size[0] * scale, size[1] * scale
    grid = Image.new(mode, (cols * w + (cols + 1) * padding, rows * h + (rows + 1) * padding), color=background)
    if mode == "RGB":
        grid.paste((background,) * 3, (0, 0, *grid.size))
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        grid.paste(img.resize((w, h), Image.NEAREST), (padding + c * (w + padding), padding + r * (h + padding)))
    return grid


def to_pil_image(image: torch.Tensor) -> Image.Image:
    """A float image ``(C, H, W)`` in ``[0, 1]`` (clamped) as an 8-bit PIL image: grayscale for one channel, RGB for
    three."""
    array = (image.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)


@contextlib.contextmanager
def atomic_output(target: str | os.PathLike) -> Iterator[Path]:
    """Write a file or a folder all at once: yield a hidden sibling path to write ``target``'s content to, and move
    it onto ``target`` (:func:`replace_path`) when the block ends without an error.

    A crash or an error inside the block leaves ``target`` as it was (the partial sibling is removed on errors; after
    a hard kill it stays hidden, named ``.<name>.<random>.partial``). The sibling is in the same folder, so the final
    rename stays on one file system.

    Args:
        target (`str` or `os.PathLike`): the file or folder to write; its parent folder is created.

    Example::

        with atomic_output("state/model.pt") as temporary:
            torch.save(state, temporary)
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.{uuid.uuid4().hex[:12]}.partial"
    try:
        yield staging
        replace_path(staging, target)
    finally:
        if staging.is_dir():
            shutil.rmtree(staging)
        elif staging.exists():
            staging.unlink()


def replace_path(staging: str | os.PathLike, target: str | os.PathLike) -> None:
    """Move the finished file or folder ``staging`` onto ``target`` by renames, so ``target`` is always either the
    old content or the new, never a mixture.

    A file, or a folder onto an absent or empty one, is one ``os.replace``. A non-empty folder at ``target`` is first
    renamed aside, then deleted once ``staging`` is in place (and renamed back if that move fails).
    """
    staging, target = Path(staging), Path(target)
    if not (target.is_dir() and any(target.iterdir())):
        os.replace(staging, target)
        return
    aside = target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}.replaced")
    os.replace(target, aside)
    try:
        os.replace(staging, target)
    except OSError:
        os.replace(aside, target)
        raise
    shutil.rmtree(aside)
