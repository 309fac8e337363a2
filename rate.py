"""
Rate stories blind: a page where people score stories from several checkpoints, written from the same
openings, for coherence, grammar and creativity (1 to 10), without seeing which checkpoint wrote which.
  $ pip install -r requirements-serve.txt
  $ python rate.py --out_dirs=out-cpu,out-gpt2recipe --stories=20   # then open http://127.0.0.1:8001
  $ python rate.py --report=True                                    # each checkpoint's scores so far
The stories are written once, at the first start (stories.continue_stories: the openings are the first
sentences of the validation split's first stories), and kept with the ratings in one SQLite file (db):
a restart, after a crash too, serves the same stories and keeps every rating saved before it.
"""
import os
import random
import secrets
import sqlite3
import time

import numpy as np

import stories as story_text
from common import checkpoint_path, die, get_device, get_dtype, load_for_generation, log, open_split, read_meta, set_threads

# -----------------------------------------------------------------------------
out_dirs = 'out-cpu'  # the checkpoints to rate, comma-separated: out_dirs (their ckpt) or paths of .pt files
ckpt = 'best'  # best or last, for the out_dirs
data_dir = ''  # the openings come from its validation split; empty: the first checkpoint's data_dir
stories = 10  # openings (>= 1): the validation split's first stories; every checkpoint continues each
opening_tokens = 0  # each opening: 0 its story's first sentence, else its first opening_tokens tokens, back to a word's end
max_new_tokens = 200  # most tokens of a continuation (>= 1)
temperature = 0.8  # as sample.py
top_k: int | None = 200  # as sample.py: sample only from the k likeliest tokens (None: all)
top_p: float | None = None  # as sample.py: the likeliest tokens that together reach top_p (None: off)
seed = 1337  # story i of every checkpoint draws from a generator seeded seed + i
db = 'ratings.db'  # the SQLite file of the stories and the ratings
report = False  # True: print each checkpoint's scores from db and exit, without serving
host = '127.0.0.1'  # the address to listen on; 0.0.0.0 serves other machines too
port = 8001  # 1 to 65535
device = 'auto'  # auto, cpu, cuda, cuda:1, mps
dtype = 'auto'  # as sample.py
threads = 0  # CPU threads torch computes with; 0: one per core (torch's own); beside another busy process, give each its share
# -----------------------------------------------------------------------------
SCORES = ('coherence', 'grammar', 'creativity')
SCHEMA = """
create table if not exists stories (id text primary key, checkpoint text not null, opening integer not null,
                                    start text not null, text text not null);
create table if not exists ratings (rater text not null, story text not null references stories(id),
                                    coherence integer not null check (coherence between 1 and 10),
                                    grammar integer not null check (grammar between 1 and 10),
                                    creativity integer not null check (creativity between 1 and 10),
                                    at real not null, primary key (rater, story));
"""


def connect(path):
    """A connection of its own (one per request: sqlite3's may not cross threads); WAL lets raters save
    while others read, and a rating is on disk once its request is answered."""
    con = sqlite3.connect(path, timeout=30, isolation_level=None)  # autocommit, except inside `with con`
    con.execute('pragma journal_mode=wal')
    con.execute('pragma foreign_keys=on')
    return con


def interval(x, rng):
    """The mean of x and its 95% bootstrap interval (2,000 resamples, percentiles)."""
    x = np.asarray(x, dtype=float)
    means = rng.choice(x, (2000, len(x))).mean(axis=1)
    return x.mean(), np.percentile(means, 2.5), np.percentile(means, 97.5)


def summary(con):
    """{checkpoint: {'ratings', 'raters', each score's (mean, low, high), 'preferred', 'compared'}}: preferred
    counts the (rater, opening) pairs where its story had the highest sum of the three scores among two
    or more that the rater scored from that opening (a tie shares the win)."""
    rows = con.execute('select s.checkpoint, s.opening, r.rater, r.coherence, r.grammar, r.creativity '
                       'from ratings r join stories s on s.id = r.story order by s.checkpoint, r.rater, s.opening').fetchall()
    rng = np.random.default_rng(0)
    out = {}
    for name in sorted({r[0] for r in rows}):
        mine = [r for r in rows if r[0] == name]
        out[name] = {'ratings': len(mine), 'raters': len({r[2] for r in mine}), 'preferred': 0.0, 'compared': 0,
                     **{s: interval([r[3 + i] for r in mine], rng) for i, s in enumerate(SCORES)}}
    pairs = {}
    for name, opening, rater, *scores in rows:
        pairs.setdefault((rater, opening), []).append((sum(scores), name))
    for scored in pairs.values():
        if len(scored) < 2:
            continue
        best = max(s for s, _ in scored)
        winners = [name for s, name in scored if s == best]
        for _, name in scored:
            out[name]['compared'] += 1
        for name in winners:
            out[name]['preferred'] += 1 / len(winners)
    return out


