"""The README's bpe flow end to end, as a user runs it, on the tiny fixture: prepare.py
--tokenizer=bpe:N, train.py, then sample.py and eval.py from the checkpoint alone after the
training data_dir is deleted, and the refusals of data made with another tokenizer."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from common import load_checkpoint
from conftest import ROOT, TINYSTORIES, needs_shared, needs_tokenizer
from tokenizer import get_tokenizer

pytestmark = [needs_shared, needs_tokenizer]
FIXTURE = os.path.join(TINYSTORIES, 'tiny-fixture.txt')
TINY = ['--n_layer=1', '--n_head=2', '--n_embd=16', '--block_size=32', '--batch_size=4', '--gradient_accumulation_steps=1',
        '--eval_iters=2', '--eval_interval=4', '--max_iters=4', '--lr_decay_iters=4', '--warmup_iters=1',
        '--dtype=float32', '--device=cpu']


def run(tmp, script, *args):
    """`python script args` from the repository root; one thread, as tests/test_train.py explains."""
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'HF_DATASETS_CACHE': str(tmp / 'hf-cache')}
    return subprocess.run([sys.executable, script, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def ok(r):
    assert r.returncode == 0, r.stderr
    return r


def refused(r, message):
    """One error line that matches message, and no traceback."""
    assert r.returncode == 1 and 'Traceback' not in r.stderr, r.stderr
    assert re.match(message, r.stderr.strip().splitlines()[-1]), r.stderr


def prepare(tmp, data_dir, *args):
    return ok(run(tmp, 'prepare.py', f'--source={FIXTURE}', f'--val_source={FIXTURE}', f'--data_dir={data_dir}', *args))


def story_docs(path):
    with open(path, encoding='utf-8') as f:
        return [p.strip() for p in re.split(r'^<\|endoftext\|>$', f.read(), flags=re.M) if p.strip()]


@pytest.fixture(scope='module')
def flow(tmp_path_factory):
    """Prepare bpe:512 data, train on it, keep its tokenizer.json, then delete the data_dir."""
    tmp = tmp_path_factory.mktemp('flow')
    prepare(tmp, tmp / 'data', '--tokenizer=bpe:512')
    with open(tmp / 'data' / 'meta.json') as f:
        meta = json.load(f)
    tokenizer_json = (tmp / 'data' / 'tokenizer.json').read_text(encoding='utf-8')
    ok(run(tmp, 'train.py', f'--data_dir={tmp / "data"}', f'--out_dir={tmp / "out"}', *TINY))
    shutil.rmtree(tmp / 'data')
    return tmp, meta, tokenizer_json


def test_prepare_writes_the_same_tokenizer_again(flow):
    tmp, meta, tokenizer_json = flow
    assert re.fullmatch(r'bpe:\d+', meta['tokenizer']) and meta['vocab_size'] <= 512
    assert meta['eot_token'] == meta['vocab_size'] - 1 and meta['dtype'] == 'uint16'
    prepare(tmp, tmp / 'again', '--tokenizer=bpe:512')
    assert (tmp / 'again' / 'tokenizer.json').read_text(encoding='utf-8') == tokenizer_json


def test_checkpoint_holds_the_tokenizer(flow):
    tmp, meta, tokenizer_json = flow
    for name in ('best.pt', 'last.pt'):
        assert load_checkpoint(str(tmp / 'out' / name))['tokenizer'] == {'name': meta['tokenizer'], 'json': tokenizer_json}


def test_sample_without_the_data_dir(flow):
    tmp, _, _ = flow
    assert not (tmp / 'data').exists()
    r = ok(run(tmp, 'sample.py', f'--out_dir={tmp / "out"}', '--start=Once upon a time', '--max_new_tokens=30',
               '--device=cpu'))
    assert r.stdout.startswith('Once upon a time') and len(r.stdout) > len('Once upon a time\n')


def test_eval_counts_the_bytes_of_the_stories(flow):
    """eval reads the data_dir it is given: the same command prepared it again, with the same tokenizer."""
    tmp, _, _ = flow
    prepare(tmp, tmp / 'again', '--tokenizer=bpe:512')  # nothing to do if the test above ran
    ok(run(tmp, 'eval.py', f'--out_dir={tmp / "out"}', f'--data_dir={tmp / "again"}', f'--json_out={tmp / "eval.json"}',
           '--device=cpu'))
    results = json.loads((tmp / 'eval.json').read_text())
    enc = get_tokenizer(load_checkpoint(str(tmp / 'out' / 'best.pt'))['tokenizer'])
    docs = story_docs(FIXTURE)
    first = enc.decode_single_token_bytes(enc.encode_ordinary(docs[0])[0])  # the one token not predicted
    assert results['bytes'] == sum(len(d.encode('utf-8')) for d in docs) - len(first)


def test_data_of_another_tokenizer_is_refused(flow):
    tmp, meta, _ = flow
    out, best = tmp / 'out', tmp / 'out' / 'best.pt'
    prepare(tmp, tmp / 'gpt2')
    prepare(tmp, tmp / 'small', '--tokenizer=bpe:300')
    prepare(tmp, tmp / 'again', '--tokenizer=bpe:512')
    refused(run(tmp, 'eval.py', f'--out_dir={out}', f'--data_dir={tmp / "gpt2"}', '--device=cpu'),
            f"error: {re.escape(str(tmp / 'gpt2'))} was prepared with tokenizer gpt2, but {re.escape(str(best))} "
            f"was trained with {meta['tokenizer']}: ")
    for data, init_from, ckpt in (('gpt2', best, best), ('small', best, best), ('small', 'resume', out / 'last.pt')):
        out_dir = out if init_from == 'resume' else tmp / 'elsewhere'  # a fine-tune may not overwrite out
        refused(run(tmp, 'train.py', f'--data_dir={tmp / data}', f'--out_dir={out_dir}', f'--init_from={init_from}', *TINY),
                f"error: {re.escape(str(tmp / data))} was prepared with tokenizer (gpt2|bpe:300), but "
                f"{re.escape(str(ckpt))} was trained with {meta['tokenizer']}: ")
    ok(run(tmp, 'train.py', f'--data_dir={tmp / "again"}', f'--out_dir={tmp / "tuned"}', f'--init_from={best}', *TINY))


def test_the_cpu_config_trains_and_samples_as_run_sh_runs_it(tmp_path):
    # run.sh's recipe (Llama blocks with ReLU², Muon, a trained BPE with BPE-dropout, compiled) for a few steps: the
    # config's settings pass train.py's checks and the checkpoint holds its options and the average
    prepare(tmp_path, tmp_path / 'data', '--tokenizer=bpe:512', '--bpe_dropout=0.1')
    ok(run(tmp_path, 'train.py', 'config/cpu.py', f'--data_dir={tmp_path / "data"}', f'--out_dir={tmp_path / "out"}',
           '--max_iters=3', '--lr_decay_iters=3', '--warmup_iters=1', '--eval_interval=3', '--eval_iters=1',
           '--block_size=32', '--dtype=float32', '--device=cpu'))
    ckpt = load_checkpoint(str(tmp_path / 'out' / 'best.pt'))
    args = ckpt['model_args']
    assert (args['pos_emb'], args['norm'], args['mlp'], args['bias']) == ('rope', 'rmsnorm', 'relu2', False)
    assert ckpt['ema_updates'] == 3 and ckpt['trained_model'].keys() == ckpt['model'].keys()
    r = ok(run(tmp_path, 'sample.py', f'--out_dir={tmp_path / "out"}', '--num_samples=1', '--max_new_tokens=5',
               '--start=Once', '--dtype=float32', '--device=cpu'))
    assert r.stdout.startswith('Once')
