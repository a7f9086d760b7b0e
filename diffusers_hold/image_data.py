"""Image folders and data sets: loading, up-front checks of every image, and PIL/numpy transforms, for the training
scripts, the audit and the benchmark (:func:`load_image_folder`: a whole folder as one tensor). Bundled sets:
:mod:`diffusers_hold.data`.

The flow of `training/train_text_to_image_hold.py` and `training/train_unconditional_hold.py`:

```py
check_resolution(args.resolution, vae=vae, unet=unet)
dataset = load_image_dataset(train_data_dir=args.train_data_dir, dataset_name=args.dataset_name, ...)
train_dataset, info = prepare_training_dataset(dataset, image_column=..., caption_column=..., resolution=..., seed=...)
loader = DataLoader(train_dataset, collate_fn=collate_examples, ...)
for epoch in range(first_epoch, num_epochs):
    loader.set_epoch(epoch)  # for an accelerate-prepared loader (see ImageTrainingDataset.set_epoch)
    train_dataset.set_epoch(epoch)
    ...
```

Unlike diffusers' example scripts this needs no torchvision, checks columns and images before training starts,
names the file behind every unreadable image, and makes random crops and flips a function of (seed, epoch, example)
so that a resumed run sees exactly the pixels an uninterrupted one would.
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import datasets
import numpy as np
import pyarrow
import torch
from PIL import Image, ImageOps
from tqdm.auto import tqdm

from ._validation import check_positive_int

__all__ = [
    "ImageTrainingDataset",
    "check_resolution",
    "collate_examples",
    "load_image_dataset",
    "load_image_folder",
    "prepare_training_dataset",
]

logger = logging.getLogger(__name__)

RESAMPLING = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}
# the suffixes `load_dataset("imagefolder")` picks up, so an imagefolder without any of them is reported as empty
IMAGE_SUFFIXES = frozenset(suffix.lower() for suffix in datasets.packaged_modules.imagefolder.ImageFolder.EXTENSIONS)
# bad images listed in one error message; the rest are counted
MAX_LISTED_BAD_IMAGES = 10


def load_image_dataset(
    *,
    train_data_dir: str | os.PathLike | None = None,
    dataset_name: str | os.PathLike | None = None,
    dataset_config_name: str | None = None,
    split: str = "train",
    cache_dir: str | os.PathLike | None = None,
    source_names: tuple[str, str] = ("train_data_dir", "dataset_name"),
) -> datasets.Dataset:
    """Load one split of an image data set, from exactly one of two sources.

    Args:
        train_data_dir (`str` or `os.PathLike`, *optional*):
            A folder of images (searched recursively), optionally with a `metadata.jsonl` whose lines are
            `{"file_name": <path relative to the folder>, "text": <caption>}`; loaded with
            `datasets.load_dataset("imagefolder", data_dir=...)`, so the images are in the `image` column and the
            captions in `text`.
        dataset_name (`str` or `os.PathLike`, *optional*):
            A folder written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk` (read with
            `datasets.load_from_disk`), or anything `datasets.load_dataset(dataset_name, dataset_config_name)`
            accepts: a local folder of data files or a Hub data set id (from the local cache when offline). Loading
            scripts are no longer supported by `datasets`.
        dataset_config_name (`str`, *optional*):
            The configuration of `dataset_name`, for `load_dataset` only.
        split (`str`, defaults to `"train"`):
            The split to return. A single saved `Dataset` is returned whole, unless it records a different split.
        cache_dir (`str` or `os.PathLike`, *optional*):
            Where `load_dataset` caches the prepared data (the `datasets` default if not given).
        source_names (`tuple[str, str]`, defaults to `("train_data_dir", "dataset_name")`):
            What the error messages call the two sources (a caller's flags, e.g. the audit's held-out set).

    Returns:
        `datasets.Dataset`: the split, with at least one row.

    Raises:
        `ValueError`: when neither or both sources are given, the folder does not exist or holds no images, the
        split does not exist (the message names the available ones), or the split is empty.
    """
    folder_name, data_set_name = source_names
    if (train_data_dir is None) == (dataset_name is None):
        given = "both" if train_data_dir is not None else "neither"
        raise ValueError(
            f"Give exactly one of `{folder_name}` (a folder of images) and `{data_set_name}` (a saved or Hub data "
            f"set); got {given}."
        )
    if train_data_dir is not None:
        if dataset_config_name is not None:
            raise ValueError(f"`dataset_config_name` applies to `{data_set_name}` only, not to `{folder_name}`.")
        folder = os.path.expanduser(os.fspath(train_data_dir))
        source = f"{folder_name} {folder!r}"
        if not os.path.isdir(folder):
            raise ValueError(f"{source} does not exist or is not a folder.")
        if not _contains_image_file(folder):
            raise ValueError(f"{source} contains no image files (looked for {', '.join(sorted(IMAGE_SUFFIXES))}).")
        try:
            loaded = datasets.load_dataset("imagefolder", data_dir=folder, cache_dir=cache_dir)
        except pyarrow.ArrowInvalid as error:  # pyarrow's message names neither the file nor the line
            raise ValueError(f"{source}: {_metadata_problem(folder) or error}") from error
    else:
        name = os.path.expanduser(os.fspath(dataset_name))
        source = f"{data_set_name} {name!r}"
        if _is_saved_dataset(name):
            if dataset_config_name is not None:
                raise ValueError(
                    f"{source} is a saved data set, which has no configurations; drop dataset_config_name."
                )
            loaded = datasets.load_from_disk(name)
        elif _looks_like_a_path(name) and not os.path.exists(name):
            # a path cannot be a Hub id; say so instead of letting the Hub look-up fail obscurely
            raise ValueError(f"{source} does not exist.")
        else:
            loaded = datasets.load_dataset(name, dataset_config_name, cache_dir=cache_dir)

    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise ValueError(f"{source} has no split {split!r}; available splits: {', '.join(sorted(loaded))}.")
        dataset = loaded[split]
    elif isinstance(loaded, datasets.Dataset):
        if loaded.split is not None and str(loaded.split) != split:
            raise ValueError(f"{source} holds only the {str(loaded.split)!r} split, not {split!r}.")
        dataset = loaded
    else:
        raise ValueError(f"{source} loaded as {type(loaded).__name__}; expected a Dataset or DatasetDict.")
    if len(dataset) == 0:
        raise ValueError(f"Split {split!r} of {source} is empty.")
    return dataset


def prepare_training_dataset(
    dataset: datasets.Dataset,
    *,
    image_column: str = "image",
    caption_column: str | None = None,
    resolution: int,
    center_crop: bool = False,
    random_flip: bool = False,
    num_channels: Literal[1, 3] = 3,
    interpolation: Literal["bilinear", "bicubic", "lanczos"] = "bilinear",
    seed: int = 0,
    skip_bad_images: bool = False,
    image_check: Literal["decode", "verify"] = "decode",
) -> tuple[ImageTrainingDataset, dict[str, Any]]:
    """Check a data set's columns and every image, then wrap it as a torch data set of training tensors.

    Every image is checked up front, before training starts, so that a bad file stops the run at once (or, with
    `skip_bad_images=True`, is left out) instead of hours into it, and so that the data set's length and hence the
    epoch boundaries are fixed, which exact resumption from a checkpoint needs. Images are read from the records'
    bytes or file paths by this module (the image column is cast to `datasets.Image(decode=False)`), so every error
    names the file, or the row when the image came as bytes without a name.

    Each example is then: decoded, turned upright from its EXIF orientation, converted to `num_channels` (3: RGB,
    1: grayscale L; 16-bit grayscale is rescaled to 8 bits, 32-bit integer or float images are rejected), resized
    so that its shorter side is `resolution` (no resampling when it already is), cropped to
    `resolution x resolution` at the center or at a random offset, optionally flipped left-right, and scaled to a
    float32 tensor in `[-1, 1]` of shape `(num_channels, resolution, resolution)`.

    Random choices (crop offset, flip, one caption out of a list) are drawn from a numpy generator seeded with
    `(seed, epoch, row)`, where `row` is the example's row in `dataset`: they do not depend on the order in which
    examples are read, on data loader workers or on what came before, so a run resumed at epoch `e` makes the same
    choices as an uninterrupted one provided it calls `set_epoch(e)` (see [`ImageTrainingDataset.set_epoch`]).

    Args:
        dataset (`datasets.Dataset`):
            One split, e.g. from [`load_image_dataset`].
        image_column (`str`, defaults to `"image"`):
            The column of images (`datasets.Image`) or of image file paths (strings).
        caption_column (`str`, *optional*):
            The column of captions: strings, or lists of strings of which one is drawn per epoch. `None` for
            unconditional training (captions are then `None`).
        resolution (`int`):
            Side length of the square training images.
        center_crop (`bool`, defaults to `False`):
            Crop at the center instead of at a random offset.
        random_flip (`bool`, defaults to `False`):
            Flip left-right with probability 1/2.
        num_channels (`int`, defaults to 3):
            3 for RGB, 1 for grayscale.
        interpolation (`str`, defaults to `"bilinear"`):
            PIL resampling filter for the resize: `"bilinear"`, `"bicubic"` or `"lanczos"`.
        seed (`int`, defaults to 0):
            Seed of the random crops, flips and caption choices; keep it when resuming.
        skip_bad_images (`bool`, defaults to `False`):
            Leave out images that fail the check (reported in the returned info) instead of raising.
        image_check (`str`, defaults to `"decode"`):
            `"decode"` fully decodes and converts every image once, exactly as training will, so no image can fail
            later; `"verify"` only runs PIL's `Image.verify()` (file structure and checksums without decoding the
            pixels: faster, but blind to, e.g., a truncated JPEG). An image that passes `"verify"` and then fails to
            decode during training raises an error naming it, even with `skip_bad_images=True`, since dropping it
            then would change the epoch length.

    Returns:
        `tuple`: the [`ImageTrainingDataset`] and an info dict with `num_examples` (its length), `skipped` (the
        number of images left out) and `skipped_images` (a list of `(name, error)` pairs, the name being the file
        path or `"row <i>"`).

    Raises:
        `ValueError`: for a missing or non-image column (the message lists the available columns and the ones that
        hold images), a missing caption column, a caption that is not a string or a list of strings, bad images
        (all of them named) when `skip_bad_images=False`, no readable image at all, or an invalid argument.
    """
    if isinstance(dataset, datasets.DatasetDict):
        raise ValueError(f"Expected one split, got a DatasetDict with splits {', '.join(dataset)}; pick one.")
    check_positive_int(resolution, "resolution")
    if num_channels not in (1, 3):
        raise ValueError(f"num_channels must be 3 (RGB) or 1 (grayscale), got {num_channels!r}.")
    if interpolation not in RESAMPLING:
        raise ValueError(f"interpolation must be one of {', '.join(RESAMPLING)}, got {interpolation!r}.")
    if image_check not in ("decode", "verify"):
        raise ValueError(f"image_check must be 'decode' or 'verify', got {image_check!r}.")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}.")

    features = dataset.features
    image_columns = [name for name, feature in features.items() if isinstance(feature, datasets.Image)]
    if image_column not in features:
        message = f"Image column {image_column!r} not found; the data set has columns {', '.join(features)}."
        if image_columns:
            message += f" Columns holding images: {', '.join(image_columns)}."
        raise ValueError(message)
    image_feature = features[image_column]
    is_path_column = isinstance(image_feature, datasets.Value) and image_feature.dtype in ("string", "large_string")
    if not (isinstance(image_feature, datasets.Image) or is_path_column):
        raise ValueError(
            f"Column {image_column!r} holds {image_feature}, neither images nor file paths. "
            f"Columns holding images: {', '.join(image_columns) or 'none'}."
        )
    if caption_column is not None and caption_column not in features:
        raise ValueError(
            f"Caption column {caption_column!r} not found; the data set has columns {', '.join(features)}."
        )

    columns = [image_column] if caption_column is None else [image_column, caption_column]
    records = dataset.select_columns(columns).cast_column(image_column, datasets.Image(decode=False))
    mode = "RGB" if num_channels == 3 else "L"
    kept_rows, bad_images = _check_images(records, image_column, caption_column, mode, image_check)
    if bad_images and not skip_bad_images:
        listed = "; ".join(f"{name} ({error})" for name, error in bad_images[:MAX_LISTED_BAD_IMAGES])
        more = len(bad_images) - MAX_LISTED_BAD_IMAGES
        raise ValueError(
            f"{len(bad_images)} of {len(records)} images cannot be read: {listed}"
            + (f"; and {more} more" if more > 0 else "")
            + ". Fix or remove them, or pass skip_bad_images=True to leave them out."
        )
    for name, error in bad_images:
        logger.warning("Skipping unreadable image %s: %s", name, error)
    if not kept_rows:
        raise ValueError(f"None of the {len(records)} images can be read.")

    train_dataset = ImageTrainingDataset(
        records,
        rows=kept_rows,
        image_column=image_column,
        caption_column=caption_column,
        resolution=resolution,
        center_crop=center_crop,
        random_flip=random_flip,
        mode=mode,
        resample=RESAMPLING[interpolation],
        seed=seed,
    )
    info = {"num_examples": len(train_dataset), "skipped": len(bad_images), "skipped_images": bad_images}
    return train_dataset, info


class ImageTrainingDataset(torch.utils.data.Dataset):
    """Training examples `{"pixel_values": tensor, "caption": str | None, "index": int}`, built by
    [`prepare_training_dataset`], which documents the transforms; `index` is the example's row in the source
    data set (skipped images leave gaps), a stable identity for, e.g., memorization metrics.

    Args:
        records (`datasets.Dataset`):
            The image column (cast to `datasets.Image(decode=False)`) and, if used, the caption column.
        rows (`Sequence[int]`):
            The rows of `records` that passed the image check, in order.
        image_column (`str`):
            Name of the image column.
        caption_column (`str`, *optional*):
            Name of the caption column; `None` gives `None` captions.
        resolution (`int`):
            Side length of the square output.
        center_crop (`bool`):
            Crop at the center instead of at a random offset.
        random_flip (`bool`):
            Flip left-right with probability 1/2.
        mode (`str`):
            PIL mode of the output, `"RGB"` or `"L"`.
        resample (`PIL.Image.Resampling`):
            Resize filter.
        seed (`int`):
            Seed of the random choices, combined with the epoch and the row.
    """

    def __init__(
        self,
        records: datasets.Dataset,
        *,
        rows: Sequence[int],
        image_column: str,
        caption_column: str | None,
        resolution: int,
        center_crop: bool,
        random_flip: bool,
        mode: Literal["RGB", "L"],
        resample: Image.Resampling,
        seed: int,
    ):
        self.records = records
        self.rows = np.asarray(rows, dtype=np.int64)
        self.image_column = image_column
        self.caption_column = caption_column
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.mode = mode
        self.resample = resample
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose random crops, flips and caption choices `__getitem__` makes.

        Call it before iterating each epoch, with the true epoch number (also after resuming). With a loader
        prepared by `accelerate`, call `loader.set_epoch(epoch)` as well, first: depending on the sampler and the
        number of processes, that loader either calls this method with its own count of passes at the start of
        every pass (a count that restarts at 0 in a resumed run, unless set) or never calls it. Data loader workers
        copy the data set when an iteration starts, so do not use `persistent_workers=True`, or the workers keep the
        epoch of the first pass.

        Args:
            epoch (`int`): the epoch number, from 0.
        """
        if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative integer, got {epoch!r}.")
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, position: int) -> dict[str, Any]:
        row = int(self.rows[position])
        record = self.records[row]
        rng = np.random.default_rng([self.seed, self.epoch, row])
        try:
            image = _decode_image(record[self.image_column], self.mode)
        except Exception as err:  # name the file whatever PIL raised; see `image_check` for why it is not skipped
            name = _image_name(record[self.image_column], row)
            raise ValueError(f"Cannot decode image {name}: {type(err).__name__}: {err}") from err
        pixel_values = self._transform(image, rng)
        caption = None if self.caption_column is None else record[self.caption_column]
        if isinstance(caption, list):
            caption = caption[int(rng.integers(len(caption)))]
        return {"pixel_values": pixel_values, "caption": caption, "index": row}

    def _transform(self, image: Image.Image, rng: np.random.Generator) -> torch.Tensor:
        width, height = image.size
        if min(width, height) != self.resolution:
            scale = self.resolution / min(width, height)
            # the max() keeps float rounding from making a side one pixel short of the crop
            width = max(self.resolution, round(width * scale))
            height = max(self.resolution, round(height * scale))
            image = image.resize((width, height), resample=self.resample)
        if self.center_crop:
            # torchvision's CenterCrop offsets, as in diffusers' example scripts
            top = int(round((height - self.resolution) / 2.0))
            left = int(round((width - self.resolution) / 2.0))
        else:
            top = int(rng.integers(height - self.resolution + 1))
            left = int(rng.integers(width - self.resolution + 1))
        pixels = np.asarray(image.crop((left, top, left + self.resolution, top + self.resolution)))
        if self.random_flip and rng.random() < 0.5:
            pixels = pixels[:, ::-1]
        pixels = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
        return torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32) / 127.5 - 1.0)


def collate_examples(examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Batch examples of [`ImageTrainingDataset`]; the `collate_fn` of the training data loader.

    Args:
        examples (`Sequence[dict]`): items `{"pixel_values", "caption", "index"}`.

    Returns:
        `dict`: `pixel_values` (contiguous float32, `(batch, channels, height, width)`), `captions` (a list of
        strings or `None`s) and `indices` (int64 source rows).
    """
    if not examples:
        raise ValueError("Cannot collate an empty batch.")
    pixel_values = torch.stack([example["pixel_values"] for example in examples])
    return {
        "pixel_values": pixel_values.to(memory_format=torch.contiguous_format).float(),
        "captions": [example["caption"] for example in examples],
        "indices": torch.tensor([example["index"] for example in examples], dtype=torch.int64),
    }


def check_resolution(resolution: int, *, vae: Any = None, unet: Any = None) -> None:
    """Check that the models can train at `resolution`, before any data is touched.

    With a `vae` (latent diffusion) the resolution must be a multiple of the VAE's downsampling factor
    `2 ** (len(vae.config.block_out_channels) - 1)`; otherwise the encoder pads and the latents no longer cover the
    image exactly. With a `unet` alone the model works on pixels (as in unconditional training), and a
    `UNet2DModel` needs a multiple of its own factor `2 ** (len(unet.config.block_out_channels) - 1)`, or its skip
    connections do not line up. A resolution that differs from the UNet's `sample_size` (times the VAE factor) is
    allowed but logged as a warning: pipelines generate at that size by default.

    Args:
        resolution (`int`): the training resolution.
        vae (`AutoencoderKL`, *optional*): the VAE (anything with `config.block_out_channels`).
        unet (`UNet2DConditionModel` or `UNet2DModel`, *optional*): the UNet (with `config.sample_size`).

    Raises:
        `ValueError`: when the resolution is not a multiple of the factor; the message states the factor and the
        nearest valid resolutions.
    """
    check_positive_int(resolution, "resolution")
    if vae is not None:
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        _check_multiple(
            resolution, factor, "the VAE's downsampling factor 2 ** (len(vae.config.block_out_channels) - 1)"
        )
    elif unet is not None:
        factor = 2 ** (len(unet.config.block_out_channels) - 1)
        _check_multiple(
            resolution, factor, "the UNet's downsampling factor 2 ** (len(unet.config.block_out_channels) - 1)"
        )
    if unet is not None and unet.config.sample_size is not None:
        sample_size = unet.config.sample_size
        sides = tuple(sample_size) if isinstance(sample_size, (list, tuple)) else (sample_size, sample_size)
        pixel_scale = factor if vae is not None else 1
        model_size = tuple(side * pixel_scale for side in sides)
        if model_size != (resolution, resolution):
            logger.warning(
                "Training at %dx%d while the UNet's sample_size corresponds to %dx%d, the size pipelines generate at "
                "by default.",
                resolution,
                resolution,
                *model_size,
            )


def load_image_folder(
    *,
    train_data_dir: str | os.PathLike | None = None,
    dataset_name: str | os.PathLike | None = None,
    resolution: int,
    num_channels: int = 3,
    image_column: str = "image",
    caption_column: str | None = None,
    source_names: tuple[str, str] = ("train_data_dir", "dataset_name"),
) -> tuple[torch.Tensor, list[str] | None]:
    """Images of a folder or saved data set as a float tensor in ``[0, 1]`` `(N, C, resolution, resolution)`,
    centre-cropped without flips (as the nearest-neighbour rule needs), and their captions when asked.

    Args:
        train_data_dir (`str` or `os.PathLike`, *optional*), dataset_name (`str` or `os.PathLike`, *optional*):
            exactly one source, as in :func:`diffusers_hold.image_data.load_image_dataset`.
        resolution (`int`): side of the square images (the generations' size).
        num_channels (`int`, defaults to 3): 1 (grayscale) or 3 (RGB), the generations' channels.
        image_column (`str`, defaults to `"image"`), caption_column (`str`, *optional*): the columns.
        source_names (`tuple[str, str]`): what error messages call the two sources.
    """
    dataset = load_image_dataset(train_data_dir=train_data_dir, dataset_name=dataset_name, source_names=source_names)
    examples, _ = prepare_training_dataset(
        dataset,
        image_column=image_column,
        caption_column=caption_column,
        resolution=resolution,
        center_crop=True,
        num_channels=num_channels,
    )
    items = [examples[i] for i in range(len(examples))]
    images = torch.stack([item["pixel_values"] for item in items]) / 2 + 0.5
    captions = [item["caption"] for item in items] if caption_column is not None else None
    return images, captions


def _check_images(
    records: datasets.Dataset, image_column: str, caption_column: str | None, mode: str, image_check: str
) -> tuple[list[int], list[tuple[str, str]]]:
    """Check every row's caption and image (decoded in ``mode``, or PIL-verified), with a progress bar; returns the
    readable rows and the ``(name, error)`` of each unreadable image."""
    kept_rows, bad_images = [], []
    progress = tqdm(total=len(records), desc="Checking images", unit="image", disable=None)
    row = 0
    for batch in records.iter(batch_size=256):
        for position, record in enumerate(batch[image_column]):
            name = _image_name(record, row)
            if caption_column is not None:
                _check_caption(batch[caption_column][position], name, caption_column)
            try:
                if image_check == "decode":
                    _decode_image(record, mode)
                else:
                    with _open_image(record) as image:
                        image.verify()
            except Exception as err:  # any failure to read the file makes it a bad image, whatever PIL raised
                bad_images.append((name, f"{type(err).__name__}: {err}"))
            else:
                kept_rows.append(row)
            row += 1
        progress.update(len(batch[image_column]))
    progress.close()
    return kept_rows, bad_images


def _check_multiple(resolution: int, factor: int, what: str) -> None:
    if resolution % factor == 0:
        return
    lower = resolution // factor * factor
    nearest = f"{lower} or {lower + factor}" if lower > 0 else f"{lower + factor}"
    raise ValueError(
        f"resolution {resolution} is not a multiple of {factor}, {what}; the nearest valid resolutions are {nearest}."
    )


def _contains_image_file(folder: str) -> bool:
    for _, _, file_names in os.walk(folder):
        if any(os.path.splitext(file_name)[1].lower() in IMAGE_SUFFIXES for file_name in file_names):
            return True
    return False


def _looks_like_a_path(name: str) -> bool:
    """Whether a ``dataset_name`` is meant as a local path: absolute, starting with ``.``, deeper than a Hub id's
    ``owner/name``, or under a folder that exists here."""
    parts = name.replace(os.sep, "/").split("/")
    under_a_local_folder = len(parts) == 2 and os.path.isdir(parts[0])
    return os.path.isabs(name) or name.startswith(".") or len(parts) > 2 or under_a_local_folder


def _metadata_problem(folder: str) -> str | None:
    """The first line of a ``metadata.jsonl`` under ``folder`` that is not a JSON object, described; else None."""
    for path in sorted(Path(folder).rglob("metadata.jsonl")):
        with open(path, encoding="utf-8", errors="replace") as lines:
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                try:
                    valid = isinstance(json.loads(line), dict)
                except json.JSONDecodeError:
                    valid = False
                if not valid:
                    return f"line {number} of {path} is not a JSON object: {line.strip()[:80]!r}"
    return None


def _is_saved_dataset(path: str) -> bool:
    # the marker files `Dataset.save_to_disk` and `DatasetDict.save_to_disk` write, which `load_from_disk` reads
    return os.path.isfile(os.path.join(path, "state.json")) or os.path.isfile(os.path.join(path, "dataset_dict.json"))


def _image_name(record: dict[str, Any] | None, row: int) -> str:
    if record is not None and record.get("path"):
        return f"{record['path']!r} (row {row})"
    return f"row {row}"


def _open_image(record: dict[str, Any] | None) -> Image.Image:
    if record is None:
        raise ValueError("the row has no image")
    if record.get("bytes") is not None:  # bytes win: the path of an embedded image is only its original name
        return Image.open(io.BytesIO(record["bytes"]))
    if record.get("path"):
        return Image.open(record["path"])
    raise ValueError("the image has neither bytes nor a path")


def _decode_image(record: dict[str, Any] | None, mode: Literal["RGB", "L"]) -> Image.Image:
    with _open_image(record) as image:
        image.load()
        image = ImageOps.exif_transpose(image)
    if image.mode.startswith("I;16"):
        # PIL's convert() clips 16-bit values at 255 instead of rescaling them; 65535 / 257 = 255
        image = Image.fromarray(np.round(np.asarray(image, dtype=np.float64) / 257.0).astype(np.uint8))
    elif image.mode in ("I", "F"):
        raise ValueError(f"{image.mode!r} images (32-bit) have no fixed value range; save them with 8 or 16 bits.")
    return image.convert(mode)


def _check_caption(caption: Any, name: str, caption_column: str) -> None:
    if isinstance(caption, str):
        return
    if isinstance(caption, list) and caption and all(isinstance(text, str) for text in caption):
        return
    raise ValueError(
        f"Caption of image {name} in column {caption_column!r} must be a string or a non-empty list of strings, "
        f"got {caption!r}."
    )
