"""Pipelines of diffusers-hold."""

from .pipeline_hold import HOLDPipeline

__all__ = ["HOLDPipeline"]
