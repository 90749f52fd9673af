"""Retry delays shared by everything that reconnects (the operator's pushes, the relay's upstreams)."""

from __future__ import annotations

import random
from collections.abc import Callable


def backoff_delay(
    attempt: int,
    *,
    initial: float,
    maximum: float,
    multiplier: float = 2.0,
    rng: Callable[[], float] = random.random,
) -> float:
    """Exponential backoff with "equal jitter"; ``attempt`` 0 is the first retry.

    Half of the delay is fixed, so a refusing peer is never hammered; half is random,
    so many clients that failed together (a shared outage) do not retry in lockstep.
    """
    ceiling = maximum
    if attempt < 64:  # beyond that the power only overflows towards the cap anyway
        ceiling = min(maximum, initial * multiplier ** max(0, attempt))
    return ceiling / 2 + rng() * ceiling / 2
