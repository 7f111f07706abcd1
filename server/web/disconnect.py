"""Work for a client that hung up stops: a grammar compile, a prompt's tokenization, a non-streamed answer."""

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.requests import Request

from server.errors import APIError


@asynccontextmanager
async def cancelled_if_client_leaves(request: Request) -> AsyncIterator[None]:
    """Cancel the enclosed work when the client disconnects (its generation is aborted in the engine, a
    compile's worker process is stopped). Only around work before a response starts: a streamed response
    watches for the disconnect itself. The body must have been read: what `receive` gives next is the end."""
    task, gone = asyncio.current_task(), asyncio.Event()

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        gone.set()
        task.cancel()

    watcher = asyncio.create_task(watch())
    try:
        yield
    except asyncio.CancelledError:
        if not gone.is_set():
            raise
    finally:
        watcher.cancel()
    if gone.is_set():  # also where the cancel was swallowed (wait_for returning a result it had meanwhile)
        task.uncancel()
        # Nobody reads it; it ends the request (and logs as 499, nginx's "client closed request").
        raise APIError(499, "the client closed the request", type="invalid_request_error",
                       code="client_closed_request")
