"""Keep Python's cyclic garbage collector out of the serving loop.

An engine step allocates thousands of short-lived containers (updates, chunks, lists), so CPython's
default thresholds run a young collection every step or two, and now and then a full one that walks
every object the process holds: with Transformers and torch loaded that is hundreds of thousands of
objects (~0.2 s on a CPU core), millions once ``torch.compile`` has run, all while the device idles.
vLLM and SGLang answer it the same way: freeze the heap that exists when serving starts (the
collector no longer walks it) and collect the young generation less often.
"""

from __future__ import annotations

import contextlib
import gc
import threading
from collections.abc import Iterator

__all__ = ["quiet_gc"]

# Young-generation threshold while serving: most of a step's objects die by reference count before
# this many allocations, so a collection rarely finds anything worth the walk.
_YOUNG_THRESHOLD = 50_000

_lock = threading.Lock()
_depth = 0
_saved: tuple[tuple[int, ...], bool] | None = None


@contextlib.contextmanager
def quiet_gc() -> Iterator[None]:
    """While any loop runs under it: the heap of the time frozen (`gc.freeze`) and young
    collections rarer. The outermost exit restores the thresholds and unfreezes, unless the process
    had frozen objects of its own before (those stay frozen, with ours)."""
    global _depth, _saved
    with _lock:
        if _depth == 0:
            threshold = gc.get_threshold()
            _saved = (threshold, gc.get_freeze_count() == 0)
            gc.freeze()
            gc.set_threshold(max(threshold[0], _YOUNG_THRESHOLD), *threshold[1:])
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                threshold, unfreeze = _saved
                gc.set_threshold(*threshold)
                if unfreeze:
                    gc.unfreeze()
                _saved = None