def print_report(con):
    found = summary(con)
    if not found:
        print(f"no ratings in {db} yet")
        return
    print(f"{'checkpoint':40} {'ratings':>7} {'raters':>6}" + ''.join(f' {s + " (95% CI)":>22}' for s in SCORES)
          + f" {'preferred':>14}")
    for name, r in found.items():
        cells = ''.join(f" {f'{m:.2f} ({lo:.2f}-{hi:.2f})':>22}" for m, lo, hi in (r[s] for s in SCORES))
        pref = f"{r['preferred'] / r['compared']:.0%} of {r['compared']}" if r['compared'] else '-'
        print(f"{name:40} {r['ratings']:>7} {r['raters']:>6}{cells} {pref:>14}")


def write_stories(con, paths):
    """Write, once, every checkpoint's continuation of each opening into db (one transaction each)."""
    from tokenizer import data_tokenizer, get_tokenizer
    import torch
    have = {row[0] for row in con.execute('select distinct checkpoint from stories')}
    todo = [p for p in paths if p not in have]
    if not todo:
        return
    dev = get_device(device)
    dt = get_dtype(dtype, dev.split(':')[0])
    # a checkpoint added to a db that has stories continues the openings already there
    starts = [row[0] for row in con.execute('select start from stories group by opening order by opening')] or None
    for path in todo:
        model, enc, checkpoint = load_for_generation(path, dev, dt)
        if starts is None:  # the openings, from the first checkpoint's data unless data_dir is given
            data = data_dir or (checkpoint.get('config') or {}).get('data_dir')
            if not data:
                die(f"{path} does not say which data it was trained on: give --data_dir for the openings")
            meta = read_meta(data, path, ['validation'])
            data_enc = get_tokenizer(data_tokenizer(data, meta))
            docs = story_text.split_documents(np.asarray(open_split(data, meta, 'validation')), data_enc.eot_token)
            starts = [story_text.opening(data_enc.decode(d), data_enc, opening_tokens)[0] for d in docs[:stories]]
            if not starts:
                die(f"{data}/validation.bin holds no stories")
        t0 = time.time()
        written = story_text.continue_stories(model, enc, starts, max_new_tokens, temperature, top_k, top_p, seed)
        with con:
            con.executemany('insert into stories values (?, ?, ?, ?, ?)',
                            [(secrets.token_hex(8), path, i, s, text) for i, (s, (text, _)) in enumerate(zip(starts, written))])
        log(f"wrote {len(written)} stories of {path} in {time.time() - t0:.1f} s with {torch.get_num_threads()} thread{'s' * (torch.get_num_threads() > 1)}")


class Refused(Exception):
    """A request this server does not take: (HTTP status, one line saying why)."""


def check_rating(con, body):
    """(rater, story, scores) of a POST /api/ratings body, or Refused."""
    if not isinstance(body, dict):
        raise Refused(400, "the body must be a JSON object: rater, story, coherence, grammar, creativity")
    rater, story = body.get('rater'), body.get('story')
    if not (isinstance(rater, str) and 0 < len(rater.strip()) <= 100):
        raise Refused(400, "rater must be a name of 1 to 100 characters")
    if not isinstance(story, str) or con.execute('select 1 from stories where id = ?', (story,)).fetchone() is None:
        raise Refused(404, f"no story {story!r} to rate")
    scores = []
    for name in SCORES:
        value = body.get(name)
        if type(value) is not int or not 1 <= value <= 10:
            raise Refused(400, f"{name} must be a whole number from 1 to 10, got {value!r}")
        scores.append(value)
    return rater.strip(), story, scores


