"""Prompt sets of the audit's prompt-set protocol: prompt files, and each prompt's reference (ground-truth) images.

A prompt file is UTF-8 text in one of two forms:

- **Plain text** (any name not ending in ``.jsonl``): one prompt a line, surrounding whitespace removed, blank lines
  skipped.
- **JSON Lines** (a name ending in ``.jsonl``): one JSON object a line (blank lines skipped) with a ``prompt`` string
  and optionally ``reference_images``: a path or a list of paths of that prompt's ground-truth images, relative to
  the file's folder (absolute paths are kept as they are). Other keys are ignored. Either every line has
  ``reference_images`` or none has.

Prompts must be distinct (the protocol groups generations by prompt). Errors name the file and the line.

Reference images can come instead from a ``reference_dir`` (:meth:`PromptSet.with_reference_dir`): one sub-folder per
prompt, named by the prompt's position in the prompt set counted from 0 (``0``, ``1``, ...; zero padding such as
``007`` is allowed), each holding that prompt's image files (directly, not in sub-folders). Every prompt needs a
folder with at least one image, and every folder must name a prompt.

Reference images are read as the training images are (:func:`~diffusers_hold.image_data.load_image_folder`): turned
upright from their EXIF orientation, converted to the generations' channels, the shorter side resized to the
generations' size (bilinear), centre-cropped, as values in ``[0, 1]``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["PromptSet", "load_reference_images", "read_prompt_file"]


@dataclass
class PromptSet:
    """The prompts of a prompt-set audit, with each prompt's reference images when there are any.

    Attributes:
        prompts (`list[str]`): distinct, non-empty prompts, in order.
        reference_images (`list[list[Path]]`, *optional*): per prompt, the files of its ground-truth images (at least
            one each); `None` when the references are the training images.
        source (`str`, *optional*): the prompt file, for messages and the report.
        line_numbers (`list[int]`, *optional*): each prompt's line in ``source`` (from 1).
    """

    prompts: list[str]
    reference_images: list[list[Path]] | None = None
    source: str | None = None
    line_numbers: list[int] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.prompts, str) or not isinstance(self.prompts, Sequence):
            raise ValueError("prompts must be a list of strings (one prompt each), not a single string.")
        self.prompts = list(self.prompts)
        if not self.prompts:
            raise ValueError(f"{self.source or 'The prompt set'} holds no prompts.")
        seen: dict[str, int] = {}
        for i, prompt in enumerate(self.prompts):
            if not isinstance(prompt, str) or not prompt.strip():
                raise ValueError(f"{self.where(i)}: a prompt must be a non-empty string, got {prompt!r}.")
            if prompt in seen:
                raise ValueError(
                    f"{self.where(i)} repeats the prompt of {self.where(seen[prompt])} ({prompt!r:.80}); the protocol "
                    "groups generations by prompt, so prompts must be distinct."
                )
            seen[prompt] = i
        if self.reference_images is not None:
            if len(self.reference_images) != len(self.prompts):
                raise ValueError(
                    f"reference_images has {len(self.reference_images)} entries for {len(self.prompts)} prompts."
                )
            self.reference_images = [[Path(path) for path in paths] for paths in self.reference_images]
            for i, paths in enumerate(self.reference_images):
                if not paths:
                    raise ValueError(f"{self.where(i)} has no reference image.")

    def __len__(self) -> int:
        return len(self.prompts)

    def where(self, index: int) -> str:
        """How messages name prompt ``index``: its line in the prompt file, or its position in the set."""
        if self.source is not None and self.line_numbers is not None:
            return f"line {self.line_numbers[index]} of {self.source}"
        return f"prompt {index}"

    def with_reference_dir(self, reference_dir: str | os.PathLike) -> PromptSet:
        """This prompt set with the reference images of ``reference_dir``: sub-folder ``k`` (any zero padding) holds
        the images of prompt ``k`` (counted from 0). See the module docstring.

        Raises:
            `ValueError`: if the set already has reference images, the folder does not exist, a prompt has no folder
                or no image in it, or a sub-folder's name is not the position of a prompt.
        """
        from ..image_data import IMAGE_SUFFIXES

        if self.reference_images is not None:
            raise ValueError(
                f"{self.source or 'The prompt set'} already lists reference_images; give them either in the prompt "
                "file or as a reference_dir, not both."
            )
        folder = Path(reference_dir)
        if not folder.is_dir():
            raise ValueError(f"The reference_dir {os.fspath(folder)!r} does not exist or is not a folder.")
        by_index: dict[int, Path] = {}
        for child in sorted(folder.iterdir()):
            if not child.is_dir():
                continue
            if not child.name.isdigit() or int(child.name) >= len(self.prompts):
                raise ValueError(
                    f"{child} is not named by the position of a prompt: the sub-folders of the reference_dir are "
                    f"named 0 to {len(self.prompts) - 1} (one per prompt, counted from 0)."
                )
            if int(child.name) in by_index:
                raise ValueError(f"{by_index[int(child.name)]} and {child} name the same prompt {int(child.name)}.")
            by_index[int(child.name)] = child
        references = []
        for i in range(len(self.prompts)):
            if i not in by_index:
                raise ValueError(
                    f"The reference_dir {os.fspath(folder)!r} has no sub-folder {i} for {self.where(i)} "
                    f"({self.prompts[i]!r:.80})."
                )
            files = sorted(p for p in by_index[i].iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise ValueError(f"{by_index[i]} holds no image files (for {self.where(i)}).")
            references.append(files)
        return PromptSet(self.prompts, references, self.source, self.line_numbers)


def read_prompt_file(path: str | os.PathLike) -> PromptSet:
    """Read a prompt file: plain text (one prompt a line) or JSON Lines (``*.jsonl``: ``prompt`` and optional
    ``reference_images``, paths relative to the file), as the module docstring describes.

    Args:
        path (`str` or `os.PathLike`): the file.

    Returns:
        [`PromptSet`]: the prompts, their reference images (JSON Lines with ``reference_images``) and line numbers.

    Raises:
        `ValueError`: naming the file and line: a line that is not a JSON object or has no ``prompt`` string, a bad
            ``reference_images`` value, a reference image that does not exist, some lines with references and some
            without, a repeated prompt, or a file without prompts.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"The prompt file {os.fspath(path)!r} does not exist or is not a file.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"The prompt file {path} is not UTF-8 text: {error}.") from error
    numbered = [(number, line.strip()) for number, line in enumerate(text.splitlines(), start=1) if line.strip()]
    if not numbered:
        raise ValueError(f"The prompt file {path} holds no prompts.")
    if path.suffix.lower() != ".jsonl":
        number, first = numbered[0]
        if first.startswith("{") and _json_object(first) is not None:
            raise ValueError(
                f"Line {number} of {path} is a JSON object, but the file is read as plain text (one prompt a line); "
                "name it *.jsonl to read it as JSON Lines."
            )
        return PromptSet([line for _, line in numbered], None, str(path), [number for number, _ in numbered])
    prompts, references, numbers = [], [], []
    for number, line in numbered:
        where = f"line {number} of {path}"
        record = _json_object(line)
        if record is None:
            raise ValueError(f"{where} is not a JSON object: {line[:80]!r}.")
        prompt = record.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"{where} has no `prompt` string (keys: {', '.join(record) or 'none'}).")
        prompts.append(prompt)
        numbers.append(number)
        references.append(_reference_paths(record, path.parent, where))
    with_references = [paths is not None for paths in references]
    if any(with_references) and not all(with_references):
        number = numbers[with_references.index(not with_references[0])]
        raise ValueError(
            f"Line {number} of {path} {'has' if not with_references[0] else 'lacks'} `reference_images` but line "
            f"{numbers[0]} {'has' if with_references[0] else 'lacks'} them: give every prompt reference images, or "
            "none (then the training images are the reference)."
        )
    return PromptSet(prompts, references if all(with_references) else None, str(path), numbers)


