import atexit
import json
import os
import re
import runpy
import shutil
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), 'shared')
TINYSTORIES = os.path.join(SHARED, 'data', 'tinystories')
TIKTOKEN_CACHE = os.path.join(SHARED, 'tiktoken-cache')

sys.path.insert(0, ROOT)
# Never wait ~25 s for an unreachable hub; find tiktoken's GPT-2 files offline.
os.environ.setdefault('HF_DATASETS_OFFLINE', '1')
os.environ.setdefault('HF_HUB_OFFLINE', '1')
# The tests' compiled steps (compiled.py) skip the search for the fastest GEMMs, half of a compile's time;
# test_generate's weight-change test searches.
os.environ.setdefault('TORCHINDUCTOR_MAX_AUTOTUNE', '0')
if os.path.isdir(TIKTOKEN_CACHE):
    os.environ.setdefault('TIKTOKEN_CACHE_DIR', TIKTOKEN_CACHE)

needs_shared = pytest.mark.skipif(not os.path.isdir(TINYSTORIES), reason=f'{TINYSTORIES} is absent')
needs_tokenizer = pytest.mark.skipif(not os.path.isdir(TIKTOKEN_CACHE) and 'TIKTOKEN_CACHE_DIR' not in os.environ,
                                     reason='no offline tiktoken cache (../shared/tiktoken-cache)')


def write_data(data_dir, state, stories, repeats=40, validation=None):
    """data_dir as prepare.py lays it out, in the tokens of the tokenizer `state` describes: the stories,
    each after <|endoftext|>, `repeats` times over, as the train split, and as the validation split too
    unless other stories are given for it. Returns the tokenizer."""
    import json
    import numpy as np
    import tokenizer
    enc = tokenizer.get_tokenizer(state)
    os.makedirs(data_dir)
    if state['json']:
        with open(os.path.join(data_dir, 'tokenizer.json'), 'w', encoding='utf-8') as f:
            f.write(state['json'])
    meta = tokenizer.meta_fields(enc)
    for split, docs in (('train', stories * repeats), ('validation', validation or stories * repeats)):
        tokens = np.array([t for s in docs for t in [enc.eot_token] + enc.encode_ordinary(s)], dtype=np.uint16)
        tokens.tofile(os.path.join(data_dir, f'{split}.bin'))
        meta[split] = {'tokens': len(tokens), 'documents': len(docs)}
    with open(os.path.join(data_dir, 'meta.json'), 'w') as f:
        json.dump(meta, f)
    return enc


def put_where_the_hint_trains(error, checkpoint):
    """Copy checkpoint to the out_dir (under the working directory) of the config that error's hint
    trains ("train one first: python train.py CONFIG")."""
    command = re.search(r'train one first: python train.py (\S+)\)', str(error))
    assert command, error
    settings = {}
    exec(open(os.path.join(ROOT, command[1])).read(), {}, settings)
    os.makedirs(settings['out_dir'])
    shutil.copy(checkpoint, settings['out_dir'])


# ---------------------------------------------------------------------------- prepare.py, run in this process

PREPARE = os.path.join(ROOT, 'prepare.py')
STORIES = [f"Story {i}: once upon a time a {animal} found {i} shiny stones. The end."
           for i, animal in enumerate(['cat', 'dog', 'fox', 'owl', 'bee', 'ant', 'cow', 'pig'] * 5)]


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """Keep the Arrow files that datasets writes for local sources out of ~/.cache."""
    import datasets
    monkeypatch.setattr(datasets.config, 'HF_DATASETS_CACHE', str(tmp_path / 'hf-cache'))


def run_prepare(monkeypatch, *args):
    """`python prepare.py ARGS`, in this process (a subprocess would spend seconds importing). What it
    registers to run at exit (the release of its data_dir's lock) runs when it ends, as when a process exits."""
    at_exit = []
    with monkeypatch.context() as m:
        m.setattr(sys, 'argv', [PREPARE, *args])
        m.setattr(atexit, 'register', at_exit.append)
        try:
            runpy.run_path(PREPARE, run_name='__main__')
        except SystemExit as e:
            if e.code not in (None, 0):
                raise
        finally:
            for f in reversed(at_exit):
                f()


def read_prepared(data_dir):
    """meta.json, and the tokens of both splits."""
    with open(os.path.join(data_dir, 'meta.json')) as f:
        meta = json.load(f)
    tokens = {split: np.fromfile(os.path.join(data_dir, f'{split}.bin'), dtype=meta['dtype'])
              for split in ('train', 'validation')}
    return meta, tokens


