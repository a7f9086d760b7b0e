"""NeMo-style value-neuron masking against memorization (Hintersdorf et al.), an inference-time edit of the weights.

Hintersdorf et al. find that a memorized prompt often drives a few output neurons of
the cross-attention value projections (``attn2.to_v`` of a ``UNet2DConditionModel``) far above their activation on
other prompts; zeroing those neurons removes the memorization with little change elsewhere.
:func:`value_neuron_activations` gives the absolute ``to_v`` activations, :func:`value_neuron_z_scores` and
:func:`find_memorization_neurons` the out-of-distribution neurons of a memorized prompt against reference prompts, and
:func:`mask_value_neurons` zeroes their ``to_v`` rows (and biases), which saves and loads like head pruning
(:mod:`.head_pruning`). This is
NeMo's initial (z-score) selection; its refinement search over the candidate neurons is not implemented.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
from diffusers.models.attention_processor import Attention

__all__ = [
    "cross_attention_modules",
    "find_memorization_neurons",
    "mask_value_neurons",
    "masked_value_neurons",
    "value_neuron_activations",
    "value_neuron_z_scores",
]


def cross_attention_modules(unet: torch.nn.Module) -> dict[str, Attention]:
    """The cross-attention modules of ``unet`` that have a value projection (``to_v``), by module name; raises
    when there are none. Their value neurons are what NeMo selects and masks."""
    modules = {
        name: m
        for name, m in unet.named_modules()
        if isinstance(m, Attention) and m.is_cross_attention and getattr(m, "to_v", None) is not None
    }
    if not modules:
        raise ValueError(f"{type(unet).__name__} has no cross-attention modules with a value projection.")
    return modules


def value_neuron_activations(
    unet: torch.nn.Module, encoder_hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Absolute activations of the cross-attention value neurons (``attn2.to_v`` outputs), averaged over tokens.

    In cross-attention the values depend only on the text, not on the image or the timestep, so they are computed
    directly from the text states (through ``norm_cross`` if the module has one, and the UNet's ``encoder_hid_proj``
    if it is a linear projection), without a UNet forward pass.

    Args:
        unet (`UNet2DConditionModel`): the UNet (HOLD UNets included).
        encoder_hidden_states (`torch.Tensor` of shape `(batch, tokens, dim)`): text-encoder states of the prompts.
        attention_mask (`torch.Tensor` of shape `(batch, tokens)`, *optional*): 1 for the tokens to average over;
            all tokens by default.

    Returns:
        `dict[str, torch.Tensor]`: per cross-attention module name, float32 activations of shape
        `(batch, to_v.out_features)`.
    """
    if not torch.is_tensor(encoder_hidden_states) or encoder_hidden_states.ndim != 3:
        raise ValueError("encoder_hidden_states must have shape (batch, tokens, dim).")
    modules = cross_attention_modules(unet)
    states = encoder_hidden_states
    projection = getattr(unet, "encoder_hid_proj", None)
    if projection is not None:
        if not isinstance(projection, torch.nn.Linear):
            raise ValueError(f"Unsupported encoder_hid_proj {type(projection).__name__}; only a Linear is handled.")
        states = projection(states)
    if attention_mask is None:
        weights = torch.ones(states.shape[:2], device=states.device)
    else:
        if attention_mask.shape != states.shape[:2]:
            raise ValueError(f"attention_mask must have shape {tuple(states.shape[:2])}.")
        weights = attention_mask.to(device=states.device, dtype=torch.float32)
    weights = weights / weights.sum(dim=1, keepdim=True).clamp_min(1)
    activations = {}
    with torch.no_grad():
        for name, attn in modules.items():
            x = states
            if attn.norm_cross is not None:
                x = attn.norm_encoder_hidden_states(x)
            values = attn.to_v(x.to(attn.to_v.weight.dtype)).float().abs()
            activations[name] = torch.einsum("btn,bt->bn", values, weights)
    return activations


