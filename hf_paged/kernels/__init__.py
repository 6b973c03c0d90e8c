"""Paged-attention kernels: a torch reference and device backends chosen through pluggy hooks.

Nothing here imports Transformers.
"""

from .backend import PLUGIN_GROUP, get_backend, plugin_manager
from .hookspecs import KernelBackend, hookimpl, hookspec

__all__ = ["PLUGIN_GROUP", "KernelBackend", "get_backend", "hookimpl", "hookspec", "plugin_manager"]
