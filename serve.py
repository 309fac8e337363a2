"""
Serve a model trained by train.py over HTTP: a page to write stories in, and OpenAI's completions API.
  $ pip install -r requirements-serve.txt
  $ python serve.py --out_dir=out-cpu
then open http://127.0.0.1:8000, or point any OpenAI client at base_url http://127.0.0.1:8000/v1.
The requests in flight are decoded together: a process of its own owns the model and runs one batched
step for all of them (batching.Batcher, decoder.py); the web server hands it requests and streams back their tokens.
It trusts no one it need not: the API's routes want the key (api_key, or SERVE_API_KEY) where one is
set, the Host header must name this server (against DNS rebinding), and every limit below holds.
"""
import asyncio
import json
import os
import secrets
import signal
import time
import uuid
from functools import partial

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from starlette.exceptions import HTTPException

from batching import Batcher
from common import checkpoint_path, die, load_checkpoint, log
from decoder import serve_rows
from serve_limits import connection, open_files, out_of_files
from tokenizer import checkpoint_tokenizer, get_tokenizer, prompt_ids

# -----------------------------------------------------------------------------
out_dir = 'out-cpu'  # where train.py saved its checkpoints
ckpt = 'best'  # best or last (out_dir/best.pt, out_dir/last.pt), or the path of a checkpoint
device = 'auto'  # auto, cpu, cuda, cuda:1, mps
dtype = 'auto'  # as sample.py: bf16 where the CPU or GPU has it, else float32; not float32 casts the weights
host = '127.0.0.1'  # the address to listen on; 0.0.0.0 serves other machines too (set api_key then)
port = 8000  # 1 to 65535
api_key = ''  # clients must send "Authorization: Bearer KEY" to every route but / and /health; '': SERVE_API_KEY's, else none
allowed_hosts = ''  # Host header names answered, comma-separated; '': localhost names on 127.0.0.1/::1, any on 0.0.0.0/::, else host; '*': any
max_batch = 8  # rows decoded together: requests beyond it wait for a free row
max_tokens_limit = 1024  # the most max_tokens a request may ask for
max_queue = 32  # requests that may wait for a free row, streamed or not; more get 429 Too Many Requests
max_prompt_chars = 20000  # longer prompts get 400 (the model sees only the last block_size tokens anyway)
max_body_bytes = 1_000_000  # larger request bodies get 413 (20,000 characters, JSON-escaped, are at most 240 kB)
max_connections = 512  # connections open at once (idle, sending or served); more are closed at once; at most ulimit -n allows
request_timeout = 20.0  # seconds a connection has to send a whole request, head and body; slower ones are closed
int8 = False  # as sample.py: int8 weights, for models large enough that reading weights bounds a step
threads = 0  # CPU threads torch computes with; 0: one per core but one for a lone request's step (the web server writes its tokens meanwhile), every core for wider ones and for reading prompts (docs/serving.md)
window_shift: int | None = None  # past block_size, forget this many oldest tokens at once; None: block_size // 4
slide = 'reread'  # as sample.py: past block_size, 'reread' the tokens kept, or 'shift' the cache back (rotary models)
compile = False  # compile the batched decoding step (rows.Rows): on the CPU ~1-2 min the first time for a checkpoint, kept in compiled/ beside it, then seconds to start; faster steps
fixed_batch = False  # decode all max_batch rows every step: a request's text (float32) never depends on the others in flight, at a slower step with few
# -----------------------------------------------------------------------------
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
if not 1 <= port <= 65535:
    die(f"port must be from 1 to 65535, got {port}")
for name, least in (('max_batch', 1), ('max_tokens_limit', 1), ('max_queue', 0), ('max_prompt_chars', 0),
                    ('max_body_bytes', 1), ('max_connections', 1), ('request_timeout', 0.001)):
    if globals()[name] < least:
        die(f"{name} must be at least {least}, got {globals()[name]}")
api_key = api_key or os.environ.get('SERVE_API_KEY', '')
if allowed_hosts:
    hosts = {h.strip().lower() for h in allowed_hosts.split(',') if h.strip()}
elif host in ('127.0.0.1', '::1', 'localhost'):
    hosts = {'localhost', '127.0.0.1', '[::1]'}
else:
    hosts = {'*'} if host in ('0.0.0.0', '::', '') else {host.lower(), f'[{host.lower()}]'}
path = checkpoint_path(out_dir, ckpt)
# the decoding process loads the model (and compiles its step) while this one loads the rest
batcher = Batcher(partial(serve_rows, path, device, dtype, int8, threads, compile, max_rows=max_batch, slide=slide,
                          window_shift=window_shift, fixed_batch=fixed_batch),
                  max_batch, max_queue, on_token=lambda seconds, first: (ttft if first else per_token).observe(seconds))
batcher.start()
enc = get_tokenizer(checkpoint_tokenizer(load_checkpoint(path, mmap=True)))
# the model's id in the API: the out_dir's name (out-cpu), or the checkpoint file's
model_name = os.path.basename(os.path.abspath(out_dir) if ckpt in ('best', 'last') else os.path.splitext(path)[0])
created = int(os.path.getmtime(path))


