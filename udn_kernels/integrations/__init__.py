"""Integrations with model libraries, built on the public ops only.

``hf``: an early-exit loss for Hugging Face causal LMs (docs/early_exit_lm.md).
"""
from .hf import (CURRICULA, SCALES, EarlyExitLoss, ExitStats, GradualCurriculum, RotationalCurriculum,
                 early_exit_loss, layer_scales, resolve_exits)

__all__ = ["CURRICULA", "SCALES", "EarlyExitLoss", "ExitStats", "GradualCurriculum", "RotationalCurriculum",
           "early_exit_loss", "layer_scales", "resolve_exits"]
