"""train.py end to end, as a user runs it, on a tiny model and made-up token files (conftest's): a run's
outputs and schedule, the log, compiled training, fine-tuning, evaluation only, early stopping and the
batches the model reads. Resume, out_dir's safety, DDP and settings have files of their own."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from common import load_checkpoint
from conftest import ENV, ROOT, TINY, VOCAB, cycles, metrics, train, write_tokens


def test_a_run_writes_checkpoints_metrics_and_plot_and_learns(trained):
    for name in ('last.pt', 'best.pt', 'metrics.jsonl', 'loss.png'):
        assert os.path.isfile(os.path.join(trained, name))
    with open(os.path.join(trained, 'loss.png'), 'rb') as f:
        assert f.read(8) == b'\x89PNG\r\n\x1a\n'
    evals = [r for r in metrics(trained) if 'val_loss' in r]
    assert [r['iter'] for r in evals] == [0, 10, 20, 30]
    assert evals[-1]['val_loss'] < 0.6 * evals[0]['val_loss']  # from ln(64) = 4.16 on learnable data
    steps = [r for r in metrics(trained) if 'loss' in r]
    assert len(steps) == 30 and {'lr', 'ms_per_iter', 'tokens_per_s', 'mfu'} <= set(steps[0])

    ckpt = load_checkpoint(os.path.join(trained, 'last.pt'))  # torch.load(weights_only=True)
    assert set(ckpt) == {'model', 'model_args', 'iter_num', 'best_val_loss', 'config', 'started_from', 'optimizer',
                         'scaler', 'rng', 'tokenizer'}
    assert ckpt['iter_num'] == 30 and ckpt['scaler'] is None and ckpt['tokenizer'] == {'name': 'gpt2', 'json': None}
    assert ckpt['best_val_loss'] == pytest.approx(min(r['val_loss'] for r in evals))
    assert ckpt['model_args'] == dict(n_layer=2, n_head=2, n_embd=32, block_size=16, bias=True, vocab_size=VOCAB,
                                      dropout=0.1)
    assert ckpt['config']['max_iters'] == 30 and not any(k.startswith(('_orig_mod.', 'module.')) for k in ckpt['model'])
    assert len(ckpt['rng']) == 1 and set(ckpt['rng'][0]) == {'python', 'numpy', 'torch', 'cuda'}
    best = load_checkpoint(os.path.join(trained, 'best.pt'))
    assert best['iter_num'] == min(evals, key=lambda r: r['val_loss'])['iter']


def test_learning_rate_schedule(data, trained, out):
    """Linear warmup to learning_rate, cosine down to min_lr at lr_decay_iters, then min_lr: values by hand.
    A step row of metrics.jsonl at iter k logs the lr of step k - 1; an evaluation row, that of step k."""
    step_lr = {r['iter'] - 1: r['lr'] for r in metrics(trained) if 'loss' in r}
    # warmup_iters=2, learning_rate=1e-2, min_lr=1e-3, lr_decay_iters=30: halfway through the cosine at 2 + 28 / 2
    assert [step_lr[0], step_lr[1], step_lr[2]] == pytest.approx([1e-2 / 3, 2e-2 / 3, 1e-2])
    assert step_lr[16] == pytest.approx(1e-3 + 0.5 * 9e-3)
    assert step_lr[9] == pytest.approx(1e-3 + 9e-3 * (1 + np.cos(np.pi * 7 / 28)) / 2)
    train(data, out, '--max_iters=7', '--eval_interval=100', '--warmup_iters=0', '--lr_decay_iters=4')
    lrs = [r['lr'] for r in metrics(out) if 'loss' in r]
    assert lrs == pytest.approx([1e-2, 1e-3 + 9e-3 * (1 + np.cos(np.pi / 4)) / 2, 5.5e-3,
                                 1e-3 + 9e-3 * (1 + np.cos(3 * np.pi / 4)) / 2, 1e-3, 1e-3, 1e-3])  # the floor past 4


def test_the_log_counts_processes_and_threads_and_warns_of_a_run_that_only_warms_up(data, out):
    run = train(data, out, '--max_iters=2', '--warmup_iters=5', '--threads=2')  # ENV's OMP_NUM_THREADS=1 says 1
    assert '(1 process x 1 micro-step x 8 x 16 tokens), 1 x cpu with 2 threads, float32' in run.stderr
    assert 'warning: warmup_iters=5 is not below max_iters=2: the learning rate only warms up' in run.stderr


def test_compiled_training_on_the_cpu_learns_as_eager(data, tmp_path):
    """--compile=True on the CPU: without dropout the losses of eager training to float rounding, and the checkpoint
    has the bare model's names; with dropout (aten's random numbers in inductor's graph) it learns too."""
    args = ['--max_iters=8', '--eval_interval=4', '--lr_decay_iters=8']
    for name, extra in (('eager', []), ('compiled', ['--compile=True']), ('dropout', ['--compile=True', '--dropout=0.1'])):
        train(data, tmp_path / name, *args, *extra, *(['--dropout=0.0'] if name != 'dropout' else []))
    evals = {name: [r['val_loss'] for r in metrics(tmp_path / name) if 'val_loss' in r]
             for name in ('eager', 'compiled', 'dropout')}
    assert evals['compiled'] == pytest.approx(evals['eager'], rel=1e-3)
    assert evals['dropout'][-1] < 0.9 * evals['dropout'][0]
    ckpt = load_checkpoint(tmp_path / 'compiled' / 'last.pt')
    assert not any(k.startswith('_orig_mod.') for k in ckpt['model'])


