"""
Measure this machine: training tokens/s and MFU, sampling tokens/s against the weight-streaming
floor and nanoGPT's way, and prepare.py's tokenizer throughput. Prints one table.
  $ python bench.py                                   # the small config, everything
  $ python bench.py --config_file=config/nano.py --parts=sample
  $ python bench.py --config_file=config/cpu.py --parts=step,attention --compile=True
  $ python bench.py --parts=peer --compile=True      # out-cpu against llama.cpp (tools: ../shared/tools/llama-cpp.sh)
"""
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import fields

import torch
from torch.nn import functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from common import (autocast, checkpoint_path, compile_for_training, die, get_device, keep_freed_memory, load_checkpoint,
                    set_threads)
from generate import generate
from layouts import use_fast_linears
from model import GPT, GPTConfig

config_file = 'config/small.py'  # model shape (n_layer, n_head, n_embd, block_size, bias) comes from here
parts = 'train,sample,prepare'  # which measurements to run: memory, train, step, attention, sample, prepare, serve, peer (sample.py and serve.py against llama.cpp)
batch_size = 8  # training micro-batch (sequences of block_size tokens); step and attention take the config's
train_steps = 10  # timed training steps, after warmup_steps; the median is reported
warmup_steps = 3  # untimed steps first (allocator, caches, compilation)
dtypes = 'float32,bfloat16'  # training autocast dtypes and sampling weight dtypes to measure; peer also takes int8 (against q8_0)
compile: bool | None = None  # also time torch.compile (training, sampling's and serve.py's decoding steps): True, False, or None (on CUDA only; slow to start on a CPU)
new_tokens = 256  # tokens sampled per row
prompt_tokens = 16  # random prompt tokens per row before them
sample_block_size = 512  # the sampling model's context (the window never slides: prompt + new tokens fit)
sample_batches = '1,8'  # sampling batch sizes
sample_repeats = 3  # timed generate() calls per setting, after one untimed; the median is reported
text_file = '../shared/data/tinystories/train-sample.txt'  # text for the tokenizer benchmark
serve_models = 'out-cpu,config'  # serve.py under load: checkpoint folders, 'config' for random weights of config_file's shape
serve_clients = '1,4,8,16'  # concurrent streaming clients, one request each (peer: empty runs no servers)
serve_tokens = 128  # max_tokens of each request
serve_batch = 8  # serve.py's max_batch
peer_model = 'out-cpu'  # peer: the checkpoint folder that sample.py and llama.cpp both run, alternating; 'config': random weights of config_file's shape
peer_bin = ''  # peer: llama.cpp's tools (../shared/tools/llama-cpp.sh prints their folder); empty: $LLAMA_CPP_BIN, else that script's
peer_tokens = 100  # peer: new tokens per story (after a 5-token prompt, within run.sh's 128-token window)
peer_rounds = 2  # peer: alternating rounds per setting; the median and the range are reported
peer_long_tokens = 1000  # peer: new tokens of a story past the window (its slides' cost, against a story within it); 0: none
device = 'auto'  # auto, cpu, cuda, cuda:1, mps
threads = 0  # CPU threads torch computes with; 0: one per core (torch's own); beside another busy process, give each its share
seed = 1337
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())

set_threads(threads)
device = get_device(device)
device_type = device.split(':')[0]
keep_freed_memory(device_type)  # as train.py does
shape = {}
exec(open(config_file).read(), {}, shape)
model_args = {f.name: shape[f.name] for f in fields(GPTConfig) if f.name in shape and f.name not in ('vocab_size', 'dropout')}
if 'int8' in dtypes.split(',') and set(parts.split(',')) - {'peer', 'prepare', 'serve'}:
    die("dtypes: int8 is for --parts=peer only (sample.py --int8=True against llama.cpp's q8_0); drop it, or run peer alone")
torch.manual_seed(seed)
rows = []


def timed(fn, steps, warmup):
    """Median seconds of fn() over steps calls, after warmup calls."""
    times = []
    for i in range(warmup + steps):
        if device_type == 'cuda':
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device_type == 'cuda':
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_peak(dtype):
    """Achievable FLOP/s of one large matmul: the CPU's MFU denominator (no datasheet peak)."""
    a = torch.randn(2048, 2048, device=device, dtype=getattr(torch, dtype))
    return 2 * 2048 ** 3 / timed(lambda: a @ a, 5, 2)


