"""The memorization benchmark: train the DDPM baseline, HOLD orders and mitigations side by side, then measure them.

    diffusers-hold bench --output_dir outputs/bench            # or: python -m diffusers_hold.bench
    diffusers-hold bench --quick --output_dir outputs/bench-quick

On bundled real data (scikit-learn's digits by default, scikit-image's LFW faces, or an image folder) at a
training-set size where the unmitigated DDPM memorizes, every method trains a model of the same architecture for the
same number of updates. Each is then sampled and measured against its training images (nearest-neighbour ratio,
the "1/3 rule", with a bootstrap interval and the held-out control) and against held-out images (Fréchet distance and
k-NN precision/recall in a PCA feature space, with the train-vs-held-out floor). Evaluations along training give the
curves of memorization and quality against training steps.

The output folder gets ``results.json``, ``results.md`` (the table), ``samples_vs_nearest.png`` (the most-copied
generations of each method above their nearest training images), ``memorization_vs_order.png`` and
``memorization_vs_steps.png``. A run is resumable: each method's state is saved atomically at every evaluation, and
finished methods are not run again (the configuration must match).

Where things are: :mod:`.methods` (the registry :data:`BENCH_METHODS` of :class:`BenchMethod` recipes, and
:class:`BenchConfig`), :mod:`.run` (data, models, training through
:func:`~diffusers_hold.mitigations.training_step`, sampling, the resumable state, :func:`run_bench`), :mod:`.report`
(scores with bootstrap intervals, the table, the figures), :mod:`.text` (captions and the text encoder of the
text-conditional methods) and :mod:`.cli` (the flags).
"""

from .cli import build_parser, config_from_args, main, run_from_args
from .methods import BENCH_METHODS, DEFAULT_METHODS, EXP_SDE_SAMPLER, BenchConfig, BenchMethod, dit_inputs
from .report import check_evaluation_sizes, evaluate, results_table, write_figures
from .run import build_model, load_bench_data, run_bench, train_and_evaluate
from .text import BenchTextEncoder, bench_caption

__all__ = [
    "BENCH_METHODS",
    "DEFAULT_METHODS",
    "EXP_SDE_SAMPLER",
    "BenchConfig",
    "BenchMethod",
    "BenchTextEncoder",
    "bench_caption",
    "check_evaluation_sizes",
    "build_model",
    "build_parser",
    "config_from_args",
    "dit_inputs",
    "evaluate",
    "load_bench_data",
    "main",
    "results_table",
    "run_bench",
    "run_from_args",
    "train_and_evaluate",
    "write_figures",
]
