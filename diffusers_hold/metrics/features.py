"""Learned image features for the copy-detection protocol and the CLIP score, behind one interface.

Every extractor here is a callable from images, a float tensor ``(N, C, H, W)`` with values in ``[0, 1]`` and
``C = 1`` or ``3``, to a float32 CPU tensor ``(N, D)`` of features, like the weight-free
:class:`~diffusers_hold.metrics.PCAFeatures` that the quality metrics use by default. Each has a ``metric`` attribute,
``"cosine"`` or ``"l2"``, naming the similarity that the published protocols use in its feature space.

- :class:`DINOv2Features`: the CLS token of a DINOv2 ``transformers`` model (cosine).
- :class:`CLIPImageFeatures`: CLIP's projected image embedding (cosine).
- :class:`SSCDFeatures`: an SSCD copy-detection descriptor from the TorchScript file of the SSCD release (cosine);
  the descriptor of the protocol of Somepalli et al., Wen et al. and MemBench.
- :func:`load_features`: one of these, or a PCA fitted on given images, by name.
- :func:`clip_score`: text alignment of images with their prompts (CLIPScore, as torchmetrics defines it).

Every extractor is built from its model and these keyword arguments: ``image_size`` (`int`: the side the images are
resized to; each class states its default, and CLIP's comes from the model), ``batch_size`` (`int`, defaults to 64:
images per forward pass), ``device`` (`str` or `torch.device`, *optional*: where the model runs; defaults to CUDA when
available, else the CPU), ``progress`` (`bool`, defaults to `False`: show a tqdm progress bar) and ``source``
(`str`: where the weights came from, for reports; each class states its default).

Weights are never downloaded: models come from a local folder or from a Hub id already in the local cache
(``local_files_only=True``). Preprocessing (resize, centre crop, normalisation) is done with torch operations on the
extractor's device and is stated in each class's docstring.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .._validation import as_batch, check_finite, check_positive_int
from .quality import PCAFeatures

__all__ = [
    "CLIPImageFeatures",
    "DINOv2Features",
    "SSCDFeatures",
    "clip_score",
    "load_features",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
FEATURE_KINDS = ("pca", "dinov2", "clip", "sscd")
_DINOV2_TYPES = ("dinov2", "dinov2_with_registers")  # both put the CLS token first


# -------------------------------------------------------------------------------------------------- images
def _check_images(images: torch.Tensor | np.ndarray, name: str = "images") -> torch.Tensor:
    """A validated batch ``(N, C, H, W)``, ``C`` 1 or 3, floating point, finite, in ``[0, 1]``."""
    images = as_batch(images, name)
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(
            f"{name} must have shape (N, C, H, W) with C = 1 (grayscale) or 3 (RGB), got {tuple(images.shape)}."
        )
    if not images.is_floating_point():
        raise ValueError(
            f"{name} must be floating point with values in [0, 1], got dtype {images.dtype} (for 8-bit images use "
            "images.float() / 255)."
        )
    check_finite(images, name)
    low, high = (float(v) for v in torch.aminmax(images))
    if low < 0 or high > 1:
        raise ValueError(
            f"{name} must have values in [0, 1], got values in [{low:.4g}, {high:.4g}] (map outputs in [-1, 1] with "
            "(images + 1) / 2)."
        )
    return images


def _resize_short_side(images: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """Resize so that the shorter side is ``size``, keeping the aspect ratio (the longer side is truncated to an
    integer, as torchvision's ``Resize(size)`` does), with antialiasing; values are clamped to ``[0, 1]`` because
    bicubic interpolation overshoots and the reference pipelines (PIL on 8-bit images) clip."""
    height, width = images.shape[-2:]
    if min(height, width) == size:
        return images
    if height <= width:
        new_size = (size, int(size * width / height))
    else:
        new_size = (int(size * height / width), size)
    resized = F.interpolate(images, size=new_size, mode=mode, align_corners=False, antialias=True)
    return resized.clamp(0.0, 1.0)


def _centre_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """The central ``size x size`` window (offsets rounded as torchvision's ``CenterCrop`` rounds them)."""
    height, width = images.shape[-2:]
    top, left = round((height - size) / 2), round((width - size) / 2)
    return images[..., top : top + size, left : left + size]


def _default_device(device: str | torch.device | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _load_pretrained(model_class: Any, name_or_path: str | os.PathLike, what: str, dtype: torch.dtype) -> Any:
    """``model_class.from_pretrained`` from local files only, with errors that name the path.

    A checkpoint of another architecture would load with freshly initialised (random) weights in place of the missing
    ones and give meaningless features without complaint, so missing weights raise.
    """
    try:
        model, info = model_class.from_pretrained(
            os.fspath(name_or_path), local_files_only=True, dtype=dtype, output_loading_info=True
        )
    except (OSError, ValueError) as error:
        raise ValueError(
            f"Cannot load {what} from {os.fspath(name_or_path)!r}: it is neither a folder written by save_pretrained "
            "nor a Hub id in the local cache (nothing is downloaded; fetch a Hub model with `hf download` first). "
            f"{error}"
        ) from error
    missing = sorted(info["missing_keys"])
    if missing:
        raise ValueError(
            f"{os.fspath(name_or_path)!r} does not hold the weights of {what}: {len(missing)} weights are missing "
            f"(e.g. {missing[0]!r}). Is it the right kind of model?"
        )
    return model


class _Preprocess:
    """Validated images to a model's input: grayscale to RGB, resize of the shorter side, optional centre crop,
    per-channel normalisation; in float32 on ``device``."""

    def __init__(
        self,
        image_size: int,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
        interpolation: str,
        crop: bool,
        device: torch.device,
    ):
        check_positive_int(image_size, "image_size")
        self.image_size = int(image_size)
        self.interpolation = interpolation
        self.crop = crop
        self.device = device
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.device, torch.float32)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = _resize_short_side(x, self.image_size, self.interpolation)
        if self.crop:
            x = _centre_crop(x, self.image_size)
        return (x - self.mean) / self.std


def _model_type(model: torch.nn.Module) -> str | None:
    """The ``model_type`` of a ``transformers`` model's config (`None` for another module)."""
    return getattr(getattr(model, "config", None), "model_type", None)


def _model_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype of the model's first parameter (float32 for a model without any)."""
    return next(iter(model.parameters()), torch.empty(0)).dtype


class _ImageFeatures:
    """Shared machinery: the constructor (its keyword arguments are the module docstring's), validation,
    preprocessing, batching, device placement and the progress bar.

    Subclasses set the preprocessing (``_mean``, ``_std``, ``_interpolation``, ``_crop``) and the defaults
    (``_image_size``, ``_source``), may check the model (:meth:`_check_model`) or take the input size from it
    (:meth:`_input_size`), and implement :meth:`_embed` on preprocessed pixels.
    """

    metric: Literal["cosine", "l2"] = "cosine"
    _mean = IMAGENET_MEAN
    _std = IMAGENET_STD
    _interpolation = "bicubic"
    _crop = True
    _image_size: int | None = None
    _source = ""

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        image_size: int | None = None,
        batch_size: int = 64,
        device: str | torch.device | None = None,
        progress: bool = False,
        source: str | None = None,
    ):
        self._check_model(model)
        image_size = self._input_size(model, image_size)
        check_positive_int(batch_size, "batch_size")
        self.device = _default_device(device)
        self._preprocess = _Preprocess(image_size, self._mean, self._std, self._interpolation, self._crop, self.device)
        self.model = model.eval().to(self.device)
        self.batch_size = int(batch_size)
        self.progress = progress
        self.source = self._source if source is None else source

    def _check_model(self, model: torch.nn.Module) -> None:
        """Raise for a model of the wrong kind (any model is accepted by default)."""

    def _input_size(self, model: torch.nn.Module, image_size: int | None) -> int | None:
        """The side the images are resized to: ``image_size``, or the class's default when it is `None`."""
        return self._image_size if image_size is None else image_size

    @property
    def image_size(self) -> int:
        """The side the images are resized to (the shorter side; also the crop when there is one)."""
        return self._preprocess.image_size

    def preprocess(self, images: torch.Tensor | np.ndarray) -> torch.Tensor:
        """The model's input for ``images``, as the class docstring states it (for inspection and tests).

        Args:
            images (`torch.Tensor` or `np.ndarray` of shape `(N, C, H, W)`): values in ``[0, 1]``, ``C`` 1 or 3.

        Returns:
            `torch.Tensor` of shape `(N, 3, H', W')`: normalised float32 pixels on the extractor's device.
        """
        return self._preprocess(_check_images(images))

    def _embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def __call__(self, images: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Features of ``images``, ``batch_size`` at a time.

        Args:
            images (`torch.Tensor` or `np.ndarray` of shape `(N, C, H, W)`): values in ``[0, 1]``, ``C`` 1 or 3.

        Returns:
            `torch.Tensor` of shape `(N, D)`: float32 features on the CPU.
        """
        images = _check_images(images)
        n = images.shape[0]
        parts = []
        dtype = _model_dtype(self.model)
        with tqdm(total=n, desc=type(self).__name__, unit="image", disable=not self.progress) as bar:
            for start in range(0, n, self.batch_size):
                batch = images[start : start + self.batch_size]
                out = self._embed(self._preprocess(batch).to(dtype))
                if out.ndim != 2 or out.shape[0] != batch.shape[0]:
                    raise ValueError(
                        f"{type(self).__name__}'s model returned shape {tuple(out.shape)} for {batch.shape[0]} "
                        "images; one feature vector per image, (N, D), is expected."
                    )
                parts.append(out.float().cpu())
                bar.update(batch.shape[0])
        return torch.cat(parts)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.source!r}, image_size={self.image_size}, metric={self.metric!r})"


# ------------------------------------------------------------------------------------------------ DINOv2
class DINOv2Features(_ImageFeatures):
    """DINOv2 image embeddings: the CLS token of the last hidden state (after the final layer norm).

    Preprocessing: grayscale images are repeated to 3 channels; the shorter side is resized to ``image_size``
    (bicubic, antialiased, clamped to ``[0, 1]``), the central ``image_size x image_size`` square is cropped, and the
    channels are normalised with the ImageNet mean ``(0.485, 0.456, 0.406)`` and std ``(0.229, 0.224, 0.225)``. (The
    DINOv2 image processor resizes to 256 before cropping 224; resizing straight to ``image_size`` keeps the whole
    shorter side, which matters when a copy sits near the border.) Similarity: cosine.

    Args:
        model (`transformers.Dinov2Model`): the backbone (``Dinov2WithRegistersModel`` works too).
        image_size (`int`, defaults to 224): side of the square input; DINOv2 interpolates its position embeddings,
            so any multiple of the patch size works.
        batch_size (`int`, defaults to 64): images per forward pass.
        device (`str` or `torch.device`, *optional*), progress (`bool`, defaults to `False`): as the module
            docstring states.
        source (`str`, defaults to `"Dinov2Model"`): where the weights came from, for reports.
    """

    _image_size = 224
    _source = "Dinov2Model"

    def _check_model(self, model: torch.nn.Module) -> None:
        model_type = _model_type(model)
        if model_type not in _DINOV2_TYPES:
            raise ValueError(f"DINOv2Features needs a DINOv2 model ({', '.join(_DINOV2_TYPES)}), got {model_type!r}.")

    @classmethod
    def from_pretrained(
        cls, name_or_path: str | os.PathLike, *, dtype: torch.dtype = torch.float32, **kwargs: Any
    ) -> DINOv2Features:
        """Load a DINOv2 model with ``transformers.AutoModel`` from a local folder or a cached Hub id.

        Args:
            name_or_path (`str` or `os.PathLike`): a folder written by ``save_pretrained``, or a Hub id such as
                ``facebook/dinov2-small`` already in the local cache (nothing is downloaded).
            dtype (`torch.dtype`, defaults to `torch.float32`): the weights' dtype.
            **kwargs: the keyword arguments of [`DINOv2Features`] (``image_size``, ``batch_size``, ``device``,
                ``progress``).

        Returns:
            [`DINOv2Features`]
        """
        from transformers import AutoModel

        model = _load_pretrained(AutoModel, name_or_path, "a DINOv2 model", dtype)
        return cls(model, source=os.fspath(name_or_path), **kwargs)

    def _embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).last_hidden_state[:, 0]


# -------------------------------------------------------------------------------------------------- CLIP
class CLIPImageFeatures(_ImageFeatures):
    """CLIP image embeddings: ``image_embeds`` of a ``CLIPVisionModelWithProjection`` (projected, not normalised).

    Preprocessing, as CLIP's image processor does it: grayscale images are repeated to 3 channels; the shorter side
    is resized to the vision config's ``image_size`` (bicubic, antialiased, clamped to ``[0, 1]``), the central
    square is cropped, and the channels are normalised with CLIP's mean ``(0.48145466, 0.4578275, 0.40821073)`` and
    std ``(0.26862954, 0.26130258, 0.27577711)``. Similarity: cosine.

    Args:
        model (`transformers.CLIPVisionModelWithProjection`): the vision tower with its projection.
        batch_size (`int`, defaults to 64), device (`str` or `torch.device`, *optional*), progress (`bool`, defaults
            to `False`): as the module docstring states; there is no ``image_size``, the vision config sets it.
        source (`str`, defaults to `"CLIPVisionModelWithProjection"`): where the weights came from, for reports.
    """

    _mean = CLIP_MEAN
    _std = CLIP_STD
    _source = "CLIPVisionModelWithProjection"

    def _check_model(self, model: torch.nn.Module) -> None:
        model_type = _model_type(model)
        if model_type != "clip_vision_model":
            raise ValueError(
                f"CLIPImageFeatures needs a CLIPVisionModelWithProjection (model type 'clip_vision_model'), got "
                f"{model_type!r}; load a full CLIP checkpoint with CLIPImageFeatures.from_pretrained."
            )

    def _input_size(self, model: torch.nn.Module, image_size: int | None) -> int:
        if image_size is not None:  # the position embeddings are fixed by the vision config
            raise TypeError("CLIPImageFeatures takes no image_size: the model's vision config sets it.")
        return model.config.image_size

    @classmethod
    def from_pretrained(
        cls, name_or_path: str | os.PathLike, *, dtype: torch.dtype = torch.float32, **kwargs: Any
    ) -> CLIPImageFeatures:
        """Load ``transformers.CLIPVisionModelWithProjection`` from a local folder or a cached Hub id.

        A full ``CLIPModel`` checkpoint (e.g. ``openai/clip-vit-large-patch14``) works: its text tower is ignored.

        Args:
            name_or_path (`str` or `os.PathLike`): a folder written by ``save_pretrained``, or a Hub id already in
                the local cache (nothing is downloaded).
            dtype (`torch.dtype`, defaults to `torch.float32`): the weights' dtype.
            **kwargs: the keyword arguments of [`CLIPImageFeatures`] (``batch_size``, ``device``, ``progress``).

        Returns:
            [`CLIPImageFeatures`]
        """
        from transformers import CLIPVisionModelWithProjection

        model = _load_pretrained(CLIPVisionModelWithProjection, name_or_path, "a CLIP vision model", dtype)
        return cls(model, source=os.fspath(name_or_path), **kwargs)

    def _embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).image_embeds


# -------------------------------------------------------------------------------------------------- SSCD
class SSCDFeatures(_ImageFeatures):
    """SSCD copy-detection descriptors (Pizzi et al. 2022) from a TorchScript model, L2-normalised.

    Preprocessing, as the SSCD README states it (``Resize(288)``, ``ToTensor``, ``Normalize``): grayscale images are
    repeated to 3 channels; the shorter side is resized to ``image_size`` keeping the aspect ratio (bilinear,
    antialiased, clamped to ``[0, 1]``, no crop), and the channels are normalised with the ImageNet mean
    ``(0.485, 0.456, 0.406)`` and std ``(0.229, 0.224, 0.225)``. The descriptors are divided by their L2 norm, so
    the cosine similarity of the protocol (a copy at similarity > 0.5) is their dot product. Similarity: cosine.

    Args:
        model (`torch.nn.Module`): the descriptor model, mapping ``(N, 3, H, W)`` to ``(N, D)``; normally a
            ``torch.jit.ScriptModule`` from :meth:`from_torchscript`.
        image_size (`int`, defaults to 288): the shorter side after resizing (SSCD's "small" setting).
        batch_size (`int`, defaults to 64): images per forward pass.
        device (`str` or `torch.device`, *optional*), progress (`bool`, defaults to `False`): as the module
            docstring states.
        source (`str`, defaults to `"SSCD"`): where the model came from, for reports.
    """

    _interpolation = "bilinear"
    _crop = False
    _image_size = 288
    _source = "SSCD"

    @classmethod
    def from_torchscript(cls, path: str | os.PathLike, **kwargs: Any) -> SSCDFeatures:
        """Load an SSCD TorchScript file, e.g. ``sscd_disc_mixup.torchscript.pt`` of the SSCD release.

        Args:
            path (`str` or `os.PathLike`): the TorchScript file (the user downloads it; nothing is fetched here).
            **kwargs: the keyword arguments of [`SSCDFeatures`] (``image_size``, ``batch_size``, ``device``,
                ``progress``).

        Returns:
            [`SSCDFeatures`]
        """
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise ValueError(f"The SSCD TorchScript file {path!r} does not exist (or is not a file).")
        try:
            with warnings.catch_warnings():
                # torch.jit.load is deprecated in favour of torch.export, but the SSCD release ships TorchScript
                warnings.simplefilter("ignore", DeprecationWarning)
                model = torch.jit.load(path, map_location="cpu")
        except RuntimeError as error:
            raise ValueError(f"{path!r} is not a TorchScript model file (torch.jit.load failed: {error}).") from error
        return cls(model, source=path, **kwargs)

    def _embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model(pixel_values), dim=-1)


# ------------------------------------------------------------------------------------------------- loader
def load_features(
    kind: str,
    path: str | os.PathLike | None = None,
    *,
    fit_images: torch.Tensor | np.ndarray | None = None,
    **kwargs: Any,
) -> PCAFeatures | DINOv2Features | CLIPImageFeatures | SSCDFeatures:
    """A feature extractor by name: the weight-free PCA or a learned model from local files.

    Args:
        kind (`str`): ``"pca"`` (a [`PCAFeatures`] fitted on ``fit_images``; L2), ``"dinov2"``
            ([`DINOv2Features`]), ``"clip"`` ([`CLIPImageFeatures`]) or ``"sscd"`` ([`SSCDFeatures`]); the learned
            ones use cosine similarity.
        path (`str` or `os.PathLike`, *optional*): required by the learned kinds: a folder written by
            ``save_pretrained`` or a cached Hub id (``dinov2``, ``clip``), or the TorchScript file (``sscd``).
        fit_images (`torch.Tensor` or `np.ndarray`, *optional*): required by ``"pca"``: the real images (normally
            held out) that the PCA is fitted on.
        **kwargs: keyword arguments of the extractor (``n_components`` for PCA; ``image_size``, ``batch_size``,
            ``device``, ``progress`` and, for ``dinov2`` / ``clip``, ``dtype`` for the others).

    Returns:
        The extractor, a callable from images to features with a ``metric`` attribute.
    """
    if kind not in FEATURE_KINDS:
        raise ValueError(f"Unknown feature kind {kind!r}; choose one of {', '.join(FEATURE_KINDS)}.")
    if kind == "pca":
        if path is not None:
            raise ValueError(f"The PCA features are fitted, not loaded: pass fit_images, not path ({path!r}).")
        if fit_images is None:
            raise ValueError("The PCA features need fit_images (real images, normally held out) to be fitted on.")
        return PCAFeatures(**kwargs).fit(fit_images)
    if path is None:
        raise ValueError(
            f"The {kind!r} features need path: "
            + ("the SSCD TorchScript file." if kind == "sscd" else "a local model folder or a cached Hub id.")
        )
    if fit_images is not None:
        raise ValueError(f"fit_images is only used by the 'pca' features, not by {kind!r}.")
    if kind == "sscd":
        return SSCDFeatures.from_torchscript(path, **kwargs)
    extractor_class = DINOv2Features if kind == "dinov2" else CLIPImageFeatures
    return extractor_class.from_pretrained(path, **kwargs)


# --------------------------------------------------------------------------------------------- CLIP score
@torch.no_grad()
def clip_score(
    images: torch.Tensor | np.ndarray,
    prompts: Sequence[str],
    model_name_or_path: str | os.PathLike,
    *,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
) -> torch.Tensor:
    """CLIPScore of each image with its prompt: ``max(100 * cos(image_embed, text_embed), 0)``, as torchmetrics
    defines it (Hessel et al. 2021 with weight 100 instead of 2.5).

    The embeddings are the projected ones of a ``transformers.CLIPModel``; images are preprocessed as in
    [`CLIPImageFeatures`], prompts are tokenized with the model's ``CLIPTokenizer`` and truncated to its context
    length (77 tokens for the released models).

    Args:
        images (`torch.Tensor` or `np.ndarray` of shape `(N, C, H, W)`): values in ``[0, 1]``, ``C`` 1 or 3.
        prompts (`Sequence[str]`): ``N`` prompts, one per image.
        model_name_or_path (`str` or `os.PathLike`): a folder with a ``CLIPModel`` and its tokenizer, or a Hub id
            such as ``openai/clip-vit-large-patch14`` already in the local cache (nothing is downloaded).
        batch_size (`int`, defaults to 64): image-prompt pairs per forward pass.
        device (`str` or `torch.device`, *optional*): where the model runs; defaults to CUDA when available, else
            the CPU.
        dtype (`torch.dtype`, defaults to `torch.float32`): the weights' dtype.
        progress (`bool`, defaults to `False`): show a tqdm progress bar.

    Returns:
        `torch.Tensor` of shape `(N,)`: float32 scores in ``[0, 100]`` on the CPU.
    """
    from transformers import CLIPModel, CLIPTokenizer

    check_positive_int(batch_size, "batch_size")
    images = _check_images(images)
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts must be a sequence of strings, one per image.")
    if len(prompts) != images.shape[0]:
        raise ValueError(
            f"clip_score needs one prompt per image: {len(prompts)} prompts for {images.shape[0]} images."
        )
    source = os.fspath(model_name_or_path)
    model = _load_pretrained(CLIPModel, source, "a CLIP model (CLIPModel)", dtype)
    try:
        tokenizer = CLIPTokenizer.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError) as error:
        raise ValueError(f"Cannot load the CLIP tokenizer from {source!r}: {error}") from error
    # without tokenizer files transformers builds a tokenizer of special tokens only, which maps every word to one id
    if len(tokenizer.get_vocab()) <= len(tokenizer.all_special_tokens):
        raise ValueError(f"No CLIP tokenizer files (vocab.json and merges.txt, or tokenizer.json) in {source!r}.")
    device = _default_device(device)
    model = model.eval().to(device)
    preprocess = _Preprocess(model.config.vision_config.image_size, CLIP_MEAN, CLIP_STD, "bicubic", True, device)
    context = model.config.text_config.max_position_embeddings
    scores = []
    n = images.shape[0]
    with tqdm(total=n, desc="CLIP score", unit="image", disable=not progress) as bar:
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            tokens = tokenizer(
                list(prompts[start:stop]), padding=True, truncation=True, max_length=context, return_tensors="pt"
            ).to(device)
            pixel_values = preprocess(images[start:stop]).to(_model_dtype(model))
            out = model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, pixel_values=pixel_values)
            # CLIPModel returns unit-norm embeddings, so the cosine is their dot product
            cosine = (out.image_embeds.float() * out.text_embeds.float()).sum(-1)
            scores.append((100.0 * cosine).clamp_min(0.0).cpu())
            bar.update(stop - start)
    return torch.cat(scores)