def task(con, rater, opening=None):
    """The stories of one opening for rater, in an order of its own (neither the checkpoints' nor the
    same for every rater), with what rater gave each: the first opening, in rater's order, with a story
    left to rate, unless opening is named."""
    openings = [row[0] for row in con.execute('select distinct opening from stories order by opening')]
    random.Random(f'{rater}\0openings').shuffle(openings)
    rated = {row[0] for row in con.execute('select story from ratings where rater = ?', (rater,))}
    ids = {o: [row[0] for row in con.execute('select id from stories where opening = ? order by id', (o,))]
           for o in openings}
    done = sum(all(i in rated for i in ids[o]) for o in openings)
    if opening is None:
        opening = next((o for o in openings if not all(i in rated for i in ids[o])), None)
    elif opening not in ids:
        raise Refused(404, f"no opening {opening}")
    result = {'rater': rater, 'done': done, 'openings': len(openings), 'order': openings}
    if opening is None:
        return result | {'opening': None}
    rows = con.execute('select s.id, s.start, s.text, r.coherence, r.grammar, r.creativity from stories s left join '
                       'ratings r on r.story = s.id and r.rater = ? where s.opening = ? order by s.id',
                       (rater, opening)).fetchall()
    random.Random(f'{rater}\0{opening}').shuffle(rows)
    return result | {'opening': opening, 'start': rows[0][1],
                     'stories': [{'id': i, 'text': text, 'scores': None if c is None else dict(zip(SCORES, (c, g, k)))}
                                 for i, _, text, c, g, k in rows]}


if __name__ == '__main__':  # a plain script; tests import summary and the checks
    exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
    if not 1 <= port <= 65535:
        die(f"port must be from 1 to 65535, got {port}")
    for name, least in (('stories', 1), ('max_new_tokens', 1), ('opening_tokens', 0)):
        if globals()[name] < least:
            die(f"{name} must be at least {least}, got {globals()[name]}")
    from generate import check_options
    try:
        check_options(temperature, top_k, top_p)
    except ValueError as e:
        die(str(e))
    set_threads(threads)
    if not db:
        die("db must be the path of the SQLite file for the stories and ratings")
    try:
        con = connect(db)
        con.executescript(SCHEMA)
    except sqlite3.Error as e:
        die(f"cannot use {db} as the ratings database: {e}")
    if report:
        print_report(con)
        raise SystemExit(0)
    paths = [checkpoint_path(d.strip(), ckpt) if not d.strip().endswith('.pt') else d.strip()
             for d in out_dirs.split(',') if d.strip()]
    if not paths:
        die("out_dirs must name at least one checkpoint")
    write_stories(con, paths)
    con.close()

    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.responses import FileResponse, JSONResponse

    app = FastAPI(title='rate.py', docs_url=None, redoc_url=None)

    def refuse(e):
        status, message = e.args
        return JSONResponse({'error': message}, status_code=status)

    @app.get('/')
    def page():
        html = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'rate.html')
        if not os.path.isfile(html):
            return JSONResponse({'error': f"{html} is missing: rate.py's page is a file beside it"}, status_code=404)
        return FileResponse(html, media_type='text/html')

    @app.get('/api/task')
    def get_task(rater: str = '', opening: int | None = None):
        if not 0 < len(rater.strip()) <= 100:
            return refuse(Refused(400, "rater must be a name of 1 to 100 characters"))
        con = connect(db)
        try:
            return task(con, rater.strip(), opening)
        except Refused as e:
            return refuse(e)
        finally:
            con.close()

    @app.post('/api/ratings')
    async def post_rating(request: Request):
        try:
            body = await request.json()
        except ValueError:
            return refuse(Refused(400, "the body is not valid JSON"))
        con = connect(db)
        try:
            rater, story, scores = check_rating(con, body)
            con.execute('insert into ratings values (?, ?, ?, ?, ?, ?) on conflict (rater, story) do update set '
                        'coherence = excluded.coherence, grammar = excluded.grammar, creativity = excluded.creativity, '
                        'at = excluded.at', (rater, story, *scores, time.time()))
            return {'saved': story, **dict(zip(SCORES, scores))}
        except Refused as e:
            return refuse(e)
        finally:
            con.close()

    log(f"rating {len(paths)} checkpoints' stories from {db} at http://{host}:{port} (Ctrl-C stops)")
    uvicorn.run(app, host=host, port=port)
