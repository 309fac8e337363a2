"""serve.py as a user runs it: a subprocess serving a tiny untrained model, asked by OpenAI's own
Python client and by plain HTTP (http.client, to see raw status lines, headers and bodies)."""
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch

from conftest import ROOT, needs_tokenizer
from model import GPT, GPTConfig
from test_sample import chain, enc  # noqa: F401 (fixtures: a model that writes ' one two three' and <|endoftext|>)

pytestmark = needs_tokenizer
MODEL_ARGS = dict(n_layer=1, n_head=2, n_embd=16, block_size=32, vocab_size=50257)
SECONDS = 30  # the most any one wait here takes: starting a server, a request, a row freed
LONG = 100_000  # tokens: a request that takes minutes, to hold a row while a test looks
# such a request is greedy: the random model's greedy text never reaches <|endoftext|>, where sampled it
# may, about once in 50,000 tokens, and end the request before the test looks
HOLD = {'prompt': 'Once', 'max_tokens': LONG, 'temperature': 0}


def start_server(out_dir, *options, wait=SECONDS, env=None, preexec_fn=None):
    """Start serve.py on a free port, logging to out_dir/serve-PORT.log; return its process and port
    once /health answers (within wait seconds)."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    with open(out_dir / f'serve-{port}.log', 'w') as log:
        command = [sys.executable, os.path.join(ROOT, 'serve.py'), f'--out_dir={out_dir}', f'--port={port}',
                   '--dtype=float32', '--device=cpu', *options]
        proc = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=log, env={**os.environ, **(env or {})},
                                preexec_fn=preexec_fn)
    deadline = time.time() + wait
    while True:
        try:
            if get(port, '/health')[0] == 200:
                return proc, port
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"serve.py did not start:\n{(out_dir / f'serve-{port}.log').read_text()}")
        time.sleep(0.2)


def stop_server(proc):
    proc.send_signal(signal.SIGINT)  # as Ctrl-C
    try:
        proc.wait(timeout=SECONDS)
    finally:
        proc.kill()


def request(port, method, path, body=None, headers=None):
    """(status, headers, the body parsed as JSON or as text)."""
    conn = http.client.HTTPConnection('127.0.0.1', port, timeout=SECONDS)
    try:
        if body is not None and not isinstance(body, (str, bytes)):
            body = json.dumps(body)
        conn.request(method, path, body, headers if headers is not None else
                     {'Content-Type': 'application/json'} if body is not None else {})
        r = conn.getresponse()
        text = r.read().decode()
        return r.status, r.headers, json.loads(text) if text and 'json' in r.headers.get('content-type', '') else text
    finally:
        conn.close()


def get(port, path):
    return request(port, 'GET', path)


def open_stream(port, **body):
    """A streamed completion's connection and response, its headers read; the caller reads on, and
    closes the connection (which hangs up)."""
    conn = http.client.HTTPConnection('127.0.0.1', port, timeout=SECONDS)
    conn.request('POST', '/v1/completions', json.dumps({**body, 'stream': True}), {'Content-Type': 'application/json'})
    return conn, conn.getresponse()


def wait_for_health(port, within=SECONDS, **expected):
    deadline = time.time() + within
    while (health := get(port, '/health')[2]) != {'status': 'ok', **expected}:
        assert time.time() < deadline, f"/health still says {health}, not {expected}"
        time.sleep(0.05)


def client(port):
    return openai.OpenAI(base_url=f'http://127.0.0.1:{port}/v1', api_key='none', timeout=SECONDS, max_retries=0)


@pytest.fixture(scope='module')
def random_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp('random')
    torch.manual_seed(0)
    torch.save({'model': GPT(GPTConfig(**MODEL_ARGS)).state_dict(), 'model_args': MODEL_ARGS,
                'config': {'data_dir': 'nowhere'}}, out / 'best.pt')
    return out


@pytest.fixture(scope='module')
def server(random_dir):
    proc, port = start_server(random_dir, f'--max_tokens_limit={LONG}')
    try:
        yield port
    finally:
        stop_server(proc)


def test_page_health_and_models(server, random_dir):
    status, headers, page = get(server, '/')
    assert status == 200 and headers['content-type'].startswith('text/html')
    with open(os.path.join(ROOT, 'serve.html'), 'rb') as f:
        assert page == f.read().decode()
    assert get(server, '/health')[2] == {'status': 'ok', 'active': 0, 'waiting': 0}
    assert [m.id for m in client(server).models.list()] == [random_dir.name]


def test_completion(server, random_dir, enc):
    from generate import generate
    prompt = 'Once upon a time'
    out = client(server).completions.create(model=random_dir.name, prompt=prompt, max_tokens=12, temperature=0)
    ids = [enc.eot_token] + enc.encode(prompt)
    assert out.object == 'text_completion' and out.id.startswith('cmpl-') and out.model == random_dir.name
    assert out.choices[0].finish_reason == 'length'
    usage = out.usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (len(ids), 12, len(ids) + 12)
    model = GPT(GPTConfig(**MODEL_ARGS))
    model.load_state_dict(torch.load(random_dir / 'best.pt')['model'])
    expected = generate(model.eval(), torch.tensor([ids]), 12, temperature=0)[0, len(ids):].tolist()
    assert out.choices[0].text == enc.decode(expected)  # the prompt is read as sample.py reads it
    nulls = dict.fromkeys(['max_tokens', 'temperature', 'top_p', 'top_k', 'stop', 'seed', 'stream', 'n'])
    status, _, out = request(server, 'POST', '/v1/completions', {'prompt': prompt, **nulls})  # null: OpenAI's defaults
    assert status == 200 and out['usage']['completion_tokens'] == 16 and out['choices'][0]['finish_reason'] == 'length'


def test_stream(server):
    options = dict(model='m', prompt=['Once upon a time'], max_tokens=20, temperature=0.8, seed=5)
    plain = client(server).completions.create(**options).choices[0].text
    chunks = list(client(server).completions.create(**options, stream=True))
    assert ''.join(c.choices[0].text for c in chunks) == plain
    assert [c.choices[0].finish_reason for c in chunks] == [None] * (len(chunks) - 1) + ['length']
    conn, r = open_stream(server, prompt='Once', max_tokens=3)  # the wire format itself
    events = r.read().decode().split('\n\n')
    conn.close()
    assert r.headers['content-type'].startswith('text/event-stream')
    assert events[-2:] == ['data: [DONE]', ''] and all(e.startswith('data: {') for e in events[:-2])
    # OpenAI's stream_options: a last chunk with the usage and no choices
    *chunks, last = client(server).completions.create(**options, stream=True, stream_options={'include_usage': True})
    assert ''.join(c.choices[0].text for c in chunks) == plain and not last.choices
    assert last.usage.completion_tokens == 20 and last.usage.prompt_tokens == 5  # <|endoftext|> and 4 tokens


# top_k is this server's, not OpenAI's: the client sends it as an extra field
@pytest.mark.parametrize('options', [dict(temperature=0), dict(temperature=1.0, top_p=0.9, extra_body={'top_k': 50})])
def test_together_as_alone(server, options):
    """Rows decoded together give each one the tokens it gets alone, past block_size (40 tokens > 32)."""
    prompts = ['Once', 'Once upon a time there was a', 'The cat', '', 'A dog ran', 'She said "hi"', 'Tim', 'Sun']

    def complete(i):
        out = client(server).completions.create(model='m', prompt=prompts[i], max_tokens=40, seed=i, **options)
        return out.choices[0].text
    alone = [complete(i) for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(complete, range(8))) == alone
    if options['temperature']:
        assert len(set(alone)) == 8 and complete(0) == alone[0]


def test_stop_strings(server):
    options = dict(model='m', prompt='Once upon a time', max_tokens=30, temperature=0)
    text = client(server).completions.create(**options).choices[0].text
    stop = text[10:13]
    for stream in (False, True):
        out = client(server).completions.create(**options, stop=[stop, 'never written'], stream=stream)
        chunks = list(out) if stream else [out]
        assert ''.join(c.choices[0].text for c in chunks) == text[:text.index(stop)]
        assert chunks[-1].choices[0].finish_reason == 'stop'


def test_end_of_text(chain):  # noqa: F811 (chain is a fixture)
    """<|endoftext|> ends a completion with finish_reason stop; a stop string that spans tokens is found."""
    proc, port = start_server(chain)
    try:
        out = client(port).completions.create(model='m', prompt='Once', max_tokens=10)
        assert (out.choices[0].text, out.choices[0].finish_reason) == (' one two three', 'stop')
        assert out.usage.completion_tokens == 4  # <|endoftext|> too
        chunks = list(client(port).completions.create(model='m', prompt='Once', max_tokens=10, stop='e t', stream=True))
        assert ''.join(c.choices[0].text for c in chunks) == ' on' and chunks[-1].choices[0].finish_reason == 'stop'
    finally:
        stop_server(proc)


def test_compiled_server_writes_as_eager(server, random_dir):
    options = dict(model='m', prompt='Once upon a time', max_tokens=40, temperature=0)
    eager = client(server).completions.create(**options).choices[0].text
    proc, port = start_server(random_dir, '--compile=True', wait=180)  # it compiles before it listens
    try:
        assert client(port).completions.create(**options).choices[0].text == eager
        with ThreadPoolExecutor(3) as pool:
            assert list(pool.map(lambda _: client(port).completions.create(**options).choices[0].text, range(3))) == [eager] * 3
    finally:
        stop_server(proc)
    assert 'compiled the decoding step' in (random_dir / f'serve-{port}.log').read_text()


BAD = [
    ('{"prompt": "Once",', None, 'not valid JSON'),
    ('[1, 2]', None, 'JSON object'),
    ({'prompt': 'Once', 'max_tokens': 0}, 'max_tokens', 'greater than or equal to 1'),
    ({'prompt': 'Once', 'max_tokens': LONG + 1}, 'max_tokens', f'less than or equal to {LONG}'),
    ({'prompt': 'Once', 'max_tokens': '16'}, 'max_tokens', 'valid integer'),
    ({'prompt': 'Once', 'temperature': -0.5}, 'temperature', 'greater than or equal to 0'),
    ({'prompt': 'Once', 'top_p': 0}, 'top_p', 'greater than 0'),
    ({'prompt': 'Once', 'top_p': 1.5}, 'top_p', 'less than or equal to 1'),
    ({'prompt': 'Once', 'top_k': 0}, 'top_k', 'greater than or equal to 1'),
    ({'prompt': 'Once', 'n': 2}, 'n', 'only 1'),
    ({'prompt': 'a' * 100_000}, 'prompt', '100000 characters'),
    ({'prompt': ['Once', 'Twice']}, 'prompt', 'one string'),
    ({'prompt': [464, 3797]}, 'prompt', 'one string'),
    ({'prompt': 'Once', 'stop': ['a', 'b', 'c', 'd', 'e']}, 'stop', 'up to 4'),
    ({'prompt': 'Once', 'seed': 2 ** 64}, 'seed', 'less than'),
    ({'prompt': 'Once', 'stream': 'yes'}, 'stream', 'valid boolean'),
]


@pytest.mark.parametrize('body, param, words', BAD)
def test_bad_input(server, body, param, words):
    status, _, out = request(server, 'POST', '/v1/completions', body)
    assert status == 400 and set(out) == {'error'}, out
    assert out['error']['type'] == 'invalid_request_error' and out['error']['param'] == param
    assert words in out['error']['message'] and out['error']['code'] is None


def test_bad_input_reaches_the_client(server):
    with pytest.raises(openai.BadRequestError, match='max_tokens'):
        client(server).completions.create(model='m', prompt='Once', max_tokens=0)
    assert get(server, '/health')[2] == {'status': 'ok', 'active': 0, 'waiting': 0}
    assert client(server).completions.create(model='m', prompt='Once', max_tokens=2).usage.completion_tokens == 2


def test_disconnect_frees_the_row(server):
    conn, r = open_stream(server, **HOLD)
    for _ in range(3):
        assert r.readline().startswith(b'data: {') and r.readline() == b'\n'
    assert get(server, '/health')[2]['active'] == 1
    conn.close()
    wait_for_health(server, active=0, waiting=0)


def test_queue_limit(random_dir):
    """max_batch=1, max_queue=1: one request decodes, one waits, the next is turned away with 429 and
    Retry-After, streamed or not; a waiting client that hangs up leaves the queue. Ctrl-C lets a story
    in flight end."""
    proc, port = start_server(random_dir, '--max_batch=1', '--max_queue=1', f'--max_tokens_limit={LONG}')
    try:
        # 20 streamed requests at once: a stream's place is taken before its response starts
        body = json.dumps({**HOLD, 'stream': True}).encode()
        head = ['POST /v1/completions HTTP/1.1', 'Host: 127.0.0.1', 'Content-Type: application/json',
                f'Content-Length: {len(body)}']
        streams = [send(port, [], ('\r\n'.join(head) + '\r\n\r\n').encode() + body[:-1]) for _ in range(20)]
        proc.send_signal(signal.SIGSTOP)  # so that the server reads all 20 requests' ends in one go, as a busy one does
        for s in streams:
            s.sendall(body[-1:])
        proc.send_signal(signal.SIGCONT)
        assert sorted(s.recv(12) for s in streams) == [b'HTTP/1.1 200'] * 2 + [b'HTTP/1.1 429'] * 18
        wait_for_health(port, active=1, waiting=1)
        assert 'serve_requests_rejected_total 18\n' in get(port, '/metrics')[2]
        for s in streams:
            s.close()
        wait_for_health(port, active=0, waiting=0)
        first, r = open_stream(port, **HOLD)
        assert r.readline().startswith(b'data: {')
        second, _ = open_stream(port, **HOLD)
        wait_for_health(port, active=1, waiting=1)
        status, headers, out = request(port, 'POST', '/v1/completions', {'prompt': 'Once'})
        assert status == 429 and int(headers['Retry-After']) >= 1
        assert out['error']['type'] == 'rate_limit_error' and 'busy' in out['error']['message']
        second.close()
        wait_for_health(port, active=1, waiting=0)
        first.close()
        wait_for_health(port, active=0, waiting=0)
        assert client(port).completions.create(model='m', prompt='Once', max_tokens=2).usage.completion_tokens == 2
        last, r = open_stream(port, prompt='Once', max_tokens=200)
        assert r.readline().startswith(b'data: {')
        proc.send_signal(signal.SIGINT)
        assert r.read().endswith(b'data: [DONE]\n\n')
        last.close()
        assert proc.wait(timeout=SECONDS) == 0
        assert 'Traceback' not in (random_dir / f'serve-{port}.log').read_text()
    finally:
        proc.kill()


def metric(port, name, headers=None):
    text = request(port, 'GET', '/metrics', headers=headers)[2]
    return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name + ' ')))


def test_metrics(server):
    """/metrics in Prometheus' text format: tokens made, time to the first token and between tokens."""
    status, headers, text = get(server, '/metrics')
    assert status == 200 and headers['content-type'].startswith('text/plain; version=0.0.4')
    assert '# TYPE serve_time_to_first_token_seconds histogram' in text and 'serve_requests_running 0' in text
    names = ['serve_generation_tokens_total', 'serve_time_to_first_token_seconds_count',
             'serve_time_per_output_token_seconds_count', 'serve_time_to_first_token_seconds_bucket{le="+Inf"}']
    before = [metric(server, n) for n in names]
    client(server).completions.create(model='m', prompt='Once', max_tokens=7, temperature=0)
    assert [metric(server, n) - b for n, b in zip(names, before)] == [7, 1, 6, 1]


