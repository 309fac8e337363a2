"""
Requests decoded together, for a server (serve.py): a thread of its own owns the model and runs one
step of rows.Rows for every request in flight, while the server's asyncio event loop hands it
jobs and reads their tokens back as text.
  batcher = Batcher(Rows(model, max_rows=8), enc, max_queue=32)
  batcher.start()
  job = batcher.admit(ids, dict(temperature=0.8, seed=1), max_tokens=100)  # in the event loop; None: no place
  async for text, finish_reason in batcher.pieces(job, stop=['The end.']):
      ...
  batcher.release(job)  # however its request ended
  batcher.stop()
"""
import asyncio
import threading
import time
from collections import deque

from tokenizer import TextDecoder


class Job:
    """A completion: its prompt and sampling options in, its tokens, then its finish_reason, out."""

    def __init__(self, ids, options, max_tokens):
        self.ids, self.options, self.max_tokens = ids, options, max_tokens
        self.loop, self.out = asyncio.get_running_loop(), asyncio.Queue()
        self.slot, self.made = None, 0  # the thread's: its row, the tokens it has made
        self.began = time.perf_counter()

    def send(self, item):
        send([(self, item)])


def send(items):
    """Put each (job, item) on its job's queue, all in one call into the event loop (one wake-up a step)."""
    if items:
        try:
            items[0][0].loop.call_soon_threadsafe(lambda: [job.out.put_nowait(item) for job, item in items])
        except RuntimeError:  # the event loop has closed: the server is shutting down
            pass


class Batcher:
    """The event loop admits a Job (it waits in `waiting`), and releases it (to `leaving`, or out of
    `waiting`) once its client no longer wants it; the thread gives waiting jobs rows, steps them all,
    and sends each its tokens. At most max_queue jobs beyond the rows have a place, streamed or not.
    on_token(seconds, first) times each token as its job reads it: since admission for the first,
    else since the one before."""

    def __init__(self, rows, enc, max_queue, on_token=lambda seconds, first: None):
        self.rows, self.enc, self.on_token = rows, enc, on_token
        self.places = len(rows.rows) + max_queue
        self.changed = threading.Condition()  # guards waiting, leaving and stopping, and wakes the thread
        self.waiting, self.leaving, self.stopping = deque(), [], False
        self.decoding = {}  # slot -> its Job; the thread's own
        self.admitted = set()  # the event loop's: jobs from admission until released
        self.generated = 0  # tokens made
        self.thread = threading.Thread(target=self.decode_forever, name='decoding')

    def start(self):
        self.thread.start()

    def stop(self):
        with self.changed:
            self.stopping = True
            self.changed.notify()
        self.thread.join()

    def end(self, job):
        """Take job's row away."""
        self.rows.remove(job.slot)
        del self.decoding[job.slot]
        job.slot = None

    def decode_forever(self):
        rows, decoding, eot = self.rows, self.decoding, self.enc.eot_token
        out = []  # the last step's (job, item)s: sent as the next step runs (Rows.step's before), or before a wait

        def flush():
            send(out[:])
            out.clear()
        while True:
            if not decoding:
                flush()
            with self.changed:
                self.changed.wait_for(lambda: self.stopping or self.waiting or self.leaving or decoding)
                if self.stopping:
                    return
                gone, self.leaving[:] = self.leaving[:], []
            for job in gone:
                if job.slot is not None:
                    self.end(job)
            with self.changed:
                new = [self.waiting.popleft() for _ in range(min(rows.free, len(self.waiting)))]
            try:
                if new:  # a prompt's read takes a while: the tokens wait for no one
                    flush()
                for job in new:
                    job.slot = rows.add(job.ids, **job.options)
                    decoding[job.slot] = job
                tokens = rows.step(flush) if decoding else {}
            except Exception as e:  # a fault of the device (out of memory): fail these requests, keep serving
                flush()
                for job in set(new) | set(decoding.values()):
                    job.send(e)
                    if job.slot is not None:
                        self.end(job)
                continue
            self.generated += len(tokens)
            for slot, token in tokens.items():
                job = decoding[slot]
                job.made += 1
                out.append((job, token))
                if token == eot or job.made == job.max_tokens:
                    out.append((job, 'stop' if token == eot else 'length'))
                    self.end(job)

    def admit(self, ids, options, max_tokens):
        """A Job for the prompt ids with Rows.add's options, in line for a row; None when every place is taken."""
        if len(self.admitted) >= self.places:
            return None
        job = Job(ids, options, max_tokens)
        self.admitted.add(job)
        with self.changed:
            self.waiting.append(job)
            self.changed.notify()
        return job

    def release(self, job):
        """Free job's row or place in the queue, once, however its request ended."""
        if job in self.admitted:
            self.admitted.discard(job)
            with self.changed:
                if job in self.waiting:
                    self.waiting.remove(job)
                else:
                    self.leaving.append(job)
                self.changed.notify()

    def end_all(self, error):
        """End every job admitted now, raising error where it is read."""
        for job in list(self.admitted):
            job.send(error)

    async def pieces(self, job, stop):
        """Yield (text, None) as job's completion is written, then (its last text, finish_reason). Text that
        may begin a stop string is held back until it cannot; a stop string and what follows are cut.
        Counts the tokens read in job.used."""
        decoder = TextDecoder(self.enc, eot_text=False)
        hold = max(map(len, stop), default=1) - 1
        held, reason, job.used, last = '', None, 0, None
        while reason is None:
            items, new = [await job.out.get()], ''
            while not job.out.empty():  # tokens that came while the last text was written out: one piece
                items.append(job.out.get_nowait())
            for item in items:
                if isinstance(item, Exception):
                    raise item
                if isinstance(item, str):
                    reason = item
                    new += decoder.end()
                    break
                now = time.perf_counter()
                self.on_token(now - (job.began if last is None else last), last is None)
                job.used, last = job.used + 1, now
                new += decoder.add(item)
            held += new
            cut = min((i for i in map(held.find, stop) if i >= 0), default=-1)
            if cut >= 0:
                held, reason = held[:cut], 'stop'
            text = held if reason else held[:max(0, len(held) - hold)]
            held = held[len(text):]
            if text or reason:
                yield text, reason