# -----------------------------------------------------------------------------
# /metrics, in Prometheus' text format
class Histogram:
    def __init__(self, name, what, bounds):
        self.name, self.what, self.bounds = name, what, bounds
        self.counts, self.sum = [0] * (len(bounds) + 1), 0.0

    def observe(self, seconds):
        self.counts[next((i for i, b in enumerate(self.bounds) if seconds <= b), len(self.bounds))] += 1
        self.sum += seconds

    def text(self):
        lines, total = [f'# HELP {self.name} {self.what}', f'# TYPE {self.name} histogram'], 0
        for bound, count in zip([*map(str, self.bounds), '+Inf'], self.counts):
            total += count
            lines.append(f'{self.name}_bucket{{le="{bound}"}} {total}')
        return lines + [f'{self.name}_sum {self.sum}', f'{self.name}_count {total}']


ttft = Histogram('serve_time_to_first_token_seconds', 'From a request admitted to its first token.',
                 [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30])
per_token = Histogram('serve_time_per_output_token_seconds', 'Between one token of a request and its next.',
                      [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5])
busy = 0  # requests turned away with 429


# -----------------------------------------------------------------------------
# The web server: it only checks requests, hands them to the batcher and writes out what comes back.
app = FastAPI(title='serve.py', docs_url=None, redoc_url=None)


def error(status, message, param=None, kind='invalid_request_error', headers=None, code=None):
    body = {'error': {'message': message, 'type': kind, 'param': param, 'code': code}}
    return JSONResponse(body, status_code=status, headers=headers)


class Guard:
    """Before FastAPI reads a request: its Host must name this server (DNS rebinding), routes but the page
    and /health want the key, and a body may not pass max_body_bytes. A completion's body is read as
    JSON whatever its Content-Type says (curl -d sends application/x-www-form-urlencoded)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope['type'] != 'http':
            return await self.app(scope, receive, send)
        headers = dict(scope['headers'])
        name = headers.get(b'host', b'').decode('latin-1').lower()
        name = name[:name.index(']') + 1] if name.startswith('[') and ']' in name else name.split(':')[0]
        if '*' not in hosts and name not in hosts:
            problem = error(400, f"the Host header {name!r} is not a name of this server ({', '.join(sorted(hosts))}): "
                                 f"ask for one of those, or start serve.py with --allowed_hosts={name or 'NAME'}")
        elif api_key and scope['path'] not in ('/', '/health') and not secrets.compare_digest(
                headers.get(b'authorization', b''), b'Bearer ' + api_key.encode()):
            said = 'is wrong' if b'authorization' in headers else 'is missing'
            problem = error(401, f"the API key {said}: send the header 'Authorization: Bearer KEY' "
                                 "(OpenAI's clients: api_key=KEY) with the key serve.py was started with",
                            code='invalid_api_key', headers={'WWW-Authenticate': 'Bearer'})
        elif int(headers.get(b'content-length', b'0') or 0) > max_body_bytes:
            problem = too_large()
        else:
            if scope['method'] == 'POST' and scope['path'] == '/v1/completions':
                scope = {**scope, 'headers': [(k, v) for k, v in scope['headers'] if k != b'content-type']
                         + [(b'content-type', b'application/json')]}
            size = 0

            async def receive_counted():  # a chunked body has no Content-Length: count it as it comes
                nonlocal size
                message = await receive()
                size += len(message.get('body', b''))
                if size > max_body_bytes:
                    raise HTTPException(413)  # http_error answers it
                return message
            return await self.app(scope, receive_counted, send)
        await problem(scope, receive, send)


def too_large():
    return error(413, f"the body is larger than this server takes ({max_body_bytes} bytes): send a shorter "
                      "prompt, or start serve.py with a larger --max_body_bytes")


app.add_middleware(Guard)


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
    if exc.status_code == 413:  # raised as the body came in, by Guard
        return too_large()
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


@app.api_route('/', methods=['GET', 'HEAD'])
async def page():
    html = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'serve.html')
    if not os.path.isfile(html):
        return error(404, f"{html} is missing: serve.py's page is a file beside it")
    return FileResponse(html, media_type='text/html')


@app.api_route('/health', methods=['GET', 'HEAD'])
async def health():
    if batcher.dead:  # a supervisor's cue to restart it
        return error(503, str(batcher.dead), kind='server_error')
    return {'status': 'ok', 'active': batcher.decoding, 'waiting': batcher.waiting}


@app.get('/metrics')
async def metrics():
    lines = []
    for name, kind, what, value in [
            ('serve_requests_running', 'gauge', 'Requests decoding now.', batcher.decoding),
            ('serve_requests_waiting', 'gauge', 'Requests waiting for a free row.', batcher.waiting),
            ('serve_generation_tokens_total', 'counter', 'Tokens generated.', batcher.generated),
            ('serve_requests_rejected_total', 'counter', 'Requests turned away with 429: max_queue was full.',
             busy),
            ('serve_connections_refused_total', 'counter', 'Connections closed at once: max_connections were open.',
             Connection.refused)]:
        lines += [f'# HELP {name} {what}', f'# TYPE {name} {kind}', f'{name} {value}']
    lines += ttft.text() + per_token.text()
    return PlainTextResponse('\n'.join(lines) + '\n', media_type='text/plain; version=0.0.4')


@app.get('/v1/models')
async def models():
    return {'object': 'list', 'data': [{'id': model_name, 'object': 'model', 'created': created, 'owned_by': 'user'}]}


class Stream(StreamingResponse):
    """Server-sent events that release their job however the response ends, even before it began."""

    def __init__(self, job, events):
        super().__init__(events, media_type='text/event-stream')
        self.job = job

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            batcher.release(self.job)


async def until_gone(request):
    """Returns when the client hangs up: once the body is read, uvicorn's next message says so."""
    while (await request.receive())['type'] != 'http.disconnect':
        pass