def test_head(server):
    """curl -I health checks: HEAD answers as GET does, without the body."""
    for path in ('/', '/health'):
        status, headers, body = request(server, 'HEAD', path)
        assert status == 200 and body == ''


def test_tiny_top_p_is_greedy(server):
    """A top_p that rounds to 0 in float32 keeps the likeliest token, not the least likely."""
    from sampling import sample_logits
    logits = torch.randn(3, 1000)
    assert torch.equal(sample_logits(logits, top_p=1e-46), logits.argmax(-1, keepdim=True))
    options = dict(model='m', prompt='Once', max_tokens=5)
    greedy = client(server).completions.create(**options, temperature=0).choices[0].text
    assert client(server).completions.create(**options, top_p=1e-300).choices[0].text == greedy


def test_json_without_its_content_type(server):
    """curl -d sends application/x-www-form-urlencoded; the body is JSON all the same, and read as JSON."""
    for headers in ({'Content-Type': 'application/x-www-form-urlencoded'}, {}):
        status, _, out = request(server, 'POST', '/v1/completions', '{"prompt": "Once", "max_tokens": 2}', headers)
        assert status == 200 and out['usage']['completion_tokens'] == 2, out


def test_host_names(server):
    """A page on another site that reaches 127.0.0.1 by DNS rebinding sends its own Host: refused."""
    for host, expected in [('evil.example', 400), ('evil.example:80', 400), (f'localhost:{server}', 200),
                           (f'127.0.0.1:{server}', 200), ('[::1]', 200)]:
        status, _, out = request(server, 'GET', '/v1/models', headers={'Host': host})
        assert status == expected, (host, out)
    status, _, out = request(server, 'GET', '/health', headers={'Host': 'evil.example'})
    assert status == 400 and '--allowed_hosts=evil.example' in out['error']['message']


