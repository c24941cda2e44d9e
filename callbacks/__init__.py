"""Reusable Lightning callbacks; each imports only ``methods`` so it plugs into any project."""

from callbacks.dynamic_sparsity import DynamicSparsity
from callbacks.finite_loss_guard import FiniteLossGuard
from callbacks.forgetting_monitor import ForgettingMonitor
from callbacks.soft_causal_mask import SoftCausalMask
from callbacks.sparsity_search import SparsitySearch

__all__ = ["DynamicSparsity", "FiniteLossGuard", "ForgettingMonitor", "SoftCausalMask", "SparsitySearch"]
