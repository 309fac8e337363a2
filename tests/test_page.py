"""serve.py's page (serve.html) in a real headless browser: Debian's chromium driven by Playwright,
against serve.py run as a user runs it, with a tiny untrained model."""
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import torch

from conftest import ROOT, needs_tokenizer
from model import GPT, GPTConfig

pytestmark = needs_tokenizer
CHROMIUM = '/usr/bin/chromium'
# headless, offline: no sandbox (CI runs as root), and none of chromium's own calls home
CHROMIUM_ARGS = ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
                 '--disable-component-update', '--disable-sync']
MODEL_ARGS = dict(n_layer=1, n_head=2, n_embd=16, block_size=32, vocab_size=50257)
PROMPT = 'Once upon a time there was a cat'
LONG = 100000  # a story long enough to be stopped, even by a fast machine
SECONDS = 60  # the most any one wait here takes: starting the server, a story, the end of a stopped one


def require(ok, what, how):
    """CI installs chromium (.ci/run) and playwright (setup.sh): there a missing one is a failure."""
    if ok:
        return
    if os.environ.get('CI', '').lower() in ('true', '1'):
        pytest.fail(f'{what} is absent, and CI is set: CI installs it')
    pytest.skip(f'{what} is absent ({how})')


def get_json(url):
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.load(response)


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tmp_path):
    """The URL of serve.py serving a tiny random model; the server is killed afterwards."""
    yield from serving(tmp_path)


@pytest.fixture
def keyed_server(tmp_path):
    """As server, with a key: SERVE_API_KEY=KEY."""
    yield from serving(tmp_path, {'SERVE_API_KEY': KEY})


KEY = 'sk-page-test-42'


def serving(tmp_path, env=None):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**MODEL_ARGS))
    torch.save({'model': model.state_dict(), 'model_args': MODEL_ARGS, 'config': {'data_dir': 'nowhere'}},
               tmp_path / 'best.pt')
    port = free_port()
    log = open(tmp_path / 'serve.log', 'w+')
    proc = subprocess.Popen([sys.executable, 'serve.py', f'--out_dir={tmp_path}', f'--port={port}', '--host=127.0.0.1',
                             '--device=cpu', '--dtype=float32', f'--max_tokens_limit={LONG}'],
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    url = f'http://127.0.0.1:{port}'
    try:
        deadline = time.monotonic() + SECONDS
        while True:
            try:
                assert get_json(url + '/health')['status'] == 'ok'
                break
            except OSError:
                log.seek(0)
                assert proc.poll() is None, f'serve.py exited with status {proc.returncode}:\n{log.read()}'
                assert time.monotonic() < deadline, f'serve.py did not answer /health in {SECONDS} s:\n{log.read()}'
                time.sleep(0.2)
        yield url
    finally:
        proc.kill()
        proc.wait()
        log.close()


@pytest.fixture
def browser():
    """Headless chromium, through Playwright (tests/test_rate.py uses it too)."""
    require(os.path.exists(CHROMIUM), CHROMIUM, 'apt-get install chromium, as .ci/run does')
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        require(False, 'the Python package playwright', 'setup.sh installs it')
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(browser):
    page = browser.new_page(viewport={'width': 900, 'height': 600})
    page.set_default_timeout(SECONDS * 1000)
    return page


def story_length(page):
    return len(page.text_content('#story'))


def test_page_streams_a_story_stops_one_and_shows_errors(page, server, tmp_path):
    page.goto(server + '/')
    assert page.input_value('#prompt') == 'Once upon a time'
    page.fill('#prompt', PROMPT)
    page.fill('#max_tokens', '24')
    page.fill('#seed', '7')
    page.click('#start')
    page.wait_for_function(f'document.getElementById("story").textContent.length > {len(PROMPT)}')
    page.wait_for_selector('#start:enabled')  # the story is over
    page.screenshot(path=tmp_path / 'page.png')
    text = page.text_content('#story')
    assert text.startswith(PROMPT) and len(text) > len(PROMPT)
    assert page.is_hidden('#error')
    status = page.text_content('#status')
    speed = re.search(r'(\d+) tokens, (\d+\.\d) tokens/s', status)
    assert speed and 0 < int(speed[1]) <= 24 and float(speed[2]) > 0, status
    # the page shows just what the API writes for the same request, read in one piece
    request = dict(prompt=PROMPT, max_tokens=24, seed=7, temperature=0.8, top_k=200)
    post = urllib.request.Request(server + '/v1/completions', json.dumps(request).encode(),
                                  {'Content-Type': 'application/json'})
    with urllib.request.urlopen(post, timeout=SECONDS) as response:
        assert text == PROMPT + json.load(response)['choices'][0]['text']

    # Stop ends a long story early, and the server stops writing it
    page.fill('#max_tokens', str(LONG))
    page.fill('#seed', '')  # a random one
    page.click('#start')
    page.wait_for_function(f'document.getElementById("story").textContent.length > {len(PROMPT) + 20}')
    page.click('#stop')
    page.wait_for_selector('#start:enabled')
    assert page.is_hidden('#error')
    status = page.text_content('#status')
    tokens = int(re.search(r'(\d+) tokens, \d+\.\d tokens/s, seed \d+ \(stopped\)', status)[1])
    assert 0 < tokens < LONG
    length = story_length(page)
    time.sleep(0.5)
    assert story_length(page) == length
    deadline = time.monotonic() + SECONDS
    while (health := get_json(server + '/health'))['active'] or health['waiting']:
        assert time.monotonic() < deadline, f'the server still writes the stopped story: {health}'
        time.sleep(0.2)
    assert health['status'] == 'ok'

    # a request the server refuses: its message on the error line, the story box empty but for the prompt
    page.fill('#temperature', '-1')
    page.click('#start')
    page.wait_for_selector('#error:visible')
    assert 'temperature' in page.text_content('#error')
    assert page.text_content('#story') == PROMPT
    assert page.is_enabled('#start') and page.is_disabled('#stop')


def test_page_asks_for_the_key_once(page, keyed_server):
    """Where the server wants a key, the page asks for it (again, when the one given is wrong), then keeps it."""
    asked = []

    def answer(dialog):
        asked.append(dialog.message)
        dialog.accept(KEY if len(asked) > 1 else 'sk-wrong')
    page.on('dialog', answer)
    page.goto(keyed_server + '/')
    page.fill('#max_tokens', '5')
    for _ in range(2):
        page.click('#start')
        page.wait_for_function(f'document.getElementById("story").textContent.length > {len("Once upon a time")}')
        page.wait_for_selector('#start:enabled')
        assert page.is_hidden('#error')
    assert len(asked) == 2 and 'API key' in asked[0] and 'wrong' in asked[1]
    page.reload()  # kept in this browser
    page.fill('#max_tokens', '5')
    page.click('#start')
    page.wait_for_selector('#start:enabled')
    assert len(asked) == 2 and page.is_hidden('#error')

    # no key given: the server's 401 message on the error line
    page.evaluate('localStorage.clear()')
    page.remove_listener('dialog', answer)
    page.on('dialog', lambda dialog: dialog.dismiss())
    page.click('#start')
    page.wait_for_selector('#error:visible')
    assert 'Authorization: Bearer' in page.text_content('#error')
