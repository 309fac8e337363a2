"""train.py end to end, as a user runs it, on a tiny model and made-up token files: a run's
outputs, exact resume, fine-tuning, early stopping, signals, divergence, DDP and bad data."""
import importlib.util
import json
import os
import runpy
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist

from common import load_checkpoint
from conftest import ROOT

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


def write_data(data_dir, train, val, dtype='uint16', meta_dtype=None):
    os.makedirs(data_dir, exist_ok=True)
    for split, tokens in (('train', train), ('validation', val)):
        np.asarray(tokens, dtype=dtype).tofile(os.path.join(data_dir, f'{split}.bin'))
    meta = {'dtype': meta_dtype or dtype, 'vocab_size': VOCAB, 'eot_token': VOCAB - 1,
            'train': {'tokens': len(train), 'documents': 1}, 'validation': {'tokens': len(val), 'documents': 1}}
    with open(os.path.join(data_dir, 'meta.json'), 'w') as f:
        json.dump(meta, f)
    return str(data_dir)


def train(data_dir, out_dir, *args, ok=True):
    cmd = [sys.executable, 'train.py', f'--data_dir={data_dir}', f'--out_dir={out_dir}', *TINY, *args]
    run = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    if ok:
        assert run.returncode == 0, run.stderr
    return run


def metrics(out_dir):
    with open(os.path.join(out_dir, 'metrics.jsonl')) as f:
        return [json.loads(line) for line in f]


def assert_error(run, hint):
    assert run.returncode == 1
    assert 'Traceback' not in run.stderr
    assert run.stderr.strip().splitlines()[-1].startswith('error: ') and hint in run.stderr, run.stderr


@pytest.fixture
def out(tmp_path):
    """A run's out_dir inside the test's own folder, where its lock (.out.lock, beside it) lands too."""
    return tmp_path / 'out'


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp('data'), cycles(20000, 0), cycles(4000, 1))


@pytest.fixture(scope='module')
def trained(data, tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp('trained') / 'out')
    train(data, out_dir, '--max_iters=30', '--eval_interval=10', '--lr_decay_iters=30', '--dropout=0.1')
    return out_dir


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