def send(port, head, body=b'', timeout=SECONDS):
    """A socket that sent a raw request (head: its lines, without the blank line)."""
    s = socket.create_connection(('127.0.0.1', port), timeout=timeout)
    s.sendall(('\r\n'.join(head) + '\r\n\r\n').encode() + body if head else body)
    return s


def test_hang_up_frees_the_row(server):
    """A client that hangs up before its whole (not streamed) completion is written frees its row at once."""
    body = json.dumps(HOLD).encode()
    s = send(server, ['POST /v1/completions HTTP/1.1', 'Host: 127.0.0.1', 'Content-Type: application/json',
                      f'Content-Length: {len(body)}'], body)
    wait_for_health(server, active=1, waiting=0)
    s.close()
    wait_for_health(server, within=5, active=0, waiting=0)  # not the minutes LONG tokens take


def test_empty_checkpoint(tmp_path):
    (tmp_path / 'best.pt').write_bytes(b'')
    out = subprocess.run([sys.executable, os.path.join(ROOT, 'serve.py'), f'--out_dir={tmp_path}', '--device=cpu'],
                         cwd=ROOT, capture_output=True, text=True, timeout=SECONDS)
    assert out.returncode == 1 and 'Traceback' not in out.stderr, out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith(f"error: {tmp_path / 'best.pt'} is empty (0 bytes)")


