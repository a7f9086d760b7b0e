"""Iterative ensemble training (IET, Liu et al., ECCV 2024), as a training callback and a sharded dataset.

The training set is split into ``K`` shards. Each round, every shard model starts from the global weights and trains
``E`` local epochs on its shard alone; the new global weights are the data-size-weighted average of the shard models
(``sum_k n_k w_k / sum_k n_k``), and so are the EMA weights when the run keeps an EMA. No single model sees the whole
training set for long, which is what keeps it from fitting each image exactly; IET-AGC adds anti-gradient control
(:class:`~diffusers_hold.mitigations.AntiGradientControl`) inside the local training, and IET-AGC+ moves the samples
that are skipped most often (memorized ones) to another shard between rounds.

Here the shard models are trained one after another by the same loop, optimizer and processes: a run is the phases
``(round 0, shard 0), (round 0, shard 1), ..., (round R-1, shard K-1)``, each ``E`` epochs of that shard. This is the
parallel algorithm computed sequentially (every shard of a round starts from the same global weights, with a fresh
optimizer state), and it keeps everything else of a training run: ``accelerate`` data parallelism (every process works
on the current shard), gradient accumulation, mixed precision, the other callbacks, and checkpoints, which resume
anywhere, mid-round included, because the global weights, the running weighted sum of the finished shards and the
shard assignment are the callback's :meth:`IterativeEnsembleTraining.state_dict`.

    ensemble = IterativeEnsembleTraining(num_shards=4, num_rounds=10, local_epochs=1, ema=ema, seed=0)
    dataset = ensemble.shard_dataset(dataset)   # epochs now iterate over the current shard
    ...  # then train with ensemble among the callbacks for ensemble.num_epochs epochs (see the training scripts)

See ``docs/MEMORIZATION.md``, "Training-time mitigations", item 3.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .._validation import check_positive_int
from .callbacks import TrainingCallback, TrainingState

__all__ = ["IterativeEnsembleTraining", "ShardedDataset"]


class ShardedDataset(torch.utils.data.Dataset):
    """A view of a training dataset that holds the current IET shard: item ``i`` is the shard's ``i``-th example.

    Its length is that of the largest shard, so every epoch has the same number of batches; a smaller shard (the
    training-set size need not divide by ``K``) starts over for its last items. The shard is read from the ensemble
    when an item is taken, and the ensemble switches shards only at epoch boundaries, so data loader workers (which
    copy the dataset at the start of each epoch) see the right one.

    Args:
        dataset (`torch.utils.data.Dataset`): the training set (e.g. an
            :class:`~diffusers_hold.image_data.ImageTrainingDataset`).
        ensemble (`IterativeEnsembleTraining`): the callback whose shards it serves.
    """

    def __init__(self, dataset: torch.utils.data.Dataset, ensemble: IterativeEnsembleTraining):
        self.dataset = dataset
        self.ensemble = ensemble

    def __len__(self) -> int:
        return max(len(shard) for shard in self.ensemble.shards)

    def __getitem__(self, item: int):
        shard = self.ensemble.shards[self.ensemble.shard]
        return self.dataset[int(shard[item % len(shard)])]

    def set_epoch(self, epoch: int) -> None:
        """Pass the epoch on to the wrapped dataset (its crops and flips depend on it)."""
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)


class IterativeEnsembleTraining(TrainingCallback):
    """Iterative ensemble training: ``num_rounds`` rounds of ``num_shards`` shard models averaged by data size.

    Averaged are the model's trainable parameters and its buffers (frozen weights are the same in every shard model),
    kept as CPU copies: the global weights plus a float64 running sum, three times their size in memory.

    The loop trains the phases in order, each for ``local_epochs * state.updates_per_epoch`` optimizer updates (the
    loop sets ``TrainingState.updates_per_epoch``); a run has :attr:`num_epochs` epochs in all. At the end of a phase
    (in :meth:`on_step_end`) the shard's weights (and EMA weights) join a running sum weighted by the shard's size;
    at the end of a round the sum divided by the total size becomes the global model; then the next shard starts from
    the global weights with the optimizer's state cleared. After the last round the model holds the global average.

    Memory-sample redistribution (IET-AGC+, ``redistribute_fraction > 0``): a sample counts as skipped each time a
    loss filter (e.g. :class:`~diffusers_hold.mitigations.AntiGradientControl`, which must come earlier in the
    callback list) drops it, read from ``TrainingState.kept``. After each round, in every shard the
    ``round(redistribute_fraction * n_k)`` samples with the highest skip rate (skips per appearance; ties by position,
    only samples skipped at least once) trade places with as many of the least-skipped samples of the next shard
    (``k + 1 mod K``), so the shards keep their sizes and a memorized sample meets a model that has not fitted it.
    The paper's exact rule is not published (``docs/MEMORIZATION.md``); this is the documented family with its knob
    exposed.

    Args:
        num_shards (`int`, defaults to 4): ``K`` (10 for CIFAR-10 and 4 for Stable Diffusion in the paper).
        num_rounds (`int`, defaults to 10): ``R``.
        local_epochs (`int`, defaults to 1): ``E``, epochs of a shard per round.
        ema (`diffusers.training_utils.EMAModel`, *optional*): the run's EMA, averaged and reset like the weights.
        redistribute_fraction (`float`, defaults to 0.0): fraction of each shard moved between rounds (0: off).
        seed (`int`, defaults to 0): seed of the shard assignment (a random permutation split into ``K`` parts).
    """

    def __init__(
        self,
        num_shards: int = 4,
        num_rounds: int = 10,
        local_epochs: int = 1,
        ema=None,
        redistribute_fraction: float = 0.0,
        seed: int = 0,
    ):
        for name, value in (("num_shards", num_shards), ("num_rounds", num_rounds), ("local_epochs", local_epochs)):
            check_positive_int(value, name)
        if not 0 <= redistribute_fraction < 1:
            raise ValueError(f"redistribute_fraction must be in [0, 1), got {redistribute_fraction!r}.")
        if redistribute_fraction > 0 and num_shards < 2:
            raise ValueError("Redistribution moves samples between shards: it needs num_shards >= 2.")
        self.num_shards = num_shards
        self.num_rounds = num_rounds
        self.local_epochs = local_epochs
        self.ema = ema
        self.redistribute_fraction = float(redistribute_fraction)
        self.seed = seed
        self.shards: list[np.ndarray] = []
        self.identities: np.ndarray | None = None
        self.round = 0
        self.shard = 0
        self.global_weights: dict[str, torch.Tensor] | None = None
        self.global_ema: list[torch.Tensor] | None = None
        self._weight_sum: dict[str, torch.Tensor] | None = None
        self._ema_sum: list[torch.Tensor] | None = None
        self._size_sum = 0
        self._skips: torch.Tensor | None = None
        self._seen: torch.Tensor | None = None
        self._positions: torch.Tensor | None = None

    @property
    def num_epochs(self) -> int:
        """Epochs of the whole run, ``num_rounds * num_shards * local_epochs``."""
        return self.num_rounds * self.num_shards * self.local_epochs

    def make_shards(self, num_examples: int, identities: Sequence[int] | None = None) -> None:
        """Split ``num_examples`` dataset positions into the shards (a seeded permutation in ``K`` near-equal parts).

        Args:
            num_examples (`int`): size of the training set (at least ``num_shards``).
            identities (`Sequence[int]`, *optional*): the id of each position as batches report it in ``"indices"``
                (an :class:`~diffusers_hold.image_data.ImageTrainingDataset`'s ``rows``); by default the positions.
        """
        if num_examples < self.num_shards:
            raise ValueError(f"{num_examples} examples cannot fill {self.num_shards} shards.")
        identities = np.arange(num_examples) if identities is None else np.asarray(identities, dtype=np.int64)
        if identities.shape != (num_examples,) or np.any(np.diff(identities) <= 0):
            raise ValueError("identities must be one increasing id per example.")
        permutation = np.random.default_rng(self.seed).permutation(num_examples)
        self.shards = [np.sort(part) for part in np.array_split(permutation, self.num_shards)]
        self.identities = identities
        self._skips = torch.zeros(num_examples, dtype=torch.float64)
        self._seen = torch.zeros(num_examples, dtype=torch.float64)

    def shard_dataset(self, dataset: torch.utils.data.Dataset) -> ShardedDataset:
        """Make the shards for ``dataset`` and return the view that a training loop's data loader iterates."""
        self.make_shards(len(dataset), getattr(dataset, "rows", None))
        return ShardedDataset(dataset, self)

    @property
    def current_shard(self) -> np.ndarray:
        """Dataset positions of the shard being trained."""
        if not self.shards:
            raise ValueError("No shards yet: call shard_dataset(dataset) or make_shards(n) first.")
        return self.shards[self.shard]

    @staticmethod
    def _trained_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The tensors training can change: trainable parameters and buffers. Frozen weights (a LoRA run's base
        model) are the same in every shard model, so averaging them is skipped, and so is their memory."""
        tensors = {name: p for name, p in model.named_parameters() if p.requires_grad}
        tensors.update(model.named_buffers())
        return tensors

    def _snapshot(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        return {key: value.detach().to("cpu", copy=True) for key, value in self._trained_tensors(model).items()}

    def on_batch(self, batch: dict, state: TrainingState) -> dict:
        if not self.shards:
            raise ValueError("IterativeEnsembleTraining has no shards: train on ensemble.shard_dataset(dataset).")
        if self.global_weights is None:  # round 0 starts from the model as the run begins
            self.global_weights = self._snapshot(state.unwrapped_model)
            if self.ema is not None:
                self.global_ema = [p.detach().to("cpu", copy=True) for p in self.ema.shadow_params]
        self._positions = None
        if self.redistribute_fraction > 0:
            if "indices" not in batch:
                raise ValueError("Redistribution needs the examples' ids in batch['indices'].")
            ids = torch.as_tensor(batch["indices"]).cpu().numpy()
            positions = np.searchsorted(self.identities, ids).clip(max=len(self.identities) - 1)
            if np.any(self.identities[positions] != ids):
                raise ValueError("batch['indices'] holds ids that are not in the sharded dataset.")
            self._positions = torch.from_numpy(positions)
        return batch

    def on_loss(self, per_sample_loss: torch.Tensor, state: TrainingState) -> torch.Tensor:
        if self._positions is not None:
            kept = state.kept if state.kept is not None else torch.ones(len(per_sample_loss), dtype=torch.bool)
            self._seen.index_add_(0, self._positions, torch.ones(len(self._positions), dtype=torch.float64))
            self._skips.index_add_(0, self._positions, (~kept.cpu()).double())
        return per_sample_loss

    def on_step_end(self, state: TrainingState) -> None:
        if not state.updates_per_epoch:
            raise ValueError("IterativeEnsembleTraining needs TrainingState.updates_per_epoch (set by the loop).")
        if state.global_step % (self.local_epochs * state.updates_per_epoch):
            return
        if self.round >= self.num_rounds:
            raise ValueError(
                f"Training ran past the ensemble's {self.num_rounds} rounds: train for ensemble.num_epochs "
                f"({self.num_epochs}) epochs."
            )
        model = state.unwrapped_model
        self._accumulate(model, len(self.current_shard))
        self.shard += 1
        if self.shard == self.num_shards:
            self._finish_round(state)
        self._load_global(model, state)
        state.logs.update(ensemble_round=self.round, ensemble_shard=self.shard)

    def _accumulate(self, model: torch.nn.Module, size: int) -> None:
        weights = self._snapshot(model)
        if self._weight_sum is None:
            self._weight_sum = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in weights.items()}
            if self.ema is not None:
                shadows = self.ema.shadow_params
                self._ema_sum = [torch.zeros_like(p, dtype=torch.float64, device="cpu") for p in shadows]
        for key, value in weights.items():
            if value.is_floating_point():
                self._weight_sum[key] += size * value.double()
            else:  # counters: the last shard's
                self._weight_sum[key] = value.double()
        if self.ema is not None:
            for total, shadow in zip(self._ema_sum, self.ema.shadow_params, strict=True):
                total += size * shadow.detach().cpu().double()
        self._size_sum += size

    def _finish_round(self, state: TrainingState) -> None:
        reference = self.global_weights
        self.global_weights = {
            key: (total / (self._size_sum if reference[key].is_floating_point() else 1)).to(reference[key].dtype)
            for key, total in self._weight_sum.items()
        }
        if self.ema is not None:
            pairs = zip(self._ema_sum, self.global_ema, strict=True)
            self.global_ema = [(total / self._size_sum).to(old.dtype) for total, old in pairs]
        self._weight_sum, self._ema_sum, self._size_sum = None, None, 0
        if self.redistribute_fraction > 0:
            self._redistribute(state)
        self.round += 1
        self.shard = 0

    def _redistribute(self, state: TrainingState) -> None:
        skips, seen = self._skips, self._seen
        accelerator = state.accelerator
        if accelerator is not None and accelerator.num_processes > 1:  # every process counted its own samples
            device = accelerator.device
            skips = accelerator.reduce(skips.to(device), reduction="sum").cpu()
            seen = accelerator.reduce(seen.to(device), reduction="sum").cpu()
        rate = (skips / seen.clamp(min=1)).numpy()
        skipped = skips.numpy() > 0
        moves = []
        for k, shard in enumerate(self.shards):
            following = self.shards[(k + 1) % self.num_shards]
            count = min(round(self.redistribute_fraction * len(shard)), len(following))
            candidates = shard[skipped[shard]]
            # most skipped first; a stable sort keeps ties in position order
            outgoing = candidates[np.argsort(-rate[candidates], kind="stable")][:count]
            incoming = following[np.argsort(rate[following], kind="stable")][: len(outgoing)]
            moves.append((k, outgoing, incoming))
        shards = [set(shard.tolist()) for shard in self.shards]
        for k, outgoing, incoming in moves:
            following = (k + 1) % self.num_shards
            shards[k].difference_update(outgoing.tolist())
            shards[k].update(incoming.tolist())
            shards[following].difference_update(incoming.tolist())
            shards[following].update(outgoing.tolist())
        self.shards = [np.array(sorted(shard), dtype=np.int64) for shard in shards]
        self._skips.zero_()
        self._seen.zero_()
        state.logs["ensemble_moved"] = sum(len(outgoing) for _, outgoing, _ in moves)

    def _load_global(self, model: torch.nn.Module, state: TrainingState) -> None:
        with torch.no_grad():
            for key, value in self._trained_tensors(model).items():
                value.copy_(self.global_weights[key])
            if self.ema is not None:
                for shadow, saved in zip(self.ema.shadow_params, self.global_ema, strict=True):
                    shadow.copy_(saved)
        if state.optimizer is not None:  # each shard model has its own optimizer: no moments carried over
            state.optimizer.state.clear()

    def state_dict(self) -> dict:
        return {
            "round": self.round,
            "shard": self.shard,
            "shards": [shard.tolist() for shard in self.shards],
            "global_weights": self.global_weights,
            "global_ema": self.global_ema,
            "weight_sum": self._weight_sum,
            "ema_sum": self._ema_sum,
            "size_sum": self._size_sum,
            "skips": None if self._skips is None else self._skips.clone(),
            "seen": None if self._seen is None else self._seen.clone(),
        }

    def load_state_dict(self, state_dict: dict) -> None:
        shards = [np.asarray(shard, dtype=np.int64) for shard in state_dict["shards"]]
        if len(shards) != self.num_shards or (self.shards and sum(map(len, shards)) != sum(map(len, self.shards))):
            raise ValueError(
                f"The saved ensemble state has {len(shards)} shards of {sum(map(len, shards))} examples; this run "
                f"has {self.num_shards} of {sum(map(len, self.shards))}."
            )
        self.shards = shards
        self.round, self.shard = int(state_dict["round"]), int(state_dict["shard"])
        self.global_weights, self.global_ema = state_dict["global_weights"], state_dict["global_ema"]
        self._weight_sum, self._ema_sum = state_dict["weight_sum"], state_dict["ema_sum"]
        self._size_sum = int(state_dict["size_sum"])
        self._skips, self._seen = state_dict["skips"], state_dict["seen"]