def test_derived_settings_follow_overrides(data, out):
    """lr_decay_iters, min_lr and muon_learning_rate left unset follow max_iters and learning_rate as given
    last: config/cpu.py --max_iters=6 --learning_rate=1e-2 decays over 6 steps to 1e-3, Muon's rate too."""
    args = [a for a in TINY if not a.startswith('--min_lr')]
    run = subprocess.run([sys.executable, 'train.py', 'config/cpu.py', f'--data_dir={data}', f'--out_dir={out}', *args,
                          '--max_iters=6', '--eval_interval=6', '--learning_rate=1e-2', '--compile=False'],
                         cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    ckpt = load_checkpoint(out / 'last.pt')
    assert {k: ckpt['config'][k] for k in ('lr_decay_iters', 'min_lr', 'muon_learning_rate')} == dict(
        lr_decay_iters=6, min_lr=pytest.approx(1e-3), muon_learning_rate=1e-2)
    last = metrics(out)[-1]
    assert last['iter'] == 6 and last['lr'] == pytest.approx(1e-3)
    groups = [g for opt in ('muon', 'adamw') for g in ckpt['optimizer'][opt]['param_groups']]
    assert [g['lr'] for g in groups] == pytest.approx([1e-3] * len(groups))  # every group at the end of its decay


def test_the_log_counts_processes_and_threads_and_warns_of_a_run_that_only_warms_up(data, out):
    run = train(data, out, '--max_iters=2', '--warmup_iters=5', '--threads=2')  # ENV's OMP_NUM_THREADS=1 says 1
    assert '(1 process x 1 micro-step x 8 x 16 tokens), 1 x cpu with 2 threads, float32' in run.stderr
    assert 'warning: warmup_iters=5 is not below max_iters=2: the learning rate only warms up' in run.stderr


def test_resume_is_exact(data, tmp_path):
    # dropout and accumulation exercise the random state and the optimizer state in the checkpoint
    args = ['--eval_interval=4', '--lr_decay_iters=16', '--dropout=0.2', '--gradient_accumulation_steps=2']
    train(data, tmp_path / 'straight', '--max_iters=16', *args)
    train(data, tmp_path / 'halves', '--max_iters=8', *args)
    run = train(data, tmp_path / 'halves', '--max_iters=16', '--init_from=resume', *args)
    assert 'resumed from iter 8 of 16' in run.stderr
    straight = load_checkpoint(tmp_path / 'straight' / 'last.pt')
    halves = load_checkpoint(tmp_path / 'halves' / 'last.pt')
    assert halves['iter_num'] == 16
    for name, weight in straight['model'].items():
        assert torch.equal(weight, halves['model'][name]), name
    assert straight['best_val_loss'] == halves['best_val_loss']

    def losses(out_dir):
        return [(r['iter'], r.get('loss'), r.get('val_loss')) for r in metrics(out_dir)]
    assert losses(tmp_path / 'straight') == losses(tmp_path / 'halves')  # the log continues where last.pt left off


def test_ema_averages_the_trained_weights_and_resumes_exactly(data, tmp_path):
    """--ema=0.8: after two steps the saved model is 0.8 w1 + 0.2 w2 (the average starts at the first step's
    weights, w1 and w2 from a run without it: the average never changes the training), and a resumed run ends
    with the same average and weights as one that never stopped."""
    args = ['--eval_interval=2', '--lr_decay_iters=8']
    for name, steps in (('one', 1), ('two', 2)):
        train(data, tmp_path / name, f'--max_iters={steps}', *args)
    w1, w2 = (load_checkpoint(tmp_path / name / 'last.pt')['model'] for name in ('one', 'two'))
    train(data, tmp_path / 'ema', '--max_iters=2', '--ema=0.8', *args)
    ema = load_checkpoint(tmp_path / 'ema' / 'last.pt')
    assert ema['ema_updates'] == 2
    for name in w2:
        assert torch.equal(ema['trained_model'][name], w2[name]), name
        torch.testing.assert_close(ema['model'][name], 0.8 * w1[name] + 0.2 * w2[name])
    assert not torch.equal(ema['model']['lm_head.weight'], w2['lm_head.weight'])

    args += ['--ema=0.8', '--dropout=0.2']
    train(data, tmp_path / 'straight', '--max_iters=6', *args)
    train(data, tmp_path / 'halves', '--max_iters=4', *args)
    train(data, tmp_path / 'halves', '--max_iters=6', '--init_from=resume', *args)
    straight, halves = (load_checkpoint(tmp_path / name / 'last.pt') for name in ('straight', 'halves'))
    for key in ('model', 'trained_model'):
        for name, weight in straight[key].items():
            assert torch.equal(weight, halves[key][name]), (key, name)
    assert [r.get('val_loss') for r in metrics(tmp_path / 'straight')] == [r.get('val_loss') for r in metrics(tmp_path / 'halves')]


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



def test_a_new_run_never_overwrites_a_trained_model(data, trained, tmp_path):
    out_dir = tmp_path / 'out'
    shutil.copytree(trained, out_dir)
    before = {name: (out_dir / name).read_bytes() for name in os.listdir(out_dir)}
    for args in ([], [f'--init_from={trained}/best.pt']):  # from scratch, or fine-tuning
        run = train(data, out_dir, '--max_iters=2', *args, ok=False)
        assert_error(run, f'{out_dir} already holds best.pt, last.pt')
        for way in ('--init_from=resume', 'another --out_dir', '--overwrite=True'):
            assert way in run.stderr
        assert {name: (out_dir / name).read_bytes() for name in os.listdir(out_dir)} == before
    # what a second `bash run.sh` does: resume, and a finished run ends at once, changing nothing, and says why
    run = train(data, out_dir, '--max_iters=30', '--init_from=resume', '--eval_interval=10', '--lr_decay_iters=30')
    assert 'last.pt is at iter 30, so max_iters=30 is already reached and there is nothing to train' in run.stderr
    assert 'to train further, raise --max_iters above 30' in run.stderr
    assert {name: (out_dir / name).read_bytes() for name in os.listdir(out_dir)} == before
    train(data, out_dir, '--max_iters=2', '--overwrite=True')
    assert load_checkpoint(out_dir / 'last.pt')['iter_num'] == 2

def test_eval_only_prints_the_losses_and_writes_nothing(data, trained, tmp_path):
    run = train(data, tmp_path, f'--init_from={trained}/best.pt', '--eval_only=True')
    train_loss, val_loss = (float(word.strip(',')) for word in run.stdout.split()[2::3])
    assert run.stdout.startswith('train loss') and max(train_loss, val_loss) < 0.6 * np.log(VOCAB)
    assert os.listdir(tmp_path) == []


def test_a_checkpoint_of_another_shape_is_an_error(data, trained, out):
    run = train(data, out, f'--init_from={trained}/last.pt', '--n_embd=64', ok=False)
    assert_error(run, 'n_embd=32 (the config says 64)')
    run = train(data, trained, '--init_from=resume', '--n_layer=3', ok=False)
    assert_error(run, 'n_layer=2 (the config says 3)')


def test_early_stopping(tmp_path):
    # validation runs count down while training runs count up: learning makes it worse
    data = write_data(tmp_path / 'data', cycles(20000, 0), cycles(4000, 1, step=-1))
    run = train(data, tmp_path / 'out', '--max_iters=500', '--eval_interval=5', '--patience=2')
    assert 'early stop' in run.stderr
    evals = [r for r in metrics(tmp_path / 'out') if 'val_loss' in r]
    assert len(evals) < 100 / 5
    assert load_checkpoint(tmp_path / 'out' / 'last.pt')['iter_num'] == evals[-1]['iter']


def test_sigterm_finishes_the_step_saves_and_exits(data, out):
    cmd = [sys.executable, 'train.py', f'--data_dir={data}', f'--out_dir={out}', *TINY, '--max_iters=100000',
           '--eval_interval=100000', '--lr_decay_iters=100000']
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stderr=subprocess.PIPE, text=True)
    try:
        assert any(line.startswith('iter 3:') for line in proc.stderr)  # stops reading there
    finally:
        proc.send_signal(signal.SIGTERM)
    rest = proc.communicate(timeout=60)[1]
    assert proc.returncode == 128 + signal.SIGTERM, rest
    ckpt = load_checkpoint(out / 'last.pt')
    assert 3 <= ckpt['iter_num'] < 100  # saved at the signal, not at the evaluation of iter 0
    train(data, out, '--init_from=resume', f"--max_iters={ckpt['iter_num'] + 2}", '--lr_decay_iters=100000')



