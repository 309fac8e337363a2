"""
Turn a story dataset into the token files train.py reads: train.bin and validation.bin (one flat
stream of tokens each, every document followed by <|endoftext|>) and meta.json; with a trained
tokenizer (--tokenizer=bpe:N) also its tokenizer.json.
  $ python prepare.py                          # roneneldan/TinyStories from the Hugging Face hub
  $ python prepare.py --source=../shared/data/tinystories/train-sample.txt \
        --val_source=../shared/data/tinystories/valid-sample.txt --data_dir=data/sample
--bpe_dropout=0.1 adds differently split copies of the train documents (see the setting).
A source is a hub dataset id, or local files: a file, a directory or a glob of .txt (TinyStories'
format: documents separated by <|endoftext|> lines; a file without them is one document),
.jsonl/.json or .parquet (text in text_field; records without text are skipped, and counted). Both
kinds load through `datasets`. A re-run with the same sources and options finds them in meta.json and
does nothing; --force=True redoes it. One run at a time writes to a data_dir.
"""
import glob
import hashlib
import itertools
import json
import os
import sys
import tempfile
import time
from contextlib import nullcontext
from concurrent.futures import ThreadPoolExecutor

import datasets
import huggingface_hub
import numpy as np
import pyarrow.compute as pc
from tqdm import tqdm

from common import atomic_output, die, lock_folder, log, remove_stale_temps
from tokenizer import (GPT2, dropout_tokenizer, get_tokenizer, meta_fields, parse_name, reused_tokenizer,
                       train_tokenizer)

# -----------------------------------------------------------------------------
source = 'roneneldan/TinyStories'  # hub dataset id, or a local file, directory or glob
val_source = ''  # validation documents; '' = the source's validation split, else val_fraction of train
val_fraction = 0.05  # share (0..1, exclusive) of the train documents held out (seeded) when there is no validation source
seed = 1337  # seed of that split (>= 0)
max_docs = 0  # keep only the first max_docs documents of each source (0 = all), for quick demos
text_field = 'text'  # the field holding the text in hub, .jsonl/.json and .parquet sources
tokenizer = 'gpt2'  # 'gpt2' (tiktoken), 'bpe:N' (N from 257 to 65535: a byte-level BPE trained on the train documents), or a checkpoint or data_dir whose tokenizer to reuse
data_dir = 'data/tinystories'  # where train.bin, validation.bin, meta.json (and tokenizer.json) go
# in [0, 1): with a BPE tokenizer (bpe:N, or one reused), train.bin also holds bpe_copies more tokenizations of the
# train documents, each merge skipped with this probability (BPE-dropout): other pieces of the same stories, a
# regulariser when there are few (config/cpu.py trains on 0.1). Drawn by `tokenizers`, unseeded
bpe_dropout = 0.0
bpe_copies = 8  # >= 1
batch_size = 1024  # documents tokenized at a time (>= 1): bounds memory, hardly matters for speed
num_threads = 0  # tokenizer threads (>= 0; 0 = one per CPU core)
force = False  # redo the work even when data_dir already holds it
# -----------------------------------------------------------------------------
FORMATS = {'.txt': 'text', '.jsonl': 'json', '.json': 'json', '.parquet': 'parquet'}
PROGRESS_EVERY = 30  # seconds between progress lines when stderr is not a terminal


