"""Argument checks shared across the package (metrics, image data, mitigations): one place for each message.

Private to diffusers-hold; the names are public within the package.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

# elements handled at once by chunked checks and searches (bounded extra memory)
ELEMENT_BUDGET = 1 << 22


def is_integer(value: Any) -> bool:
    """Whether ``value`` is an integer number: a Python or numpy integer or a 0-d integer tensor, not a ``bool``."""
    if isinstance(value, torch.Tensor):
        return value.ndim == 0 and not (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool)
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_positive_int(value: Any, name: str) -> None:
    """Raise unless ``value`` is an integer (:func:`is_integer`) of at least 1."""
    if not is_integer(value) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")


def as_batch(images: torch.Tensor | np.ndarray, name: str) -> torch.Tensor:
    """A non-empty batch ``(N, *image_shape)`` of real numbers as a tensor (numpy arrays are wrapped, not copied)."""
    if isinstance(images, np.ndarray):
        if not (np.issubdtype(images.dtype, np.integer) or np.issubdtype(images.dtype, np.floating)):
            raise ValueError(f"{name} must hold real numbers, got a numpy array of dtype {images.dtype}.")
        try:
            images = torch.from_numpy(images)
        except ValueError:  # negative strides
            images = torch.from_numpy(np.ascontiguousarray(images))
    elif not isinstance(images, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or a numpy array, got {type(images).__name__}.")
    if images.is_complex() or images.dtype == torch.bool:
        raise ValueError(f"{name} must hold real numbers, got dtype {images.dtype}.")
    if images.ndim < 2:
        raise ValueError(
            f"{name} must be a batch of shape (N, ...) with one image (or feature vector) per row, "
            f"got shape {tuple(images.shape)}."
        )
    if images.shape[0] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(images.shape)}); at least one image is needed.")
    if images[0].numel() == 0:
        raise ValueError(f"{name} holds images with no elements (shape {tuple(images.shape)}).")
    return images


def check_finite(images: torch.Tensor, name: str) -> None:
    """Raise on NaN or infinite values, naming the first offending row; works chunk by chunk (bounded memory).

    Row norms are a fast screen (NaN and inf propagate into them); only a chunk with a non-finite norm, which may
    also be a harmless overflow, is checked element by element.
    """
    if not images.is_floating_point():
        return
    rows = max(1, ELEMENT_BUDGET // images[0].numel())
    for start in range(0, images.shape[0], rows):
        chunk = images[start : start + rows].flatten(1)
        if bool(torch.isfinite(torch.linalg.vector_norm(chunk, dim=1)).all()):
            continue
        ok = torch.isfinite(chunk).all(1)
        if not bool(ok.all()):
            first = start + int((~ok).nonzero()[0, 0])
            raise ValueError(f"{name} contains NaN or infinite values (first in row {first}).")


def check_same_shape(shape_a: tuple[int, ...], name_a: str, shape_b: tuple[int, ...], name_b: str) -> None:
    """Raise unless two per-image shapes agree, saying when only the channel count differs."""
    shape_a, shape_b = tuple(shape_a), tuple(shape_b)
    if shape_a == shape_b:
        return
    if len(shape_a) == len(shape_b) >= 3:
        if shape_a[1:] == shape_b[1:]:  # channels first
            channels = (shape_a[0], shape_b[0])
        elif shape_a[:-1] == shape_b[:-1]:  # channels last
            channels = (shape_a[-1], shape_b[-1])
        else:
            channels = None
        if channels is not None:
            raise ValueError(
                f"{name_a} and {name_b} have different channel counts ({channels[0]} vs {channels[1]}; image shapes "
                f"{shape_a} and {shape_b})."
            )
    raise ValueError(
        f"{name_a} and {name_b} have different image shapes: {shape_a} vs {shape_b}. Samples are compared element "
        "by element, so both sets must have the same shape after the batch axis."
    )


def check_k(k: int, available: int, what: str, name: str) -> None:
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}.")
    if available < k:
        raise ValueError(f"{what} needs at least {k} images in {name}, but {name} holds only {available}.")


def is_real_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
