"""Attention-head pruning against memorization (Ye, Zhu, Tao and Chen, *Provable Separations between Memorization and
Generalization in Diffusion Models*, 2025).

Memorizing the empirical score needs capacity that grows with the number of training images; taking
capacity away where the model fits the data most closely reduces memorization. Ye et al. prune the 20 % least
important attention heads of a trained DiT, importance being measured on the *small-t* loss (``u ~ Beta(0.8, 2)``
on normalised time, where the model is closest to the data), and then fine-tune. Here:

- :func:`attention_heads` lists the heads of every diffusers ``Attention`` module of a model (``UNet2DModel``,
  ``UNet2DConditionModel``, diffusers DiTs, the HOLD UNets); head ``h`` owns the input columns
  ``h * head_dim:(h + 1) * head_dim`` of ``attn.to_out[0]``.
- :func:`prune_heads` zeroes those columns, so the head contributes exactly zero (the output bias stays). The pruning
  lives in the weights: a pruned model saves and loads with plain ``save_pretrained`` / ``from_pretrained``, and
  :func:`pruned_heads` reads the pruned heads back from the weights.
- :func:`head_importance` measures each head on the small-t loss, exactly (``"masking"``: loss with the head zeroed
  minus the base loss) or to first order (``"taylor"``), with the same noise and timesteps for every head; it works
  for DDPM-style schedulers and for :class:`~diffusers_hold.HOLDScheduler`.
- :func:`prune_least_important_heads` prunes the globally least important fraction; :func:`random_heads` draws the
  random-pruning control of the paper.
- :class:`HeadPruningCallback` prunes during a training run (optionally measuring importance itself) and keeps the
  pruned heads at exactly zero while fine-tuning, re-zeroing them after every optimizer update.

A typical use, on a trained model::

    importance = head_importance(model, noise_scheduler, clean_images, num_draws=8, generator=gen)
    pruned = prune_least_important_heads(model, importance, ratio=0.2)
    callbacks = CallbackList([HeadPruningCallback(heads=pruned)])  # then fine-tune with them
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from accelerate.utils import broadcast_object_list
from diffusers.models.attention_processor import Attention

from .._validation import check_positive_int
from ..objective import noisy_input_and_target
from .callbacks import TrainingCallback, TrainingState
from .timestep_sampling import TimestepAxis

__all__ = [
    "AttentionHead",
    "HeadPruningCallback",
    "attention_heads",
    "head_importance",
    "prune_heads",
    "prune_least_important_heads",
    "pruned_heads",
    "random_heads",
    "sample_small_t",
]

IMPORTANCE_METHODS = ("masking", "taylor")
"""The criteria of :func:`head_importance`."""


@dataclass(frozen=True, order=True)
class AttentionHead:
    """One attention head: the ``Attention`` module's name in ``model.named_modules()`` and the head's index.

    Args:
        module (`str`): the module's name, e.g. ``"transformer_blocks.0.attn1"``.
        index (`int`): the head, in ``[0, attn.heads)``.
    """

    module: str
    index: int


def _attention_modules(model: torch.nn.Module, cross_attention: bool | None = None) -> dict[str, Attention]:
    """The prunable ``Attention`` modules of ``model`` by name (those with an output projection)."""
    modules = {}
    for name, module in model.named_modules():
        if not isinstance(module, Attention) or getattr(module, "to_out", None) is None:
            continue
        if cross_attention is not None and bool(module.is_cross_attention) != cross_attention:
            continue
        modules[name] = module
    return modules


def _head_dim(attn: Attention) -> int:
    return attn.to_out[0].in_features // attn.heads


def attention_heads(model: torch.nn.Module, cross_attention: bool | None = None) -> list[AttentionHead]:
    """Every head of every diffusers ``Attention`` module of ``model``, in module order then head order.

    Works for any model built from diffusers' ``Attention`` (``UNet2DModel`` with ``AttnDownBlock2D`` etc.,
    ``UNet2DConditionModel``, ``DiTTransformer2DModel``, ``Transformer2DModel``, the HOLD UNets). Modules without an
    output projection (``to_out is None``) cannot be pruned this way and are left out.

    Args:
        model (`torch.nn.Module`): the model (not wrapped by DDP: unwrap it first).
        cross_attention (`bool`, *optional*): `True` for cross-attention modules only (``attn2`` of a text-conditioned
            UNet), `False` for self-attention only, `None` (default) for all.
    """
    return [
        AttentionHead(name, index)
        for name, attn in _attention_modules(model, cross_attention).items()
        for index in range(attn.heads)
    ]


def _as_head(head) -> AttentionHead:
    if isinstance(head, AttentionHead):
        return head
    try:
        name, index = head
    except (TypeError, ValueError):
        raise ValueError(f"Expected AttentionHead or (module name, index) pairs, got {head!r}.") from None
    return AttentionHead(name, index)


def _resolve_heads(model: torch.nn.Module, heads: Iterable) -> list[tuple[AttentionHead, Attention]]:
    """Validated ``(head, module)`` pairs; heads may be :class:`AttentionHead` or ``(module name, index)`` pairs."""
    modules = _attention_modules(model)
    resolved = []
    for head in heads:
        head = _as_head(head)
        if head.module not in modules:
            known = ", ".join(list(modules)[:8]) + (", ..." if len(modules) > 8 else "")
            raise ValueError(
                f"{type(model).__name__} has no Attention module named {head.module!r} (its Attention modules: "
                f"{known or 'none'})."
            )
        attn = modules[head.module]
        if isinstance(head.index, bool) or not isinstance(head.index, int) or not 0 <= head.index < attn.heads:
            raise ValueError(
                f"Head index {head.index!r} is out of range for {head.module!r}, which has {attn.heads} heads."
            )
        resolved.append((head, attn))
    return resolved


def _columns(attn: Attention, index: int) -> slice:
    head_dim = _head_dim(attn)
    return slice(index * head_dim, (index + 1) * head_dim)


def prune_heads(model: torch.nn.Module, heads: Iterable[AttentionHead | tuple[str, int]]) -> list[AttentionHead]:
    """Prune heads by setting their input columns of ``attn.to_out[0].weight`` to exactly zero.

    A pruned head then adds exactly nothing to the module's output, for every input; the output bias is kept. As the
    pruning is in the weights, the model saves and loads with ``save_pretrained`` / ``from_pretrained`` unchanged.
    Fine-tuning would regrow the columns: use :class:`HeadPruningCallback` to keep them at zero. (A LoRA adapter on
    ``to_out[0]`` would add its own, unpruned, contribution; merge or leave out adapters there.)

    Args:
        model (`torch.nn.Module`): the model, edited in place.
        heads (`Iterable[AttentionHead]`): the heads, or ``(module name, index)`` pairs.

    Returns:
        `list[AttentionHead]`: the pruned heads.

    Raises:
        `ValueError`: for an unknown module name or an out-of-range head index (nothing is pruned then).
    """
    resolved = _resolve_heads(model, heads)
    with torch.no_grad():
        for head, attn in resolved:
            attn.to_out[0].weight[:, _columns(attn, head.index)] = 0
    return [head for head, _ in resolved]


def pruned_heads(model: torch.nn.Module) -> list[AttentionHead]:
    """The heads whose ``to_out[0]`` columns are all exactly zero, read from the weights (see :func:`prune_heads`)."""
    found = []
    for name, attn in _attention_modules(model).items():
        weight = attn.to_out[0].weight.detach()
        for index in range(attn.heads):
            if not bool(weight[:, _columns(attn, index)].any()):
                found.append(AttentionHead(name, index))
    return found


def _seed_from(generator: torch.Generator | None) -> int | None:
    return None if generator is None else int(torch.randint(0, 2**62, (1,), generator=generator))


def sample_small_t(
    noise_scheduler,
    num: int,
    beta: tuple[float, float] = (0.8, 2.0),
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised times ``u ~ Beta(beta)`` (small-t emphasis for the default ``(0.8, 2)``) and their model timesteps.

    ``torch.distributions.Beta`` takes no generator, so with a ``generator`` the draw runs on a forked global RNG
    seeded from it: the same generator state gives the same draw and the global RNG is left as it was.

    Args:
        noise_scheduler (`SchedulerMixin`): a DDPM-style scheduler or a :class:`~diffusers_hold.HOLDScheduler`.
        num (`int`): number of draws.
        beta (`tuple[float, float]`, defaults to `(0.8, 2.0)`): the Beta law's concentrations ``(a, b)``, positive.
        generator (`torch.Generator`, *optional*): source of the draw (CPU); the global RNG without one.

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: ``u`` (float64, shape `(num,)`) and the timesteps of
        :meth:`TimestepAxis.timesteps_from_u` (int64 for DDPM-style, float32 for HOLD), on the CPU.
    """
    check_positive_int(num, "num")
    try:
        a, b = (float(x) for x in beta)
    except (TypeError, ValueError):
        raise ValueError(f"beta must be a pair of positive numbers, got {beta!r}.") from None
    if not (a > 0 and b > 0 and math.isfinite(a) and math.isfinite(b)):
        raise ValueError(f"beta must be a pair of positive numbers, got {beta!r}.")
    law = torch.distributions.Beta(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64))
    seed = _seed_from(generator)
    if seed is None:
        u = law.sample((num,))
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            u = law.sample((num,))
    return u, TimestepAxis(noise_scheduler).timesteps_from_u(u)


