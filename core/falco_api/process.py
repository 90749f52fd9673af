"""The life of a falco-api server process: start, run until SIGTERM/SIGINT (or a fatal failure), stop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Protocol


class Service(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...


async def run_until_signalled(
    service: Service,
    *,
    grace: float,
    log: logging.Logger,
    failure: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Start ``service``; on SIGTERM/SIGINT stop it (streams get ``grace`` seconds to drain).

    ``failure`` returns (or raises) only when the service cannot go on; its error then ends the run.
    """
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    await service.start()
    waiters: list[asyncio.Future[object]] = [asyncio.ensure_future(stopping.wait())]
    if failure is not None:
        waiters.append(asyncio.ensure_future(failure()))
    try:
        done, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            task.result()  # a failure's exception ends the run here
        log.info("stopping: draining streams for up to %.1f s", grace)
    finally:
        for task in waiters:
            task.cancel()
        await service.stop()


def exit_code(
    prog: str,
    body: Callable[[], None],
    *,
    usage_errors: tuple[type[BaseException], ...],
    fatal_errors: tuple[type[BaseException], ...] = (),
) -> int:
    """Run ``body``: a usage error (flags, certificates, files) exits 2, a fatal one 1, each as one line."""
    try:
        body()
    except usage_errors as error:
        print(f"{prog}: {error}", file=sys.stderr)
        return 2
    except fatal_errors as error:
        print(f"{prog}: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    with contextlib.suppress(Exception):
        logging.shutdown()
    return 0
