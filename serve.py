"""
Serve a model trained by train.py over HTTP: a page to write stories in, and OpenAI's completions API.
  $ pip install -r requirements-serve.txt
  $ python serve.py --out_dir=out-cpu
then open http://127.0.0.1:8000, or point any OpenAI client at base_url http://127.0.0.1:8000/v1.
The requests in flight are decoded together: one thread owns the model and runs one batched step
for all of them (generate.Rows); the web server hands it requests and streams back their tokens.
"""
import asyncio
import codecs
import json
import os
import threading
import time
import uuid
from collections import deque

import torch
import uvicorn
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from starlette.exceptions import HTTPException

from common import check_compiler, checkpoint_path, die, get_device, get_dtype, keep_freed_memory, load_model, log
from generate import Rows, check_options
from tokenizer import checkpoint_tokenizer, get_tokenizer

# -----------------------------------------------------------------------------
out_dir = 'out-cpu'  # where train.py saved its checkpoints
ckpt = 'best'  # best or last (out_dir/best.pt, out_dir/last.pt), or the path of a checkpoint
device = 'auto'  # auto, cpu, cuda, cuda:1, mps
dtype = 'auto'  # as sample.py: bf16 where the CPU or GPU has it, else float32; not float32 casts the weights
host = '127.0.0.1'  # the address to listen on; 0.0.0.0 serves other machines too
port = 8000  # 1 to 65535
max_batch = 8  # rows decoded together: requests beyond it wait for a free row
max_tokens_limit = 1024  # the most max_tokens a request may ask for
max_queue = 32  # requests that may wait for a free row; more get 429 Too Many Requests
max_prompt_chars = 20000  # longer prompts get 400 (the model sees only the last block_size tokens anyway)
window_shift: int | None = None  # past block_size, forget this many oldest tokens at once; None: block_size // 4
compile = False  # torch.compile the batched decoding step: slower to start (tens of seconds on a CPU), then faster steps
# -----------------------------------------------------------------------------
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
if not ckpt:
    die("ckpt must be best, last or the path of a checkpoint")
if not 1 <= port <= 65535:
    die(f"port must be from 1 to 65535, got {port}")
for name, least in (('max_batch', 1), ('max_tokens_limit', 1), ('max_queue', 0), ('max_prompt_chars', 0)):
    if globals()[name] < least:
        die(f"{name} must be at least {least}, got {globals()[name]}")
try:  # before the slow part, loading the model; Rows checks it against block_size
    check_options(window_shift=1 if window_shift is None else window_shift)
except ValueError as e:
    die(str(e))
device = get_device(device)
dtype = get_dtype(dtype, device.split(':')[0])
keep_freed_memory(device.split(':')[0])
if compile:
    check_compiler(device.split(':')[0])

path = checkpoint_path(out_dir, ckpt)
model, checkpoint = load_model(path, device)
enc = get_tokenizer(checkpoint_tokenizer(checkpoint))
if model.config.vocab_size < enc.n_vocab:
    die(f"{path} has vocab_size={model.config.vocab_size}, too small for its tokenizer {enc.name} ({enc.n_vocab})")
if dtype != 'float32':
    model.to(getattr(torch, dtype))  # as sample.py, which says why
try:
    rows = Rows(model, max_rows=max_batch, window_shift=window_shift, compile=compile)  # None: block_size // 4
except ValueError as e:
    die(str(e))
if compile:  # before the first request, which would otherwise wait for it
    t0 = time.time()
    rows.step()
    log(f"compiled the decoding step in {time.time() - t0:.0f} s")
# the model's id in the API: the out_dir's name (out-cpu), or the checkpoint file's
model_name = os.path.basename(os.path.abspath(out_dir) if ckpt in ('best', 'last') else os.path.splitext(path)[0])
created = int(os.path.getmtime(path))

# -----------------------------------------------------------------------------
# The decoding thread. The event loop puts a Job in `waiting`, or in `leaving` when its client no
# longer wants it; the thread gives jobs rows, steps them all, and sends each its tokens.
changed = threading.Condition()  # guards waiting, leaving and stopping, and wakes the thread
waiting, leaving, stopping = deque(), [], False
decoding = {}  # slot -> its Job; the thread's own


