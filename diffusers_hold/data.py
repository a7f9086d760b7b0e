"""Small real image sets that ship inside installed packages (scikit-learn's digits, scikit-image's LFW faces,
patches of the colour photographs both bundle), so demos, tests and the benchmark never download anything. Image
folders and data sets are in :mod:`diffusers_hold.image_data`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ._validation import check_positive_int

__all__ = ["load_digits_images", "load_lfw_faces", "load_photo_patches", "write_digits_imagefolder"]


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


def load_lfw_faces(resolution: int = 25) -> torch.Tensor:
    """scikit-image's bundled subset of Labeled Faces in the Wild: its 100 face images (of 200; the rest are not
    faces), grayscale, as a float tensor in ``[-1, 1]``.

    Args:
        resolution (`int`, defaults to 25): output side length; the 25x25 originals are resized bicubically.

    Returns:
        `torch.Tensor`: images of shape ``(100, 1, resolution, resolution)`` (float32).
    """
    try:
        from skimage.data import lfw_subset
    except ImportError as error:  # scikit-image is an optional dependency
        raise ImportError("The LFW faces need scikit-image: pip install 'diffusers-hold[bench]'.") from error
    check_positive_int(resolution, "resolution")
    faces = lfw_subset()[:100].astype(np.float32)  # (100, 25, 25) in [0, 1]
    resized = np.stack(
        [np.asarray(Image.fromarray(face, mode="F").resize((resolution, resolution), Image.BICUBIC)) for face in faces]
    )
    return torch.from_numpy(np.clip(resized, 0, 1) * 2 - 1)[:, None]


def load_photo_patches(resolution: int = 8, patch_size: int = 32, min_std: float = 0.04) -> torch.Tensor:
    """RGB natural-image patches cut from the colour photographs that ship with scikit-image (astronaut, chelsea,
    coffee, rocket) and scikit-learn (china, flower), as a float tensor in ``[-1, 1]``.

    Each photograph is cut into non-overlapping ``patch_size`` squares from its top-left corner, each square is
    reduced to ``resolution`` by area averaging, and flat patches (pixel standard deviation below ``min_std`` on the
    ``[0, 1]`` scale: sky, walls, backgrounds) are left out, because they are near-duplicates of one another and a
    nearest-neighbour memorization test cannot tell a copy of one from a copy of another. With the defaults that
    leaves about 1,200 patches.

    Args:
        resolution (`int`, defaults to 8): output side length, at most ``patch_size``.
        patch_size (`int`, defaults to 32): side of the squares cut from the photographs, in their pixels.
        min_std (`float`, defaults to 0.04): patches less varied than this are left out.

    Returns:
        `torch.Tensor`: images of shape ``(N, 3, resolution, resolution)`` (float32), photograph by photograph in
        reading order.
    """
    try:
        from skimage import data as skimage_data
        from sklearn.datasets import load_sample_images
    except ImportError as error:  # both are optional dependencies
        raise ImportError(
            "The photo patches need scikit-image and scikit-learn: pip install 'diffusers-hold[bench]'."
        ) from error
    check_positive_int(resolution, "resolution")
    check_positive_int(patch_size, "patch_size")
    if resolution > patch_size:
        raise ValueError(f"resolution ({resolution}) must not exceed patch_size ({patch_size}).")
    photos = [getattr(skimage_data, name)() for name in ("astronaut", "chelsea", "coffee", "rocket")]
    photos += list(load_sample_images().images)
    patches = []
    for photo in photos:
        rows, cols = photo.shape[0] // patch_size, photo.shape[1] // patch_size
        for i in range(rows):
            for j in range(cols):
                square = photo[i * patch_size : (i + 1) * patch_size, j * patch_size : (j + 1) * patch_size, :3]
                reduced = Image.fromarray(square).resize((resolution, resolution), Image.BOX)
                patches.append(np.asarray(reduced, dtype=np.float32) / 255.0)
    patches = np.stack(patches)
    patches = patches[patches.reshape(len(patches), -1).std(1) >= min_std]
    return torch.from_numpy(patches * 2 - 1).permute(0, 3, 1, 2).contiguous()


def write_digits_imagefolder(output_dir: str | os.PathLike, resolution: int = 16, limit: int | None = None) -> Path:
    """Write the bundled digits as an imagefolder (PNG files plus ``metadata.jsonl`` captions such as "digit 7").

    The layout is what ``datasets.load_dataset("imagefolder", data_dir=...)`` and the training scripts'
    ``--train_data_dir`` read, so the scripts can be tried on real data without a download.

    Args:
        output_dir (`str` or `os.PathLike`): folder to create; must not exist or be empty.
        resolution (`int`, defaults to 16): side length of the PNG files.
        limit (`int`, *optional*): write only the first ``limit`` digits (a small training set memorizes sooner).

    Returns:
        `pathlib.Path`: the folder.
    """
    images, labels = load_digits_images(resolution)
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}.")
        images, labels = images[:limit], labels[:limit]
    folder = Path(output_dir)
    if folder.exists() and any(folder.iterdir()):
        raise FileExistsError(f"{folder} is not empty; choose a new folder for the digits.")
    folder.mkdir(parents=True, exist_ok=True)
    pixels = ((images[:, 0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    with open(folder / "metadata.jsonl", "w") as metadata:
        for i, (image, label) in enumerate(zip(pixels, labels.tolist(), strict=True)):
            name = f"digit_{i:04d}.png"
            Image.fromarray(image, mode="L").save(folder / name)
            metadata.write(json.dumps({"file_name": name, "text": f"digit {label}"}) + "\n")
    return folder
