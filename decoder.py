"""
serve.py's decoding process: it owns the model and runs one step of rows.Rows for every request in
flight. It is a process, not a thread of the server's, so that its Python never waits for the web
server's to let go of the interpreter's lock (the GIL): on a 2-core AMD EPYC a busy Python thread beside
run.sh's compiled step made the step 10-35x slower, a busy process not at all.
batching.Batcher starts it (python decoder.py FD) and talks to it over the socket FD, in messages:
  in:  pickle.dumps(make_rows), the <|endoftext|> token, then ('add', key, ids, options, max_tokens),
       ('leave', key), or None (stop)
  out: ('ready', threads, threads of wider steps) or ('failed', why) once, then a step's
       [(key, token, or 'stop'/'length', or an error)]
"""
import pickle
import signal
import sys
from collections import deque
from multiprocessing.connection import Connection


def serve_rows(path, device, dtype, int8, threads, compile, **options):
    """serve.py's Rows (options: Rows' own) for the checkpoint at path, loaded as sample.py loads it (device
    and dtype may be 'auto'), with its step compiled before the first request, which would otherwise wait.
    threads=0: one per core but one for a step of one row, whose tokens the web server writes out
    meanwhile, and every core for wider steps and for reading a prompt (or re-reading the window)."""
    import time

    from common import (check_compiler, compiled_folder, get_device, get_dtype, keep_freed_memory, load_for_generation,
                        log, set_threads)
    from rows import Rows
    cores = set_threads()
    threads, wide_threads = (threads, threads) if threads else (max(1, cores - 1), cores)
    set_threads(threads)
    device = get_device(device)
    dtype = get_dtype(dtype, device.split(':')[0])
    keep_freed_memory(device.split(':')[0])
    if compile:
        check_compiler(device.split(':')[0])
    model, _, _ = load_for_generation(path, device, dtype, int8)
    rows = Rows(model, compile=compile and compiled_folder(path), wide_threads=wide_threads, **options)
    if compile:
        t0 = time.time()
        rows.warm()
        log(f"compiled the decoding step in {time.time() - t0:.0f} s")
    return rows


def decode(rows, conn, eot):
    """Step rows for the jobs the server sends until it says stop (or is gone), sending each step's tokens."""
    waiting, slots, jobs = deque(), {}, {}  # jobs waiting for a row; key -> slot; slot -> [key, max_tokens, made]
    while True:
        while conn.poll(None if not jobs and not waiting else 0):  # idle: sleep until a message
            message = conn.recv()
            if message is None:
                return
            if message[0] == 'add':
                waiting.append(message[1:])
            elif message[1] in slots:
                rows.remove(slot := slots.pop(message[1]))
                del jobs[slot]
            else:  # still waiting, or ended before the server heard
                waiting = deque(job for job in waiting if job[0] != message[1])
        out, new = [], []
        try:
            while waiting and rows.free:
                key, ids, options, max_tokens = waiting.popleft()
                new.append(key)
                slot = slots[key] = rows.add(ids, **options)
                jobs[slot] = [key, max_tokens, 0]
            tokens = rows.step()
        except Exception as e:  # a fault of the device (out of memory): fail these requests, keep serving
            error = RuntimeError(f"{type(e).__name__}: {e}")
            out = [(key, error) for key in set(new) | {job[0] for job in jobs.values()}]
            for key in list(slots):
                rows.remove(slots.pop(key))
            jobs.clear()
            tokens = {}
        for slot, token in tokens.items():
            job = jobs[slot]
            job[2] += 1
            out.append((job[0], token))
            if token == eot or job[2] == job[1]:
                out.append((job[0], 'stop' if token == eot else 'length'))
                rows.remove(slot)
                del jobs[slot], slots[job[0]]
        if out:
            conn.send(out)


if __name__ == '__main__':
    import torch  # here, not above: serve.py imports serve_rows from this file without it
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the server's: it ends its requests, then stops this
    conn = Connection(int(sys.argv[1]))
    try:
        try:
            rows = pickle.loads(conn.recv_bytes())()
        except (ValueError, SystemExit) as e:  # a setting Rows refuses, or die()'s line
            conn.send(('failed', str(e.code if isinstance(e, SystemExit) else e).removeprefix('error: ')))
            sys.exit(1)
        eot, threads = conn.recv(), torch.get_num_threads()
        conn.send(('ready', threads, rows.wide_threads or threads))
        decode(rows, conn, eot)
    except (EOFError, OSError):  # the server is gone
        pass
