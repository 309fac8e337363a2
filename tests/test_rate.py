"""rate.py, the blind rating page: its page in a real headless browser (Debian's chromium driven by
Playwright, as tests/test_page.py), its SQLite ratings through a kill -9, its refusals, its report.
Two tiny untrained checkpoints write the stories."""
import json
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch

import rate
from conftest import ROOT, needs_tokenizer, write_data
from model import GPT, GPTConfig
from test_page import browser, free_port  # noqa: F401 (browser: a fixture)

pytestmark = needs_tokenizer
MODEL_ARGS = dict(n_layer=1, n_head=2, n_embd=16, block_size=32, vocab_size=50257)
STORIES = ['Ben had a small boat. He pushed it into the pond and watched it float away.',
           'A little bird sat on a branch. It sang a song for the flowers below.',
           'Mia went to the lake with her mom. They ate sandwiches on a blue blanket.']
SECONDS = 60  # the most any one wait here takes


@pytest.fixture(scope='module')
def checkpoints(tmp_path_factory):
    """Three tiny random checkpoints (out_dirs ckpt-a, ckpt-b, ckpt-c) trained on data of three stories."""
    from tokenizer import GPT2
    root = tmp_path_factory.mktemp('rate')
    data = root / 'data'
    write_data(data, GPT2, STORIES, repeats=1)
    for i, name in enumerate(('ckpt-a', 'ckpt-b', 'ckpt-c')):
        torch.manual_seed(i)
        (root / name).mkdir()
        torch.save({'model': GPT(GPTConfig(**MODEL_ARGS)).state_dict(), 'model_args': MODEL_ARGS,
                    'config': {'data_dir': str(data)}}, root / name / 'best.pt')
    return root


def call(url, body=None):
    """(status, JSON body) of a GET, or of a POST of body."""
    request = urllib.request.Request(url, None if body is None else (body if isinstance(body, bytes) else
                                     json.dumps(body).encode()), {'Content-Type': 'application/json'})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


