import io
import itertools
import json
import math
import os
import re
import runpy
import shutil
import subprocess
import sys
import time
from contextlib import redirect_stderr, redirect_stdout

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, needs_tokenizer, put_where_the_hint_trains
from model import GPT, GPTConfig

pytestmark = needs_tokenizer
EOT = 50256
BLOCK = 32
MODEL_ARGS = dict(n_layer=1, n_head=2, n_embd=16, block_size=BLOCK, vocab_size=50257)
STORIES = ['Once upon a time, there was a little cat named Tom. Tom liked milk and naps in the sun.',
           'Lily saw a big red ball. "Can I play?" she asked. Her mom said yes, and Lily smiled.',
           'The café had a dog 🐶 who loved cake. Every day, the dog waited by the door for a treat.']


@pytest.fixture(scope='module')
def enc():
    from tokenizer import get_tokenizer
    return get_tokenizer()


def write_split(data_dir, name, tokens):
    os.makedirs(data_dir, exist_ok=True)
    np.array(tokens, dtype=np.uint16).tofile(os.path.join(data_dir, f'{name}.bin'))
    meta = {'dtype': 'uint16', 'vocab_size': 50257, 'eot_token': EOT, name: {'tokens': len(tokens), 'documents': 0}}
    with open(os.path.join(data_dir, 'meta.json'), 'w') as f:
        json.dump(meta, f)


@pytest.fixture(scope='module')
def setup(tmp_path_factory, enc):
    """A tiny model trained on nothing, its checkpoint pointing at a validation split of
    4 full windows and a partial one (138 tokens: 137 to predict = 4 * 32 + 9)."""
    root = tmp_path_factory.mktemp('eval')
    tokens = []
    while len(tokens) < 138:
        for story in STORIES:
            tokens += enc.encode(story) + [EOT]
    tokens = tokens[:138]
    write_split(root / 'data', 'validation', tokens)
    torch.manual_seed(0)
    model = GPT(GPTConfig(**MODEL_ARGS)).eval()
    torch.save({'model': model.state_dict(), 'model_args': MODEL_ARGS, 'iter_num': 7,
                'config': {'data_dir': str(root / 'data')}}, root / 'best.pt')
    return root, model, tokens


def evaluate(out_dir, *args, dtype='float32', err=None):
    """Run eval.py in this process, as `python eval.py --out_dir=... args` would (None: no --out_dir);
    returns stdout, and writes stderr to err. float32 unless asked: the exact figures a direct
    computation gives."""
    argv, sys.argv = sys.argv, ['eval.py', *([f'--out_dir={out_dir}'] if out_dir else []), f'--dtype={dtype}', *args]
    out = io.StringIO()
    try:
        with redirect_stdout(out), redirect_stderr(err or io.StringIO()):
            runpy.run_path(os.path.join(ROOT, 'eval.py'), run_name='__main__')
    finally:
        sys.argv = argv
    return out.getvalue()


def by_hand(model, tokens, enc):
    """Sum of the cross-entropy of each window of BLOCK tokens predicting the next ones, the
    last window shorter; bytes of the predicted text, <|endoftext|> counting none."""
    nats = 0.0
    with torch.no_grad():
        for i in range(0, len(tokens) - 1, BLOCK):
            y = torch.tensor(tokens[i + 1:i + 1 + BLOCK])
            x = torch.tensor(tokens[i:i + len(y)])
            logits, _ = model(x[None], y[None])
            nats += F.cross_entropy(logits[0], y, reduction='sum').item()
    n = len(tokens) - 1
    n_bytes = len(enc.decode_bytes([t for t in tokens[1:] if t != enc.eot_token]))
    return dict(tokens=n, bytes=n_bytes, windows=math.ceil(n / BLOCK), loss=nats / n,
                perplexity=math.exp(nats / n), bits_per_byte=nats / math.log(2) / n_bytes)


def check(results, expected):
    for key in ('tokens', 'bytes', 'windows'):
        assert results[key] == expected[key], key
    for key in ('loss', 'perplexity', 'bits_per_byte'):
        assert results[key] == pytest.approx(expected[key], rel=1e-5), key


