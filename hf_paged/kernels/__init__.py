"""Paged-attention kernels: a torch reference and device backends chosen through pluggy hooks.

Nothing here imports Transformers.
"""

from ..plugins import PLUGIN_GROUP, hookimpl, hookspec, plugin_manager
from .backend import KernelBackend, get_backend

__all__ = ["PLUGIN_GROUP", "KernelBackend", "get_backend", "hookimpl", "hookspec", "plugin_manager"]
