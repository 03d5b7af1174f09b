"""A thread pool of its own for blocking repository and file work.

asyncio's default executor is small (min(32, cores + 4) threads) and shared by everything
that calls `asyncio.to_thread`; work that can block on a hostile tenant's data (reading a
huge tree, removing a build directory) runs here instead, so it cannot starve the probes or
other apps' pushes, and they cannot starve it.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")

_POOL = ThreadPoolExecutor(max_workers=8, thread_name_prefix="gateway-blocking")


async def run(func: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
    """Run a blocking call on the gateway's own pool and await its result."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(_POOL, functools.partial(func, *args, **kwargs))
