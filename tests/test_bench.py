import os
import subprocess
import sys

from conftest import ROOT, needs_tokenizer


def test_bench_prints_a_row_per_measurement():
    cmd = [sys.executable, 'bench.py', '--config_file=config/nano.py', '--parts=memory,train,step,attention,sample',
           '--batch_size=2', '--train_steps=1', '--warmup_steps=0', '--new_tokens=3', '--sample_batches=1,2',
           '--prompt_tokens=2', '--sample_block_size=16', '--sample_repeats=1', '--dtypes=float32',
           '--device=cpu']
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    rows = [line for line in run.stdout.splitlines() if line.startswith('| ') and not line.startswith('| what')]
    kinds = [r.split(' | ')[0][2:] for r in rows]
    assert kinds == ['memory', 'train', 'step', 'attention', 'attention'] + ['sample'] * 4
    assert "'n_layer': 4" in run.stdout and 'cpu' in run.stdout.splitlines()[0]
    assert all(float(r.split(' | ')[3].replace(',', '')) > 0 for r in rows[1:])
    # the config's own step: its batch, optimizer, dropout and average (config/nano.py's), and its parts
    assert rows[2].split(' | ')[2] == 'batch 32' and 'adamw, dropout 0.0, ema 0.0' in rows[2]
    assert '(forward ' in rows[2] and ', backward ' in rows[2] and ', optimizer ' in rows[2]
    assert 'fused_attention' in rows[3] and 'plain_attention' in rows[4] and 'x the fused' in rows[4]
    # each batch: nanoGPT's way, then the KV cache with its share of the weight-streaming floor
    assert ["nanoGPT's way" in r.split(' | ')[1] for r in rows[5:]] == [True, False, True, False]
    assert all('% of the floor' in r for r in rows[5:])


def test_threads_sets_the_thread_count_it_reports():
    cmd = [sys.executable, 'bench.py', '--config_file=config/nano.py', '--parts=memory', '--device=cpu']
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}  # torch's own count would be 1
    run = subprocess.run(cmd + ['--threads=2'], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith('torch ') and ', cpu, 2 threads, ' in run.stdout.splitlines()[0]
    run = subprocess.run(cmd + ['--threads=-1'], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 1 and run.stdout == ''
    assert run.stderr.splitlines()[-1] == 'error: threads must be a whole number >= 0 (0: one per core), got -1'


@needs_tokenizer  # the checkpoint's GPT-2 tokenizer, for the export and sample.py
def test_peer_runs_one_checkpoint_in_both_engines_and_gives_the_ratio(tmp_path):
    import pytest
    import torch
    from model import GPT, GPTConfig
    from test_gguf import LLAMA_CPP_BIN, needs_llama_cpp
    if needs_llama_cpp.args[0]:
        pytest.skip(needs_llama_cpp.kwargs['reason'])
    args = dict(n_layer=1, n_head=2, n_embd=32, block_size=32, vocab_size=50257)
    torch.save({'model': GPT(GPTConfig(**args)).state_dict(), 'model_args': args}, tmp_path / 'best.pt')
    cmd = [sys.executable, 'bench.py', '--parts=peer', f'--peer_model={tmp_path}', '--peer_tokens=8', '--peer_long_tokens=40', '--peer_rounds=2',
           '--dtypes=float32', '--sample_batches=1,2', '--serve_clients=1,2', '--serve_tokens=8', '--serve_batch=2',
           '--device=cpu', '--threads=1', f'--peer_bin={LLAMA_CPP_BIN}']
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    rows = [line.split(' | ') for line in run.stdout.splitlines() if line.startswith('| peer')]
    assert [r[2] for r in rows] == ['batch 1', 'batch 1', 'batch 2', '1 client', '2 clients']
    assert all('sample.py eager against' in r[1] and "x llama.cpp's " in r[4] for r in (rows[0], rows[2]))
    # past the 32-token window, re-read (its positions are learned: no shift), against the story within it
    assert 'sample.py eager past the window, slide=reread' in rows[1][1] and 'x within it; 40 new tokens' in rows[1][4]
    assert all('serve.py eager' in r[1] and "x llama-server's " in r[4] for r in rows[3:])
    assert all(float(r[3].split()[0].replace(',', '')) > 0 and '2 rounds' in r[4] for r in rows)
    run = subprocess.run(cmd[:-1] + [f'--peer_bin={tmp_path}'], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 1 and run.stderr.splitlines()[-1].startswith(f'error: no llama.cpp tools in {tmp_path}')
    (tmp_path / 'other').mkdir()  # a folder whose best.pt is no checkpoint: one line that says so
    (tmp_path / 'other' / 'best.pt').write_text('left by a user')
    run = subprocess.run(cmd[:3] + [f"--peer_model={tmp_path / 'other'}"] + cmd[4:], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 1 and run.stderr.splitlines()[-1].startswith(f"error: cannot read checkpoint {tmp_path / 'other' / 'best.pt'}: ")


@needs_tokenizer
def test_peer_takes_a_configs_shape_and_int8_against_q8_0():
    import pytest
    from test_gguf import LLAMA_CPP_BIN, needs_llama_cpp
    if needs_llama_cpp.args[0]:
        pytest.skip(needs_llama_cpp.kwargs['reason'])
    cmd = [sys.executable, 'bench.py', '--parts=peer', '--peer_model=config', '--config_file=config/nano.py', '--dtypes=int8',
           '--peer_tokens=8', '--peer_long_tokens=0', '--peer_rounds=1', '--sample_batches=1', '--serve_clients=',
           '--device=cpu', '--threads=1', f'--peer_bin={LLAMA_CPP_BIN}']
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    rows = [line.split(' | ') for line in run.stdout.splitlines() if line.startswith('| peer')]
    # one story, no slide and no servers: one row, of random weights of the config's shape in int8
    assert len(rows) == 1 and rows[0][1] == "int8 sample.py eager against llama.cpp, config/nano.py's shape", rows
    assert float(rows[0][3].split()[0].replace(',', '')) > 0 and "x llama.cpp's " in rows[0][4]
    assert "'n_layer': 4" in run.stdout
    run = subprocess.run(cmd[:3] + ['--dtypes=int8', '--parts=sample,peer'], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 1 and 'int8 is for --parts=peer only' in run.stderr.splitlines()[-1]
