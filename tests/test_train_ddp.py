"""train.py under torchrun on the CPU (gloo): any process count, and an exact resume of every process's
random state."""
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from common import load_checkpoint
from conftest import ENV, ROOT, TINY, metrics


needs_gloo = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason='no torch.distributed with gloo')


def torchrun(nproc, data_dir, out_dir, *args, env=ENV):
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}', 'train.py',
           f'--data_dir={data_dir}', f'--out_dir={out_dir}', *TINY, *args]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr
    return run


@needs_gloo
@pytest.mark.parametrize('nproc', [2, 3])
def test_ddp_on_cpu_processes_with_any_count(nproc, data, out):
    # gradient_accumulation_steps=2 over 3 processes rounds up to 1 micro-step each: 3 x 1 x 8 x 16 tokens per step.
    # train.py compares every process's weights at the end and fails if DDP let them drift apart
    # each process computes with its share of the cores, not with the OMP_NUM_THREADS that torchrun passes on
    run = torchrun(nproc, data, out, '--gradient_accumulation_steps=2', '--max_iters=10', '--eval_interval=5',
                   '--lr_decay_iters=10', env={**ENV, 'OMP_NUM_THREADS': '4'})
    share = max(1, len(os.sched_getaffinity(0)) // nproc)
    assert f"{nproc} x cpu with {share} thread{'s' * (share > 1)} each, float32" in run.stderr
    assert f'{nproc * 128} tokens per step ({nproc} processes x 1 micro-step x 8 x 16 tokens)' in run.stderr
    assert load_checkpoint(out / 'last.pt')['iter_num'] == 10
    evals = [r for r in metrics(out) if 'val_loss' in r]
    assert evals[-1]['val_loss'] < evals[0]['val_loss']


@needs_gloo
def test_ddp_resume_is_exact(data, tmp_path):
    # each process draws its own batches and dropout masks: every one's random state must come back
    args = ['--eval_interval=3', '--lr_decay_iters=6', '--dropout=0.2', '--gradient_accumulation_steps=2']
    torchrun(2, data, tmp_path / 'straight', '--max_iters=6', *args)
    torchrun(2, data, tmp_path / 'halves', '--max_iters=3', *args)
    torchrun(2, data, tmp_path / 'halves', '--max_iters=6', '--init_from=resume', *args)
    straight = load_checkpoint(tmp_path / 'straight' / 'last.pt')
    halves = load_checkpoint(tmp_path / 'halves' / 'last.pt')
    assert halves['iter_num'] == 6 and len(halves['rng']) == 2  # one random state per process
    for name, weight in straight['model'].items():
        assert torch.equal(weight, halves['model'][name]), name
    assert straight['best_val_loss'] == halves['best_val_loss']
    run = torchrun(3, data, tmp_path / 'halves', '--max_iters=7', '--init_from=resume', *args)
    assert 'last.pt holds the random states of 2 processes, not 3' in run.stderr