KEY = 'sk-test-0123456789'


def test_key_and_body_size(random_dir):
    """With a key (SERVE_API_KEY), every route but the page and /health wants it, answering 401 in OpenAI's
    error body without it; bodies past max_body_bytes get 413, whether their size is said or not."""
    proc, port = start_server(random_dir, '--max_body_bytes=2000', env={'SERVE_API_KEY': KEY})
    try:
        for path in ('/v1/models', '/metrics', '/openapi.json'):
            for headers in ({}, {'Authorization': 'Bearer wrong'}, {'Authorization': KEY}):
                status, got, out = request(port, 'GET', path, headers=headers)
                assert status == 401 and got['WWW-Authenticate'] == 'Bearer', (path, headers)
                assert out['error']['code'] == 'invalid_api_key' and 'Authorization: Bearer' in out['error']['message']
            assert request(port, 'GET', path, headers={'Authorization': f'Bearer {KEY}'})[0] == 200
        with pytest.raises(openai.AuthenticationError):
            client(port).completions.create(model='m', prompt='Once', max_tokens=2)
        keyed = openai.OpenAI(base_url=f'http://127.0.0.1:{port}/v1', api_key=KEY, timeout=SECONDS, max_retries=0)
        assert keyed.completions.create(model='m', prompt='Once', max_tokens=2).usage.completion_tokens == 2
        assert get(port, '/')[0] == 200 and get(port, '/health')[0] == 200  # the page asks for the key itself
        assert metric(port, 'serve_generation_tokens_total', {'Authorization': f'Bearer {KEY}'}) == 2

        auth = {'Authorization': f'Bearer {KEY}', 'Content-Type': 'application/json'}
        big = json.dumps({'prompt': 'Once', 'max_tokens': 1, 'junk': 'x' * 3000})
        status, _, out = request(port, 'POST', '/v1/completions', big, auth)
        assert status == 413 and 'max_body_bytes' in out['error']['message']
        # a huge body announced is refused before it is sent
        s = send(port, ['POST /v1/completions HTTP/1.1', 'Host: 127.0.0.1', f'Authorization: Bearer {KEY}',
                        'Content-Length: 200000000'], timeout=5)
        assert s.recv(100).startswith(b'HTTP/1.1 413 ')
        s.close()
        conn = http.client.HTTPConnection('127.0.0.1', port, timeout=SECONDS)  # chunked: no size said
        conn.request('POST', '/v1/completions', iter([big[:1500].encode(), big[1500:].encode()]), auth,
                     encode_chunked=True)
        assert conn.getresponse().status == 413
        conn.close()
        assert keyed.completions.create(model='m', prompt='Once', max_tokens=2).usage.completion_tokens == 2
    finally:
        stop_server(proc)


