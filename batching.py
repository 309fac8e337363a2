"""
Requests decoded together, for a server (serve.py): a process of its own (decoder.py) owns the model and
runs one step of rows.Rows for every request in flight, while the server's asyncio event loop hands it
jobs and reads their tokens back as text.
  batcher = Batcher(functools.partial(Rows, model, max_rows=8), max_rows=8, max_queue=32)
  batcher.start()  # the process makes its Rows with the picklable make_rows, meanwhile...
  batcher.ready(enc)  # ...until they are made
  job = batcher.admit(ids, dict(temperature=0.8, seed=1), max_tokens=100)  # in the event loop; None: no place
  async for text, finish_reason in batcher.pieces(job, stop=['The end.']):
      ...
  batcher.release(job)  # however its request ended
  batcher.stop()
"""
import asyncio
import atexit
import itertools
import os
import pickle
import socket
import subprocess
import sys
import time
from multiprocessing.connection import Connection

from tokenizer import TextDecoder


class Job:
    """A completion's key in the decoding process, and its queue: its tokens, then its finish_reason."""

    def __init__(self, key):
        self.key = key
        self.loop, self.out = asyncio.get_running_loop(), asyncio.Queue()
        self.began = time.perf_counter()

    def send(self, item):
        """Put item on the queue, from any thread (a signal handler's too)."""
        try:
            self.loop.call_soon_threadsafe(self.out.put_nowait, item)
        except RuntimeError:  # the event loop has closed: the server is shutting down
            pass


class Batcher:
    """The event loop admits a Job and sends it to the decoding process, and tells the process once the
    job's client no longer wants it (release); the process gives waiting jobs rows, steps them all, and
    sends each step's tokens back in one message, which the event loop reads as soon as it comes. At most
    max_rows + max_queue jobs have a place, streamed or not. on_token(seconds, first) times each token as
    its job reads it: since admission for the first, else since the one before."""

    def __init__(self, make_rows, max_rows, max_queue, on_token=lambda seconds, first: None):
        self.make_rows, self.max_rows, self.on_token = make_rows, max_rows, on_token
        self.places = max_rows + max_queue
        self.admitted = set()  # jobs from admission until released
        self.jobs = {}  # key -> the Job the process has, until it ends or is released
        self.keys, self.generated = itertools.count(), 0  # tokens made
        self.process = self.conn = self.loop = self.enc = self.dead = None  # dead: the error once the process has died

    def start(self):
        """Start the decoding process: it makes its Rows with make_rows (compiled, if they compile) while the
        caller goes on."""
        mine, its = socket.socketpair()
        with its:
            self.process = subprocess.Popen([sys.executable, os.path.join(os.path.dirname(__file__), 'decoder.py'),
                                             str(its.fileno())], pass_fds=[its.fileno()])
        atexit.register(self.process.kill)  # should the server end before it is ready (stop waits for it after)
        self.conn = Connection(mine.detach())
        self.conn.send_bytes(pickle.dumps(self.make_rows))

    def ready(self, enc):
        """Wait until the process has made its Rows, to decode text of the tokenizer enc; returns the CPU threads
        its steps compute with, of one row and of more. Raises RuntimeError with the reason if it could not."""
        self.enc = enc
        try:
            self.conn.send(enc.eot_token)
        except OSError:  # it has failed, and said why
            pass
        try:
            reply = self.conn.recv()
        except EOFError:
            reply = ('failed', f"the decoding process ended before it was ready (exit status {self.process.wait()})")
        if reply[0] == 'failed':
            self.stop()
            raise RuntimeError(reply[1])
        return reply[1:]

    def stop(self):
        if self.loop and not self.loop.is_closed():
            self.loop.remove_reader(self.conn.fileno())
        try:
            self.conn.send(None)
        except OSError:  # it has ended already
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.conn.close()

    @property
    def decoding(self):
        """Jobs in the process' rows (as the process last heard): the first max_rows in flight."""
        return min(len(self.jobs), self.max_rows)

    @property
    def waiting(self):
        return len(self.jobs) - self.decoding

    def receive(self):
        """Put each token and end the process sent on its job's queue (the event loop calls it when a step's are in)."""
        try:
            while self.conn.poll():
                for key, item in self.conn.recv():
                    job = self.jobs.get(key)
                    if isinstance(item, int):
                        self.generated += 1
                    elif job:  # its end: the process has let it go
                        del self.jobs[key]
                    if job:
                        job.out.put_nowait(item)
        except (EOFError, OSError):  # it died: say so to every request, as to every one that comes
            self.loop.remove_reader(self.conn.fileno())
            self.dead = RuntimeError(f"the decoding process ended (exit status {self.process.wait()}): restart the server")
            self.end_all(self.dead)

    def admit(self, ids, options, max_tokens):
        """A Job for the prompt ids with Rows.add's options, in line for a row; None when every place is taken."""
        if len(self.admitted) >= self.places:
            return None
        if self.loop is None:
            self.loop = asyncio.get_running_loop()
            self.loop.add_reader(self.conn.fileno(), self.receive)
        job = Job(next(self.keys))
        self.admitted.add(job)
        if self.dead:
            job.send(self.dead)
        else:
            self.jobs[job.key] = job
            self.conn.send(('add', job.key, ids, options, max_tokens))
        return job

    def release(self, job):
        """Free job's row or place in the queue, once, however its request ended."""
        if job in self.admitted:
            self.admitted.discard(job)
            if self.jobs.pop(job.key, None) is not None:
                self.conn.send(('leave', job.key))

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
