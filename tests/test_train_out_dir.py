"""What train.py does to its out_dir: a new run never replaces a trained model, one run at a time, and
a checkpoint stays whole through a signal, a kill mid-write, a full disk or a diverged loss."""
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from common import load_checkpoint
from conftest import ENV, ROOT, TINY, assert_error, train


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
import checkpoints, torch
atomic_output, hook, n = checkpoints.atomic_output, *os.environ['HOOK'].rsplit('-', 1)
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

checkpoints.atomic_output, torch_save, torch.save = hooked_output, torch.save, hooked_save
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


def test_divergence_stops_and_keeps_the_last_good_checkpoint(data, out):
    run = train(data, out, '--learning_rate=1e3', '--grad_clip=0', '--warmup_iters=0', '--eval_interval=1',
                '--max_iters=50', ok=False)
    assert_error(run, 'training diverged')
    ckpt = load_checkpoint(out / 'last.pt')
    assert f"last.pt keeps iter {ckpt['iter_num']}" in run.stderr
    assert all(torch.isfinite(w).all() for w in ckpt['model'].values())
