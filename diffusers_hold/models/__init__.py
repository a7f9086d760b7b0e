"""HOLD UNets."""

from .unet_hold import HOLDUNet2DConditionModel, HOLDUNet2DModel

__all__ = ["HOLDUNet2DConditionModel", "HOLDUNet2DModel"]