@pytest.mark.parametrize('batch_size', [1, 3, 8])  # the partial window alone, in a batch, all in one batch
def test_numbers_match_a_direct_computation(setup, enc, tmp_path, batch_size):
    root, model, tokens = setup
    out = evaluate(root, f'--batch_size={batch_size}', f'--json_out={tmp_path / "eval.json"}')
    results = json.loads((tmp_path / 'eval.json').read_text())
    check(results, by_hand(model, tokens, enc))
    assert results['split'] == 'validation' and results['iter_num'] == 7 and results['block_size'] == BLOCK
    assert f"loss {results['loss']:.4f} nats/token" in out and '137 tokens' in out and '5 windows of 32' in out


def test_int8_weights_cost_a_little_loss(setup, enc, tmp_path):
    root, model, tokens = setup
    evaluate(root, '--int8=True', f'--json_out={tmp_path / "int8.json"}')
    loss, exact = json.loads((tmp_path / 'int8.json').read_text())['loss'], by_hand(model, tokens, enc)['loss']
    assert loss == pytest.approx(exact, rel=0.01) and loss != exact  # int8 did run


@pytest.mark.parametrize('cpu_bf16', [True, False])
def test_default_precision_follows_the_rule_and_bf16_stays_close(setup, enc, tmp_path, monkeypatch, cpu_bf16):
    """dtype=auto is bf16 autocast on a CPU with bf16 instructions, within 0.01 nats/token of
    float32, and float32 (exact) on one without them."""
    root, model, tokens = setup
    monkeypatch.setattr(torch.cpu, '_is_avx512_bf16_supported', lambda: cpu_bf16, raising=False)
    results = {}
    for dtype in ('auto', 'bfloat16'):
        evaluate(root, '--batch_size=2', f'--json_out={tmp_path / dtype}.json', dtype=dtype)
        results[dtype] = json.loads((tmp_path / f'{dtype}.json').read_text())
    expected = by_hand(model, tokens, enc)
    assert results['bfloat16']['loss'] == pytest.approx(expected['loss'], abs=0.01)
    assert results['bfloat16']['loss'] != expected['loss']  # bf16 did run
    if cpu_bf16:
        assert results['auto'] == results['bfloat16']
    else:
        check(results['auto'], expected)


def test_max_tokens_scores_the_start_of_the_split(setup, enc, tmp_path):
    root, model, tokens = setup
    evaluate(root, '--max_tokens=40', f'--json_out={tmp_path / "eval.json"}')
    check(json.loads((tmp_path / 'eval.json').read_text()), by_hand(model, tokens[:41], enc))


def test_data_dir_and_split_override_the_checkpoint(setup, enc, tmp_path):
    root, model, tokens = setup
    other = [EOT] + enc.encode(STORIES[2]) + [EOT]
    write_split(tmp_path / 'other', 'train', other)
    evaluate(root, f'--data_dir={tmp_path / "other"}', '--split=train', f'--json_out={tmp_path / "eval.json"}')
    check(json.loads((tmp_path / 'eval.json').read_text()), by_hand(model, other, enc))


