"""diffusers-hold: higher-order Langevin dynamics (HOLD) and memorization controls for Hugging Face diffusers.

Importing this package registers every class that can appear in a saved pipeline's ``model_index.json``, so
``DiffusionPipeline.from_pretrained`` can rebuild HOLD pipelines after ``import diffusers_hold``.
"""

from .dynamics import HOLDDynamics, LinearStep, critical_damping
from .pipelines import HOLDPipeline
from .schedulers import HOLDScheduler, HOLDSchedulerOutput

__version__ = "0.1.0"

__all__ = [
    "HOLDDynamics",
    "HOLDPipeline",
    "HOLDScheduler",
    "HOLDSchedulerOutput",
    "LinearStep",
    "critical_damping",
]