class Job:
    """A completion: its prompt and sampling options in, its tokens, then its finish_reason, out."""

    def __init__(self, ids, options, max_tokens):
        self.ids, self.options, self.max_tokens = ids, options, max_tokens
        self.loop, self.out = asyncio.get_running_loop(), asyncio.Queue()
        self.slot, self.made = None, 0  # the thread's: its row, the tokens it has made

    def send(self, item):
        try:
            self.loop.call_soon_threadsafe(self.out.put_nowait, item)
        except RuntimeError:  # the event loop has closed: the server is shutting down
            pass


def end(job, reason=None):
    """Take job's row away and, when it ended by itself, tell it why."""
    rows.remove(job.slot)
    del decoding[job.slot]
    job.slot = None
    if reason is not None:
        job.send(reason)


def decode_forever():
    while True:
        with changed:
            changed.wait_for(lambda: stopping or waiting or leaving or decoding)
            if stopping:
                return
            gone, leaving[:] = leaving[:], []
        for job in gone:
            if job.slot is not None:
                end(job)
        with changed:
            new = [waiting.popleft() for _ in range(min(rows.free, len(waiting)))]
        try:
            for job in new:
                job.slot = rows.add(job.ids, **job.options)
                decoding[job.slot] = job
            tokens = rows.step() if decoding else {}
        except Exception as e:  # a fault of the device (out of memory): fail these requests, keep serving
            for job in set(new) | set(decoding.values()):
                job.send(e)
                if job.slot is not None:
                    end(job)
            continue
        for slot, token in tokens.items():
            job = decoding[slot]
            job.made += 1
            job.send(token)
            if token == enc.eot_token or job.made == job.max_tokens:
                end(job, 'stop' if token == enc.eot_token else 'length')


async def pieces(job, stop):
    """Hand job to the thread; yield (text, None) as the completion is written, then (its last text,
    finish_reason). Text that may begin a stop string is held back until it cannot; a stop string and
    what follows are cut. Counts the tokens read in job.used. However it ends (the text is done, a stop
    string came, the client went away and cancelled it), the job's row or place in the queue is freed."""
    decoder = codecs.getincrementaldecoder('utf-8')(errors='replace')  # a token may end inside a character
    hold = max(map(len, stop), default=1) - 1
    held, reason, job.used = '', None, 0
    with changed:
        waiting.append(job)
        changed.notify()
    try:
        while reason is None:
            item = await job.out.get()
            if isinstance(item, Exception):
                raise item
            if isinstance(item, str):
                reason, new = item, decoder.decode(b'', final=True)
            else:
                job.used += 1
                # <|endoftext|> and ids past the tokenizer's (a vocabulary padded for speed) have no text
                known = item < enc.n_vocab and item != enc.eot_token
                new = decoder.decode(enc.decode_single_token_bytes(item) if known else b'')
            held += new
            cut = min((i for i in map(held.find, stop) if i >= 0), default=-1)
            if cut >= 0:
                held, reason = held[:cut], 'stop'
            text = held if reason else held[:max(0, len(held) - hold)]
            held = held[len(text):]
            if text or reason:
                yield text, reason
    finally:
        with changed:
            if job in waiting:
                waiting.remove(job)
            else:
                leaving.append(job)
            changed.notify()


# -----------------------------------------------------------------------------
# The web server: it only checks requests, hands them to the thread and writes out what comes back.
app = FastAPI(title='serve.py', docs_url=None, redoc_url=None)


def error(status, message, param=None, kind='invalid_request_error', headers=None):
    body = {'error': {'message': message, 'type': kind, 'param': param, 'code': None}}
    return JSONResponse(body, status_code=status, headers=headers)


@app.exception_handler(RequestValidationError)
async def invalid_request(request, exc):
    """400 with OpenAI's error body, for the first problem FastAPI found, instead of its 422."""
    e = exc.errors()[0]
    if e['type'] == 'json_invalid':
        return error(400, f"the body is not valid JSON: {e['ctx']['error']}")
    if len(e['loc']) < 2:  # ('body',): no body, or not an object
        return error(400, "the body must be a JSON object of OpenAI's completion fields")
    param = str(e['loc'][1])
    return error(400, f"{param}: {e['ctx']['error'] if e['type'] == 'value_error' else e['msg']}", param)


@app.exception_handler(HTTPException)
async def http_error(request, exc):
    return error(exc.status_code, str(exc.detail), headers=exc.headers)


@app.exception_handler(Exception)
async def server_error(request, exc):
    return error(500, f"the server failed: {type(exc).__name__}: {exc}", kind='server_error')


