"""Reusable Lightning callbacks; each imports only ``methods`` so it plugs into any project."""

from effitrain.callbacks.dynamic_sparsity import DynamicSparsity
from effitrain.callbacks.finite_loss_guard import FiniteLossGuard
from effitrain.callbacks.forgetting_monitor import ForgettingMonitor
from effitrain.callbacks.nm_sparsity import NMSparsity
from effitrain.callbacks.soft_causal_mask import SoftCausalMask
from effitrain.callbacks.sparsity_search import SparsitySearch

__all__ = ["DynamicSparsity", "FiniteLossGuard", "ForgettingMonitor", "NMSparsity", "SoftCausalMask", "SparsitySearch"]
