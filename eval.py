"""
Score a checkpoint on a split of the prepared data: mean cross-entropy (nats per token),
perplexity and bits per byte. The whole split is read in consecutive, non-overlapping windows
of block_size tokens, each predicting its tokens from its own context, so every token but the
first is scored exactly once and every run gives the same numbers. The data must be made with the
tokenizer the checkpoint was trained with, which the checkpoint holds.
  $ python eval.py --out_dir=out-nano
  $ python eval.py --ckpt=last --split=train --max_tokens=1000000 --json_out=eval.json
"""
import json
import math
import os
import time

import numpy as np
import torch
from tqdm import tqdm

from common import atomic_output, autocast, checkpoint_path, die, get_device, get_dtype, load_model, log, open_split, read_meta
from generate import use_fast_linears
from tokenizer import check_same, checkpoint_tokenizer, data_tokenizer, get_tokenizer, token_bytes

# -----------------------------------------------------------------------------
out_dir = 'out-cpu'  # where train.py saved its checkpoints: config/cpu.py's, the README's first run
ckpt = 'best'  # best or last (out_dir/best.pt, out_dir/last.pt), or the path of a checkpoint
data_dir = ''  # prepared data (prepare.py); empty: the data_dir the checkpoint was trained on
split = 'validation'  # which split to score: validation or train
max_tokens = 0  # score only the first max_tokens tokens of the split (>= 0; 0: all of it)
batch_size = 8  # windows per forward pass (>= 1)
logits_chunk = 64  # positions whose logits are held at once (>= 1): vocab_size float32 each; 64 stay in a CPU's cache
json_out = ''  # also write the results as JSON to this path; a bare file name (eval.json) goes beside the checkpoint
device = 'auto'  # auto, cpu, cuda, cuda:1, mps
dtype = 'auto'  # bf16 autocast where the CPU or GPU has it (fp16 on older GPUs), else float32 (common.get_dtype); float32 is exact
# -----------------------------------------------------------------------------
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
# every setting's range, checked before the slow part, loading the model
if not ckpt:
    die("ckpt must be best, last or the path of a checkpoint")
if split not in ('train', 'validation'):
    die(f"split must be train or validation, the splits prepare.py writes, got {split!r}")
if max_tokens < 0:
    die(f"max_tokens must be >= 0 (0 scores the whole split), got {max_tokens}")
if batch_size < 1:
    die(f"batch_size must be at least 1, got {batch_size}")
if logits_chunk < 1:
    die(f"logits_chunk must be at least 1, got {logits_chunk}")
device = get_device(device)
device_type = device.split(':')[0]
dtype = get_dtype(dtype, device_type)

path = checkpoint_path(out_dir, ckpt)
if json_out and not os.path.dirname(json_out):  # ./eval.json is the working directory's
    json_out = os.path.join(os.path.dirname(path), json_out)
model, checkpoint = load_model(path, device)
use_fast_linears(model)  # the CPU's faster weight layouts (generate.py)
tokenizer = checkpoint_tokenizer(checkpoint)
enc = get_tokenizer(tokenizer)
block_size = model.config.block_size
data_dir = data_dir or (checkpoint.get('config') or {}).get('data_dir')
if not data_dir:
    die(f"{path} does not say which data it was trained on: give --data_dir")
meta = read_meta(data_dir, path, [split])  # missing, the hint prepares it in the checkpoint's tokenizer
check_same(data_tokenizer(data_dir, meta), tokenizer, data_dir, path)
if meta['vocab_size'] > model.config.vocab_size:
    die(f"{data_dir} has vocab_size={meta['vocab_size']}, more than the model's {model.config.vocab_size}")
bin_path = os.path.join(data_dir, f'{split}.bin')
data = open_split(data_dir, meta, split)
n = len(data) - 1  # every token but the first is predicted
if n < 1:
    die(f"{bin_path} holds {n + 1} tokens: too few to score")
if max_tokens:
    n = min(n, max_tokens)

# bytes of the scored text; <|endoftext|> has none, but its nats count: predicting the end of a
# story is part of modelling it
sizes = token_bytes(enc)

# the loss is computed here, a chunk of positions at a time, from the final hidden states, in one
# float32 buffer reused in place: the model's own loss would hold every position's logits again in
# float32 (a 50257-wide row per token), and on the CPU each fresh buffer that size costs a page
# fault per 4 KiB (measured: ~43 ms per 1,024 positions in place, ~105 ms with cross_entropy)
logits32 = torch.empty(logits_chunk, model.config.vocab_size, device=device)


def chunk_nats(h, y):
    """Summed cross-entropy of the next tokens y (n,) given the final hidden states h (n, n_embd)."""
    logits = logits32[:len(y)].copy_(model.lm_head(h))
    logits -= logits.amax(dim=-1, keepdim=True)
    target = logits.gather(1, y[:, None])
    return (logits.exp_().sum(dim=-1, keepdim=True).log_() - target).sum()


starts = range(0, n, block_size)  # window i reads tokens i.. and predicts i+1.., the last one shorter
batches = range(0, len(starts), batch_size)
# a bar on a terminal only (in a log file it is one line of \r updates), elsewhere a plain line every 30 s
bar, shown = tqdm(batches, desc=split, unit='batch', disable=None), time.monotonic()
total_nats, total_bytes = 0.0, 0
for done, b in enumerate(bar, 1):
    windows = starts[b:b + batch_size]
    x = np.zeros((len(windows), block_size), dtype=np.int64)
    y = np.full((len(windows), block_size), -1, dtype=np.int64)  # -1: past the end, not scored
    for row, i in enumerate(windows):
        length = min(block_size, n - i)
        x[row, :length] = data[i:i + length]
        y[row, :length] = data[i + 1:i + 1 + length]
    scored = int((y >= 0).sum())  # only the last window is short: the scored positions come first
    y = y.reshape(-1)[:scored]
    total_bytes += int(sizes[y].sum())
    x, y = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
    with torch.inference_mode(), autocast(device_type, dtype):
        h = model.hidden_states(x).flatten(0, 1)[:scored]
        nats = sum(chunk_nats(h[c:c + logits_chunk], y[c:c + logits_chunk]) for c in range(0, scored, logits_chunk))
    total_nats += nats.item()  # one sync per batch
    if bar.disable and time.monotonic() - shown >= 30:
        shown = time.monotonic()
        log(f"{split}: {done}/{len(batches)} batches")
loss = total_nats / n
results = dict(checkpoint=path, iter_num=checkpoint.get('iter_num'), data_dir=data_dir, split=split,
               tokens=n, bytes=total_bytes, windows=len(starts), block_size=block_size,
               loss=loss, perplexity=math.exp(loss), bits_per_byte=total_nats / math.log(2) / total_bytes)
print(f"{path} (iter {results['iter_num']}) on {bin_path}: {n:,} tokens ({total_bytes:,} bytes) "
      f"in {len(starts)} windows of {block_size}")
print(f"loss {loss:.4f} nats/token, perplexity {results['perplexity']:.3f}, {results['bits_per_byte']:.4f} bits/byte")
if json_out:
    with atomic_output(json_out) as tmp:
        with open(tmp, 'w') as f:
            json.dump(results, f, indent=2)
    log(f"wrote {json_out}")