# train.py with its checkpoint writes hooked: HOOK=kill-after-N dies as kill -9 would once N checkpoints are
# in place, HOOK=kill-in-N dies halfway through writing the Nth, HOOK=full-in-N finds the disk full there (and
# raises as torch.save does then: a RuntimeError, the OSError its context)
HOOKED = """
import contextlib, errno, os, runpy, sys
import common, torch
atomic_output, hook, n = common.atomic_output, *os.environ['HOOK'].rsplit('-', 1)
saved = []

@contextlib.contextmanager
def hooked_output(path):
    with atomic_output(path) as tmp:
        yield tmp
    saved.extend([path] if path.endswith('.pt') else [])
    if hook == 'kill-after' and len(saved) == int(n):
        os._exit(137)

def hooked_save(obj, f):
    if len(saved) + 1 == int(n) and hook in ('kill-in', 'full-in'):
        f.write(b'half a checkpoint')
        f.flush()
        if hook == 'kill-in':
            os._exit(137)
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError:
            raise RuntimeError('[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598')
    torch_save(obj, f)

common.atomic_output, torch_save, torch.save = hooked_output, torch.save, hooked_save
sys.argv = sys.argv[1:]
runpy.run_path('train.py', run_name='__main__')
"""


def hooked_train(hook, data_dir, out_dir, *args):
    cmd = [sys.executable, '-c', HOOKED, 'train.py', f'--data_dir={data_dir}', f'--out_dir={out_dir}', *TINY, *args]
    return subprocess.run(cmd, cwd=ROOT, env={**ENV, 'HOOK': hook}, capture_output=True, text=True, timeout=120)


