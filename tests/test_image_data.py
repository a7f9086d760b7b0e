"""Image data for the training scripts: loading, column and image checks, transforms, reproducible randomness."""

import io
import json
import logging
import os
import pickle

import datasets
import numpy as np
import pytest
import torch
from accelerate.data_loader import prepare_data_loader, skip_first_batches
from diffusers import AutoencoderKL, UNet2DModel
from PIL import Image

from diffusers_hold.image_data import (
    check_resolution,
    collate_examples,
    load_image_dataset,
    load_image_folder,
    prepare_training_dataset,
)

GOOD_FILES = ("wide.png", "tall/portrait.png", "square.jpg", "gray.png")
# corrupt.png is random bytes; the truncated files stop halfway through their image data
BAD_FILES = ("corrupt.png", "truncated.png", "truncated.jpg")


def _random_pixels(rng, height, width, channels=3):
    shape = (height, width, channels) if channels > 1 else (height, width)
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


def _encoded(array, image_format):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=image_format)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """An imagefolder of four good images (sizes and aspect ratios differ, one grayscale) and three bad ones."""
    folder = tmp_path_factory.mktemp("images")
    (folder / "tall").mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(_random_pixels(rng, 20, 30)).save(folder / "wide.png")
    Image.fromarray(_random_pixels(rng, 28, 16)).save(folder / "tall" / "portrait.png")
    Image.fromarray(_random_pixels(rng, 24, 24)).save(folder / "square.jpg", quality=95)
    Image.fromarray(_random_pixels(rng, 16, 20, channels=1)).save(folder / "gray.png")
    (folder / "corrupt.png").write_bytes(rng.integers(0, 256, size=300, dtype=np.uint8).tobytes())
    png = _encoded(_random_pixels(rng, 32, 32), "PNG")
    (folder / "truncated.png").write_bytes(png[: len(png) // 2])
    jpeg = _encoded(_random_pixels(rng, 64, 64), "JPEG")  # large enough that the cut falls in the image data
    (folder / "truncated.jpg").write_bytes(jpeg[: len(jpeg) * 2 // 3])
    captions = {name: f"caption of {name}" for name in GOOD_FILES + BAD_FILES}
    with open(folder / "metadata.jsonl", "w") as metadata:
        for name, text in captions.items():
            metadata.write(json.dumps({"file_name": name, "text": text}) + "\n")
    return folder, captions


@pytest.fixture(scope="module")
def folder_dataset(image_folder, tmp_path_factory):
    folder, _ = image_folder
    return load_image_dataset(train_data_dir=folder, cache_dir=tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def good_dataset(folder_dataset):
    """The rows of the four good images only."""
    paths = [record["path"] for record in folder_dataset.cast_column("image", datasets.Image(decode=False))["image"]]
    return folder_dataset.select([row for row, path in enumerate(paths) if not path.endswith(BAD_FILES)])


def _dataset_of_arrays(tmp_path, arrays):
    """A data set whose image column holds the paths of PNGs of `arrays`, with captions `caption i`."""
    paths = []
    for i, array in enumerate(arrays):
        paths.append(str(tmp_path / f"image_{i}.png"))
        Image.fromarray(array).save(paths[-1])
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    return datasets.Dataset.from_dict({"image": paths, "text": [f"caption {i}" for i in range(len(arrays))]}, features)


def _as_unit_tensor(array):
    """The expected training tensor of a uint8 (H, W, C) array: (C, H, W) in [-1, 1], written out independently."""
    return torch.tensor(array.transpose(2, 0, 1).astype(np.float32) / 127.5 - 1.0)


def _gradient(height, width):
    """Every pixel distinct: red encodes the column, green the row."""
    rows, columns = np.mgrid[0:height, 0:width]
    return np.stack([columns * 8, rows * 8, np.full_like(rows, 100)], axis=-1).astype(np.uint8)


# loading


def test_imagefolder_loads_every_file_with_its_metadata_caption(image_folder, folder_dataset):
    folder, captions = image_folder
    assert len(folder_dataset) == len(GOOD_FILES) + len(BAD_FILES)
    records = folder_dataset.cast_column("image", datasets.Image(decode=False))
    paths = [os.path.relpath(record["path"], folder) for record in records["image"]]
    by_file = dict(zip(paths, records["text"], strict=True))
    assert by_file == captions


def test_saved_dataset_and_dataset_dict_folders_load(good_dataset, tmp_path):
    good_dataset.save_to_disk(tmp_path / "single")
    loaded = load_image_dataset(dataset_name=str(tmp_path / "single"))
    assert loaded["text"] == good_dataset["text"]
    # save_to_disk embeds the images as bytes; they give the same tensors as the files they came from
    from_bytes, _ = prepare_training_dataset(loaded, resolution=8, center_crop=True)
    from_files, _ = prepare_training_dataset(good_dataset, resolution=8, center_crop=True)
    for i in range(len(from_files)):
        assert torch.equal(from_bytes[i]["pixel_values"], from_files[i]["pixel_values"])

    splits = datasets.DatasetDict({"train": good_dataset, "holdout": good_dataset.select([0])})
    splits.save_to_disk(tmp_path / "splits")
    holdout = load_image_dataset(dataset_name=tmp_path / "splits", split="holdout")
    assert holdout["text"] == good_dataset["text"][:1]
    with pytest.raises(ValueError, match=r"no split 'validation'; available splits: holdout, train"):
        load_image_dataset(dataset_name=tmp_path / "splits", split="validation")
    # a single saved split is not silently used as another one
    with pytest.raises(ValueError, match=r"only the 'train' split, not 'validation'"):
        load_image_dataset(dataset_name=tmp_path / "single", split="validation")


def test_a_local_data_folder_given_as_dataset_name_goes_through_load_dataset(image_folder, tmp_path):
    folder, captions = image_folder
    dataset = load_image_dataset(dataset_name=str(folder), cache_dir=tmp_path / "cache")
    assert sorted(dataset["text"]) == sorted(captions.values())


def test_source_errors_are_explicit(image_folder, tmp_path):
    folder, _ = image_folder
    with pytest.raises(ValueError, match="exactly one .* got neither"):
        load_image_dataset()
    with pytest.raises(ValueError, match="exactly one .* got both"):
        load_image_dataset(train_data_dir=folder, dataset_name="someone/some-images")
    with pytest.raises(ValueError, match="`dataset_config_name` applies to `dataset_name` only"):
        load_image_dataset(train_data_dir=folder, dataset_config_name="default")
    with pytest.raises(ValueError, match=r"train_data_dir '.*missing' does not exist"):
        load_image_dataset(train_data_dir=tmp_path / "missing")
    with pytest.raises(ValueError, match=r"dataset_name '.*missing' does not exist"):
        load_image_dataset(dataset_name=str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="contains no image files"):
        load_image_dataset(train_data_dir=tmp_path / "empty")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match="contains no image files"):
        load_image_dataset(train_data_dir=tmp_path / "notes")
    empty = datasets.Dataset.from_dict({"image": []}, datasets.Features({"image": datasets.Image()}))
    empty.save_to_disk(tmp_path / "no_rows", num_shards=1)  # datasets cannot reload its default of 0 shards
    with pytest.raises(ValueError, match="Split 'train' of .*no_rows.* is empty"):
        load_image_dataset(dataset_name=tmp_path / "no_rows")


# columns


def test_missing_columns_are_named_with_the_available_ones(good_dataset):
    with pytest.raises(ValueError, match=r"Caption column 'caption' not found; the data set has columns image, text"):
        prepare_training_dataset(good_dataset, caption_column="caption", resolution=8)
    with pytest.raises(ValueError, match=r"Image column 'img' not found; .* columns image, text\. .*images: image\."):
        prepare_training_dataset(good_dataset, image_column="img", resolution=8)
    # the default image column is absent: point at the column that holds images
    renamed = good_dataset.rename_column("image", "picture")
    with pytest.raises(ValueError, match=r"Image column 'image' not found.*Columns holding images: picture\."):
        prepare_training_dataset(renamed, resolution=8)
    numbers = datasets.Dataset.from_dict({"image": [1, 2]})
    with pytest.raises(ValueError, match=r"Column 'image' holds Value\('int64'\), neither images nor file paths"):
        prepare_training_dataset(numbers, resolution=8)


def test_captions_must_be_strings_and_the_error_names_the_image(tmp_path):
    dataset = _dataset_of_arrays(tmp_path, [_gradient(8, 8)] * 2)
    dataset = dataset.remove_columns("text").add_column("text", ["fine", None])
    with pytest.raises(ValueError, match=r"Caption of image '.*image_1\.png' \(row 1\) .* got None"):
        prepare_training_dataset(dataset, caption_column="text", resolution=8)


def test_a_column_of_file_paths_is_read_as_images(tmp_path):
    array = _gradient(8, 8)
    _dataset_of_arrays(tmp_path, [array])  # writes image_0.png
    as_paths = datasets.Dataset.from_dict({"file": [str(tmp_path / "image_0.png")]})
    train_dataset, _ = prepare_training_dataset(as_paths, image_column="file", resolution=8)
    torch.testing.assert_close(train_dataset[0]["pixel_values"], _as_unit_tensor(array), rtol=0, atol=0)


# bad images


def test_bad_images_stop_preparation_and_every_one_is_named(folder_dataset):
    with pytest.raises(ValueError, match="skip_bad_images=True") as raised:
        prepare_training_dataset(folder_dataset, resolution=8)
    message = str(raised.value)
    assert message.startswith(f"{len(BAD_FILES)} of {len(folder_dataset)} images cannot be read")
    for name in BAD_FILES:
        assert name in message
    for name in GOOD_FILES:
        assert name not in message


def test_skip_bad_images_leaves_them_out_and_reports_them(folder_dataset, caplog):
    with caplog.at_level(logging.WARNING, logger="diffusers_hold.image_data"):
        train_dataset, info = prepare_training_dataset(
            folder_dataset, caption_column="text", resolution=8, skip_bad_images=True
        )
    assert info["skipped"] == len(BAD_FILES)
    assert len(train_dataset) == info["num_examples"] == len(GOOD_FILES)
    skipped_names = [name for name, _ in info["skipped_images"]]
    for name in BAD_FILES:
        assert sum(name in skipped for skipped in skipped_names) == 1
    assert all(any(name in record.message for record in caplog.records) for name in BAD_FILES)
    items = [train_dataset[i] for i in range(len(train_dataset))]
    assert sorted(item["caption"] for item in items) == sorted(f"caption of {name}" for name in GOOD_FILES)
    # indices are rows of the source data set
    source_captions = folder_dataset["text"]
    assert [source_captions[item["index"]] for item in items] == [item["caption"] for item in items]


def test_verify_check_misses_a_truncated_jpeg_whose_decode_error_names_it(folder_dataset):
    train_dataset, info = prepare_training_dataset(
        folder_dataset, caption_column="text", resolution=8, skip_bad_images=True, image_check="verify"
    )
    # PIL's verify() reads no JPEG image data, so only the corrupt and truncated PNGs are caught up front
    assert info["skipped"] == 2 and not any("truncated.jpg" in name for name, _ in info["skipped_images"])
    source_captions = folder_dataset["text"]
    position = next(i for i, row in enumerate(train_dataset.rows) if "truncated.jpg" in source_captions[row])
    with pytest.raises(ValueError, match=r"Cannot decode image '.*truncated\.jpg' \(row \d+\)"):
        train_dataset[position]


def test_an_unreadable_image_given_as_bytes_is_named_by_its_row(tmp_path):
    good = {"bytes": _encoded(_gradient(8, 8), "PNG"), "path": None}
    dataset = datasets.Dataset.from_dict(
        {"image": [good, {"bytes": b"not an image", "path": None}]}, datasets.Features({"image": datasets.Image()})
    )
    with pytest.raises(ValueError, match=r"1 of 2 images cannot be read: row 1 \(UnidentifiedImageError"):
        prepare_training_dataset(dataset, resolution=8)
    with pytest.raises(ValueError, match="None of the 1 images can be read"):
        prepare_training_dataset(dataset.select([1]), resolution=8, skip_bad_images=True)


# transforms


def test_output_shape_dtype_and_range_for_every_image(good_dataset):
    for num_channels in (3, 1):
        train_dataset, _ = prepare_training_dataset(
            good_dataset, caption_column="text", resolution=12, num_channels=num_channels, random_flip=True
        )
        for i in range(len(train_dataset)):
            item = train_dataset[i]
            pixels = item["pixel_values"]
            assert pixels.shape == (num_channels, 12, 12) and pixels.dtype == torch.float32
            assert pixels.min() >= -1.0 and pixels.max() <= 1.0
            assert isinstance(item["caption"], str)


def test_grayscale_images_become_three_equal_channels_and_rgb_becomes_luma(tmp_path):
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    pixels = prepare_training_dataset(_dataset_of_arrays(tmp_path, [gray]), resolution=8)[0][0]["pixel_values"]
    expected = torch.tensor(gray.astype(np.float32) / 127.5 - 1.0)
    for channel in pixels:
        torch.testing.assert_close(channel, expected, rtol=0, atol=0)
    red = np.zeros((8, 8, 3), dtype=np.uint8)
    red[..., 0] = 200
    luma = prepare_training_dataset(_dataset_of_arrays(tmp_path, [red]), resolution=8, num_channels=1)[0][0]
    # ITU-R 601 luma of pure red: 200 * 299 / 1000 = 59.8 -> 60
    torch.testing.assert_close(luma["pixel_values"], torch.full((1, 8, 8), 60 / 127.5 - 1.0), rtol=0, atol=0)


def test_sixteen_bit_grayscale_is_rescaled_not_clipped(tmp_path):
    values = np.array([[0, 257 * 10], [257 * 128, 65535]], dtype=np.uint16).repeat(4, axis=0).repeat(4, axis=1)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode == "I;16"
    dataset = datasets.Dataset.from_dict({"image": [str(path)]}, datasets.Features({"image": datasets.Image()}))
    pixels = prepare_training_dataset(dataset, resolution=8, num_channels=1)[0][0]["pixel_values"]
    expected = np.array([[0, 10], [128, 255]], dtype=np.float32).repeat(4, axis=0).repeat(4, axis=1)
    torch.testing.assert_close(pixels[0], torch.tensor(expected / 127.5 - 1.0), rtol=0, atol=0)


def test_a_square_image_at_the_training_resolution_is_passed_through_unchanged(tmp_path):
    array = _gradient(16, 16)
    train_dataset, _ = prepare_training_dataset(_dataset_of_arrays(tmp_path, [array]), resolution=16)
    for epoch in range(3):  # the random crop of a 16x16 image to 16x16 has a single choice
        train_dataset.set_epoch(epoch)
        torch.testing.assert_close(train_dataset[0]["pixel_values"], _as_unit_tensor(array), rtol=0, atol=0)


def test_center_crop_takes_the_center_of_wide_and_tall_images(tmp_path):
    wide, tall = _gradient(16, 24), _gradient(20, 16)
    train_dataset, _ = prepare_training_dataset(
        _dataset_of_arrays(tmp_path, [wide, tall]), resolution=16, center_crop=True
    )
    # the shorter side is already 16, so no resize: the crop drops (24 - 16) / 2 = 4 columns and (20 - 16) / 2 = 2 rows
    torch.testing.assert_close(train_dataset[0]["pixel_values"], _as_unit_tensor(wide[:, 4:20]), rtol=0, atol=0)
    torch.testing.assert_close(train_dataset[1]["pixel_values"], _as_unit_tensor(tall[2:18]), rtol=0, atol=0)


def test_resize_brings_the_shorter_side_to_the_resolution_before_the_center_crop(tmp_path):
    # 40 wide, 20 tall: red columns 0-11, green 12-27, blue 28-39. Halved to 20x10: red 0-5, green 6-13, blue
    # 14-19; the 10x10 center crop keeps columns 5-14: red, then green, then blue, with blends next to the edges.
    # Cropping without resizing would give pure green.
    stripes = np.zeros((20, 40, 3), dtype=np.uint8)
    stripes[:, :12, 0] = stripes[:, 12:28, 1] = stripes[:, 28:, 2] = 255
    train_dataset, _ = prepare_training_dataset(
        _dataset_of_arrays(tmp_path, [stripes]), resolution=10, center_crop=True
    )
    pixels = train_dataset[0]["pixel_values"]
    assert pixels.shape == (3, 10, 10)
    assert (pixels[:, :, 0].argmax(0) == 0).all()  # red dominates the first column
    assert (pixels[:, :, 9].argmax(0) == 2).all()  # blue dominates the last column
    green = torch.tensor([-1.0, 1.0, -1.0])[:, None, None]
    torch.testing.assert_close(pixels[:, :, 2:8], green.expand(3, 10, 6), rtol=0, atol=0)


def test_exif_orientation_is_applied(tmp_path):
    array = _gradient(8, 16)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the stored pixels are to be rotated 90 degrees clockwise for display
    path = tmp_path / "rotated.png"
    Image.fromarray(array).save(path, exif=exif)
    dataset = datasets.Dataset.from_dict({"image": [str(path)]}, datasets.Features({"image": datasets.Image()}))
    pixels = prepare_training_dataset(dataset, resolution=8, center_crop=True)[0][0]["pixel_values"]
    upright = np.rot90(array, k=-1)  # 16 tall, 8 wide; the center crop drops 4 rows at the top
    torch.testing.assert_close(pixels, _as_unit_tensor(upright[4:12]), rtol=0, atol=0)


def test_random_flip_flips_left_right_in_some_epochs_only(tmp_path):
    array = _gradient(8, 8)
    train_dataset, _ = prepare_training_dataset(
        _dataset_of_arrays(tmp_path, [array]), resolution=8, center_crop=True, random_flip=True
    )
    flipped = 0
    for epoch in range(16):
        train_dataset.set_epoch(epoch)
        pixels = train_dataset[0]["pixel_values"]
        if torch.equal(pixels, _as_unit_tensor(np.fliplr(array))):
            flipped += 1
        else:
            torch.testing.assert_close(pixels, _as_unit_tensor(array), rtol=0, atol=0)
    assert 0 < flipped < 16


def _all_items(train_dataset, epochs):
    outputs = []
    for epoch in epochs:
        train_dataset.set_epoch(epoch)
        outputs.extend(train_dataset[i]["pixel_values"] for i in range(len(train_dataset)))
    return outputs


def test_random_crops_and_flips_depend_only_on_seed_epoch_and_example(tmp_path):
    rng = np.random.default_rng(1)
    dataset = _dataset_of_arrays(tmp_path, [_random_pixels(rng, 20, 30), _random_pixels(rng, 26, 20)])

    def prepared(seed):
        return prepare_training_dataset(dataset, resolution=8, random_flip=True, seed=seed)[0]

    first, again, other_seed = prepared(3), prepared(3), prepared(4)
    reference = _all_items(first, range(6))
    assert all(torch.equal(a, b) for a, b in zip(reference, _all_items(again, range(6)), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(reference, _all_items(other_seed, range(6)), strict=True))
    # different epochs make different choices, and crops vary beyond the two flip states
    one_example = _all_items(first, range(12))[::2]
    assert len({tuple(pixels.flatten().tolist()) for pixels in one_example}) > 2

    # a resumed run: a fresh data set at epoch 4 read in another order gives what the uninterrupted run read
    resumed = prepared(3)
    resumed.set_epoch(4)
    assert torch.equal(resumed[1]["pixel_values"], reference[4 * 2 + 1])
    assert torch.equal(resumed[0]["pixel_values"], reference[4 * 2 + 0])


def test_a_caption_is_drawn_from_a_list_reproducibly(tmp_path):
    dataset = _dataset_of_arrays(tmp_path, [_gradient(8, 8)])
    dataset = dataset.remove_columns("text").add_column("text", [["one", "two", "three"]])
    choices = []
    for seed in (0, 0, 1):
        train_dataset, _ = prepare_training_dataset(dataset, caption_column="text", resolution=8, seed=seed)
        choices.append(_captions_over_epochs(train_dataset, range(12)))
    assert choices[0] == choices[1] != choices[2]
    assert set(choices[0]) == {"one", "two", "three"}


def _captions_over_epochs(train_dataset, epochs):
    captions = []
    for epoch in epochs:
        train_dataset.set_epoch(epoch)
        captions.append(train_dataset[0]["caption"])
    return captions


def test_unconditional_examples_have_no_caption(tmp_path):
    train_dataset, _ = prepare_training_dataset(_dataset_of_arrays(tmp_path, [_gradient(8, 8)]), resolution=8)
    assert train_dataset[0]["caption"] is None and train_dataset[0]["index"] == 0


def test_invalid_arguments_are_rejected(good_dataset):
    with pytest.raises(ValueError, match="resolution must be a positive integer"):
        prepare_training_dataset(good_dataset, resolution=0)
    with pytest.raises(ValueError, match="num_channels must be 3"):
        prepare_training_dataset(good_dataset, resolution=8, num_channels=4)
    with pytest.raises(ValueError, match="interpolation must be one of"):
        prepare_training_dataset(good_dataset, resolution=8, interpolation="nearest")
    with pytest.raises(ValueError, match="image_check must be"):
        prepare_training_dataset(good_dataset, resolution=8, image_check="none")
    with pytest.raises(ValueError, match="got a DatasetDict"):
        prepare_training_dataset(datasets.DatasetDict({"train": good_dataset}), resolution=8)
    train_dataset, _ = prepare_training_dataset(good_dataset, resolution=8)
    with pytest.raises(ValueError, match="epoch must be a non-negative integer"):
        train_dataset.set_epoch(-1)


# batching


def test_collate_stacks_a_data_loader_batch(good_dataset):
    train_dataset, _ = prepare_training_dataset(good_dataset, caption_column="text", resolution=8, random_flip=True)
    loader = torch.utils.data.DataLoader(train_dataset, batch_size=3, collate_fn=collate_examples)
    batch = next(iter(loader))
    assert batch["pixel_values"].shape == (3, 3, 8, 8) and batch["pixel_values"].dtype == torch.float32
    assert batch["pixel_values"].is_contiguous()
    assert batch["captions"] == [train_dataset[i]["caption"] for i in range(3)]
    assert batch["indices"].dtype == torch.int64 and batch["indices"].tolist() == [0, 1, 2]
    torch.testing.assert_close(batch["pixel_values"][1], train_dataset[1]["pixel_values"], rtol=0, atol=0)
    with pytest.raises(ValueError, match="empty batch"):
        collate_examples([])


def test_the_prepared_dataset_survives_pickling_for_loader_workers(good_dataset):
    train_dataset, _ = prepare_training_dataset(good_dataset, resolution=8, random_flip=True, seed=5)
    train_dataset.set_epoch(2)
    copy = pickle.loads(pickle.dumps(train_dataset))
    for i in range(len(train_dataset)):
        assert torch.equal(copy[i]["pixel_values"], train_dataset[i]["pixel_values"])


@pytest.mark.parametrize("num_processes", [1, 2])
def test_a_resumed_accelerate_loader_reproduces_the_uninterrupted_batches(good_dataset, num_processes):
    """The documented recipe: `loader.set_epoch(epoch)` then `train_dataset.set_epoch(epoch)`, and resume with
    `skip_first_batches`. accelerate forwards the epoch to the data set for one process and not for two."""

    def prepared_loader():
        train_dataset, _ = prepare_training_dataset(good_dataset, resolution=8, random_flip=True, seed=0)
        loader = torch.utils.data.DataLoader(train_dataset, batch_size=1, shuffle=True, collate_fn=collate_examples)
        sharded = prepare_data_loader(
            loader, num_processes=num_processes, process_index=0, use_seedable_sampler=True, data_seed=7
        )
        return train_dataset, sharded

    def start_epoch(train_dataset, loader, epoch):
        loader.set_epoch(epoch)
        train_dataset.set_epoch(epoch)

    train_dataset, loader = prepared_loader()
    uninterrupted = []
    for epoch in range(3):
        start_epoch(train_dataset, loader, epoch)
        uninterrupted.append(list(loader))
    # the data set saw the true epoch: each example is what a data set set to epoch 2 makes of it
    reference, _ = prepare_training_dataset(good_dataset, resolution=8, random_flip=True, seed=0)
    reference.set_epoch(2)
    for batch in uninterrupted[2]:
        assert torch.equal(batch["pixel_values"][0], reference[int(batch["indices"][0])]["pixel_values"])

    train_dataset, loader = prepared_loader()  # a new process resuming after the first batch of epoch 2
    start_epoch(train_dataset, loader, 2)
    resumed = list(skip_first_batches(loader, 1))
    assert len(resumed) == len(uninterrupted[2]) - 1 > 0
    for expected, batch in zip(uninterrupted[2][1:], resumed, strict=True):
        assert torch.equal(batch["indices"], expected["indices"])
        assert torch.equal(batch["pixel_values"], expected["pixel_values"])


# resolution


def test_resolution_must_be_a_multiple_of_the_vae_factor():
    vae = AutoencoderKL(
        block_out_channels=(4, 4, 4, 4),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        norm_num_groups=2,
        layers_per_block=1,
    )
    check_resolution(96, vae=vae)
    with pytest.raises(
        ValueError, match=r"resolution 100 is not a multiple of 8, the VAE's .*nearest valid .* 96 or 104"
    ):
        check_resolution(100, vae=vae)
    with pytest.raises(ValueError, match=r"resolution 5 is not a multiple of 8.*nearest valid resolutions are 8\."):
        check_resolution(5, vae=vae)
    with pytest.raises(ValueError, match="resolution must be a positive integer"):
        check_resolution(-8, vae=vae)


def test_a_pixel_space_unet_needs_a_multiple_of_its_own_factor_and_warns_on_another_size(caplog):
    unet = UNet2DModel(
        sample_size=16,
        in_channels=3,
        out_channels=3,
        block_out_channels=(4, 4, 4),
        down_block_types=("DownBlock2D",) * 3,
        up_block_types=("UpBlock2D",) * 3,
        layers_per_block=1,
        norm_num_groups=2,
        add_attention=False,
    )
    with pytest.raises(ValueError, match=r"resolution 18 is not a multiple of 4, the UNet's .* 16 or 20"):
        check_resolution(18, unet=unet)
    with caplog.at_level(logging.WARNING, logger="diffusers_hold.image_data"):
        check_resolution(16, unet=unet)
        assert not caplog.records
        check_resolution(20, unet=unet)
    assert "Training at 20x20 while the UNet's sample_size corresponds to 16x16" in caplog.text


def test_data_errors_name_the_file_and_the_path(tmp_path, monkeypatch):
    """A broken metadata.jsonl line used to surface as pyarrow's "JSON parse error ... in row 3" without the file;
    a relative --dataset_name under a local folder was looked up on the Hub."""
    folder = tmp_path / "captioned"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((8, 8, 3), 40 * i, dtype=np.uint8)).save(folder / f"{i}.png")
    lines = [f'{{"file_name": "{i}.png", "text": "image {i}"}}' for i in range(3)]
    lines[1] = lines[1][:-3]  # cut off mid-string
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"line 2 of .*metadata.jsonl is not a JSON object"):
        load_image_dataset(train_data_dir=folder, cache_dir=tmp_path / "cache")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="dataset_name 'captioned/typo' does not exist"):
        load_image_dataset(dataset_name="captioned/typo")


def test_errors_about_a_second_image_source_use_its_names(tmp_path):
    """The audit's held-out folder used to be called train_data_dir in its errors."""
    names = ("held_out_dir", "held_out_dataset_name")
    with pytest.raises(ValueError, match=r"held_out_dir '.*missing' does not exist"):
        load_image_folder(train_data_dir=tmp_path / "missing", resolution=8, source_names=names)
    with pytest.raises(ValueError, match="exactly one of `held_out_dir` .* and `held_out_dataset_name`"):
        load_image_folder(resolution=8, source_names=names)