def test_slow_and_many_connections(random_dir):
    """Connections that send nothing or part of a request are closed after request_timeout; past
    max_connections open, a new one is closed at once; then the server serves again."""
    proc, port = start_server(random_dir, '--request_timeout=4', '--max_connections=20')
    try:
        partial = [b'', b'POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n',  # nothing, half a head, half a body
                   b'POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\n{"prompt"']
        t0 = time.time()
        held = [send(port, [], partial[i % 3]) for i in range(20)]
        time.sleep(0.5)  # the server has accepted them all
        for _ in range(3):  # the 21st
            with socket.create_connection(('127.0.0.1', port), timeout=SECONDS) as s:
                assert s.recv(100) == b'' and time.time() - t0 < 3.5  # before any timed out
        for s in held:
            assert s.recv(100) == b'' and 3.5 < time.time() - t0 < SECONDS
            s.close()
        assert client(port).completions.create(model='m', prompt='Once', max_tokens=2).usage.completion_tokens == 2
        assert metric(port, 'serve_connections_refused_total') == 3
    finally:
        stop_server(proc)


def test_open_files_run_out(random_dir):
    """The audit's: with ulimit -n 256, 300 partial requests. New clients are served again once the
    partial ones time out, and the log does not fill with "Too many open files"."""
    import resource
    proc, port = start_server(random_dir, '--request_timeout=2',
                              preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256)))
    try:
        held = [send(port, [], b'POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n') for _ in range(300)]
        deadline = time.time() + SECONDS
        while True:
            try:
                if get(port, '/health')[0] == 200:
                    break
            except OSError:
                pass
            assert time.time() < deadline, "serve.py still shuts new clients out"
            time.sleep(0.2)
        for s in held:
            s.close()
        assert client(port).completions.create(model='m', prompt='Once', max_tokens=2).usage.completion_tokens == 2
    finally:
        stop_server(proc)
    log = (random_dir / f'serve-{port}.log').read_text()
    assert 'Traceback' not in log and len(log) < 20_000 and 'max_connections lowered to' in log