def test_a_kill_between_checkpoint_writes_never_leaves_best_pt_behind_last_pt(data, out):
    # evaluations at 0 and 5 both improve and write two checkpoints each; die after the third write
    run = hooked_train('kill-after-3', data, out, '--max_iters=10', '--eval_interval=5', '--lr_decay_iters=10')
    assert run.returncode == 137, run.stderr
    best, last = load_checkpoint(out / 'best.pt'), load_checkpoint(out / 'last.pt')
    assert best['iter_num'] == 5 and last['iter_num'] == 0
    assert best['best_val_loss'] <= last['best_val_loss']  # the best model is never older than last.pt's record


def test_files_a_kill_left_half_written_are_removed_at_the_next_start(data, out):
    run = hooked_train('kill-in-3', data, out, '--max_iters=10', '--eval_interval=5', '--lr_decay_iters=10')
    assert run.returncode == 137, run.stderr
    stale = [name for name in os.listdir(out) if '.pt.tmp' in name]
    assert len(stale) == 1
    live = out / f'last.pt.tmp{os.getpid()}'  # a process still writing it: left alone
    live.write_bytes(b'')
    run = train(data, out, '--max_iters=10', '--eval_interval=5', '--lr_decay_iters=10', '--init_from=resume')
    assert f'removed {os.path.join(out, stale[0])}' in run.stderr
    assert sorted(n for n in os.listdir(out) if '.tmp' in n) == [live.name]


def test_a_full_disk_while_saving_keeps_the_old_checkpoint(data, out):
    run = hooked_train('full-in-3', data, out, '--max_iters=10', '--eval_interval=5', '--lr_decay_iters=10')
    assert_error(run, 'No space left on device')
    assert 'keeps its previous version' in run.stderr
    assert load_checkpoint(out / 'last.pt')['iter_num'] == 0
    assert not [name for name in os.listdir(out) if '.tmp' in name]


@pytest.fixture
def small_disk(tmp_path):
    """A real 2 MB filesystem (a tmpfs), unmounted after the test: a full disk as a user meets one."""
    disk = tmp_path / 'disk'
    disk.mkdir()
    mount = shutil.which('mount') and subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=2m', 'tmpfs', str(disk)],
                                                     capture_output=True, text=True)
    if not mount or mount.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mount.stderr.strip() if mount else 'no mount command'}")
    yield disk
    subprocess.run(['umount', str(disk)], check=True)


def test_a_real_full_disk_keeps_training_then_stops_at_the_checkpoint_keeping_the_old_one(data, small_disk):
    out = small_disk / 'out'
    train(data, out, '--max_iters=4', '--eval_interval=4')
    before = {name: (out / name).read_bytes() for name in ('last.pt', 'metrics.jsonl')}
    fd = os.open(small_disk / 'filler', os.O_WRONLY | os.O_CREAT)
    with pytest.raises(OSError, match='No space left on device'):
        while True:
            os.write(fd, bytes(1 << 16))
    os.close(fd)
    # metrics.jsonl's last page has room for a few rows, not for 36 more
    run = train(data, out, '--max_iters=40', '--eval_interval=40', '--init_from=resume', ok=False)
    # one line for each file it could not write, and it trains on to the checkpoint, which it cannot save
    assert run.stderr.count(f'warning: cannot write {out}/metrics.jsonl: No space left on device') == 1
    assert f'warning: cannot write {out}/loss.png: No space left on device' in run.stderr
    assert_error(run, 'at iter 40: No space left on device (disk full?); it keeps its previous version')
    assert (out / 'last.pt').read_bytes() == before['last.pt']
    log = (out / 'metrics.jsonl').read_text()
    assert log.startswith(before['metrics.jsonl'].decode()) and log.endswith('\n')  # whole rows only
    assert [json.loads(row)['iter'] for row in log.splitlines()][-1] < 40
    assert not [name for name in os.listdir(out) if '.tmp' in name]