class Server:
    """rate.py run as a user runs it, on a free port, over checkpoints' two out_dirs and the SQLite file db."""

    def __init__(self, checkpoints, db, names=('ckpt-a', 'ckpt-b'), args=()):
        self.port = free_port()
        self.url = f'http://127.0.0.1:{self.port}'
        self.log = open(f'{db}.log', 'a+')
        self.proc = subprocess.Popen([sys.executable, 'rate.py', '--out_dirs=' + ','.join(str(checkpoints / n) for n in names),
                                      '--stories=2', '--max_new_tokens=12', '--device=cpu', '--dtype=float32',
                                      f'--db={db}', f'--port={self.port}', *args], cwd=ROOT, stdout=self.log,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + SECONDS
        while True:
            try:
                assert call(self.url + '/api/task?rater=x')[0] == 200
                return
            except OSError:
                self.log.seek(0)
                assert self.proc.poll() is None, f'rate.py exited with status {self.proc.returncode}:\n{self.log.read()}'
                assert time.monotonic() < deadline, f'rate.py did not answer in {SECONDS} s:\n{self.log.read()}'
                time.sleep(0.2)

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.log.close()


@pytest.fixture
def server(checkpoints, tmp_path):
    s = Server(checkpoints, tmp_path / 'ratings.db')
    yield s
    s.kill()


def report(db):
    done = subprocess.run([sys.executable, 'rate.py', f'--db={db}', '--report=True'], cwd=ROOT, capture_output=True,
                          text=True, timeout=SECONDS)
    assert done.returncode == 0, done.stderr
    return done.stdout


def open_page(browser, url, rater):
    page = browser.new_context(viewport={'width': 900, 'height': 700}).new_page()
    page.set_default_timeout(SECONDS * 1000)
    page.goto(url + '/')
    page.fill('#rater', rater)
    page.click('#begin')
    page.wait_for_selector('.story >> nth=1')
    return page


def fill(page, story, scores):
    box = page.locator(f'.story[data-id="{story}"]')
    for name, value in zip(rate.SCORES, scores):
        box.locator('.' + name).fill(str(value))
    box.locator('.save').click()


def test_page_rates_blind_keeps_ratings_through_a_reload_and_two_raters(browser, server, tmp_path):
    ann = open_page(browser, server.url, 'ann')
    ids = ann.eval_on_selector_all('.story', 'boxes => boxes.map(b => b.dataset.id)')
    assert len(ids) == 2  # one story of each checkpoint, from the same opening
    assert ann.text_content('#start') in [s.split('.')[0] + '.' for s in STORIES[:2]]
    assert 'ckpt' not in ann.content()  # which checkpoint wrote a story is not on the page
    fill(ann, ids[0], (7, 6, 5))
    ann.wait_for_selector(f'.story[data-id="{ids[0]}"] .saved:has-text("saved")')
    ann.reload()  # the rater and the opening come back, with the scores given
    ann.wait_for_selector('.story >> nth=1')
    assert ann.eval_on_selector_all('.story', 'boxes => boxes.map(b => b.dataset.id)') == ids
    box = ann.locator(f'.story[data-id="{ids[0]}"]')
    assert [box.locator('.' + s).input_value() for s in rate.SCORES] == ['7', '6', '5']

    # a score of 11 is refused, in one line on the page, and nothing is saved
    fill(ann, ids[1], (11, 6, 5))
    ann.wait_for_selector('#error:visible')
    assert ann.text_content('#error') == 'coherence must be a whole number from 1 to 10, got 11'
    assert ann.text_content(f'.story[data-id="{ids[1]}"] .saved') == ''

    # two raters at once, each in a browser of their own, on the same story
    bob = open_page(browser, server.url, 'bob')
    if not bob.locator(f'.story[data-id="{ids[1]}"]').count():  # bob's order of the openings is his own
        bob.click('#next')
        bob.wait_for_selector(f'.story[data-id="{ids[1]}"]')
    fill(ann, ids[1], (3, 4, 5))
    fill(bob, ids[1], (9, 9, 9))
    for page in (ann, bob):
        page.wait_for_selector(f'.story[data-id="{ids[1]}"] .saved:has-text("saved")')
    with sqlite3.connect(tmp_path / 'ratings.db') as con:
        saved = dict(((r, s), c) for r, s, c in con.execute('select rater, story, coherence from ratings'))
    assert saved[('ann', ids[0])] == 7 and saved[('ann', ids[1])] == 3 and saved[('bob', ids[1])] == 9
    # ann's page goes on to the next opening, where her order of the stories is her own
    ann.click('#next')
    ann.wait_for_function(f'!document.querySelector(\'.story[data-id="{ids[0]}"]\')')
    assert ann.locator('.story').count() == 2


def test_kill_9_loses_no_rating_and_keeps_the_stories(checkpoints, tmp_path):
    db = tmp_path / 'ratings.db'
    server = Server(checkpoints, db)
    try:
        stories = {}
        assert call(server.url + '/api/task?rater=ann')[1]['opening'] is not None
        for opening in (0, 1):
            status, task = call(server.url + f'/api/task?rater=ann&opening={opening}')
            assert status == 200
            stories[opening] = [s['id'] for s in task['stories']]

        def rate_all(rater, score):  # two raters saving at once
            for opening, ids in stories.items():
                for i in ids:
                    status, body = call(server.url + '/api/ratings', dict(rater=rater, story=i, coherence=score,
                                                                           grammar=score, creativity=score))
                    assert status == 200, body
        threads = [threading.Thread(target=rate_all, args=(r, k)) for r, k in (('ann', 4), ('bob', 8))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        server.kill()  # kill -9 right after the last answer
    server = Server(checkpoints, db)
    try:
        for opening, ids in stories.items():
            status, task = call(server.url + f'/api/task?rater=bob&opening={opening}')
            assert sorted(s['id'] for s in task['stories']) == sorted(ids)  # the same stories, not written again
            assert all(s['scores'] == {'coherence': 8, 'grammar': 8, 'creativity': 8} for s in task['stories'])
        assert call(server.url + '/api/task?rater=ann')[1]['opening'] is None  # ann has rated everything
    finally:
        server.kill()
    # restarted, with a third checkpoint: it continues the same openings, and the others' stories stay
    server = Server(checkpoints, db, ('ckpt-a', 'ckpt-b', 'ckpt-c'))
    try:
        for opening, ids in stories.items():
            status, task = call(server.url + f'/api/task?rater=bob&opening={opening}')
            assert task['start'] == [s.split('.')[0] + '.' for s in STORIES][opening]
            old = [s for s in task['stories'] if s['id'] in ids]
            assert len(old) == 2 and len(task['stories']) == 3
            assert all(s['scores'] == {'coherence': 8, 'grammar': 8, 'creativity': 8} for s in old)
        assert call(server.url + '/api/task?rater=ann')[1]['opening'] is not None  # ckpt-c's are to rate
    finally:
        server.kill()
    with sqlite3.connect(db) as con:
        assert con.execute('select count(*) from ratings').fetchone()[0] == 8
        assert con.execute('select count(*) from stories').fetchone()[0] == 6
    out = report(db)
    assert out.count('ckpt-') == 2 and '6.00' in out  # each rated checkpoint: 4 ratings, 4s and 8s


def test_bad_input_is_refused_in_one_line(server, checkpoints, tmp_path):
    story = call(server.url + '/api/task?rater=ann')[1]['stories'][0]['id']
    url = server.url + '/api/ratings'
    good = dict(rater='ann', story=story, coherence=5, grammar=5, creativity=5)
    for change, status, message in [
            (dict(coherence=11), 400, 'coherence must be a whole number from 1 to 10, got 11'),
            (dict(grammar=0), 400, 'grammar must be a whole number from 1 to 10, got 0'),
            (dict(creativity=7.5), 400, 'creativity must be a whole number from 1 to 10, got 7.5'),
            (dict(creativity='7'), 400, "creativity must be a whole number from 1 to 10, got '7'"),
            (dict(story='nope'), 404, "no story 'nope' to rate"),
            (dict(rater=' '), 400, 'rater must be a name of 1 to 100 characters')]:
        assert call(url, {**good, **change}) == (status, {'error': message})
    assert call(url, b'{not json') == (400, {'error': 'the body is not valid JSON'})
    assert call(server.url + '/api/task?rater=ann&opening=99') == (404, {'error': 'no opening 99'})
    assert call(url, good)[0] == 200
    # a bad setting: one error line, and nothing starts
    done = subprocess.run([sys.executable, 'rate.py', '--stories=0', f'--db={tmp_path / "x.db"}'], cwd=ROOT,
                          capture_output=True, text=True, timeout=SECONDS)
    said = [line for line in done.stderr.splitlines() if not line.startswith('config: ')]
    assert done.returncode != 0 and said == ['error: stories must be at least 1, got 0']


def test_threads_write_the_stories(checkpoints, tmp_path, monkeypatch):
    # a bad count: one error line, before the database is made
    done = subprocess.run([sys.executable, 'rate.py', '--threads=-1', f'--db={tmp_path / "x.db"}'], cwd=ROOT,
                          capture_output=True, text=True, timeout=SECONDS)
    said = [line for line in done.stderr.splitlines() if not line.startswith('config: ')]
    assert done.returncode != 0 and said == ['error: threads must be a whole number >= 0 (0: one per core), got -1']
    assert not (tmp_path / 'x.db').exists()
    monkeypatch.setenv('OMP_NUM_THREADS', '2')  # torch's own count would be 2
    server = Server(checkpoints, tmp_path / 'ratings.db', args=['--threads=1'])
    try:
        server.log.seek(0)
        wrote = [line for line in server.log.read().splitlines() if line.startswith('wrote 2 stories of ')]
        assert len(wrote) == 2 and all(line.endswith(' s with 1 thread') for line in wrote), wrote
    finally:
        server.kill()


def test_report_gives_means_intervals_and_preferences():
    con = rate.connect(':memory:')
    con.executescript(rate.SCHEMA)
    con.executemany('insert into stories values (?, ?, ?, ?, ?)',
                    [(f'{c}{o}', c, o, 'Once.', 'text') for c in 'ab' for o in range(3)])
    # two raters, three openings: a's stories score 8, b's 4, but on opening 2 rater y ties them
    rows = [(r, f'{c}{o}', *(3 * [8 if c == 'a' else 4])) for r in 'xy' for c in 'ab' for o in range(3)]
    rows[-1] = ('y', 'b2', 8, 8, 8)
    con.executemany('insert into ratings values (?, ?, ?, ?, ?, 0)', rows)
    found = rate.summary(con)
    assert found['a']['ratings'] == 6 and found['a']['raters'] == 2
    mean, low, high = found['b']['coherence']
    assert mean == pytest.approx(28 / 6) and low <= mean <= high and 4 <= low and high <= 8
    assert found['a']['coherence'] == (8, 8, 8)
    assert found['a']['compared'] == found['b']['compared'] == 6
    assert found['a']['preferred'] == pytest.approx(5.5) and found['b']['preferred'] == pytest.approx(0.5)
