"""
Score a checkpoint on a split of the prepared data: mean cross-entropy (nats per token),
perplexity and bits per byte; or, with --stories=N, the stories it writes (below). The whole split is read in consecutive, non-overlapping windows
of block_size tokens, each predicting its tokens from its own context, so every token but the
first is scored exactly once and every run gives the same numbers. The data must be made with the
tokenizer the checkpoint was trained with, which the checkpoint holds.
  $ python eval.py --out_dir=out-nano
  $ python eval.py --ckpt=last --split=train --max_tokens=1000000 --json_out=eval.json
With --stories=N it gives the model the opening (first sentence) of each of the split's first N
stories, has it write on, and scores the continuations in readers' terms (stories.py: BLEU against
the real ones, misspelt words, sentences link grammar cannot parse, repetition, diversity, copying
from the training stories, endings), beside the same scores of the real continuations.
  $ python eval.py --stories=200 --temperature=0 --json_out=stories.json
"""
import json
import math
import os
import re
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import torch
from tqdm import tqdm

import stories as story_text
from common import (atomic_output, autocast, checkpoint_path, die, get_device, get_dtype, load_model, log, open_split,
                    read_meta, set_threads)
from layouts import use_fast_linears, use_int8_weights
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
int8 = False  # int8 weights, as sample.py's: the loss they cost
threads = 0  # CPU threads torch computes with; 0: one per core (torch's own); beside another busy process, give each its share
# stories: what the model writes, scored in readers' terms (stories.py), instead of the loss
stories = 0  # > 0: continue the split's first `stories` stories (at most its number of stories) and score them
opening_tokens = 0  # each story's opening: 0 its first sentence, else its first opening_tokens tokens, back to a word's end
max_new_tokens = 256  # most tokens of a continuation (>= 1); the real ones are cut to as many for the reference row
temperature = 0.8  # as sample.py: 0 is greedy
top_k: int | None = 200  # as sample.py: sample only from the k likeliest tokens (None: all)
top_p: float | None = None  # as sample.py: the likeliest tokens that together reach top_p (None: off)
seed = 1337  # story i draws from a generator seeded seed + i: the same seed gives the same stories and scores
story_batch = 16  # stories decoded together (rows.Rows)
copy_n = 8  # copying is counted in word n-grams of this length: real unseen stories share ~1% of their 8-grams
# with the training stories (stock phrases), 3.7% of their 6-grams
copy_stories = 10000  # copying is checked against the first copy_stories training stories: all of the sample's 1,096
grammar = True  # count the sentences link grammar cannot parse (Debian's link-grammar: link-parser), when installed
show = 2  # print this many of the stories, each beside the real one
judge_url = ''  # an OpenAI-compatible chat endpoint (http://127.0.0.1:8080/v1) to grade the stories as the TinyStories paper
judge_model = ''  # the model the judge endpoint should use (empty: whatever it serves)
judge_key_env = 'OPENAI_API_KEY'  # the environment variable holding the judge's API key, if it needs one
# -----------------------------------------------------------------------------
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
# every setting's range, checked before the slow part, loading the model
if split not in ('train', 'validation'):
    die(f"split must be train or validation, the splits prepare.py writes, got {split!r}")
if max_tokens < 0:
    die(f"max_tokens must be >= 0 (0 scores the whole split), got {max_tokens}")
if batch_size < 1:
    die(f"batch_size must be at least 1, got {batch_size}")
if logits_chunk < 1:
    die(f"logits_chunk must be at least 1, got {logits_chunk}")
for name in ('stories', 'opening_tokens', 'show'):
    if globals()[name] < 0:
        die(f"{name} must be >= 0, got {globals()[name]}")
for name in ('max_new_tokens', 'story_batch', 'copy_n', 'copy_stories'):
    if globals()[name] < 1:
        die(f"{name} must be at least 1, got {globals()[name]}")
if stories:
    from generate import check_options
    try:
        check_options(temperature, top_k, top_p)
    except ValueError as e:
        die(str(e))
    if judge_url and not re.match(r'https?://', judge_url):
        die(f"judge_url must be an http:// or https:// URL of an OpenAI-compatible API, got {judge_url!r}")
set_threads(threads)
device = get_device(device)
device_type = device.split(':')[0]
dtype = get_dtype(dtype, device_type)

path = checkpoint_path(out_dir, ckpt)
if json_out and not os.path.dirname(json_out):  # ./eval.json is the working directory's
    json_out = os.path.join(os.path.dirname(path), json_out)
model, checkpoint = load_model(path, device)
(use_int8_weights if int8 else use_fast_linears)(model)  # laid out for decoding, as sample.py's (layouts.py)
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

# -----------------------------------------------------------------------------
# the stories (--stories=N): the model continues each story's opening; the real continuations are the reference row
def judge(openings, continuations):
    """The judge's mean grades of the stories, and how many answers could not be read."""
    key = os.environ.get(judge_key_env, '')
    grades, unreadable = [], []
    for i, (start, more) in enumerate(zip(openings, continuations)):
        body = {'messages': [{'role': 'user', 'content': story_text.JUDGE.format(story=f'{start}***{more}')}], 'temperature': 0}
        if judge_model:
            body['model'] = judge_model
        request = urllib.request.Request(judge_url.rstrip('/') + '/chat/completions', json.dumps(body).encode(),
                                         {'Content-Type': 'application/json',
                                          **({'Authorization': f'Bearer {key}'} if key else {})})
        try:
            with urllib.request.urlopen(request, timeout=300) as response:
                answer = json.load(response)['choices'][0]['message']['content']
        except urllib.error.HTTPError as e:
            die(f"the judge at {judge_url} answered {e.code}: {e.read()[:200].decode(errors='replace')}")
        except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
            die(f"no usable answer from the judge at {judge_url}: {type(e).__name__}: {e}")
        graded = story_text.grade(answer or '')
        if graded is None:
            unreadable.append(i)
        else:
            grades.append(graded)
    means = {f'judge_{g}': sum(x[g] for x in grades) / len(grades) if grades else None for g in story_text.GRADES}
    return {**means, 'judge_graded': len(grades), 'judge_unreadable': len(unreadable),
            'judge_unreadable_stories': unreadable[:20]}