def test_one_run_per_out_dir(data, out):
    cmd = [sys.executable, 'train.py', f'--data_dir={data}', f'--out_dir={out}', *TINY, '--max_iters=100000',
           '--eval_interval=100000']
    first = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stderr=subprocess.PIPE, text=True)
    try:
        assert any(line.startswith('iter 1:') for line in first.stderr)  # training, so holding the lock
        run = train(data, out, '--max_iters=2', '--overwrite=True', ok=False)
        assert_error(run, f'{out} is in use by process {first.pid} (train.py --data_dir={data}')
        assert 'wait for it to end, or choose another --out_dir' in run.stderr
    finally:
        first.kill()  # as kill -9: its lock file stays behind, naming it
        first.communicate(timeout=60)
    assert f'process {first.pid}' in (out.parent / '.out.lock').read_text()
    train(data, out, '--max_iters=2', '--init_from=resume')  # the kernel dropped the dead run's lock: taken over
    assert load_checkpoint(out / 'last.pt')['iter_num'] == 2


def test_missing_data_names_the_prepare_command_that_makes_it(tmp_path):
    data = tmp_path / 'stories-bpe300'  # the tokenizer the name asks for, as run.sh's data/sample-bpe4096
    args = ['--max_iters=2', '--eval_interval=2']
    run = train(data, tmp_path / 'out', *args, ok=False)
    hint = f'python prepare.py --tokenizer=bpe:300 --data_dir={data}'
    assert_error(run, f'make it with `{hint}`')
    rng = np.random.default_rng(0)
    words = [''.join(rng.choice(list('abcdefghijkl'), rng.integers(2, 7))) for _ in range(300)]
    (tmp_path / 'stories.txt').write_text('\n<|endoftext|>\n'.join(' '.join(rng.choice(words, 30)) for _ in range(100)))
    # the hint as given, with the user's own text for the hub's
    prepare = subprocess.run([sys.executable, *hint.split()[1:], f'--source={tmp_path}/stories.txt'], cwd=ROOT, env=ENV,
                             capture_output=True, text=True, timeout=120)
    assert prepare.returncode == 0, prepare.stderr
    train(data, tmp_path / 'out', *args)  # the command that failed now works
    assert load_checkpoint(tmp_path / 'out' / 'last.pt')['tokenizer']['name'] == 'bpe:300'


def test_a_checkpoint_with_missing_keys_is_an_error(data, trained, tmp_path):
    ckpt = load_checkpoint(os.path.join(trained, 'last.pt'))
    torch.save({**ckpt, 'model_args': {k: v for k, v in ckpt['model_args'].items() if k != 'n_head'}},
               tmp_path / 'no-head.pt')
    run = train(data, tmp_path / 'out', f'--init_from={tmp_path}/no-head.pt', ok=False)
    assert_error(run, "no-head.pt lacks model_args['n_head']")
    os.makedirs(tmp_path / 'weights')
    torch.save({'model': ckpt['model'], 'model_args': ckpt['model_args']}, tmp_path / 'weights' / 'last.pt')
    run = train(data, tmp_path / 'weights', '--init_from=resume', ok=False)
    assert_error(run, 'holds no optimizer, iter_num, best_val_loss, rng to resume from')
    assert f'--init_from={tmp_path}/weights/last.pt' in run.stderr  # fine-tuning it works

def test_divergence_stops_and_keeps_the_last_good_checkpoint(data, out):
    run = train(data, out, '--learning_rate=1e3', '--grad_clip=0', '--warmup_iters=0', '--eval_interval=1',
                '--max_iters=50', ok=False)
    assert_error(run, 'training diverged')
    ckpt = load_checkpoint(out / 'last.pt')
    assert f"last.pt keeps iter {ckpt['iter_num']}" in run.stderr
    assert all(torch.isfinite(w).all() for w in ckpt['model'].values())


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


