"""diffusers-hold: higher-order Langevin dynamics (HOLD) and memorization controls for Hugging Face diffusers.

Importing this package makes every class that can appear in a saved pipeline's ``model_index.json`` importable,
and registers the HOLD pipeline classes in the ``diffusers`` namespace (see :func:`register_with_diffusers`), so
``DiffusionPipeline.from_pretrained(folder)`` rebuilds HOLD pipelines after ``import diffusers_hold``.
"""

import diffusers

from . import hub
from .dynamics import HOLDDynamics, LinearStep, critical_damping
from .models import HOLDUNet2DConditionModel, HOLDUNet2DModel
from .pipelines import HOLDPipeline
from .schedulers import HOLDScheduler, HOLDSchedulerOutput

__version__ = "0.1.0"

PIPELINE_CLASSES = (HOLDPipeline,)


def register_with_diffusers() -> None:
    """Expose the HOLD pipeline classes as attributes of the ``diffusers`` module.

    ``DiffusionPipeline.from_pretrained`` resolves the ``_class_name`` of ``model_index.json`` with
    ``getattr(diffusers, name)``; registering lets it find ``HOLDPipeline``. Runs on import; never replaces a name
    that diffusers itself defines.
    """
    for cls in PIPELINE_CLASSES:
        existing = getattr(diffusers, cls.__name__, None)
        if existing is not None and existing is not cls:
            raise RuntimeError(f"diffusers already defines {cls.__name__}; refusing to replace it.")
        setattr(diffusers, cls.__name__, cls)


register_with_diffusers()

__all__ = [
    "HOLDDynamics",
    "HOLDPipeline",
    "HOLDScheduler",
    "HOLDSchedulerOutput",
    "HOLDUNet2DConditionModel",
    "HOLDUNet2DModel",
    "LinearStep",
    "critical_damping",
    "hub",
    "register_with_diffusers",
]