def make_train_step(batch, dtype, use_compile=False, args=None, optimizer='adamw', ema=0.0):
    """One optimizer step (AdamW, or Muon with AdamW; then the weights' average with ema) of a fresh model on a
    fixed random batch, and the model."""
    model = GPT(GPTConfig(**(args or model_args))).to(device)
    averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(ema)) if ema else None
    optimizer = model.configure_optimizers(0.1, 1e-4, (0.9, 0.95), device_type, optimizer)
    step_model = compile_for_training(model, device_type) if use_compile else model
    x = torch.randint(model.config.vocab_size, (batch, model.config.block_size), device=device)

    def train_step(phases=None):
        """phases, when given, collects the seconds of the forward pass, the backward pass and the optimizer."""
        marks = [time.perf_counter()]

        def mark():  # only when phases are asked for: a CUDA sync mid-step would slow the timed steps
            if phases is not None:
                if device_type == 'cuda':
                    torch.cuda.synchronize()
                marks.append(time.perf_counter())
        with autocast(device_type, dtype):
            _, loss = step_model(x, x)
        mark()
        loss.backward()
        mark()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # as train.py's default grad_clip
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if averaged:
            averaged.update_parameters(model)
        mark()
        if phases is not None:
            for name, start, end in zip(('forward', 'backward', 'optimizer'), marks, marks[1:]):
                phases.setdefault(name, []).append(end - start)
    return train_step, model


@torch.no_grad()
def nanogpt_generate(model, idx, max_new_tokens):
    """nanoGPT's generate, the baseline: re-read the whole window every step, torch.multinomial."""
    for _ in range(max_new_tokens):
        logits, _ = model(idx[:, -model.config.block_size:])
        idx = torch.cat((idx, torch.multinomial(torch.softmax(logits[:, -1, :].float(), dim=-1), 1)), dim=1)
    return idx


if 'memory' in parts:  # first, while the process's high-water mark is still this alone
    import resource
    train_step, _ = make_train_step(1, 'float32')
    for _ in range(3):
        train_step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    rows.append(('memory', 'float32 training, peak RSS of the process', 'batch 1', '', f"{peak:,.0f} MiB"))

if 'train' in parts:
    for dtype in dtypes.split(','):
        compiles = [False, True] if compile or (compile is None and device_type == 'cuda') else [False]
        for use_compile in compiles:
            train_step, model = make_train_step(batch_size, dtype, use_compile)
            dt = timed(train_step, train_steps, warmup_steps + (2 if use_compile else 0))
            peak = matmul_peak(dtype) if device_type == 'cpu' else None
            mfu = model.estimate_mfu(batch_size, dt, peak)
            rows.append(('train', f"{dtype}{' compiled' if use_compile else ''}", f"batch {batch_size}",
                         f"{batch_size * model.config.block_size / dt:,.0f}", f"MFU {mfu:.1%}, {dt * 1e3:.0f} ms/step"))

if 'step' in parts:  # config_file's own training step, as train.py takes it
    meta = os.path.join(shape.get('data_dir', ''), 'meta.json')
    vocab = json.load(open(meta))['vocab_size'] if os.path.isfile(meta) else 50257
    args = dict(model_args, vocab_size=vocab, dropout=shape.get('dropout', 0.0))
    batch, optimizer = shape.get('batch_size', batch_size), shape.get('optimizer', 'adamw')
    for dtype in dtypes.split(','):
        peak = matmul_peak(dtype) if device_type == 'cpu' else None
        for use_compile in [False, True] if compile or (compile is None and device_type == 'cuda') else [False]:
            train_step, model = make_train_step(batch, dtype, use_compile, args, optimizer, shape.get('ema', 0.0))
            dt = timed(train_step, train_steps, warmup_steps + (2 if use_compile else 0))
            phases = {}
            for _ in range(train_steps):
                train_step(phases)
            split = ', '.join(f"{name} {statistics.median(times) * 1e3:.0f}" for name, times in phases.items())
            rows.append(('step', f"{dtype}{' compiled' if use_compile else ''}", f"batch {batch}",
                         f"{batch * model.config.block_size / dt:,.0f}",
                         f"MFU {model.estimate_mfu(batch, dt, peak):.1%}, {dt * 1e3:.0f} ms/step ({split}); "
                         f"{optimizer}, dropout {args['dropout']}, ema {shape.get('ema', 0.0)}, vocabulary {vocab:,}"))

