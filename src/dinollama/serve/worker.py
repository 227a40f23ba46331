"""The engine's own thread, and the bridge that carries each request's progress to the event loop."""

from __future__ import annotations

import asyncio
import logging
import threading

from ..codellama.engine import Engine, Request

log = logging.getLogger("dinollama.serve")


class Busy(Exception):
    """The wait queue is full: answer 503 with ``Retry-After``."""


class EngineWorker:
    """Steps the engine while it has work and sleeps otherwise; requests are added from the event
    loop's thread. A failure inside a step ends the requests it held, not the server."""

    def __init__(self, engine: Engine, max_queue: int) -> None:
        self.engine, self.max_queue = engine, max_queue
        self._wake = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="dinollama-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout=30)

    def submit(self, reqs: list[Request]) -> None:
        """Queue ``reqs`` together (all or none): ``Busy`` when the queue is full, ``ValueError`` when
        one does not fit the context."""
        for r in reqs:
            self.engine.check(r)
        with self._wake:
            if self.engine.queued + len(reqs) > self.max_queue:
                raise Busy(f"{self.engine.queued} requests are waiting for a slot; retry shortly")
            for r in reqs:
                self.engine.add(r)
            self._wake.notify()

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and not self.engine.busy():
                    self._wake.wait()
                if self._stopping:
                    return
            try:
                self.engine.step()
            except Exception:
                log.exception("engine step failed")
                self.engine.abort()


class Progress:
    """Wakes an asyncio waiter after each token of a request (``on_update`` runs on the engine thread)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop, self.event = loop, asyncio.Event()

    def __call__(self, req: Request) -> None:
        self.loop.call_soon_threadsafe(self.event.set)

    async def wait(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self.event.wait(), timeout)
        except asyncio.TimeoutError:
            pass
        self.event.clear()