def _draws(noise_scheduler, clean, num_draws, beta, generator):
    """``num_draws`` fixed ``(noisy input, target, timesteps)`` triples, shared by every head."""
    check_positive_int(num_draws, "num_draws")
    if not isinstance(clean, torch.Tensor) or clean.ndim < 2 or len(clean) == 0:
        raise ValueError("clean must be a non-empty batch tensor of shape (batch, C, ...).")
    draws = []
    for _ in range(num_draws):
        _, timesteps = sample_small_t(noise_scheduler, len(clean), beta, generator)
        timesteps = timesteps.to(clean.device)
        noisy, target = noisy_input_and_target(noise_scheduler, clean, timesteps, generator)
        draws.append((noisy, target, timesteps))
    return draws


def _loss(model, draws, forward_kwargs) -> torch.Tensor:
    """Mean squared error over all draws (each draw's mean, averaged)."""
    total = 0.0
    for noisy, target, timesteps in draws:
        output = model(noisy, timesteps, **forward_kwargs, return_dict=False)[0]
        # a DiT with learned variance predicts 2 * C channels; its loss on the noise uses the first C
        output = output[:, : target.shape[1]]
        total = total + F.mse_loss(output.float(), target.float())
    return total / len(draws)


def head_importance(
    model: torch.nn.Module,
    noise_scheduler,
    clean: torch.Tensor,
    *,
    method: Literal["masking", "taylor"] = "masking",
    num_draws: int = 4,
    forward_kwargs: Mapping[str, Any] | None = None,
    generator: torch.Generator | None = None,
    beta: tuple[float, float] = (0.8, 2.0),
    heads: Iterable[AttentionHead] | None = None,
) -> dict[AttentionHead, float]:
    """Importance of each attention head for the small-t denoising loss (Ye et al. 2025).

    The loss is the mean squared error of ``model(noisy, timesteps, **forward_kwargs)`` against the target of
    :func:`~diffusers_hold.objective.noisy_input_and_target` (the noise, the velocity, or HOLD's last-block
    noise), averaged over ``num_draws`` draws of noise and timesteps ``u ~ Beta(beta)`` (:func:`sample_small_t`) for
    the whole batch ``clean``. The draws are made once and the SAME noise and timesteps serve every head, so the
    differences between heads are not sampling noise.

    - ``"masking"``: ``loss(head zeroed) - loss``, exact (one forward pass per head and draw, no gradients); the
      weights are restored afterwards. Near zero or negative: the head is dispensable.
    - ``"taylor"``: ``|sum(W_h * dloss/dW_h)|`` over the head's ``to_out[0]`` columns ``W_h``, the first-order
      estimate of the masking importance's size (one backward pass per draw for all heads).

    The model runs in eval mode (no dropout) and is put back in its previous mode; parameter ``.grad`` fields are
    not touched.

    Args:
        model (`torch.nn.Module`): a diffusers model whose forward is ``model(sample, timestep, **kwargs)`` with
            ``return_dict`` (UNets, DiTs; for a HOLD scheduler a HOLD UNet that reads the whole state).
        noise_scheduler (`SchedulerMixin`): the training noise scheduler, DDPM-style or HOLD.
        clean (`torch.Tensor` of shape `(batch, C, H, W)`): clean data in model space (e.g. VAE latents).
        method (`str`, defaults to `"masking"`): `"masking"` or `"taylor"`.
        num_draws (`int`, defaults to 4): noise-and-timestep draws per clean sample.
        forward_kwargs (`dict`, *optional*): further forward arguments for the batch, e.g.
            ``{"encoder_hidden_states": ...}`` or ``{"class_labels": ...}`` for a DiT.
        generator (`torch.Generator`, *optional*): CPU generator of the timesteps and noise, for reproducible draws.
        beta (`tuple[float, float]`, defaults to `(0.8, 2.0)`): the Beta law of ``u``.
        heads (`Iterable[AttentionHead]`, *optional*): the heads to measure; all of :func:`attention_heads` by default.

    Returns:
        `dict[AttentionHead, float]`: importance per head, in the order of ``heads``.
    """
    if method not in IMPORTANCE_METHODS:
        raise ValueError(f"Unknown method {method!r}; expected one of {', '.join(IMPORTANCE_METHODS)}.")
    resolved = _resolve_heads(model, attention_heads(model) if heads is None else heads)
    if not resolved:
        raise ValueError(f"{type(model).__name__} has no attention heads to measure.")
    forward_kwargs = dict(forward_kwargs or {})
    draws = _draws(noise_scheduler, clean, num_draws, beta, generator)
    was_training = model.training
    model.eval()
    try:
        if method == "masking":
            return _masking_importance(model, draws, forward_kwargs, resolved)
        return _taylor_importance(model, draws, forward_kwargs, resolved)
    finally:
        model.train(was_training)


