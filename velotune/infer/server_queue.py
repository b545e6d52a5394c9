"""The server's generation worker: one thread owns the model and runs the queued jobs.

Jobs wait in arrival order. The worker takes the oldest one together with every queued job that can share its
decode: the same adapter and the same resolved sampling settings (a job with a seed runs alone, so that its
draws repeat what the same request gives alone). The group decodes as one left-padded batch through
`TextGeneration`; each row's text goes to its own job, so outputs are never mixed up. Jobs that arrive while a
group decodes wait for the next group (static batching). A job whose client went away is finished at the next
decode step that hands back text, and a job cancelled while still queued never runs. A job whose logits go
NaN or infinite gets an error; the others of its batch go on as if it were not there.
"""
from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

log = logging.getLogger("velotune")

FINISH_CANCELLED = "cancelled"
# The engine's finish reasons -> OpenAI's: an EOS id and a stop string both end as "stop".
OPENAI_FINISH = {"eos": "stop", "stop": "stop", "length": "length", FINISH_CANCELLED: FINISH_CANCELLED}


@dataclass
class Finish:
    reason: str              # "stop", "length" or "cancelled"
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Job:
    """One request's generation. `deliver` is called from the worker thread with ("text", str), then once
    ("done", Finish) or ("error", exception)."""
    adapter: str | None           # None: the base model alone
    prompt_ids: list
    sampling: dict                # every SamplingParams field, resolved
    deliver: Callable[[tuple], None]
    cancelled: threading.Event = field(default_factory=threading.Event)
    images: dict | None = None    # a vision-language prompt's pixel tensors (transformers' names)

    def batch_key(self):
        if self.sampling.get("seed") is not None or self.images:
            return ("alone", id(self))
        return (self.adapter, _freeze(self.sampling))

    def cancel(self):
        self.cancelled.set()


def _freeze(value):
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


class Scheduler:
    """Owns the model from its own thread. `submit(job)` from any thread; `close()` stops the thread."""

    def __init__(self, model, tokenizer, adapters, max_batch_size: int = 16, start: bool = True):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.model, self.tokenizer, self.adapters = model, tokenizer, adapters
        self.max_batch_size = max_batch_size
        self.queue: deque = deque()
        self.running: list = []         # the jobs of the batch decoding now
        self.condition = threading.Condition()
        self.closed = False
        self.stats = dict(jobs_done=0, jobs_cancelled=0, jobs_failed=0, batches=0, largest_batch=0,
                          tokens_generated=0, cancelled_tokens=0)
        self.batch_sizes: list = []     # of every batch run so far (tests and tuning)
        self.thread = threading.Thread(target=self._loop, name="velotune-generation", daemon=True)
        if start:
            self.start()

    def start(self):
        self.thread.start()

    def submit(self, job: Job):
        with self.condition:
            if self.closed:
                raise RuntimeError("the generation worker is shut down")
            self.queue.append(job)
            self.condition.notify()

    def queued(self) -> int:
        with self.condition:
            return len(self.queue)

    def close(self, timeout: float | None = 5.0):
        """Stops the worker: queued jobs and the batch decoding now end as cancelled."""
        with self.condition:
            self.closed = True
            for job in list(self.queue) + list(self.running):
                job.cancel()
            self.condition.notify_all()
        if self.thread.is_alive():
            self.thread.join(timeout)

    # ---- the worker thread -------------------------------------------------------------------------------
    def _loop(self):
        while True:
            jobs = self._take_batch()
            if jobs is None:
                return
            live = []
            for job in jobs:
                if job.cancelled.is_set():
                    self._finish(job, Finish(FINISH_CANCELLED, len(job.prompt_ids), 0))
                else:
                    live.append(job)
            if not live:
                continue
            try:
                self._run(live)
            except Exception as exc:  # a failed batch must not stop the server: its jobs get the error
                log.exception("generation failed for a batch of %d request(s)", len(live))
                for job in live:
                    self.stats["jobs_failed"] += 1
                    job.deliver(("error", exc))
            finally:
                self.running = []

    def _take_batch(self):
        """The oldest job and every queued job that can decode with it (up to max_batch_size), in order."""
        with self.condition:
            while not self.queue and not self.closed:
                self.condition.wait()
            if self.closed:
                for job in self.queue:
                    self._finish(job, Finish(FINISH_CANCELLED, len(job.prompt_ids), 0))
                self.queue.clear()
                return None
            first = self.queue.popleft()
            key, batch, rest = first.batch_key(), [first], deque()
            while self.queue:
                job = self.queue.popleft()
                if len(batch) < self.max_batch_size and job.batch_key() == key:
                    batch.append(job)
                else:
                    rest.append(job)
            self.queue = rest
            self.running = batch
            return batch

    def _run(self, jobs):
        from .generation import FINISH_NONFINITE, NonFiniteLogitsError, TextGeneration
        self.adapters.activate(jobs[0].adapter)
        self.stats["batches"] += 1
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(jobs))
        self.batch_sizes.append(len(jobs))
        extra = {"image_inputs": jobs[0].images} if jobs[0].images else {}   # a job with images runs alone
        run = TextGeneration(self.model, self.tokenizer, [job.prompt_ids for job in jobs], **jobs[0].sampling,
                             **extra)
        for event in run.events():
            decoder = run.decoder
            for row, job in enumerate(jobs):   # clients that went away: end their rows now
                if job.cancelled.is_set() and decoder.active(row):
                    decoder.finish(row, FINISH_CANCELLED)
            job = jobs[event.row]
            if event.text and not job.cancelled.is_set():
                job.deliver(("text", event.text))
            if event.finished and event.finish_reason == FINISH_NONFINITE:   # this job alone fails
                self.stats["jobs_failed"] += 1
                job.deliver(("error", NonFiniteLogitsError(len(decoder.tokens[event.row]))))
            elif event.finished:
                reason = OPENAI_FINISH.get(event.finish_reason, event.finish_reason)
                self._finish(job, Finish(reason, decoder.prompt_lengths[event.row], len(decoder.tokens[event.row])))

    def _finish(self, job, finish: Finish):
        self.stats["jobs_cancelled" if finish.reason == FINISH_CANCELLED else "jobs_done"] += 1
        self.stats["tokens_generated"] += finish.completion_tokens
        if finish.reason == FINISH_CANCELLED:   # work done for a client that left
            self.stats["cancelled_tokens"] += finish.completion_tokens
        job.deliver(("done", finish))