def test_command_line_writes_json(setup, tmp_path):
    root, _, _ = setup
    run = subprocess.run([sys.executable, 'eval.py', f'--out_dir={root}', f'--json_out={tmp_path / "e.json"}'],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    results = json.loads((tmp_path / 'e.json').read_text())
    assert run.stdout.splitlines()[-1].startswith(f"loss {results['loss']:.4f} nats/token, perplexity ")
    assert '\r' not in run.stderr  # no progress bar off a terminal: a file of it is one line of \r updates
    assert run.stderr.splitlines()[-1] == f"wrote {tmp_path / 'e.json'}"
    assert os.listdir(tmp_path) == ['e.json']  # no temporary file left behind


def test_off_a_terminal_progress_is_a_plain_line_every_30_seconds(setup, monkeypatch):
    clock = itertools.count(step=31)  # every batch takes 31 s
    monkeypatch.setattr(time, 'monotonic', lambda: next(clock))
    err = io.StringIO()
    evaluate(setup[0], '--batch_size=2', err=err)
    assert [line for line in err.getvalue().splitlines() if 'batches' in line] == \
        ['validation: 1/3 batches', 'validation: 2/3 batches', 'validation: 3/3 batches']


def test_a_bare_json_out_goes_beside_the_checkpoint(setup, tmp_path, monkeypatch):
    """eval.json lands beside best.pt, as everything else of a run does; ./eval.json in the working directory."""
    run, cwd = tmp_path / 'run', tmp_path / 'cwd'
    run.mkdir()
    cwd.mkdir()
    shutil.copy(setup[0] / 'best.pt', run)
    monkeypatch.chdir(cwd)
    evaluate(run, '--json_out=eval.json')
    evaluate(tmp_path / 'elsewhere', f'--ckpt={run / "best.pt"}', '--json_out=ckpt.json')
    assert sorted(os.listdir(run)) == ['best.pt', 'ckpt.json', 'eval.json'] and os.listdir(cwd) == []
    evaluate(run, '--json_out=./here.json')
    assert os.listdir(cwd) == ['here.json'] and json.loads((cwd / 'here.json').read_text())['tokens'] == 137


def test_bare_eval_reads_what_its_hint_trains(setup, tmp_path, monkeypatch):
    """No --out_dir: eval.py reads what the command its error names (the README's first run) writes."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        evaluate(None)
    put_where_the_hint_trains(e.value, setup[0] / 'best.pt')
    assert '137 tokens' in evaluate(None)


@pytest.mark.parametrize('arg, message', [('--split=nope', "split must be train or validation, .*got 'nope'"),
                                           ('--split=', 'split must be'), ('--ckpt=', 'ckpt must be'),
                                           ('--batch_size=0', 'batch_size must be at least 1'),
                                           ('--max_tokens=-1', 'max_tokens must be >= 0'),
                                           ('--threads=-1', r'threads must be a whole number >= 0 \(0: one per core\), got -1$')])
def test_settings_out_of_range_are_errors_before_loading(tmp_path, arg, message):
    with pytest.raises(SystemExit, match=f'^error: {message}'):
        evaluate(tmp_path, arg)  # no checkpoint in tmp_path: caught before loading one


def test_threads_sets_torchs_thread_count(setup):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert 'loss ' in evaluate(setup[0], '--threads=2')
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_errors(setup, tmp_path):
    root, model, _ = setup
    with pytest.raises(SystemExit, match='^error: no checkpoint at'):
        evaluate(tmp_path)
    torch.save({'model': model.state_dict(), 'model_args': MODEL_ARGS}, tmp_path / 'last.pt')
    with pytest.raises(SystemExit, match='^error: .*last.pt does not say which data .*--data_dir'):
        evaluate(tmp_path, '--ckpt=last')


@pytest.mark.parametrize('name', ['gpt2', 'bpe:300'])
def test_missing_data_names_the_command_that_makes_it(tmp_path, name):
    """The data a checkpoint was trained on is gone: the prepare.py command eval.py names, given the
    stories (offline: a file, not the hub), makes data that eval.py accepts."""
    import tokenizer
    from common import read_meta
    stories, data = tmp_path / 'stories.txt', tmp_path / 'data'
    stories.write_text('\n<|endoftext|>\n'.join(STORIES * 5), encoding='utf-8')
    source = [f'--source={stories}', f'--val_source={stories}']

    def prepare(*args):
        run = subprocess.run([sys.executable, *args, *source], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr
    state = tokenizer.GPT2
    if name != 'gpt2':  # trained by prepare.py on the stories, as the data the checkpoint was trained on
        prepare('prepare.py', f'--tokenizer={name}', f'--data_dir={data}')
        state = tokenizer.data_tokenizer(data, read_meta(data))
        shutil.rmtree(data)
    args = {**MODEL_ARGS, 'vocab_size': tokenizer.get_tokenizer(state).n_vocab}
    torch.save({'model': GPT(GPTConfig(**args)).state_dict(), 'model_args': args, 'tokenizer': state,
                'config': {'data_dir': str(data)}}, tmp_path / 'best.pt')
    with pytest.raises(SystemExit) as e:
        evaluate(tmp_path)
    command = re.search(r'`python (prepare.py .*?)`', str(e.value))
    assert command, e.value
    prepare(*command[1].split())
    assert f"on {data / 'validation.bin'}" in evaluate(tmp_path)


def test_truncated_bin_is_one_error_line(setup, tmp_path):
    """A .bin cut short (a copy that stopped, a full disk) no longer holds what meta.json lists."""
    root, _, tokens = setup
    write_split(tmp_path / 'data', 'validation', tokens)
    with open(tmp_path / 'data' / 'validation.bin', 'r+b') as f:
        f.truncate(2 * 100)
    run = subprocess.run([sys.executable, 'eval.py', f'--out_dir={root}', f'--data_dir={tmp_path / "data"}'],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and run.stdout == ''
    assert run.stderr.splitlines()[-1] == (f"error: {tmp_path / 'data' / 'validation.bin'} does not hold the 138 uint16 "
                                       "tokens that meta.json lists (truncated or replaced?): run prepare.py again with --force=True")
    assert 'Traceback' not in run.stderr


@pytest.fixture(scope='module')
def bpe_setup(tmp_path_factory):
    """As setup, with a bpe:300 tokenizer that splits the café's é and the 🐶 across tokens: the
    validation split is whole stories, so its bytes are the stories' UTF-8 bytes."""
    import tokenizer
    root = tmp_path_factory.mktemp('eval-bpe')
    state = {'name': 'bpe:300', 'json': tokenizer.train_bpe(STORIES * 5, 300)}
    enc = tokenizer.get_tokenizer(state)
    assert enc.name == 'bpe:300' and len(enc.encode_ordinary('🐶')) > 1
    stories = STORIES * 2
    tokens = [enc.eot_token] + [t for s in stories for t in enc.encode_ordinary(s) + [enc.eot_token]]
    write_bpe(root / 'data', state, tokens)
    args = {**MODEL_ARGS, 'vocab_size': enc.n_vocab}
    torch.manual_seed(0)
    model = GPT(GPTConfig(**args)).eval()
    torch.save({'model': model.state_dict(), 'model_args': args, 'iter_num': 3, 'tokenizer': state,
                'config': {'data_dir': str(root / 'data')}}, root / 'best.pt')
    return root, model, tokens, stories, enc


def write_bpe(data_dir, state, tokens):
    """A validation split as prepare.py --tokenizer=bpe:N writes it."""
    import tokenizer
    os.makedirs(data_dir, exist_ok=True)
    (data_dir / 'tokenizer.json').write_text(state['json'], encoding='utf-8')
    meta = tokenizer.meta_fields(tokenizer.get_tokenizer(state))
    np.array(tokens, dtype=meta['dtype']).tofile(data_dir / 'validation.bin')
    meta['validation'] = {'tokens': len(tokens), 'documents': 0}
    (data_dir / 'meta.json').write_text(json.dumps(meta))


def test_bpe_bits_per_byte_counts_the_stories_bytes(bpe_setup, tmp_path):
    root, model, tokens, stories, enc = bpe_setup
    assert len(tokens) - 1 > 2 * BLOCK  # several windows
    evaluate(root, '--batch_size=2', f'--json_out={tmp_path / "eval.json"}')
    results = json.loads((tmp_path / 'eval.json').read_text())
    expected = by_hand(model, tokens, enc)
    assert expected['bytes'] == sum(len(s.encode('utf-8')) for s in stories)  # <|endoftext|> counts none
    check(results, expected)


def test_bpe_checkpoint_evaluates_data_prepared_elsewhere(bpe_setup, tmp_path):
    """The checkpoint holds its tokenizer: its own data_dir may be gone, eval reads the one it is given."""
    root, model, tokens, _, enc = bpe_setup
    os.rename(root / 'data', tmp_path / 'moved')
    try:
        out = evaluate(root, f'--data_dir={tmp_path / "moved"}', f'--json_out={tmp_path / "eval.json"}')
    finally:
        os.rename(tmp_path / 'moved', root / 'data')
    check(json.loads((tmp_path / 'eval.json').read_text()), by_hand(model, tokens, enc))
    assert str(tmp_path / 'moved') in out


def test_data_of_another_tokenizer_is_refused_in_one_line(setup, bpe_setup, tmp_path):
    import tokenizer
    gpt2_root, bpe_root = setup[0], bpe_setup[0]
    other = {'name': 'bpe:300', 'json': tokenizer.train_bpe(STORIES[:2] * 5, 300)}  # other train documents
    write_bpe(tmp_path / 'other', other, [0, 1, 2, 3])
    for root, data_dir, data, ckpt in ((bpe_root, gpt2_root / 'data', 'gpt2', 'bpe:300'),
                                       (gpt2_root, bpe_root / 'data', 'bpe:300', 'gpt2'),
                                       (bpe_root, tmp_path / 'other', 'bpe:300', 'another bpe:300, trained on other documents')):
        with pytest.raises(SystemExit) as e:
            evaluate(root, f'--data_dir={data_dir}')
        says = f"error: {data_dir} was prepared with tokenizer {data}, but {root / 'best.pt'} was trained with {ckpt}: "
        assert str(e.value).startswith(says + "use data prepared with the checkpoint's tokenizer")
        assert '\n' not in str(e.value)