def tokenize_batch(enc, texts, dtype='uint16', num_threads=0):
    """One flat array: each text's tokens, then the end-of-text token. Each thread encodes a
    contiguous slice (tiktoken releases the GIL); one task per text, as encode_ordinary_batch
    does, costs more thread-pool overhead than a short story takes to encode."""
    def encode(part):
        ids = []
        for text in part:
            ids += enc.encode_ordinary(text)
            ids.append(enc.eot_token)
        return np.array(ids, dtype=dtype)
    num_threads = num_threads or os.cpu_count() or 1
    step = max(1, -(-len(texts) // num_threads))
    with ThreadPoolExecutor(num_threads) as pool:
        parts = pool.map(encode, [texts[i:i + step] for i in range(0, len(texts), step)])
        return np.concatenate([np.zeros(0, dtype), *parts])


def local_files(src):
    """(path, size, mtime) of each file a local source names (a file, a directory or a glob), or
    None when src is a hub id. Size and mtime tell a changed file from the one already prepared."""
    path = os.path.expanduser(src)
    if os.path.isdir(path):
        files = [f for f in glob.glob(os.path.join(path, '**', '*'), recursive=True)
                 if os.path.splitext(f)[1].lower() in FORMATS]
    elif os.path.isfile(path):
        files = [path]
    elif any(c in path for c in '*?['):
        files = [f for f in glob.glob(path, recursive=True) if os.path.isfile(f)]
    elif os.path.splitext(path)[1].lower() in FORMATS or path.startswith(('/', '.', '~')):
        die(f"no such file or directory: {src}")
    else:
        return None
    if not files:
        die(f"no .txt, .jsonl, .json or .parquet files in {src}")
    kinds = {os.path.splitext(f)[1].lower() for f in files}
    if not kinds <= FORMATS.keys() or len({FORMATS.get(k) for k in kinds}) > 1:
        die(f"{src} holds {', '.join(sorted(kinds))} files: give one kind of .txt, .jsonl/.json or .parquet")
    return [(f, os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in sorted(files)]


def read_txt(files, field):
    """Documents of .txt files in TinyStories' format, for Dataset.from_generator (files holds sizes
    and mtimes too, so that datasets' cache key changes when a file does)."""
    for path, _, _ in files:
        with open(path, encoding='utf-8') as f:
            lines = []
            for line in itertools.chain(f, ['<|endoftext|>']):  # the end of a file ends its last document
                if line.strip() != '<|endoftext|>':
                    lines.append(line)
                    continue
                doc = ''.join(lines).strip()
                lines = []
                if doc:
                    yield {field: doc}


def load_source(src, files):
    """The source's splits, as a dict of Datasets."""
    if files is None:
        try:
            return dict(datasets.load_dataset(src))
        except Exception as e:
            die(f"cannot load '{src}' from the Hugging Face hub ({str(e).splitlines()[0]}). Offline, use "
                "local files, e.g. --source=../shared/data/tinystories/train-sample.txt, or "
                "HF_DATASETS_OFFLINE=1 with the dataset in the Hugging Face cache")
    kind = FORMATS[os.path.splitext(files[0][0])[1].lower()]
    try:
        if kind == 'text':
            if next(read_txt(files, text_field), None) is None:
                die(f"no documents in {src}")
            return {'train': datasets.Dataset.from_generator(read_txt, gen_kwargs={'files': files, 'field': text_field})}
        return dict(datasets.load_dataset(kind, data_files=[f for f, _, _ in files]))
    except Exception as e:
        while e.__cause__ is not None:  # datasets wraps the error that says what is wrong
            e = e.__cause__
        die(f"cannot read {src}: {str(e).splitlines()[0] if str(e) else 'no documents in it'}")


def documents(splits, src, *names):
    """The first of the named splits that src has, reduced to its text and its first max_docs documents."""
    ds = next((splits[name] for name in names if name in splits), None)
    if ds is None:
        die(f"{src} has no {' or '.join(names)} split (it has {', '.join(splits)})")
    if text_field not in ds.column_names:
        die(f"{src} has no field '{text_field}' (it has {', '.join(ds.column_names)}): choose one with --text_field=NAME")
    feature = ds.features[text_field]
    if not (isinstance(feature, datasets.Value) and feature.dtype in ('string', 'large_string')):
        kind = f"{feature.dtype} values" if isinstance(feature, datasets.Value) else f"{type(feature).__name__} values"
        die(f"{src}: field '{text_field}' holds {kind}, not text: choose the field that holds each document's "
            "text with --text_field=NAME, or store the text as strings")
    if len(ds) == 0:
        die(f"no documents in {src}")
    # a record without text is no document (an empty one would be a lone end-of-text token): skipped, and said
    length = pc.binary_length(ds.with_format('arrow')[text_field])  # null where the text is missing or null
    kept = np.flatnonzero(pc.fill_null(pc.greater(length, 0), False).to_numpy())
    if len(kept) == 0:
        die(f"{src}: none of its {len(ds):,} records has text in field '{text_field}' (it is missing, null or "
            "empty): choose the field that holds each document's text with --text_field=NAME")
    if len(kept) < len(ds):
        log(f"note: {src}: skipped {len(ds) - len(kept):,} of its {len(ds):,} records, which have no text in field "
            f"'{text_field}' (it is missing, null or empty)")
        ds = ds.select(kept)
    if max_docs:
        ds = ds.select(range(min(max_docs, len(ds))))
    return ds.select_columns([text_field])


def batches(ds, desc):
    """ds's texts, batch_size at a time, with progress on stderr: tqdm's bar on a terminal; elsewhere (a
    log file, where the bar's \r updates would pile up on one line) a plain line every PROGRESS_EVERY seconds."""
    done, last = 0, time.time()
    with tqdm(total=len(ds), desc=desc, unit='doc', file=sys.stderr, disable=None) as bar:
        for batch in ds.iter(batch_size):
            yield batch[text_field]
            done += len(batch[text_field])
            bar.update(len(batch[text_field]))
            if bar.disable and time.time() - last >= PROGRESS_EVERY:
                last = time.time()
                log(f"{desc}: {done:,} of {len(ds):,} documents")


def write_tokens(ds, path, name, enc, dtype, dropout_state=None):
    """Tokenize ds a batch at a time into path; memory holds one batch, never the whole stream. With the
    state of a BPE, bpe_copies more passes follow with BPE-dropout. Returns its token and document counts."""
    tokens = 0
    with open(path, 'wb') as f:
        for texts in batches(ds, f'tokenizing {name}'):
            ids = tokenize_batch(enc, texts, dtype, num_threads)
            ids.tofile(f)
            tokens += len(ids)
        if dropout_state:
            bpe = dropout_tokenizer(dropout_state, bpe_dropout)
            for copy in range(1, bpe_copies + 1):
                for texts in batches(ds, f'tokenizing {name}, BPE-dropout copy {copy} of {bpe_copies}'):
                    ids = np.array([i for e in bpe.encode_batch(texts, add_special_tokens=False)
                                    for i in (*e.ids, enc.eot_token)], dtype=dtype)
                    ids.tofile(f)
                    tokens += len(ids)
            return {'tokens': tokens, 'documents': len(ds), 'bpe_dropout_copies': bpe_copies}
    return {'tokens': tokens, 'documents': len(ds)}


if __name__ == '__main__':
    exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
    # every setting's range, checked before anything is read or written
    if not source:
        die("source must name a hub dataset or local files, e.g. --source=../shared/data/tinystories/train-sample.txt")
    if not data_dir:
        die("data_dir must name a folder, e.g. --data_dir=data/tinystories")
    if not 0 < val_fraction < 1:
        die(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    if seed < 0:
        die(f"seed must be >= 0, got {seed}")
    if max_docs < 0:
        die(f"max_docs must be >= 0 (0 keeps all), got {max_docs}")
    if batch_size < 1:
        die(f"batch_size must be at least 1, got {batch_size}")
    if num_threads < 0:
        die(f"num_threads must be >= 0 (0 is one per CPU core), got {num_threads}")
    if not 0 <= bpe_dropout < 1:
        die(f"bpe_dropout must be in [0, 1), got {bpe_dropout}")
    if bpe_copies < 1:
        die(f"bpe_copies must be at least 1, got {bpe_copies}")
    # a checkpoint's or a prepared data_dir's tokenizer: new data in the tokens that model reads
    named = tokenizer == 'gpt2' or tokenizer.startswith('bpe:')
    reused = reused_tokenizer(tokenizer) if not named and os.path.exists(tokenizer) else None
    has_json = reused['json'] is not None if reused else parse_name(tokenizer) > 0  # a BPE's tokenizer.json to write
    if bpe_dropout and not has_json:
        die("bpe_dropout needs a BPE tokenizer that prepare.py trains or reuses (e.g. --tokenizer=bpe:4096), "
            "not GPT-2's")
    files = local_files(source), (local_files(val_source) if val_source else None)
    if not has_json:
        get_tokenizer(GPT2)  # fail now if tiktoken cannot load it, not after reading the sources
    options = {k: config[k] for k in ('source', 'val_source', 'val_fraction', 'seed', 'max_docs', 'text_field',
                                      'tokenizer')}
    if bpe_dropout:  # only then: data prepared without it stays prepared
        options.update(bpe_dropout=bpe_dropout, bpe_copies=bpe_copies)
    options['files'] = hashlib.sha1(json.dumps(files).encode()).hexdigest()  # so an edited file is prepared again
    if not sys.stderr.isatty():  # a log file: datasets' and the hub's bars would pile up \r updates on one line
        datasets.disable_progress_bars()
        huggingface_hub.utils.disable_progress_bars()
    lock_folder(data_dir, "prepare into another --data_dir")  # two runs would mix their files
    remove_stale_temps(data_dir)  # what a killed run left

    # skip the work when data_dir already holds exactly these tokens
    meta_path, tokenizer_path = os.path.join(data_dir, 'meta.json'), os.path.join(data_dir, 'tokenizer.json')
    bins = {split: os.path.join(data_dir, f'{split}.bin') for split in ('train', 'validation')}
    if not force and os.path.isfile(meta_path):
        try:
            with open(meta_path) as f:
                old = json.load(f)
            done = old['options'] == options and all(
                os.path.getsize(p) == old[s]['tokens'] * np.dtype(old['dtype']).itemsize for s, p in bins.items()) and (
                not has_json or os.path.isfile(tokenizer_path))
        except (OSError, ValueError, KeyError, TypeError):
            done = False
        if done:
            print(f"{data_dir} already holds these sources prepared with these options (see its meta.json): "
                  "nothing to do; --force=True redoes it")
            sys.exit(0)

    # gather the documents
    t0 = time.time()
    splits = load_source(source, files[0])
    train = documents(splits, source, 'train')
    if val_source:
        val, val_from = documents(load_source(val_source, files[1]), val_source, 'validation', 'train'), val_source
    elif 'validation' in splits:
        val, val_from = documents(splits, source, 'validation'), f"{source} (validation split)"
    else:
        n_val = max(1, round(len(train) * val_fraction))
        if n_val >= len(train):
            die(f"{source} has {len(train)} documents, too few to hold out a validation set: give --val_source")
        is_val = np.zeros(len(train), dtype=bool)
        is_val[np.random.default_rng(seed).permutation(len(train))[:n_val]] = True
        train, val = train.select(np.flatnonzero(~is_val)), train.select(np.flatnonzero(is_val))
        val_from = f"{n_val} documents of {source} held out (val_fraction={val_fraction}, seed={seed})"

    # train the tokenizer and tokenize into temporary files; only when all are complete do they and
    # meta.json replace the old ones, so a failed or interrupted run leaves the old data usable. Renamed
    # .bin files and tokenizer.json first, meta.json last: in the moment between, common.open_split
    # sees the sizes disagree with meta.json
    try:
        os.makedirs(data_dir, exist_ok=True)
        tempfile.TemporaryFile(dir=data_dir).close()  # fail now, not after an hour of tokenizing
        with atomic_output(meta_path) as meta_tmp, (atomic_output(tokenizer_path) if has_json else nullcontext()) as \
                tokenizer_tmp, atomic_output(bins['train']) as train_tmp, atomic_output(bins['validation']) as val_tmp:
            # the train documents only, streamed: validation text must not shape the tokens it is scored in
            state = reused or train_tokenizer(tokenizer, (t for texts in batches(train, f'training {tokenizer}')
                                                          for t in texts))
            if has_json:
                with open(tokenizer_tmp, 'w', encoding='utf-8') as f:
                    f.write(state['json'])
            enc = get_tokenizer(state)
            dtype = meta_fields(enc)['dtype']
            t1 = time.time()
            stats = {split: write_tokens(ds, tmp, f'{split}.bin', enc, dtype, state if copies else None)
                     for split, ds, tmp, copies in (('train', train, train_tmp, bpe_dropout),
                                                    ('validation', val, val_tmp, 0))}
            t2 = time.time()
            stats['train']['from'], stats['validation']['from'] = source, val_from
            meta = {**meta_fields(enc), **stats, 'source': source, 'options': options}
            with open(meta_tmp, 'w') as f:
                json.dump(meta, f, indent=2)
        if not has_json and os.path.exists(tokenizer_path):
            os.remove(tokenizer_path)  # an earlier bpe run's, which meta.json no longer names
    except OSError as e:
        die(f"cannot write to data_dir {data_dir}: {e.strerror or e}")
    tokens, docs = (stats['train'][k] + stats['validation'][k] for k in ('tokens', 'documents'))
    print(f"prepared {data_dir} with {enc.name}: {tokens:,} tokens in {docs:,} documents "
          f"(train {stats['train']['tokens']:,} tokens{f', {bpe_copies} BPE-dropout copies among them' * bool(bpe_dropout)}, validation {stats['validation']['tokens']:,}), "
          f"{time.time() - t0:.1f}s in all, tokenizing and writing {t2 - t1:.1f}s at {tokens / (t2 - t1):,.0f} tokens/s")
