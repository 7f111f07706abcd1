"""Structured-output constraints compiled in child processes: bounded work, off the server's threads.

xgrammar's compile cannot be interrupted, and a hostile schema can take minutes. Run on the event loop's
executor, 24 of them once held `/ready` and every tenant's chat template for a minute. Here each compile runs in
one of `--grammar-workers` processes (at a low CPU priority, so the engine keeps the cores) within a budget; a
compile past it, or whose client left, has its process killed and replaced, and so does a process that died
on its input. Only the compiled grammar comes back, serialized.
"""

import asyncio
import json
import logging
import multiprocessing
import os
import re
import signal
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from multiprocessing.connection import Connection

log = logging.getLogger(__name__)

ANY_OBJECT = '{"type": "object"}'
# xgrammar's messages start with a timestamp and its C++ source location: not the client's business.
_SOURCE_PREFIX = re.compile(r"^\[[^\]]*\] \S+:\d+: ")
# Not fork: the server has threads (and maybe CUDA); a forked child would inherit their locks mid-use.
_SPAWN = multiprocessing.get_context("spawn")
# Niceness: a tenth of a core's share beside the engine's threads, so compiles still progress while the
# engine saturates the CPU. Set by the parent at once, so that the child's start-up runs at it too.
NICENESS = 10
RESTART_PAUSE_S = 1.0  # between starts of a worker that failed to start


class CompileTimeout(Exception):
    """The compile did not finish within its budget: its process was stopped."""


class WorkersBusy(Exception):
    """No worker was free within the budget (other compiles held them all)."""


def compile_spec(compiler, kind: str, spec: str):
    """An OutputConstraint's kind and spec, compiled by an xgrammar GrammarCompiler. Raises ValueError
    naming what is wrong with the spec."""
    try:
        if kind == "json":
            return compiler.compile_json_schema(spec, any_whitespace=False)
        if kind == "json_object":  # an object, as OpenAI means it (xgrammar's builtin takes any value)
            return compiler.compile_json_schema(ANY_OBJECT, any_whitespace=False)
        if kind == "regex":
            return compiler.compile_regex(spec)
        if kind == "choice":
            return compiler.compile_regex("|".join(re.escape(choice) for choice in json.loads(spec)))
        return compiler.compile_grammar(spec)
    except (RuntimeError, ValueError, TypeError) as exc:  # xgrammar reports bad input as these
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(_SOURCE_PREFIX.sub("", first_line)[:300]) from exc


def _serve(connection: Connection) -> None:
    """A worker process: the tokenizer's info in, "ready" out; then (kind, spec) in, (ok, serialized grammar
    or what is wrong) out."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the server, which stops its workers itself
    import xgrammar as xgr  # here, not at the top: the server process imports this module too

    info = xgr.TokenizerInfo.deserialize_json(connection.recv())
    compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)  # the server caches
    connection.send("ready")
    while True:
        try:
            kind, spec = connection.recv()
        except EOFError:  # the server went away
            return
        try:
            connection.send((True, compile_spec(compiler, kind, spec).serialize_json()))
        except ValueError as exc:
            connection.send((False, str(exc)))


class _Worker:
    def __init__(self, tokenizer_info: str):
        self._connection, child = _SPAWN.Pipe()
        self.process = _SPAWN.Process(target=_serve, args=(child,), name="swapyard-grammar", daemon=True)
        try:
            self.process.start()
        finally:
            child.close()
        os.setpriority(os.PRIO_PROCESS, self.process.pid, NICENESS)
        # Its own thread for the pipe's blocking calls: a send waits while the child starts (seconds), and
        # the event loop's executor is shared with every request.
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="swapyard-grammar")
        self.started: Future = self._thread.submit(self._start, tokenizer_info)

    def _start(self, tokenizer_info: str) -> None:
        self._connection.send(tokenizer_info)
        if self._connection.recv() != "ready":
            raise RuntimeError("unexpected start-up message")

    def compile(self, kind: str, spec: str) -> Future:
        """(ok, serialized grammar or what is wrong), or None when the process died meanwhile."""
        return self._thread.submit(self._round_trip, kind, spec)

    def _round_trip(self, kind: str, spec: str) -> tuple[bool, str] | None:
        try:
            self._connection.send((kind, spec))
            return self._connection.recv()
        except (EOFError, OSError):  # killed meanwhile, or it died on this input
            return None

    def kill(self) -> None:
        """Stop it at once, wherever its compile is; its thread ends as the pipe closes."""
        self.process.kill()
        self._thread.shutdown(wait=False)
        threading.Thread(target=self._reap, daemon=True).start()

    def _reap(self) -> None:
        self.process.join()
        self._connection.close()


class GrammarWorkers:
    """`size` worker processes; a compile takes a free one (first come, first served)."""

    def __init__(self, tokenizer_info: str, size: int):
        self._tokenizer_info = tokenizer_info
        self._idle: asyncio.Queue[_Worker] = asyncio.Queue()  # started and free
        self._all: set[_Worker] = set()
        self._closed = False
        for _ in range(size):
            self._add()

    def _add(self) -> None:
        """Start a worker; it joins the free ones once started (a failed start is logged and tried again)."""
        if self._closed:
            return
        try:
            worker = _Worker(self._tokenizer_info)
        except OSError:  # out of processes or memory: try again shortly, the pool keeps its size
            log.exception("starting a grammar worker failed; trying again in %.0f s", RESTART_PAUSE_S)
            asyncio.get_running_loop().call_later(RESTART_PAUSE_S, self._add)
            return
        self._all.add(worker)
        asyncio.wrap_future(worker.started).add_done_callback(lambda started: self._on_started(worker, started))

    def _on_started(self, worker: _Worker, started: asyncio.Future) -> None:
        if self._closed or started.cancelled():
            return
        if started.exception() is None:
            self._idle.put_nowait(worker)
            return
        log.error("a grammar worker failed to start (exit code %s); trying again in %.0f s",
                  worker.process.exitcode, RESTART_PAUSE_S, exc_info=started.exception())
        self._replace(worker, pause_s=RESTART_PAUSE_S)

    def _replace(self, worker: _Worker, pause_s: float = 0.0) -> None:
        self._all.discard(worker)
        worker.kill()
        asyncio.get_running_loop().call_later(pause_s, self._add)

    async def compile(self, kind: str, spec: str, budget_s: float) -> str:
        """The serialized compiled grammar (xgrammar's JSON). Waits up to `budget_s` for a free worker
        (WorkersBusy past it), then gives the compile up to `budget_s` (CompileTimeout past it). Raises
        ValueError naming what is wrong with the spec."""
        try:
            worker = await asyncio.wait_for(self._idle.get(), budget_s)
        except TimeoutError:
            raise WorkersBusy() from None
        result = None
        try:
            result = await asyncio.wait_for(asyncio.wrap_future(worker.compile(kind, spec)), budget_s)
        except TimeoutError:
            raise CompileTimeout() from None
        finally:  # past the budget, cancelled (the client left) or died: a fresh process takes its place
            if result is not None:
                self._idle.put_nowait(worker)
            else:
                self._replace(worker)
        if result is None:
            log.warning("a grammar worker died compiling a %s (exit code %s)", kind, worker.process.exitcode)
            raise ValueError("the constraint could not be compiled")
        ok, payload = result
        if not ok:
            raise ValueError(payload)
        return payload

    def close(self) -> None:
        self._closed = True
        for worker in self._all:
            worker.kill()
        self._all.clear()
