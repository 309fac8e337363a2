"""
Measure this machine: training tokens/s and MFU, sampling tokens/s with and without the KV
cache, and prepare.py's tokenizer throughput. Prints one table.
  $ python bench.py                                   # the small config, everything
  $ python bench.py --config_file=config/nano.py --parts=sample
"""
import os
import statistics
import time

import torch

from common import autocast, get_device, keep_freed_memory
from model import GPT, GPTConfig

config_file = 'config/small.py'  # model shape (n_layer, n_head, n_embd, block_size, bias) comes from here
parts = 'train,sample,prepare'  # which measurements to run: memory, train, sample, prepare
batch_size = 8  # training micro-batch (sequences of block_size tokens)
train_steps = 10  # timed training steps, after warmup_steps; the median is reported
warmup_steps = 3  # untimed steps first (allocator, caches, compilation)
dtypes = 'float32,bfloat16'  # training autocast dtypes and sampling weight dtypes to measure
compile: bool | None = None  # also time torch.compile: True, False, or None (on CUDA only; it is slow to start on a CPU)
new_tokens = 256  # tokens sampled per row
sample_batches = '1,8'  # sampling batch sizes
window_shift = 32  # a second cached-sampling row slides its window this many tokens at a time (1 = exact)
text_file = '../shared/data/tinystories/train-sample.txt'  # text for the tokenizer benchmark
device = 'auto'  # auto, cpu, cuda, cuda:1, mps
seed = 1337
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())

device = get_device(device)
device_type = device.split(':')[0]
if device_type == 'cpu':
    keep_freed_memory()  # as train.py does
shape = {}
exec(open(config_file).read(), {}, shape)
model_args = {k: shape[k] for k in ('n_layer', 'n_head', 'n_embd', 'block_size', 'bias') if k in shape}
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


def make_train_step(batch, dtype, use_compile=False):
    """One AdamW step of a fresh model on a fixed random batch, and the model."""
    model = GPT(GPTConfig(**model_args)).to(device)
    optimizer = model.configure_optimizers(0.1, 1e-4, (0.9, 0.95), device_type)
    step_model = torch.compile(model) if use_compile else model
    x = torch.randint(50257, (batch, model.config.block_size), device=device)

    def train_step():
        with autocast(device_type, dtype):
            _, loss = step_model(x, x)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return train_step, model


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

if 'sample' in parts:
    for dtype in dtypes.split(','):
        model = GPT(GPTConfig(**model_args)).to(device, getattr(torch, dtype)).eval()
        for b in (int(s) for s in sample_batches.split(',')):
            prompt = torch.full((b, 1), 50256, device=device)  # begin a fresh story, as sample.py does
            results = {}
            for name, kw in (('full recompute', dict(use_cache=False)), ('KV cache, exact', dict(window_shift=1)),
                             (f'KV cache, shift {window_shift}', dict(window_shift=window_shift))):
                dt = timed(lambda: model.generate(prompt, new_tokens, **kw), 1, 1)
                results[name] = dt
                speedup = results['full recompute'] / dt
                rows.append(('sample', f"{dtype} {name}", f"batch {b}", f"{b * new_tokens / dt:,.0f}",
                             f"{speedup:.1f}x full recompute, {new_tokens} new tokens"))
        del model

if 'prepare' in parts:
    import datasets
    from prepare import tokenize_batch
    from tokenizer import get_tokenizer
    enc = get_tokenizer()
    with open(text_file) as f:
        docs = [d.strip() for d in f.read().split('<|endoftext|>') if d.strip()]
    ds = datasets.Dataset.from_dict({'text': docs})
    n_tokens = len(tokenize_batch(enc, docs)) - len(docs)  # without the end-of-text tokens, as the seed counts
    # the seed's approach: datasets.map calling encode_ordinary one example at a time
    seed_dt = timed(lambda: ds.map(lambda ex: {'ids': enc.encode_ordinary(ex['text'])}, load_from_cache_file=False,
                                   keep_in_memory=True, desc=None), 2, 1)
    fast_dt = timed(lambda: tokenize_batch(enc, docs), 3, 1)
    rows.append(('prepare', 'datasets.map, one example at a time', f"{len(docs)} docs", f"{n_tokens / seed_dt:,.0f}", 'the seed'))
    rows.append(('prepare', 'prepare.tokenize_batch', f"{len(docs)} docs", f"{n_tokens / fast_dt:,.0f}",
                 f"{seed_dt / fast_dt:.1f}x the seed"))

name = torch.cuda.get_device_name() if device_type == 'cuda' else f"{device}, {torch.get_num_threads()} threads"
print(f"torch {torch.__version__}, {name}, model {model_args}")
print(f"| what | setting | batch | tokens/s | notes |\n|---|---|---|---|---|")
for row in rows:
    print('| ' + ' | '.join(row) + ' |')
