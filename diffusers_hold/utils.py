"""Small helpers for looking at results."""

from __future__ import annotations

import math

from PIL import Image

__all__ = ["image_grid"]


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
