"""The scheduling-policy hook: plugins may order admission from the waiting queue.

Without a plugin the scheduler is first come, first served. A plugin published under the
``hf_paged.plugins`` entry-point group (the same group as kernel backends) may implement::

    from hf_paged.plugins import hookimpl

    @hookimpl
    def hf_paged_request_priority(request_id, prompt_token_ids, sampling_params):
        return -len(prompt_token_ids)  # longest prompt first

Lower priorities are admitted first; equal ones keep arrival order. Preempted sequences always go
back to the head of the queue, since they had already been admitted. The hook's specification is
`hf_paged.plugins.SchedulerSpecs`.
"""

from __future__ import annotations

from ..plugins import plugin_manager

__all__ = ["request_priority"]


def request_priority(request_id: str, prompt_token_ids: list[int], sampling_params) -> float:
    """The priority the plugins give a request; 0 when none does.

    Example:
        >>> request_priority("r0", [5, 6, 7], None)  # no plugin installed
        0.0
    """
    priority = plugin_manager().hook.hf_paged_request_priority(
        request_id=request_id, prompt_token_ids=prompt_token_ids, sampling_params=sampling_params
    )
    return 0.0 if priority is None else float(priority)
