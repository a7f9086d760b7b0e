"""Schedulers of diffusers-hold."""

from .scheduling_hold import HOLDScheduler, HOLDSchedulerOutput

__all__ = ["HOLDScheduler", "HOLDSchedulerOutput"]
