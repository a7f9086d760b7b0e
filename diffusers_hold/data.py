"""Small real image sets that ship inside installed packages, so demos and tests never download anything."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

__all__ = ["load_digits_images"]


def load_digits_images(resolution: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled handwritten digits (1,797 grayscale 8x8 images) as a float tensor in ``[-1, 1]``.

    Args:
        resolution (`int`, defaults to 16): output side length; the 8x8 originals are resized bicubically.

    Returns:
        `tuple`: images of shape ``(1797, 1, resolution, resolution)`` (float32, ink bright on black) and their
        labels ``0..9`` (int64).
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # scikit-learn is an optional dependency
        raise ImportError("The digits data set needs scikit-learn: pip install 'diffusers-hold[train]'.") from err
    if not isinstance(resolution, int) or resolution < 8:
        raise ValueError(f"resolution must be an integer >= 8, got {resolution!r}.")
    digits = load_digits()
    images = digits.images.astype(np.float32) / 16.0  # values 0..16 in the bundled file
    if resolution != 8:
        images = np.stack(
            [
                np.asarray(Image.fromarray(img, mode="F").resize((resolution, resolution), Image.BICUBIC))
                for img in images
            ]
        )
    images = np.clip(images, 0.0, 1.0) * 2.0 - 1.0
    return torch.from_numpy(images)[:, None], torch.from_numpy(digits.target.astype(np.int64))