def _masking_importance(model, draws, forward_kwargs, resolved) -> dict[AttentionHead, float]:
    importance = {}
    with torch.no_grad():
        base = _loss(model, draws, forward_kwargs).item()
        for head, attn in resolved:
            weight = attn.to_out[0].weight
            columns = _columns(attn, head.index)
            saved = weight[:, columns].clone()
            weight[:, columns] = 0
            try:
                importance[head] = _loss(model, draws, forward_kwargs).item() - base
            finally:
                weight[:, columns] = saved
    return importance


def _taylor_importance(model, draws, forward_kwargs, resolved) -> dict[AttentionHead, float]:
    weights = list({id(attn): attn.to_out[0].weight for _, attn in resolved}.values())
    # frozen weights (e.g. a LoRA fine-tune) still need gradients here; their flags are restored afterwards
    flags = [w.requires_grad for w in weights]
    for w in weights:
        w.requires_grad_(True)
    try:
        grads = [torch.zeros_like(w) for w in weights]
        for draw in draws:
            # one backward per draw keeps one graph in memory; the loss is the mean over draws
            draw_grads = torch.autograd.grad(_loss(model, [draw], forward_kwargs) / len(draws), weights)
            for total, g in zip(grads, draw_grads, strict=True):
                total += g
    finally:
        for w, flag in zip(weights, flags, strict=True):
            w.requires_grad_(flag)
    grad_of = {id(w): g for w, g in zip(weights, grads, strict=True)}
    importance = {}
    for head, attn in resolved:
        weight = attn.to_out[0].weight
        columns = _columns(attn, head.index)
        product = weight.detach()[:, columns].double() * grad_of[id(weight)][:, columns].double()
        importance[head] = abs(product.sum().item())
    return importance


