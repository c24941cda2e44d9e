"""Reusable Lightning callbacks; each imports only ``methods`` so it plugs into any project."""

from callbacks.finite_loss_guard import FiniteLossGuard
from callbacks.forgetting_monitor import ForgettingMonitor
from callbacks.soft_causal_mask import SoftCausalMask

__all__ = ["FiniteLossGuard", "ForgettingMonitor", "SoftCausalMask"]
