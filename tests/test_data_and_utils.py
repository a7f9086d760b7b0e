"""Bundled data and image helpers."""

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.data import astronaut, chelsea, coffee, lfw_subset, rocket
from sklearn.datasets import load_digits, load_sample_images

from diffusers_hold.data import load_digits_images, load_lfw_faces, load_photo_patches
from diffusers_hold.utils import atomic_output, image_grid, replace_path


def test_digits_are_scaled_to_minus_one_one_and_keep_their_labels():
    images, labels = load_digits_images(8)
    raw = load_digits()
    assert images.shape == (1797, 1, 8, 8) and labels.shape == (1797,)
    np.testing.assert_allclose(images[:, 0].numpy(), raw.images / 8.0 - 1.0, atol=1e-6)
    np.testing.assert_array_equal(labels.numpy(), raw.target)
    upscaled, _ = load_digits_images(16)
    assert upscaled.shape == (1797, 1, 16, 16)
    assert upscaled.min() >= -1 and upscaled.max() <= 1
    # bicubic upscaling keeps the image: block means of the 16x16 version follow the 8x8 original
    blocks = upscaled[:, 0].reshape(1797, 8, 2, 8, 2).mean((2, 4))
    assert np.corrcoef(blocks.flatten(), images.flatten())[0, 1] > 0.95
    with pytest.raises(ValueError, match="resolution"):
        load_digits_images(4)


def test_image_grid_places_cells_with_gaps():
    cells = [Image.fromarray(np.full((3, 2), 10 * (i + 1), dtype=np.uint8)) for i in range(5)]
    grid = image_grid(cells, cols=3, padding=1, scale=2, background=0)
    assert grid.size == (3 * 4 + 4, 2 * 6 + 3)
    arr = np.asarray(grid)
    assert (arr[0] == 0).all() and (arr[:, 0] == 0).all()  # border
    np.testing.assert_array_equal(arr[1:7, 1:5], 10)  # first cell, enlarged 2x
    np.testing.assert_array_equal(arr[8:14, 6:10], 50)  # fifth cell: row 1, column 1
    np.testing.assert_array_equal(arr[8:14, 11:15], 0)  # the empty sixth slot stays background
    with pytest.raises(ValueError, match="one size"):
        image_grid([cells[0], Image.new("L", (5, 5))])
    with pytest.raises(ValueError, match="at least one"):
        image_grid([])


def test_atomic_output_writes_files_and_folders_whole_or_not_at_all(tmp_path):
    target = tmp_path / "out" / "state.json"
    with atomic_output(target) as temporary:
        temporary.write_text("new")
        assert not target.exists() and temporary.parent == target.parent and temporary.name.startswith(".")
    assert target.read_text() == "new"
    with pytest.raises(RuntimeError, match="interrupted"), atomic_output(target) as temporary:
        temporary.write_text("half")
        raise RuntimeError("interrupted")
    assert target.read_text() == "new" and sorted(p.name for p in target.parent.iterdir()) == ["state.json"]
    # a non-empty folder is replaced only once the new one is complete, and nothing is left beside it
    folder = tmp_path / "pipeline"
    folder.mkdir()
    (folder / "old.txt").write_text("old")
    with atomic_output(folder) as staging:
        staging.mkdir()
        (staging / "new.txt").write_text("new")
        assert (folder / "old.txt").exists()
    assert sorted(p.name for p in folder.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "pipeline"]


def test_replace_path_restores_the_old_folder_when_the_new_one_cannot_move_in(tmp_path):
    target = tmp_path / "target"
    target.mkdir()
    (target / "kept.txt").write_text("old")
    with pytest.raises(OSError):
        replace_path(tmp_path / "missing", target)
    assert (target / "kept.txt").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["target"]


def test_lfw_faces_are_scikit_images_first_hundred_scaled_to_minus_one_one():
    faces = load_lfw_faces(25)
    assert faces.shape == (100, 1, 25, 25) and faces.dtype == torch.float32
    np.testing.assert_allclose(faces[:, 0].numpy(), lfw_subset()[:100] * 2 - 1, atol=1e-6)
    small = load_lfw_faces(8)
    assert small.shape == (100, 1, 8, 8) and small.min() >= -1 and small.max() <= 1
    with pytest.raises(ValueError, match="resolution must be a positive integer"):
        load_lfw_faces(0)


def test_photo_patches_are_block_means_of_the_bundled_photographs_without_flat_ones():
    # every square kept: one per whole 32x32 block of the six photographs
    photos = [astronaut(), chelsea(), coffee(), rocket(), *load_sample_images().images]
    everything = load_photo_patches(8, min_std=0.0)
    assert len(everything) == sum((photo.shape[0] // 32) * (photo.shape[1] // 32) for photo in photos)
    assert everything.shape[1:] == (3, 8, 8) and everything.dtype == torch.float32
    # the first square is the astronaut's top-left 32x32 block, averaged over 4x4 pixels (PIL rounds to uint8)
    block = astronaut()[:32, :32].astype(np.float64).reshape(8, 4, 8, 4, 3).mean(axis=(1, 3)) / 255 * 2 - 1
    np.testing.assert_allclose(everything[0].permute(1, 2, 0).numpy(), block, atol=2 / 255 + 1e-6)
    # flat squares are left out, varied ones kept
    kept = load_photo_patches(8)
    std = ((everything + 1) / 2).reshape(len(everything), -1).std(1, unbiased=False)
    assert len(kept) == int((std >= 0.04).sum()) and 0 < len(kept) < len(everything)
    assert kept.min() >= -1 and kept.max() <= 1
    assert load_photo_patches(16).shape[1:] == (3, 16, 16)
    with pytest.raises(ValueError, match="must not exceed patch_size"):
        load_photo_patches(64)
