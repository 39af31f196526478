"""Step timing: one helper for every "how long did this step take" record of a run.

The pipeline and the cost model report where planning time went (``Plan.timings``) by step
name; this is the one place that measures it. A leaf: it imports nothing of attnopt's, so every
room may use it.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator

__all__ = ["timed"]

_NOTE = "attnopt: raised during the"


@contextlib.contextmanager
def timed(timings: dict[str, float], name: str, log: logging.Logger | None = None) -> Iterator[None]:
    """Add the block's wall seconds to ``timings[name]`` (steps run more than once accumulate).

    With ``log``, the step's time is also logged at INFO when the block ends. An exception leaving
    the block (an out-of-memory in calibration, a failing family) carries a note naming the step,
    the innermost one, so the user's traceback says where the run was.
    """
    start = time.perf_counter()
    try:
        yield
    except BaseException as e:
        notes = getattr(e, "__notes__", [])
        if hasattr(e, "add_note") and not any(n.startswith(_NOTE) for n in notes):
            e.add_note(f"{_NOTE} '{name}' step")
        raise
    finally:
        seconds = time.perf_counter() - start
        timings[name] = timings.get(name, 0.0) + seconds
        if log is not None:
            log.info("%s: %.2f s", name, seconds)
