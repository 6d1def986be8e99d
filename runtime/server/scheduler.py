"""The queue and the single worker that owns the Engine.

The engine has one KV cache, so generations run one at a time, first come first served. Each one
runs in a worker thread; its text deltas come back to the event loop through the job's asyncio
queue. A job whose client went away is dropped from the queue at once, or, when it is running,
stops after the token being computed (the engine polls `should_stop` between tokens).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from ..engine import Engine, Generation
from ..sampling import SamplingParams


class QueueFull(RuntimeError):
    """More requests wait than --max-queue allows."""


class ShuttingDown(RuntimeError):
    """The server is stopping: new requests are refused, waiting and running ones end."""


@dataclass
class GenRequest:
    """One generation, whichever API asked for it."""

    prompt_ids: list[int]
    params: SamplingParams
    max_tokens: int
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False


@dataclass
class Delta:
    text: str


@dataclass
class Done:
    gen: Generation
    text: str
    queued_s: float  # time spent waiting for the engine
    total_s: float  # from submission to the end of the generation


@dataclass
class Failed:
    error: BaseException


@dataclass
class Cancelled:
    pass


Event = Delta | Done | Failed | Cancelled


_ids = itertools.count(1)


@dataclass(eq=False)
class Job:
    req: GenRequest
    loop: asyncio.AbstractEventLoop
    id: int = field(default_factory=lambda: next(_ids))
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    stop_flag: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)
    started: float | None = None
    finished: bool = False
    _seen: str = ""  # text the engine produced so far (worker thread only)
    _sent: int = 0  # how much of it went out as deltas

    def _post(self, ev: Event) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: the server is going down
            self.loop.call_soon_threadsafe(self.events.put_nowait, ev)

    def on_text(self, delta: str) -> None:
        """Called by the engine in the worker thread. The engine holds back text that may be the
        start of a stop string, so the streamed text always equals the final (cut) text."""
        self._seen += delta
        self._post(Delta(delta))
        self._sent = len(self._seen)

    def should_stop(self) -> bool:
        return self.stop_flag.is_set()

    def done(self, gen: Generation) -> None:
        """Called on the event loop once the engine returned: the rest of the text, then Done."""
        text = gen.text
        if not text.startswith(self._seen[: self._sent]):  # cannot happen; keep the stream consistent
            text = self._seen[: self._sent]
        if len(text) > self._sent:
            self.events.put_nowait(Delta(text[self._sent :]))
        now = time.perf_counter()
        started = self.started if self.started is not None else now
        self.events.put_nowait(Done(gen, text, started - self.submitted, now - self.submitted))

    async def stream(self) -> AsyncIterator[Event]:
        """The job's events up to and including the last one (Done, Failed or Cancelled)."""
        while True:
            ev = await self.events.get()
            yield ev
            if not isinstance(ev, Delta):
                return


class Scheduler:
    def __init__(self, engine: Engine, max_queue: int = 32):
        self.engine = engine
        self.max_queue = max_queue
        self.pending: deque[Job] = deque()
        self.running: Job | None = None
        self.served = 0
        self.cancelled = 0
        self.rejected = 0
        self.last_generated: dict[int, int] = {}  # job id -> tokens generated (recent jobs; for tests/stats)
        self.closing = False
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kt-engine")
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    # lifecycle (called from the app's lifespan)
    def start(self) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._worker())

    def shutdown(self) -> None:
        """Refuse new jobs, end the waiting ones and stop the running one (each client is told)."""
        self.closing = True
        while self.pending:
            job = self.pending.popleft()
            job.finished = True
            job.events.put_nowait(Failed(ShuttingDown("the server is shutting down")))
        if self.running is not None:
            self.running.stop_flag.set()

    async def stop(self) -> None:
        self.shutdown()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._pool.shutdown(wait=False)

    def submit(self, req: GenRequest) -> Job:
        if self.closing:
            raise ShuttingDown("the server is shutting down")
        if len(self.pending) >= self.max_queue:
            self.rejected += 1
            raise QueueFull(f"{len(self.pending)} requests are waiting (--max-queue {self.max_queue})")
        job = Job(req, asyncio.get_running_loop())
        self.pending.append(job)
        assert self._wake is not None, "Scheduler.start() was not called"
        self._wake.set()
        return job

    def cancel(self, job: Job) -> None:
        """The client went away: drop the job if it waits, stop it if it runs."""
        if job.finished:
            return
        if job in self.pending:
            self.pending.remove(job)
            job.finished = True
            self.cancelled += 1
            job.events.put_nowait(Cancelled())
        else:
            job.stop_flag.set()

    def retry_after(self) -> int:
        """Seconds a rejected client might wait: a rough guess from the queue length."""
        return max(1, min(60, len(self.pending)))

    def _generate(self, job: Job) -> Generation:
        r = job.req
        return self.engine.generate(
            r.prompt_ids,
            r.params,
            max_new_tokens=r.max_tokens,
            stop=r.stop,
            ignore_eos=r.ignore_eos,
            on_text=job.on_text,
            should_stop=job.should_stop,
        )

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._wake is not None
        while True:
            while not self.pending:
                self._wake.clear()
                await self._wake.wait()
            job = self.pending.popleft()
            self.running = job
            job.started = time.perf_counter()
            try:
                gen = await loop.run_in_executor(self._pool, self._generate, job)
            except asyncio.CancelledError:
                job.stop_flag.set()
                raise
            except Exception as e:  # noqa: BLE001 - reported to the client of this job, the worker goes on
                job.finished = True
                job.events.put_nowait(Failed(e))
            else:
                job.finished = True
                self.last_generated[job.id] = len(gen.output_ids)
                if len(self.last_generated) > 256:
                    self.last_generated.pop(next(iter(self.last_generated)))
                if job.stop_flag.is_set() and self.closing:
                    job.events.put_nowait(Failed(ShuttingDown("the server is shutting down")))
                elif job.stop_flag.is_set():
                    self.cancelled += 1
                    job.events.put_nowait(Cancelled())
                else:
                    self.served += 1
                    job.done(gen)
            finally:
                self.running = None