def test_finetune_from_a_checkpoint_with_a_shorter_block(data, trained, out):
    train(data, out, f'--init_from={trained}/best.pt', '--block_size=8', '--max_iters=4', '--eval_interval=2',
          '--learning_rate=1e-3')
    ckpt = load_checkpoint(out / 'last.pt')
    assert ckpt['iter_num'] == 4 and ckpt['model_args']['block_size'] == 8
    assert ckpt['model']['transformer.wpe.weight'].shape == (8, 32)
    first = metrics(out)[0]
    assert first['iter'] == 0 and first['val_loss'] < 0.6 * np.log(VOCAB)  # starts from the trained weights


def test_eval_only_prints_the_losses_and_writes_nothing(data, trained, tmp_path):
    run = train(data, tmp_path, f'--init_from={trained}/best.pt', '--eval_only=True')
    train_loss, val_loss = (float(word.strip(',')) for word in run.stdout.split()[2::3])
    assert run.stdout.startswith('train loss') and max(train_loss, val_loss) < 0.6 * np.log(VOCAB)
    assert os.listdir(tmp_path) == []


def test_early_stopping(tmp_path):
    # validation runs count down while training runs count up: learning makes it worse
    data = write_tokens(tmp_path / 'data', cycles(20000, 0), cycles(4000, 1, step=-1))
    run = train(data, tmp_path / 'out', '--max_iters=500', '--eval_interval=5', '--patience=2')
    assert 'early stop' in run.stderr
    evals = [r for r in metrics(tmp_path / 'out') if 'val_loss' in r]
    assert len(evals) < 100 / 5
    assert load_checkpoint(tmp_path / 'out' / 'last.pt')['iter_num'] == evals[-1]['iter']


# train.py with what its model reads recorded: every batch the model is given, and every draw of torch.randint
# (get_batch draws the rows' starts with it), saved to $RECORD when the run ends
RECORDED = """
import os, runpy, sys, torch
import model
batches, draws = [], []
forward, randint = model.GPT.forward, torch.randint

def recorded_forward(self, idx, targets=None):
    batches.append((idx, targets))
    return forward(self, idx, targets)

def recorded_randint(*args, **kwargs):
    draws.append((args, randint(*args, **kwargs)))
    return draws[-1][1]

model.GPT.forward, torch.randint = recorded_forward, recorded_randint
sys.argv = sys.argv[1:]
runpy.run_path('train.py', run_name='__main__')
torch.save({'batches': batches, 'draws': draws}, os.environ['RECORD'])
"""


def test_each_batch_is_the_rows_that_nanogpts_slicing_gave_for_the_same_draws(data, tmp_path):
    """The batches the model trains and evaluates on: row i is the block_size tokens from the i-th start that
    torch.randint drew, its targets the same one token on, as nanoGPT sliced them row by row, and the starts
    drawn as nanoGPT drew them: the same seed still trains on the same data."""
    cmd = [sys.executable, '-c', RECORDED, 'train.py', f'--data_dir={data}', f'--out_dir={tmp_path / "out"}', *TINY,
           '--max_iters=2', '--eval_interval=2']
    run = subprocess.run(cmd, cwd=ROOT, env={**ENV, 'RECORD': str(tmp_path / 'record.pt')}, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    recorded = torch.load(tmp_path / 'record.pt')
    evaluation = ['train'] * 4 + ['validation'] * 4  # eval_iters batches of each split
    splits = evaluation + ['train'] * 2 + evaluation  # evaluations at iters 0 and 2, and a batch for each step
    assert len(recorded['batches']) == len(recorded['draws']) == len(splits)
    for split, (x, y), (args, ix) in zip(splits, recorded['batches'], recorded['draws']):
        tokens = np.fromfile(os.path.join(data, f'{split}.bin'), dtype=np.uint16)
        assert args == (len(tokens) - 16, (8,))  # nanoGPT's torch.randint(len(data) - block_size, (batch_size,))
        assert x.dtype == y.dtype == torch.int64
        assert torch.equal(x, torch.stack([torch.from_numpy(tokens[i:i + 16].astype(np.int64)) for i in ix]))
        assert torch.equal(y, torch.stack([torch.from_numpy(tokens[i + 1:i + 17].astype(np.int64)) for i in ix]))