if stories:
    t0 = time.time()
    docs = story_text.split_documents(np.asarray(data), enc.eot_token)[:stories]
    if len(docs) < stories:
        log(f"{bin_path} holds {len(docs)} stories: scoring those")
    real = [enc.decode(d) for d in docs]
    starts, rests = zip(*(story_text.opening(r, enc, opening_tokens) for r in real))
    references, real_ended = zip(*(story_text.cut_tokens(r, enc, max_new_tokens) for r in rests))
    # the training stories, for copying and for the names they capitalise: train.bin begins with them
    # once, as the tokenizer splits them (BPE-dropout copies follow)
    train_stories, copies = [], None
    if os.path.isfile(os.path.join(data_dir, 'train.bin')):
        train = open_split(data_dir, meta, 'train')
        count = min((meta.get('train') or {}).get('documents') or copy_stories, copy_stories)
        head = np.asarray(train[:count * 4096])  # TinyStories' stories are ~250 tokens; the whole dataset, 470M, is not read
        train_stories = [enc.decode(d) for d in story_text.split_documents(head, enc.eot_token)[:count]]
        copies = story_text.CopyIndex(train_stories, copy_n)
    else:
        log(f"no {data_dir}/train.bin: copying is not measured, and only the word list's names are known")
    speller = story_text.Speller(story_text.Speller.names_in(train_stories))
    if dtype != 'float32':
        model.to(getattr(torch, dtype))  # as sample.py, which says why
    torch.manual_seed(seed)
    t1 = time.time()
    written = story_text.continue_stories(model, enc, starts, max_new_tokens, temperature, top_k, top_p, seed,
                                           story_batch)
    t_write = time.time() - t1
    texts, ended = [w[0] for w in written], [w[1] for w in written]
    rows = {'model': story_text.score(texts, ended, list(references), speller, copies, grammar),
            'reference': story_text.score(list(references), real_ended, None, speller, copies, grammar)}
    if judge_url:
        for row, conts in (('model', texts), ('reference', references)):
            rows[row].update(judge(starts, conts))
    for i in range(min(show, len(texts))):
        print(f"--- story {i}: {starts[i]}\n[model]{texts[i]}\n[real]{references[i]}\n")
    columns = [('bleu', 'BLEU'), ('misspelt', 'misspelt'), ('unparsed', 'unparsed'),
               ('repeated_4grams', 'rep-4'), ('distinct_2', 'dist-2'), ('distinct_3', 'dist-3'),
               ('self_bleu', 'self-BLEU'), ('copied_ngrams', f'copied-{copy_n}'), ('ended', 'ended')]
    columns += [(f'judge_{g}', g) for g in story_text.GRADES] if judge_url else []
    print(f"{path} (iter {checkpoint.get('iter_num')}): {len(texts)} stories of {bin_path}, "
          f"temperature {temperature}, top_k {top_k}, top_p {top_p}, seed {seed}, max_new_tokens {max_new_tokens}")
    print(f"{'':10}" + ''.join(f'{title:>11}' for _, title in columns))
    for name, row in rows.items():
        print(f"{name:10}" + ''.join(f"{'-' if row.get(k) is None else f'{row[k]:.4f}':>11}" for k, _ in columns))
    for name, row in rows.items():
        c = row.get('longest_copy')
        if c and c['words']:
            print(f"{name}: longest copy {c['words']} words, in story {c['text']}, from training story {c['story']} "
                  f"(\"{story_text.opening(train_stories[c['story']], enc)[0]}\"): \"{c['from']}\"")
        if row.get('misspelt_words'):
            print(f"{name}: commonest misspelt: " + ', '.join(f'{w} ({k})' for w, k in row['misspelt_words']))
        if row.get('unparsed_note'):
            print(f"{name}: grammar {row['unparsed_note']}")
        if row.get('judge_unreadable'):
            print(f"{name}: {row['judge_unreadable']} judge answers could not be read, and are not counted")
    log(f"wrote {len(texts)} stories ({sum(map(len, map(enc.encode_ordinary, texts))):,} tokens) in {t_write:.1f} s, "
        f"{time.time() - t0:.1f} s in all")
    if json_out:
        results = dict(checkpoint=path, iter_num=checkpoint.get('iter_num'), data_dir=data_dir, split=split,
                       settings=dict(stories=stories, opening_tokens=opening_tokens, max_new_tokens=max_new_tokens,
                                     temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, copy_n=copy_n,
                                     dtype=dtype),
                       **rows, seconds=time.time() - t0,
                       stories=[dict(opening=s, model=t, real=r, ended=e) for s, t, r, e in zip(starts, texts, references, ended)])
        with atomic_output(json_out) as tmp:
            with open(tmp, 'w') as f:
                json.dump(results, f, indent=2)
        log(f"wrote {json_out}")
    sys.exit(0)

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