class CompletionRequest(BaseModel):
    """The body of POST /v1/completions: OpenAI's fields that this server implements, and top_k.
    Strict: "16" is not a number, as for OpenAI; other fields (OpenAI's frequency_penalty...) are ignored."""
    model_config = ConfigDict(strict=True)
    model: str | None = None  # any name: the server has one model
    prompt: str = ''  # or a list holding one string; empty starts a fresh story
    max_tokens: int = Field(16, ge=1, le=max_tokens_limit)
    temperature: float = Field(1.0, ge=0, allow_inf_nan=False)  # 0 is greedy
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=1)
    stop: list[str] = []  # or one string
    seed: int | None = Field(None, ge=-2 ** 63, lt=2 ** 64)  # torch.Generator's range
    stream: bool = False
    stream_options: dict[str, bool] = {}  # {'include_usage': True}: a last chunk with the usage
    n: int = 1

    @model_validator(mode='before')
    @classmethod
    def null_is_default(cls, body):  # as OpenAI's, where every optional field may be null
        return {k: v for k, v in body.items() if v is not None} if isinstance(body, dict) else body

    @field_validator('prompt', mode='before')
    @classmethod
    def one_prompt(cls, prompt):
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise ValueError("must be a string, or a list holding one string (one completion a request)")
        if len(prompt) > max_prompt_chars:
            raise ValueError(f"{len(prompt)} characters, more than this server takes ({max_prompt_chars})")
        return prompt

    @field_validator('stop', mode='before')
    @classmethod
    def stop_strings(cls, stop):
        stop = [stop] if isinstance(stop, str) else stop
        if not (isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) and s for s in stop)):
            raise ValueError("must be a string or a list of up to 4 strings, none empty")
        return stop

    @field_validator('n')
    @classmethod
    def one_choice(cls, n):
        if n != 1:
            raise ValueError(f"only 1 is served, got {n}")
        return n


@app.get('/')
async def page():
    html = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'serve.html')
    if not os.path.isfile(html):
        return error(404, f"{html} is missing: serve.py's page is a file beside it")
    return FileResponse(html, media_type='text/html')


@app.get('/health')
async def health():
    return {'status': 'ok', 'active': len(decoding), 'waiting': len(waiting)}


@app.get('/v1/models')
async def models():
    return {'object': 'list', 'data': [{'id': model_name, 'object': 'model', 'created': created, 'owned_by': 'user'}]}


@app.post('/v1/completions')
async def completions(body: CompletionRequest):
    if len(decoding) + len(waiting) >= max_batch + max_queue:
        return error(429, f"the server is busy: {max_batch} requests decoding and {max_queue} waiting; retry later",
                     kind='rate_limit_error', headers={'Retry-After': '1'})
    # as sample.py: every story in train.bin follows an <|endoftext|>, which tells the model a new story begins
    ids = [enc.eot_token] + enc.encode(body.prompt, allowed_special='all')
    job = Job(ids, dict(temperature=body.temperature, top_k=body.top_k, top_p=body.top_p, seed=body.seed),
              body.max_tokens)
    head = {'id': f'cmpl-{uuid.uuid4().hex}', 'object': 'text_completion', 'created': int(time.time()),
            'model': model_name}

    def choice(text, reason):
        return {'text': text, 'index': 0, 'logprobs': None, 'finish_reason': reason}

    def usage():  # the prompt's tokens count the <|endoftext|> before it, which the model reads too
        return {'prompt_tokens': len(ids), 'completion_tokens': job.used, 'total_tokens': len(ids) + job.used}

    if body.stream:
        async def events():  # a client that goes away cancels it, and pieces frees the row at once
            async for text, reason in pieces(job, body.stop):
                yield f"data: {json.dumps({**head, 'choices': [choice(text, reason)]})}\n\n"
            if body.stream_options.get('include_usage'):
                yield f"data: {json.dumps({**head, 'choices': [], 'usage': usage()})}\n\n"
            yield 'data: [DONE]\n\n'
        return StreamingResponse(events(), media_type='text/event-stream')
    texts = []
    async for text, reason in pieces(job, body.stop):
        texts.append(text)
    return {**head, 'choices': [choice(''.join(texts), reason)], 'usage': usage()}


thread = threading.Thread(target=decode_forever, name='decoding')
thread.start()
log(f"serving {path} as {model_name} at http://{host}:{port} (Ctrl-C stops)")
try:
    uvicorn.run(app, host=host, port=port)  # Ctrl-C lets the requests in flight end; a second Ctrl-C cuts them off
finally:
    with changed:
        stopping = True
        changed.notify()
    thread.join()