def _check_ratio(ratio) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
        raise ValueError(f"ratio must be a number in [0, 1), got {ratio!r}.")
    return float(ratio)


def prune_least_important_heads(
    model: torch.nn.Module, importance: Mapping[AttentionHead, float], ratio: float = 0.2
) -> list[AttentionHead]:
    """Prune the ``round(ratio * len(importance))`` least important heads, ranked globally over all modules.

    Ties keep the order of ``importance``. The count uses Python's ``round`` (half to even).

    Args:
        model (`torch.nn.Module`): the model, edited in place.
        importance (`dict[AttentionHead, float]`): importance per head, e.g. from :func:`head_importance`; the
            ranking is over these heads.
        ratio (`float`, defaults to 0.2): fraction of the heads to prune, in ``[0, 1)``.

    Returns:
        `list[AttentionHead]`: the pruned heads, least important first.
    """
    return prune_heads(model, _least_important(importance, ratio))


def _least_important(importance: Mapping[AttentionHead, float], ratio: float) -> list[AttentionHead]:
    """The ``round(ratio * len(importance))`` heads of lowest importance, least important first."""
    ratio = _check_ratio(ratio)
    values = {}
    for head, value in importance.items():
        value = float(value)
        if math.isnan(value):
            raise ValueError(f"The importance of {head} is NaN.")
        values[head] = value
    ranked = sorted(values, key=values.__getitem__)  # stable: ties in the given order
    return ranked[: round(ratio * len(values))]


