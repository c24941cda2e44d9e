"""Reusable Lightning callbacks; each imports only ``methods`` so it plugs into any project."""

from callbacks.finite_loss_guard import FiniteLossGuard

__all__ = ["FiniteLossGuard"]
