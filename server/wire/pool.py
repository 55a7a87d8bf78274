"""Running calls in a thread pool from the event loop, with one wake-up of the loop for all of them."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


async def run_all_in_pool(
    pool: ThreadPoolExecutor, function: Callable[..., T], calls: list[tuple],
    pool_for: Callable[[tuple], ThreadPoolExecutor] | None = None,
) -> list[T]:
    """`function(*args)` for each of `calls`, in parallel in `pool` (or in `pool_for(args)`, each call in the
    pool it names); raises the first call's error, if any.

    The event loop is woken once, when the last call is done: asyncio's run_in_executor wakes it once per
    call, and those wake-ups held the GIL longer than anything else on the host path (py-spy)."""
    if not calls:
        return []
    loop = asyncio.get_running_loop()
    all_done = loop.create_future()
    results: list[Any] = [None] * len(calls)
    errors: list[BaseException | None] = [None] * len(calls)
    remaining = [len(calls)]
    lock = threading.Lock()

    def finish() -> None:
        if not all_done.done():  # the request may have been cancelled meanwhile
            all_done.set_result(None)

    def call(i: int, args: tuple) -> None:
        try:
            results[i] = function(*args)
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting request
            errors[i] = exc
        with lock:
            remaining[0] -= 1
            last = remaining[0] == 0
        if last:
            try:
                loop.call_soon_threadsafe(finish)
            except RuntimeError:  # the loop has closed: nobody is waiting
                pass

    started = [(pool if pool_for is None else pool_for(args)).submit(call, i, args)
               for i, args in enumerate(calls)]
    try:
        await all_done
    except BaseException:  # the request gave up (its deadline): calls not yet begun never run
        for future in started:
            future.cancel()
        raise
    for error in errors:
        if error is not None:
            raise error
    return results