def test_second_ctrl_c(random_dir):
    """A second Ctrl-C ends the requests in flight at once, each with a last word: a 503 in OpenAI's error
    body, or a last error event; no tracebacks, and the server exits with 0."""
    proc, port = start_server(random_dir, f'--max_tokens_limit={LONG}')
    try:
        stream, r = open_stream(port, **HOLD)
        assert r.readline().startswith(b'data: {')
        with ThreadPoolExecutor(1) as pool:
            whole = pool.submit(request, port, 'POST', '/v1/completions', HOLD)
            wait_for_health(port, active=2, waiting=0)
            proc.send_signal(signal.SIGINT)
            time.sleep(0.5)
            proc.send_signal(signal.SIGINT)
            status, _, out = whole.result(timeout=SECONDS)
        assert status == 503 and 'shutting down' in out['error']['message'], out
        events = r.read().decode().split('\n\n')
        stream.close()
        assert 'shutting down' in json.loads(events[-2].removeprefix('data: '))['error']['message']
        assert proc.wait(timeout=SECONDS) == 0
        assert 'Traceback' not in (random_dir / f'serve-{port}.log').read_text()
    finally:
        proc.kill()


def test_decoding_process_dies(random_dir):
    """When the decoding process dies, the requests in flight and those after end with an error that says
    so, and /health answers 503 (a supervisor's cue to restart the server), which stays up."""
    proc, port = start_server(random_dir, f'--max_tokens_limit={LONG}')
    try:
        stream, r = open_stream(port, **HOLD)
        assert r.readline().startswith(b'data: {')
        decoding = int(open(f'/proc/{proc.pid}/task/{proc.pid}/children').read().split()[0])
        os.kill(decoding, signal.SIGKILL)
        events = r.read().decode().split('\n\n')
        stream.close()
        assert 'the decoding process ended' in json.loads(events[-2].strip().removeprefix('data: '))['error']['message']
        status, _, out = request(port, 'POST', '/v1/completions', {'prompt': 'Once', 'max_tokens': 2})
        assert status == 500 and 'the decoding process ended (exit status -9)' in out['error']['message'], out
        status, _, out = get(port, '/health')
        assert status == 503 and 'restart the server' in out['error']['message']
    finally:
        stop_server(proc)


def test_threads(random_dir):
    proc, port = start_server(random_dir, '--threads=2', env={'OMP_NUM_THREADS': '1'})
    stop_server(proc)
    assert 'with 2 threads' in (random_dir / f'serve-{port}.log').read_text()