@pytest.mark.parametrize('problem, hint', [
    ('no data', 'make it with `python prepare.py --data_dir='),
    ('no train.bin', 'make it with `python prepare.py --data_dir='),
    ('meta.json with the wrong dtype', 'run prepare.py again'),
    ('meta.json with a float dtype', 'not uint16 or uint32'),
    ('block_size larger than the data', 'use a smaller --block_size'),
    ('out_dir not writable', 'choose another --out_dir'),
    ('nothing to resume', 'start the run without --init_from=resume'),
    ('tensorboard_log without tensorboard', 'pip install tensorboard'),
    ('wandb_log without wandb', 'pip install wandb'),
])
def test_bad_data_and_setup_are_one_line_errors(problem, hint, tmp_path):
    data = write_data(tmp_path / 'data', cycles(2000, 0), cycles(500, 1))
    out_dir, args = tmp_path / 'out', []
    if problem == 'no data':
        data = tmp_path / 'empty'
    elif problem == 'no train.bin':
        os.remove(tmp_path / 'data' / 'train.bin')
    elif problem == 'meta.json with the wrong dtype':
        write_data(tmp_path / 'data', cycles(2000, 0), cycles(500, 1), meta_dtype='uint32')
    elif problem == 'meta.json with a float dtype':
        write_data(tmp_path / 'data', cycles(2000, 0), cycles(500, 1), dtype='float32')
    elif problem == 'block_size larger than the data':
        args = ['--block_size=1024']
    elif problem == 'out_dir not writable':
        (tmp_path / 'file').write_text('')
        out_dir = tmp_path / 'file' / 'out'  # even root cannot make a directory inside a file
    elif problem == 'nothing to resume':
        args = ['--init_from=resume']
    else:
        module = problem.split('_')[0]
        if importlib.util.find_spec(module):
            pytest.skip(f'{module} is installed')
        args = [f'--{module}_log=True']
    assert_error(train(data, out_dir, *args, ok=False), hint)


@pytest.mark.parametrize('name', ['cpu', 'nano', 'small', 'medium', 'large'])
def test_config_files_set_only_train_settings(name, tmp_path):
    # its own out_dir: the config's (out-cpu/) may hold a user's trained model, which train.py would refuse to replace
    run = subprocess.run([sys.executable, 'train.py', f'config/{name}.py', f'--data_dir={tmp_path}', f'--out_dir={tmp_path}/out'],
                         cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=60)
    assert_error(run, 'make it with `python prepare.py')  # it took every setting; only the data is missing


@pytest.mark.parametrize('arg, rule', [
    ('--eval_iters=0', 'eval_iters >= 1'), ('--gradient_accumulation_steps=0', 'gradient_accumulation_steps >= 1'),
    ('--gradient_accumulation_steps=-2', 'gradient_accumulation_steps >= 1'), ('--grad_clip=-1', 'grad_clip >= 0'),
    ('--max_iters=-1', 'max_iters >= 0'), ('--patience=-1', 'patience >= 0'), ('--batch_size=0', 'batch_size >= 1'),
    ('--block_size=0', 'block_size >= 1'), ('--eval_interval=0', 'eval_interval >= 1'),
    ('--log_interval=0', 'log_interval >= 1'), ('--n_layer=0', 'n_layer >= 1'), ('--n_head=0', 'n_head >= 1'),
    ('--n_embd=33', 'n_embd % n_head == 0, got n_embd=33, n_head=2'), ('--dropout=1.5', '0 <= dropout < 1'),
    ('--dropout=-0.1', '0 <= dropout < 1'), ('--learning_rate=0', 'learning_rate > 0'),
    ('--learning_rate=-1e-3', 'learning_rate > 0'), ('--min_lr=-1e-3', 'min_lr >= 0'), ('--beta1=1', '0 <= beta1 < 1'),
    ('--beta2=1.5', '0 <= beta2 < 1'), ('--weight_decay=-0.1', 'weight_decay >= 0'), ('--warmup_iters=-1', 'warmup_iters >= 0'),
    ('--lr_decay_iters=1', 'not decay_lr or lr_decay_iters >= warmup_iters, got decay_lr=True, lr_decay_iters=1, warmup_iters=2'),
    ('--ema=1', '0 <= ema < 1'), ('--attn_dropout=1.0', 'attn_dropout is None or 0 <= attn_dropout < 1'),
    ('--peak_flops=-1', 'peak_flops >= 0'), ('--backend=mpi', "backend in ('auto', 'nccl', 'gloo')"),
    ('--dtype=fp8', "dtype in ('auto', 'float32', 'bfloat16', 'float16')"),
    ('--optimizer=sgd', "optimizer in ('adamw', 'muon'), got optimizer='sgd'"),
    ('--threads=-1', 'threads must be a whole number >= 0 (0: one per core), got -1'),
    ('--pos_emb=alibi', "pos_emb='alibi'"), ('--mlp=relu', "mlp='relu'"),  # GPTConfig's own checks
])
def test_a_setting_out_of_range_stops_before_any_work(arg, rule, tmp_path, monkeypatch):
    # in this process, where torch is already imported: the check must come before data, model and files
    monkeypatch.setattr(sys, 'argv', ['train.py', f'--data_dir={tmp_path}/data', f'--out_dir={tmp_path}/out', *TINY, arg])
    t0 = time.time()
    with pytest.raises(SystemExit) as e:
        runpy.run_path(os.path.join(ROOT, 'train.py'), run_name='__main__')
    assert str(e.value).startswith('error: ') and '\n' not in str(e.value) and rule in str(e.value)
    assert time.time() - t0 < 2 and os.listdir(tmp_path) == []


