"""HOLD UNets, and the closed-form memorizing reference model."""

from .empirical_denoiser import OptimalEmpiricalDenoiser
from .unet_hold import HOLDUNet2DConditionModel, HOLDUNet2DModel

__all__ = ["HOLDUNet2DConditionModel", "HOLDUNet2DModel", "OptimalEmpiricalDenoiser"]