def _json_object(line: str) -> dict | None:
    try:
        value = json.loads(line)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def _reference_paths(record: dict, folder: Path, where: str) -> list[Path] | None:
    """The existing files of a record's ``reference_images`` (relative to ``folder``), or `None` without the key."""
    if "reference_images" not in record:
        return None
    value = record["reference_images"]
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(item, str) and item for item in value):
        raise ValueError(f"{where}: `reference_images` must be a path or a non-empty list of paths: {value!r:.80}.")
    paths = [folder / item for item in value]  # an absolute item replaces folder
    for item, resolved in zip(value, paths, strict=True):
        if not resolved.is_file():
            raise ValueError(f"{where}: the reference image {item!r} does not exist (looked for {resolved}).")
    return paths


def load_reference_images(
    prompt_set: PromptSet, resolution: int, num_channels: int = 3
) -> tuple[torch.Tensor, list[int]]:
    """The reference images of every prompt, read as the training images are read, and the prompt of each.

    Args:
        prompt_set ([`PromptSet`]): prompts with ``reference_images``.
        resolution (`int`): the generations' side; images are resized (shorter side) and centre-cropped to it.
        num_channels (`int`, defaults to 3): the generations' channels, 1 or 3.

    Returns:
        `tuple`: the images, a float tensor in ``[0, 1]`` of shape `(R, num_channels, resolution, resolution)`, in the
        order of the prompts and of each prompt's list, and each image's prompt position (a list of `R` ints).

    Raises:
        `ValueError`: if the set has no reference images, or an image cannot be read (every such file is named).
    """
    import datasets

    from ..image_data import prepare_training_dataset

    if prompt_set.reference_images is None:
        raise ValueError(f"{prompt_set.source or 'The prompt set'} has no reference images.")
    files = [os.fspath(path) for paths in prompt_set.reference_images for path in paths]
    owners = [i for i, paths in enumerate(prompt_set.reference_images) for _ in paths]
    dataset = datasets.Dataset.from_dict({"image": files})
    examples, _ = prepare_training_dataset(
        dataset, image_column="image", resolution=resolution, center_crop=True, num_channels=num_channels
    )
    images = torch.stack([examples[i]["pixel_values"] for i in range(len(examples))]) / 2 + 0.5
    return images, owners