def value_neuron_z_scores(
    unet: torch.nn.Module,
    memorized_hidden_states: torch.Tensor,
    reference_hidden_states: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Per-neuron z-scores of the memorized prompt(s) against reference prompts.

    ``z = (a - mean_ref) / std_ref`` per value neuron, ``a`` the activation of :func:`value_neuron_activations`
    averaged over the memorized batch, ``mean_ref`` and ``std_ref`` (with Bessel's correction) over the reference
    batch; a zero ``std_ref`` is taken as ``1e-12``.

    Args:
        unet (`UNet2DConditionModel`): the UNet.
        memorized_hidden_states (`torch.Tensor` of shape `(batch, tokens, dim)`): states of the memorized prompt(s).
        reference_hidden_states (`torch.Tensor` of shape `(n, tokens, dim)`): states of n >= 2 other prompts.

    Returns:
        `dict[str, torch.Tensor]`: per cross-attention module, z-scores of shape `(to_v.out_features,)`.
    """
    if not torch.is_tensor(reference_hidden_states) or reference_hidden_states.ndim != 3:
        raise ValueError("reference_hidden_states must have shape (n, tokens, dim).")
    if len(reference_hidden_states) < 2:
        raise ValueError("At least 2 reference prompts are needed for a standard deviation.")
    memorized = value_neuron_activations(unet, memorized_hidden_states)
    reference = value_neuron_activations(unet, reference_hidden_states)
    return {
        name: (memorized[name].mean(0) - ref.mean(0)) / ref.std(0).clamp_min(1e-12) for name, ref in reference.items()
    }


def find_memorization_neurons(
    unet: torch.nn.Module,
    memorized_hidden_states: torch.Tensor,
    reference_hidden_states: torch.Tensor,
    z_threshold: float = 3.0,
) -> dict[str, list[int]]:
    """The value neurons a memorized prompt drives out of distribution: z-score above ``z_threshold``.

    Args:
        unet (`UNet2DConditionModel`): the UNet.
        memorized_hidden_states (`torch.Tensor`), reference_hidden_states (`torch.Tensor`): see
            :func:`value_neuron_z_scores`.
        z_threshold (`float`, defaults to 3.0): the one-sided threshold on the z-score.

    Returns:
        `dict[str, list[int]]`: per cross-attention module with at least one such neuron, the neuron indices
        (ascending); pass it to :func:`mask_value_neurons`.
    """
    if isinstance(z_threshold, bool) or not isinstance(z_threshold, (int, float)) or not math.isfinite(z_threshold):
        raise ValueError(f"z_threshold must be a finite number, got {z_threshold!r}.")
    scores = value_neuron_z_scores(unet, memorized_hidden_states, reference_hidden_states)
    found = {}
    for name, z in scores.items():
        indices = torch.nonzero(z > z_threshold).flatten().tolist()
        if indices:
            found[name] = indices
    return found


def mask_value_neurons(unet: torch.nn.Module, neurons: Mapping[str, Iterable[int]]) -> dict[str, list[int]]:
    """Zero value neurons: their rows of ``to_v.weight`` (and ``to_v.bias``), so they are exactly 0 for every prompt.

    Like head pruning, the masking is in the weights and survives ``save_pretrained`` / ``from_pretrained``.

    Args:
        unet (`UNet2DConditionModel`): the UNet, edited in place.
        neurons (`dict[str, Iterable[int]]`): neuron indices per cross-attention module name (as returned by
            :func:`find_memorization_neurons`).

    Returns:
        `dict[str, list[int]]`: the masked neurons.

    Raises:
        `ValueError`: for an unknown module or an out-of-range index (nothing is masked then).
    """
    modules = cross_attention_modules(unet)
    checked = {}
    for name, indices in neurons.items():
        if name not in modules:
            raise ValueError(f"{type(unet).__name__} has no cross-attention module named {name!r}.")
        size = modules[name].to_v.out_features
        indices = [int(i) for i in indices]
        bad = [i for i in indices if not 0 <= i < size]
        if bad:
            raise ValueError(f"Neuron indices {bad} are out of range for {name!r}, whose to_v has {size} outputs.")
        checked[name] = sorted(set(indices))
    with torch.no_grad():
        for name, indices in checked.items():
            to_v = modules[name].to_v
            to_v.weight[indices] = 0
            if to_v.bias is not None:
                to_v.bias[indices] = 0
    return checked


def masked_value_neurons(unet: torch.nn.Module) -> dict[str, list[int]]:
    """The value neurons whose ``to_v`` weight row (and bias) are exactly zero, read from the weights."""
    found = {}
    for name, attn in cross_attention_modules(unet).items():
        zero = ~attn.to_v.weight.detach().any(dim=1)
        if attn.to_v.bias is not None:
            zero &= attn.to_v.bias.detach() == 0
        indices = torch.nonzero(zero).flatten().tolist()
        if indices:
            found[name] = indices
    return found