def random_heads(
    model: torch.nn.Module,
    ratio: float = 0.2,
    generator: torch.Generator | None = None,
    cross_attention: bool | None = None,
) -> list[AttentionHead]:
    """``round(ratio * num_heads)`` heads drawn uniformly without replacement: the random-pruning control.

    Pass them to :func:`prune_heads`; the count is that of :func:`prune_least_important_heads`.

    Args:
        model (`torch.nn.Module`): the model.
        ratio (`float`, defaults to 0.2): fraction of the heads, in ``[0, 1)``.
        generator (`torch.Generator`, *optional*): CPU generator of the draw.
        cross_attention (`bool`, *optional*): restrict to cross- or self-attention heads (see
            :func:`attention_heads`).

    Returns:
        `list[AttentionHead]`: the drawn heads, in model order.
    """
    ratio = _check_ratio(ratio)
    heads = attention_heads(model, cross_attention)
    count = round(ratio * len(heads))
    chosen = torch.randperm(len(heads), generator=generator)[:count].sort().values
    return [heads[i] for i in chosen.tolist()]


class HeadPruningCallback(TrainingCallback):
    """Prune attention heads during a training run and keep them at exactly zero while fine-tuning.

    Optimizer updates regrow zeroed weights (their gradients are not zero, and Adam's moments carry on), so the
    callback re-zeroes the pruned columns after every update, in :meth:`on_step_end`. The heads are either given
    (``heads``) or chosen by the callback itself (``ratio``): then, at the first :meth:`on_batch` with
    ``state.global_step >= prune_at_step`` (i.e. after ``prune_at_step`` updates, before any micro-batch of the next
    one; for ``prune_at_step=0`` before the first update), it measures :func:`head_importance` on ``importance_data``
    and prunes the ``ratio`` least important heads (or random ones for ``criterion="random"``). A loop that calls no
    ``on_batch`` can call :meth:`prune_now` itself.

    The pruned heads are in :meth:`state_dict` (module names and indices), so a resumed run re-applies them at its
    first hook that sees the model. With several processes, the heads chosen on the main process are broadcast so
    every rank prunes the same ones. With ``ema``, the same columns of the EMA weights are zeroed whenever the model's
    are (the loop's EMA update runs before ``on_step_end`` and would otherwise average in each update's regrowth), so
    the EMA model is pruned exactly as well.

    Args:
        heads (`Iterable[AttentionHead]`, *optional*): heads to prune from the start, e.g. those of
            :func:`prune_least_important_heads` on the trained model.
        ratio (`float`, *optional*): fraction of the heads to prune, in ``[0, 1)``, chosen by the callback; needs
            ``importance_data`` unless ``criterion="random"``.
        importance_data (`torch.Tensor`, *optional*): clean model-space data (e.g. latents) to measure importance on.
        prune_at_step (`int`, defaults to 0): number of updates before the callback prunes.
        criterion (`str`, defaults to `"masking"`): `"masking"`, `"taylor"` (see :func:`head_importance`) or
            `"random"`.
        num_draws (`int`, defaults to 4): draws of :func:`head_importance`.
        forward_kwargs (`dict`, *optional*): forward arguments for ``importance_data`` (e.g. its text states).
        cross_attention (`bool`, *optional*): restrict the choice to cross- or self-attention heads.
        seed (`int`, defaults to 0): seed of the importance draws (or of the random choice).
        ema (`diffusers.training_utils.EMAModel`, *optional*): an EMA of all of the model's parameters, in
            ``model.parameters()`` order (as the training scripts build it), pruned along with the model.
    """

    def __init__(
        self,
        heads: Iterable[AttentionHead | tuple[str, int]] | None = None,
        *,
        ratio: float | None = None,
        importance_data: torch.Tensor | None = None,
        prune_at_step: int = 0,
        criterion: Literal["masking", "taylor", "random"] = "masking",
        num_draws: int = 4,
        forward_kwargs: Mapping[str, Any] | None = None,
        cross_attention: bool | None = None,
        seed: int = 0,
        ema=None,
    ):
        if (heads is None) == (ratio is None):
            raise ValueError(
                "Give either heads (a fixed pruning) or ratio (the callback chooses), not both or neither."
            )
        if criterion not in (*IMPORTANCE_METHODS, "random"):
            raise ValueError(f"Unknown criterion {criterion!r}; expected 'masking', 'taylor' or 'random'.")
        if ratio is not None:
            ratio = _check_ratio(ratio)
            if criterion != "random" and importance_data is None:
                raise ValueError(f"criterion={criterion!r} needs importance_data to measure head importance on.")
        if isinstance(prune_at_step, bool) or not isinstance(prune_at_step, int) or prune_at_step < 0:
            raise ValueError(f"prune_at_step must be a non-negative integer, got {prune_at_step!r}.")
        self.heads = (
            None if heads is None else [h if isinstance(h, AttentionHead) else AttentionHead(*h) for h in heads]
        )
        self.ratio = ratio
        self.importance_data = importance_data
        self.prune_at_step = prune_at_step
        self.criterion = criterion
        self.num_draws = num_draws
        self.forward_kwargs = dict(forward_kwargs or {})
        self.cross_attention = cross_attention
        self.seed = seed
        self.ema = ema
        # heads still to be written into the weights (given, or restored by load_state_dict)
        self._pending = self.heads is not None

    @property
    def pruned(self) -> bool:
        """Whether the heads are decided (given, chosen, or restored from a checkpoint)."""
        return self.heads is not None

    def prune_now(self, model: torch.nn.Module, noise_scheduler=None, accelerator=None) -> list[AttentionHead]:
        """Decide the heads if not yet done (measuring importance when ``ratio`` is set), prune them and return them.

        Args:
            model (`torch.nn.Module`): the bare (unwrapped) model.
            noise_scheduler (`SchedulerMixin`, *optional*): the training scheduler, needed for the importance.
            accelerator (`accelerate.Accelerator`, *optional*): with several processes, the main process's choice
                is broadcast to all.
        """
        if self.heads is None:
            generator = torch.Generator().manual_seed(self.seed)
            if self.criterion == "random":
                chosen = random_heads(model, self.ratio, generator, self.cross_attention)
            else:
                if noise_scheduler is None:
                    raise ValueError("Measuring head importance needs the noise scheduler.")
                parameter = next(model.parameters())
                data = self.importance_data.to(device=parameter.device, dtype=parameter.dtype)
                kwargs = {
                    k: v.to(parameter.device) if torch.is_tensor(v) else v for k, v in self.forward_kwargs.items()
                }
                importance = head_importance(
                    model,
                    noise_scheduler,
                    data,
                    method=self.criterion,
                    num_draws=self.num_draws,
                    forward_kwargs=kwargs,
                    generator=generator,
                    heads=attention_heads(model, self.cross_attention),
                )
                chosen = _least_important(importance, self.ratio)
            if accelerator is not None and accelerator.num_processes > 1:
                # floating-point differences between ranks could change the ranking; rank 0 decides for all
                chosen = broadcast_object_list([[(h.module, h.index) for h in chosen]])[0]
                chosen = [AttentionHead(*h) for h in chosen]
            self.heads = list(chosen)
        self._apply(model)
        return list(self.heads)

    def _apply(self, model: torch.nn.Module) -> None:
        prune_heads(model, self.heads)
        if self.ema is not None:
            parameters = list(model.parameters())
            if len(parameters) != len(self.ema.shadow_params):
                raise ValueError(
                    f"The EMA holds {len(self.ema.shadow_params)} tensors, the model {len(parameters)} parameters: "
                    "HeadPruningCallback needs an EMA of all of the model's parameters."
                )
            position = {id(parameter): i for i, parameter in enumerate(parameters)}
            with torch.no_grad():
                for head, attn in _resolve_heads(model, self.heads):
                    shadow = self.ema.shadow_params[position[id(attn.to_out[0].weight)]]
                    shadow[:, _columns(attn, head.index)] = 0
        self._pending = False

    def on_batch(self, batch: dict, state: TrainingState) -> dict:
        """Prune when due (measuring importance first if needed) or re-apply restored heads; the batch is unchanged."""
        due = self.heads is None and state.global_step >= self.prune_at_step
        if due or self._pending:
            heads = self.prune_now(state.unwrapped_model, state.noise_scheduler, state.accelerator)
            if due:
                state.logs["pruned_heads"] = len(heads)
        return batch

    def on_step_end(self, state: TrainingState) -> None:
        """Re-zero the pruned heads after the optimizer update."""
        if self.heads is not None:
            self._apply(state.unwrapped_model)

    def state_dict(self) -> dict:
        """``{"heads": [[module name, index], ...]}``, or ``{"heads": None}`` before the callback has pruned."""
        return {"heads": None if self.heads is None else [[h.module, h.index] for h in self.heads]}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore the heads of :meth:`state_dict`; they are written into the weights at the next hook."""
        if set(state_dict) != {"heads"}:
            raise ValueError(f"{self.name} expects a state with 'heads', got {sorted(state_dict)}.")
        heads = state_dict["heads"]
        self.heads = None if heads is None else [AttentionHead(str(name), int(index)) for name, index in heads]
        self._pending = self.heads is not None
