"""The scheduling-policy hook: plugins may order admission from the waiting queue.

Without a plugin the scheduler is first come, first served. A plugin published under the
``hf_paged.plugins`` entry-point group (the same group as kernel backends) may implement::

    from hf_paged.kernels import hookimpl

    @hookimpl
    def hf_paged_request_priority(request_id, prompt_token_ids, sampling_params):
        return -len(prompt_token_ids)  # longest prompt first

Lower priorities are admitted first; equal ones keep arrival order. Preempted sequences always go
back to the head of the queue, since they had already been admitted.
"""

from __future__ import annotations

from ..kernels import hookspec, plugin_manager

__all__ = ["SchedulerSpecs", "request_priority"]


class SchedulerSpecs:
    @hookspec(firstresult=True)
    def hf_paged_request_priority(self, request_id: str, prompt_token_ids: list[int], sampling_params) -> float | None:
        """Admission priority of a new request (lower first), or ``None`` to pass (priority 0)."""


def request_priority(request_id: str, prompt_token_ids: list[int], sampling_params) -> float:
    """The priority the plugins give a request; 0 when none does."""
    pm = plugin_manager()
    hook = getattr(pm.hook, "hf_paged_request_priority", None)
    if hook is None or hook.spec is None:  # the kernels' plugin manager knows nothing of the engine
        pm.add_hookspecs(SchedulerSpecs)
    priority = pm.hook.hf_paged_request_priority(
        request_id=request_id, prompt_token_ids=prompt_token_ids, sampling_params=sampling_params
    )
    return 0.0 if priority is None else float(priority)
