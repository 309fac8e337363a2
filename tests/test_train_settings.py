"""train.py's settings and setup: derived settings follow overrides, config files, ranges checked before
any work, the precision rule, and one-line errors for missing or bad data and a bad setup."""
import importlib.util
import os
import runpy
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from common import load_checkpoint
from conftest import ENV, ROOT, TINY, assert_error, cycles, metrics, train, write_tokens


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
    data = write_tokens(tmp_path / 'data', cycles(2000, 0), cycles(500, 1))
    out_dir, args = tmp_path / 'out', []
    if problem == 'no data':
        data = tmp_path / 'empty'
    elif problem == 'no train.bin':
        os.remove(tmp_path / 'data' / 'train.bin')
    elif problem == 'meta.json with the wrong dtype':
        write_tokens(tmp_path / 'data', cycles(2000, 0), cycles(500, 1), meta_dtype='uint32')
    elif problem == 'meta.json with a float dtype':
        write_tokens(tmp_path / 'data', cycles(2000, 0), cycles(500, 1), dtype='float32')
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
    ('--dtype=fp8', 'dtype=fp8 is not one of auto, float32, bfloat16, float16'),  # get_dtype's, every script's
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
    # no data read (there is none: its error would be another), no files, and no model built: a 2-core machine
    # busy with other work took 2.1 s for the first case, which pays train.py's imports
    assert time.time() - t0 < 6 and os.listdir(tmp_path) == []


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