if 'attention' in parts:  # the fused kernel against the plain product, forward and backward, at config_file's shape
    def plain_attention(q, k, v):
        T = q.size(-2)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(k.size(-1))
        att = att.masked_fill(~torch.ones(T, T, dtype=torch.bool, device=device).tril(), float('-inf'))
        return F.softmax(att, dim=-1) @ v

    def fused_attention(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    batch, T, n_head = shape.get('batch_size', batch_size), model_args['block_size'], model_args['n_head']
    for dtype in dtypes.split(','):
        q, k, v = (torch.randn(batch, n_head, T, model_args['n_embd'] // n_head, device=device,
                               dtype=getattr(torch, dtype), requires_grad=True) for _ in range(3))
        times = {fn: timed(lambda: fn(q, k, v).sum().backward(), train_steps, warmup_steps)
                 for fn in (fused_attention, plain_attention)}
        for fn, dt in times.items():
            rows.append(('attention', f"{dtype} {fn.__name__}, forward and backward", f"batch {batch}",
                         f"{batch * T / dt:,.0f}", f"{dt * 1e3:.1f} ms, {times[fused_attention] / dt:.2f}x the fused"))

if 'sample' in parts:
    def copy_bandwidth():
        """Bytes read + written per second copying 256 MB (far beyond the caches). The source is
        written first: untouched pages all read as one shared page of zeros, and the copy would
        measure writes alone (a third faster on this project's machine)."""
        src = torch.ones(2 ** 26, device=device)
        dst = torch.zeros_like(src)
        return 2 * src.nbytes / timed(lambda: dst.copy_(src), 5, 2)

    sample_args = dict(model_args, block_size=sample_block_size)
    # compiling the decoding step takes tens of seconds per dtype and batch size on a CPU
    sample_compiles = [False, True] if compile or (compile is None and device_type == 'cuda') else [False]
    for dtype in dtypes.split(','):
        model = use_fast_linears(GPT(GPTConfig(**sample_args)).to(device, getattr(torch, dtype)).eval())
        step_bytes = sum(p.nbytes for n, p in model.named_parameters() if n != 'transformer.wpe.weight')
        batch_1 = {}  # tokens/s at batch 1, eager and compiled, for the speed-up of larger batches
        for b in (int(s) for s in sample_batches.split(',')):
            prompt = torch.randint(model.config.vocab_size, (b, prompt_tokens), device=device)
            # a decode step reads every weight once (the token and position embeddings only a row
            # per story, but the token embedding again as the tied output layer), so bytes over
            # bandwidth is the least time a step can take; measured next to each timing, since a
            # shared machine's bandwidth drifts by half within minutes
            bandwidth = copy_bandwidth()
            floor = b * bandwidth / step_bytes
            nanogpt_dt = timed(lambda: nanogpt_generate(model, prompt, new_tokens), 1, 0)
            rows.append(('sample', f"{dtype} nanoGPT's way (full recompute, multinomial)", f"batch {b}",
                         f"{b * new_tokens / nanogpt_dt:,.0f}", f"{b * new_tokens / nanogpt_dt / floor:.0%} of the floor; "
                         f"block_size {sample_block_size}, {prompt_tokens}-token prompt"))
            for use_compile in sample_compiles:
                t0 = time.perf_counter()
                generate(model, prompt, 2, compile=use_compile)
                start = f", {time.perf_counter() - t0:.0f} s to compile" if use_compile else ''
                dt = timed(lambda: generate(model, prompt, new_tokens, compile=use_compile), sample_repeats, 0)
                speed = b * new_tokens / dt
                if b == 1:
                    batch_1[use_compile] = speed
                rows.append(('sample', f"{dtype} KV cache (generate{', compiled step' if use_compile else ''})",
                             f"batch {b}", f"{speed:,.0f}",
                             f"{speed / floor:.0%} of the floor ({floor:,.0f}: {step_bytes / 1e6:.0f} MB "
                             f"per step at {bandwidth / 1e9:.0f} GB/s), {nanogpt_dt / dt:.1f}x nanoGPT's way"
                             + (f", {speed / batch_1[use_compile]:.1f}x batch 1" if b > 1 and use_compile in batch_1 else '') + start))
        del model

if 'prepare' in parts:
    import datasets
    from prepare import tokenize_batch
    from tokenizer import get_tokenizer
    enc = get_tokenizer()
    with open(text_file) as f:
        docs = [d.strip() for d in f.read().split('<|endoftext|>') if d.strip()]
    ds = datasets.Dataset.from_dict({'text': docs})
    # without the end-of-text tokens, as the seed counts
    n_tokens = len(tokenize_batch(enc, docs, num_threads=threads)) - len(docs)
    # the seed's approach: datasets.map calling encode_ordinary one example at a time
    seed_dt = timed(lambda: ds.map(lambda ex: {'ids': enc.encode_ordinary(ex['text'])}, load_from_cache_file=False,
                                   keep_in_memory=True, desc=None), 2, 1)
    fast_dt = timed(lambda: tokenize_batch(enc, docs, num_threads=threads), 3, 1)
    rows.append(('prepare', 'datasets.map, one example at a time', f"{len(docs)} docs", f"{n_tokens / seed_dt:,.0f}", 'the seed'))
    rows.append(('prepare', 'prepare.tokenize_batch', f"{len(docs)} docs", f"{n_tokens / fast_dt:,.0f}",
                 f"{seed_dt / fast_dt:.1f}x the seed"))

def stream_one(url, results):
    """One streaming completion from an OpenAI-style server: (start, first text, end, tokens) go to results."""
    import urllib.request
    body = json.dumps({'prompt': 'Once upon a time', 'max_tokens': serve_tokens, 'stream': True,
                       'stream_options': {'include_usage': True}}).encode()
    request = urllib.request.Request(url + '/v1/completions', body, {'Content-Type': 'application/json'})
    t0, first, tokens, chunks = time.perf_counter(), None, 0, 0
    with urllib.request.urlopen(request, timeout=600) as response:
        for line in response:
            if not line.startswith(b'data: {'):
                continue
            chunk = json.loads(line[6:])
            if chunk.get('usage'):
                tokens = chunk['usage']['completion_tokens']
            elif chunk.get('choices') and chunk['choices'][0].get('text'):
                first, chunks = first or time.perf_counter(), chunks + 1
    results.append((t0, first or time.perf_counter(), time.perf_counter(), tokens or chunks))


def server_load(command, port):
    """Start a server (command, listening on 127.0.0.1:port), then each count of serve_clients streaming
    at once, one request each: {clients: (tokens/s, time to first token p50 and p95, ms/token p50)}."""
    import threading
    import urllib.request
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url, out = f'http://127.0.0.1:{port}', {}
    try:
        for _ in range(3000):  # loading the model, and compiling its step: up to 5 minutes
            try:
                urllib.request.urlopen(url + '/health', timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        for n in (int(c) for c in serve_clients.split(',')):
            results = []
            clients = [threading.Thread(target=stream_one, args=(url, results)) for _ in range(n)]
            for c in clients:
                c.start()
            for c in clients:
                c.join()
            ttft = sorted(r[1] - r[0] for r in results)
            out[n] = (sum(r[3] for r in results) / (max(r[2] for r in results) - min(r[0] for r in results)),
                      ttft[len(ttft) // 2], ttft[int(0.95 * (n - 1))],
                      statistics.median((r[2] - r[1]) / max(1, r[3] - 1) for r in results))
    finally:
        server.terminate()
        server.wait(60)
    return out


def random_checkpoint(folder):
    """folder, holding a checkpoint of config_file's shape with random weights and GPT-2's vocabulary: a
    token's time depends on the weights' shape, not on their values."""
    args = dict(model_args, vocab_size=50257)
    torch.save({'model': GPT(GPTConfig(**args)).state_dict(), 'model_args': args}, os.path.join(folder, 'best.pt'))
    return folder


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def serve_py(out_dir, use_compile, dtype='auto', int8=False):
    """serve.py's command line for out_dir on a free port, and the port."""
    port = free_port()
    return [sys.executable, 'serve.py', f'--out_dir={out_dir}', f'--port={port}', f'--device={device}', f'--dtype={dtype}',
            f'--int8={int8}', f'--max_batch={serve_batch}', '--max_queue=64', f'--max_tokens_limit={serve_tokens}',
            f'--compile={use_compile}', f'--threads={threads}'], port


if 'serve' in parts:  # serve.py in a process of its own, its clients here, all on 127.0.0.1
    import itertools

    def serve_load(out_dir, label, use_compile):
        speeds = server_load(*serve_py(out_dir, use_compile))
        one = speeds[min(speeds)][0]
        for n, (speed, p50, p95, per_token) in speeds.items():
            rows.append(('serve', f"{label}{', compiled' * use_compile}, {n} streaming client{'s' * (n > 1)}",
                         f"max_batch {serve_batch}", f"{speed:,.0f}", f"{speed / one:.1f}x one client; time to first "
                         f"token p50 {p50 * 1e3:,.0f} ms, p95 {p95 * 1e3:,.0f} ms; {per_token * 1e3:.1f} ms/token"))

    for name, use_compile in itertools.product(serve_models.split(','), [False, True] if compile or (compile is None and device_type == 'cuda') else [False]):
        if name != 'config':
            serve_load(name, f"{name}/best.pt", use_compile)
            continue
        with tempfile.TemporaryDirectory() as folder:
            serve_load(random_checkpoint(folder), f"{config_file}'s shape", use_compile)

if 'peer' in parts:  # the same checkpoint in llama.cpp and in sample.py, alternating, each dtype: ratios
    tools = peer_bin or os.environ.get('LLAMA_CPP_BIN') or os.path.expanduser('~/.cache/llama.cpp-tools/build/bin')
    if not os.path.isfile(os.path.join(tools, 'llama-bench')):
        die(f"no llama.cpp tools in {tools}: `bash ../shared/tools/llama-cpp.sh` builds them (about 4 minutes on 2 "
            "cores) and prints their folder, for --peer_bin")
    n_threads = str(torch.get_num_threads())

    def run(*command):
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            die(f"{os.path.basename(command[1] if command[0] == sys.executable else command[0])} failed: "
                f"{(done.stderr.strip().splitlines() or ['?'])[-1]}")
        return done

    def ours(dtype, b, use_compile, new_tokens=peer_tokens, slide='reread'):
        weights, int8 = precision(dtype)
        done = run(sys.executable, 'sample.py', f'--out_dir={model_dir}', '--start=Once upon a time', f'--num_samples={b}',
                   f'--max_new_tokens={new_tokens}', '--stop_at_eot=False', f'--dtype={weights}', f'--int8={int8}',
                   f'--device={device}', f'--compile={use_compile}', f'--threads={n_threads}', f'--slide={slide}')
        return float(re.findall(r'([\d.]+) tokens/s', done.stderr)[-1])

    def theirs(path, b, tries=3):  # llama-bench for one story, llama-batched-bench for several (its generation speed)
        if b == 1:
            done = run(os.path.join(tools, 'llama-bench'), '-m', path, '-t', n_threads, '-p', '0', '-n', str(peer_tokens),
                       '-r', '3', '-o', 'json')
        else:
            done = run(os.path.join(tools, 'llama-batched-bench'), '-m', path, '-t', n_threads, '-c',
                       str(b * (peer_tokens + 8)), '-npp', '4', '-ntg', str(peer_tokens), '-npl', str(b), '--output-format', 'jsonl')
        try:
            return json.loads(done.stdout)[0]['avg_ts'] if b == 1 else json.loads(done.stdout.strip().splitlines()[-1])['speed_tg']
        except (ValueError, IndexError, KeyError):  # llama.cpp's tools sometimes exit 0 before writing it all out
            if tries == 1:
                die(f"llama.cpp's {'llama-bench' if b == 1 else 'llama-batched-bench'} printed no figure three times")
            return theirs(path, b, tries - 1)

    spread = lambda xs: f"{statistics.median(xs):,.0f} ({min(xs):,.0f}-{max(xs):,.0f})"
    ways = ('eager', 'compiled') if compile else ('eager',)
    # int8: sample.py's int8 weights (activations in dtype=auto's type) against llama.cpp's q8_0
    precision = lambda dtype: ('auto', True) if dtype == 'int8' else (dtype, False)  # (dtype, int8) of ours
    gguf_types = {'float32': 'f32', 'bfloat16': 'bf16', 'float16': 'f16', 'int8': 'q8_0'}
    if set(dtypes.split(',')) - set(gguf_types):
        die(f"dtypes: peer takes {', '.join(gguf_types)}, got {dtypes!r}")
    with tempfile.TemporaryDirectory() as folder:
        model_dir = random_checkpoint(folder) if peer_model == 'config' else peer_model
        label = f"{config_file}'s shape" if peer_model == 'config' else peer_model
        # slide='shift' turns keys back by rotary angles: a model with learned positions only re-reads
        rotary = load_checkpoint(checkpoint_path(model_dir, 'best'), mmap=True)['model_args'].get('pos_emb') == 'rope'
        slides = ('reread', 'shift') if rotary else ('reread',)
        for dtype in dtypes.split(','):
            path = os.path.join(folder, f'{dtype}.gguf')
            run(sys.executable, 'export.py', f'--out_dir={model_dir}', '--format=gguf', f'--gguf_type={gguf_types[dtype]}',
                f'--gguf_file={path}')
            for b in (int(s) for s in sample_batches.split(',')):
                speeds = {'llama.cpp': [], **{(way, slide): [] for way in ways for slide in ('within',) + slides * (b == 1 and peer_long_tokens > 0)}}
                for _ in range(peer_rounds):  # alternating, so that a shared machine's drift meets both alike
                    speeds['llama.cpp'].append(theirs(path, b))
                    for way, slide in list(speeds)[1:]:
                        speeds[way, slide].append(ours(dtype, b, way == 'compiled', *(() if slide == 'within' else (peer_long_tokens, slide))))
                peer = statistics.median(speeds['llama.cpp'])
                for way, slide in list(speeds)[1:]:
                    within = statistics.median(speeds[way, 'within'])
                    rounds = f"{peer_rounds} round{'s' * (peer_rounds > 1)}, {n_threads} threads"
                    rows.append(('peer', f"{dtype} sample.py {way} against llama.cpp, {label}", f"batch {b}",
                                 spread(speeds[way, slide]), f"{within / peer:.2f}x llama.cpp's {spread(speeds['llama.cpp'])}; "
                                 f"{peer_tokens} new tokens, {rounds}") if slide == 'within' else
                                ('peer', f"{dtype} sample.py {way} past the window, slide={slide}, {label}", f"batch {b}",
                                 spread(speeds[way, slide]), f"{statistics.median(speeds[way, slide]) / within:.2f}x within it; "
                                 f"{peer_long_tokens} new tokens, {rounds}"))
            if not serve_clients:
                continue
            # the servers: llama-server with as many slots as serve.py's rows, each client streaming serve_tokens
            speeds = {'llama-server': [], 'eager': [], 'compiled': []}
            for _ in range(peer_rounds):
                port = free_port()
                speeds['llama-server'].append(server_load(
                    [os.path.join(tools, 'llama-server'), '-m', path, '-t', n_threads, '-np', str(serve_batch),
                     '-c', str(serve_batch * (serve_tokens + 16)), '--port', str(port), '--host', '127.0.0.1'], port))
                for way in ('eager', 'compiled') if compile else ('eager',):
                    speeds[way].append(server_load(*serve_py(model_dir, way == 'compiled', *precision(dtype))))
            for n in (int(c) for c in serve_clients.split(',')):
                peer = [r[n][0] for r in speeds['llama-server']]
                for way in ('eager', 'compiled') if compile else ('eager',):
                    ours_n = [r[n][0] for r in speeds[way]]
                    rows.append(('peer', f"{dtype} serve.py {way} against llama-server, {label}",
                                 f"{n} client{'s' * (n > 1)}", spread(ours_n),
                                 f"{statistics.median(ours_n) / statistics.median(peer):.2f}x llama-server's {spread(peer)}; "
                                 f"{serve_tokens} tokens each, {peer_rounds} round{'s' * (peer_rounds > 1)}, {n_threads} threads"))

name = torch.cuda.get_device_name() if device_type == 'cuda' else \
    f"{device}, {torch.get_num_threads()} thread{'s' * (torch.get_num_threads() > 1)}"
print(f"torch {torch.__version__}, {name}, model {model_args}")
print("| what | setting | batch | tokens/s | notes |\n|---|---|---|---|---|")
for row in rows:
    print('| ' + ' | '.join(row) + ' |')