def test_settings_out_of_range_on_the_command_line(tmp_path):
    run = train(tmp_path / 'data', tmp_path / 'out', '--eval_iters=0', ok=False)
    assert_error(run, 'need eval_iters >= 1, got eval_iters=0')
    run = train(tmp_path / 'data', tmp_path / 'out', '--compile=false', ok=False)
    assert_error(run, "compile must be True, False or None, got 'false'")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize('device_type, gpu_bf16, cpu_bf16, expected', [
    ('cuda', True, False, 'bfloat16'), ('cuda', False, True, 'float16'),  # fp16 (with a GradScaler) on older GPUs
    ('cpu', False, True, 'bfloat16'), ('cpu', True, False, 'float32'),  # emulated bf16 is >10x slower than fp32
    ('cpu', False, None, 'float32'),  # a torch without the private check
    ('mps', True, True, 'float32')])
def test_one_precision_rule_for_every_script(device_type, gpu_bf16, cpu_bf16, expected, monkeypatch):
    from common import get_dtype
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda *a, **k: gpu_bf16)
    if cpu_bf16 is None:
        monkeypatch.delattr(torch.cpu, '_is_avx512_bf16_supported', raising=False)
    else:
        monkeypatch.setattr(torch.cpu, '_is_avx512_bf16_supported', lambda: cpu_bf16, raising=False)
    assert get_dtype('auto', device_type) == expected
    assert get_dtype('float32', device_type) == 'float32'  # the way to exact figures, anywhere


def test_get_batch_reads_the_rows_of_the_old_row_by_row_slicing(tmp_path):
    """train.py's vectorized get_batch, run on its own, gives the very batches that nanoGPT's slicing
    gave for the same random draws: the same seed still trains on the same data."""
    import ast
    source = open(os.path.join(ROOT, 'train.py')).read()
    tree = ast.parse(source)
    function = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == 'get_batch')
    np.arange(1000, dtype=np.uint16).tofile(tmp_path / 'train.bin')
    scope = dict(np=np, torch=torch, os=os, data_dir=str(tmp_path), data_dtype=np.dtype('uint16'), block_size=16,
                 batch_size=8, device_type='cpu', device='cpu')
    exec(compile(ast.Module([function], []), 'train.py', 'exec'), scope)
    torch.manual_seed(0)
    batches = [scope['get_batch']('train') for _ in range(3)]
    torch.manual_seed(0)
    data = np.memmap(tmp_path / 'train.bin', dtype=np.uint16, mode='r')
    for x, y in batches:
        ix = torch.randint(len(data) - 16, (8,))
        assert x.dtype == y.dtype == torch.int64
        assert torch.equal(x, torch.stack([torch.from_numpy(data[i:i + 16].astype(np.int64)) for i in ix]))
        assert torch.equal(y, torch.stack([torch.from_numpy(data[i + 1:i + 17].astype(np.int64)) for i in ix]))