def write_txt(path, docs):
    path.write_text(''.join(f"{d}\n<|endoftext|>\n" for d in docs))
    return str(path)


# validation documents full of words the train documents never use: a tokenizer trained on them too would differ
ODD = ["Zyx quuxed the vorpal jabberwock; zyx quux vorpal jabberwock, frabjous zyx." * 3] * 4


def prepare_error(monkeypatch, *args):
    """The one line that prepare.py with args ends with."""
    with pytest.raises(SystemExit) as e:
        run_prepare(monkeypatch, *args)
    assert str(e.value).startswith('error: ') and '\n' not in str(e.value)
    return str(e.value)


# ---------------------------------------------------------------------------- train.py: a tiny model, made-up tokens

VOCAB = 64
TINY = ['--n_layer=2', '--n_head=2', '--n_embd=32', '--block_size=16', '--batch_size=8',
        '--gradient_accumulation_steps=1', '--eval_iters=4', '--log_interval=1', '--warmup_iters=2',
        '--learning_rate=1e-2', '--min_lr=1e-3', '--device=cpu', '--dtype=float32']
# a tiny model on a busy 2-core machine runs far faster on one thread than waiting for a second
ENV = {**os.environ, 'OMP_NUM_THREADS': '1'}


def cycles(n, seed, step=1):
    """Learnable tokens: runs of step-spaced ids (mod VOCAB), each from a random start."""
    rng = np.random.default_rng(seed)
    runs = [(rng.integers(VOCAB) + step * np.arange(rng.integers(5, 40))) % VOCAB for _ in range(n // 5)]
    return np.concatenate(runs)[:n]


def write_tokens(data_dir, train, val, dtype='uint16', meta_dtype=None):
    """data_dir as prepare.py lays it out, with these train and validation tokens (a vocabulary of VOCAB)."""
    os.makedirs(data_dir, exist_ok=True)
    for split, tokens in (('train', train), ('validation', val)):
        np.asarray(tokens, dtype=dtype).tofile(os.path.join(data_dir, f'{split}.bin'))
    meta = {'dtype': meta_dtype or dtype, 'vocab_size': VOCAB, 'eot_token': VOCAB - 1,
            'train': {'tokens': len(train), 'documents': 1}, 'validation': {'tokens': len(val), 'documents': 1}}
    with open(os.path.join(data_dir, 'meta.json'), 'w') as f:
        json.dump(meta, f)
    return str(data_dir)


def train(data_dir, out_dir, *args, ok=True):
    """`python train.py` with TINY's settings, then args; it must succeed unless ok=False."""
    cmd = [sys.executable, 'train.py', f'--data_dir={data_dir}', f'--out_dir={out_dir}', *TINY, *args]
    run = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    if ok:
        assert run.returncode == 0, run.stderr
    return run


def metrics(out_dir):
    with open(os.path.join(out_dir, 'metrics.jsonl')) as f:
        return [json.loads(line) for line in f]


def assert_error(run, hint):
    """run ended with one error line, no traceback, and said hint."""
    assert run.returncode == 1
    assert 'Traceback' not in run.stderr
    assert run.stderr.strip().splitlines()[-1].startswith('error: ') and hint in run.stderr, run.stderr


@pytest.fixture
def out(tmp_path):
    """A run's out_dir inside the test's own folder, where its lock (.out.lock, beside it) lands too."""
    return tmp_path / 'out'


@pytest.fixture(scope='session')
def data(tmp_path_factory):
    return write_tokens(tmp_path_factory.mktemp('data'), cycles(20000, 0), cycles(4000, 1))


@pytest.fixture(scope='session')
def trained(data, tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp('trained') / 'out')
    train(data, out_dir, '--max_iters=30', '--eval_interval=10', '--lr_decay_iters=30', '--dropout=0.1')
    return out_dir


# ---------------------------------------------------------------------------- a tiny model, for generation's tests

def tiny(seed=0):
    """A 2-layer GPT of 97 tokens and a 16-token window, in eval mode."""
    import torch
    from model import GPT, GPTConfig
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=16, vocab_size=97, n_layer=2, n_head=2, n_embd=32)).eval()


def train_step(model, idx):
    """One SGD step that changes every weight in place, as an optimizer does."""
    import torch
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    _, loss = model(idx, targets=idx)
    loss.backward()
    optimizer.step()
