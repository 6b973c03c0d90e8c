"""hf_paged's pluggy plugin manager: its hook specifications and the ``hf_paged.plugins`` entry points.

A plugin is a module or object with `hookimpl`-marked functions named after the hooks below,
published under the entry-point group ``hf_paged.plugins`` (or registered on `plugin_manager`)::

    from hf_paged.plugins import hookimpl

    @hookimpl
    def hf_paged_request_priority(request_id, prompt_token_ids, sampling_params):
        return -len(prompt_token_ids)  # longest prompt first

This module knows the hooks' signatures only; `hf_paged.kernels` registers its built-in backends on
the manager and `hf_paged.engine.policy` calls the scheduling hook.
"""

from __future__ import annotations

import functools

import pluggy
import torch

__all__ = ["PLUGIN_GROUP", "PROJECT", "KernelSpecs", "SchedulerSpecs", "hookimpl", "hookspec", "plugin_manager"]

PROJECT = "hf_paged"
PLUGIN_GROUP = "hf_paged.plugins"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class KernelSpecs:
    @hookspec
    def hf_paged_kernel_backend(self, device: torch.device, dtype: torch.dtype) -> object | None:
        """Offer a backend (a `hf_paged.kernels.KernelBackend`) for ``dtype`` tensors on ``device``, or ``None``.

        Example plugin module::

            from hf_paged.kernels import hookimpl

            @hookimpl
            def hf_paged_kernel_backend(device, dtype):
                return my_backend if device.type == "cuda" else None
        """


class SchedulerSpecs:
    @hookspec(firstresult=True)
    def hf_paged_request_priority(self, request_id: str, prompt_token_ids: list[int], sampling_params) -> float | None:
        """Admission priority of a new request (lower first), or ``None`` to pass (priority 0)."""


@functools.cache
def plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager: both hook specifications and the ``hf_paged.plugins`` entry points.

    Example:
        >>> plugin_manager().hook.hf_paged_request_priority(
        ...     request_id="r", prompt_token_ids=[1, 2], sampling_params=None) is None
        True
    """
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(KernelSpecs)
    pm.add_hookspecs(SchedulerSpecs)
    pm.load_setuptools_entrypoints(PLUGIN_GROUP)
    return pm