@app.post('/v1/completions')
async def completions(body: CompletionRequest, request: Request):
    global busy
    ids = prompt_ids(enc, body.prompt)
    job = batcher.admit(ids, dict(temperature=body.temperature, top_k=body.top_k, top_p=body.top_p, seed=body.seed),
                        body.max_tokens)
    if job is None:
        busy += 1
        return error(429, f"the server is busy: {max_batch} requests decoding and {max_queue} waiting; retry later",
                     kind='rate_limit_error', headers={'Retry-After': '1'})
    head = {'id': f'cmpl-{uuid.uuid4().hex}', 'object': 'text_completion', 'created': int(time.time()),
            'model': model_name}

    def choice(text, reason):
        return {'text': text, 'index': 0, 'logprobs': None, 'finish_reason': reason}

    def usage():  # the prompt's tokens count the <|endoftext|> before it, which the model reads too
        return {'prompt_tokens': len(ids), 'completion_tokens': job.used, 'total_tokens': len(ids) + job.used}

    if body.stream:
        async def events():  # a client that goes away cancels it, and Stream frees the row at once
            try:
                async for text, reason in batcher.pieces(job, body.stop):
                    yield f"data: {json.dumps({**head, 'choices': [choice(text, reason)]})}\n\n"
            except Exception as e:  # headers are sent: the fault goes in a last event, as OpenAI's
                problem = e.detail if isinstance(e, HTTPException) else f"the server failed: {type(e).__name__}: {e}"
                yield f"data: {json.dumps({'error': {'message': problem, 'type': 'server_error'}})}\n\n"
                return
            if body.stream_options.get('include_usage'):
                yield f"data: {json.dumps({**head, 'choices': [], 'usage': usage()})}\n\n"
            yield 'data: [DONE]\n\n'
        return Stream(job, events())

    texts, reason = [], None

    async def read():
        nonlocal reason
        async for text, reason in batcher.pieces(job, body.stop):
            texts.append(text)
    reading, gone = asyncio.ensure_future(read()), asyncio.ensure_future(until_gone(request))
    try:  # a client that hangs up (or times out) frees its row at once, as a streamed one does
        await asyncio.wait([reading, gone], return_when=asyncio.FIRST_COMPLETED)
    finally:
        reading.cancel()
        gone.cancel()
        batcher.release(job)
    if not reading.done():
        return Response(status_code=499)  # the client is gone: nobody reads it
    reading.result()  # the job's fault, if any
    return {**head, 'choices': [choice(''.join(texts), reason)], 'usage': usage()}


# -----------------------------------------------------------------------------
# Connections: the limits uvicorn lacks (serve_limits.py), and a second Ctrl-C that ends requests with a last word.
max_connections, backlog = open_files(max_connections)
Connection = connection(max_connections, request_timeout)


class Server(uvicorn.Server):
    async def serve(self, sockets=None):
        asyncio.get_running_loop().set_exception_handler(out_of_files)
        await super().serve(sockets)

    def handle_exit(self, sig, frame):
        """The first Ctrl-C (or SIGTERM) lets the requests in flight end; the second ends them now, each with
        a last word: a 503, or a last error event; a third stops at once."""
        if self.should_exit and sig == signal.SIGINT and not getattr(self, 'cutting', False):
            self.cutting = True
            batcher.end_all(HTTPException(503, "the server is shutting down (a second Ctrl-C): retry when it is back"))
        else:
            super().handle_exit(sig, frame)


try:
    threads, wide_threads = batcher.ready(enc)
except RuntimeError as e:
    die(str(e))
log(f"serving {path} as {model_name} at http://{host}:{port} with {threads} threads"
    f"{f' ({wide_threads} for several requests)' if wide_threads != threads else ''} (Ctrl-C stops)")
if not api_key and '*' in hosts:
    log(f"warning: anyone who reaches {host}:{port} may use this server: set SERVE_API_KEY (or --api_key)")
server = Server(uvicorn.Config(app, host=host, port=port, http=Connection, backlog=backlog))
try:
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn raises the Ctrl-C it caught again once it has stopped
        pass
    if not server.started:
        die(f"serve.py could not listen on {host}:{port} (uvicorn's line above says why: another server there? --port=...)")
finally:
    batcher.stop()
