"""prepare.py from each kind of source to train.bin, validation.bin and meta.json: TinyStories' .txt, JSON,
Parquet, folders and globs; the held-out split; records without text; progress off a terminal; no torch."""
import json
import os
import re
import subprocess
import sys

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tiktoken

from conftest import (ROOT, STORIES, TINYSTORIES, needs_shared, needs_tokenizer, read_prepared, run_prepare,
                      write_txt)
import prepare
import tokenizer

pytestmark = pytest.mark.usefixtures('hf_cache')  # datasets' Arrow files for local sources stay out of ~/.cache


def decode_docs(tokens):
    """The documents of a token stream: text between end-of-text tokens."""
    enc = tiktoken.get_encoding('gpt2')
    assert tokens[-1] == enc.eot_token
    return enc.decode(tokens.tolist()).split('<|endoftext|>')[:-1]


def txt_docs(path):
    """Documents of a TinyStories .txt file, split independently of prepare.py."""
    with open(path) as f:
        parts = re.split(r'^<\|endoftext\|>$', f.read(), flags=re.M)
    return [p.strip() for p in parts if p.strip()]


def test_token_dtype():
    assert tokenizer.token_dtype(50257) == 'uint16'
    assert tokenizer.token_dtype(65536) == 'uint16'
    assert tokenizer.token_dtype(100277) == 'uint32'


@needs_tokenizer
def test_tokenize_batch_matches_tiktoken():
    enc = tiktoken.get_encoding('gpt2')
    expected = [t for s in STORIES[:7] for t in enc.encode_ordinary(s) + [enc.eot_token]]
    for threads in (1, 3, 16):
        ids = prepare.tokenize_batch(enc, STORIES[:7], num_threads=threads)
        assert ids.dtype == np.uint16 and ids.tolist() == expected
    assert prepare.tokenize_batch(enc, [], 'uint32').dtype == np.uint32


@needs_shared
@needs_tokenizer
def test_round_trip_and_counts_on_samples(tmp_path, monkeypatch, capsys):
    train, valid = os.path.join(TINYSTORIES, 'train-sample.txt'), os.path.join(TINYSTORIES, 'valid-sample.txt')
    run_prepare(monkeypatch, f'--source={train}', f'--val_source={valid}', f'--data_dir={tmp_path / "d"}')
    assert capsys.readouterr().out.startswith(f"prepared {tmp_path / 'd'} with gpt2: ")
    meta, tokens = read_prepared(tmp_path / 'd')
    assert (meta['vocab_size'], meta['eot_token'], meta['dtype']) == (50257, 50256, 'uint16')
    for split, path in (('train', train), ('validation', valid)):
        docs = txt_docs(path)
        assert decode_docs(tokens[split]) == docs
        assert meta[split] == {'tokens': len(tokens[split]), 'documents': len(docs), 'from': path}
        assert (tokens[split] == 50256).sum() == len(docs)
    assert meta['train']['documents'] == 1096


@needs_tokenizer
def test_split_is_seeded_and_keeps_every_document(tmp_path, monkeypatch):
    src = write_txt(tmp_path / 'stories.txt', STORIES)
    def split(seed, name):
        run_prepare(monkeypatch, f'--source={src}', '--val_fraction=0.1', f'--seed={seed}', f'--data_dir={tmp_path / name}')
        meta, tokens = read_prepared(tmp_path / name)
        train, val = decode_docs(tokens['train']), decode_docs(tokens['validation'])
        assert len(val) == 4 == meta['validation']['documents'] and meta['train']['documents'] == 36
        assert sorted(train + val) == sorted(STORIES)
        assert train == [s for s in STORIES if s not in val]  # the original order is kept
        return val
    assert split(1, 'a') == split(1, 'b')
    assert split(1, 'a') != split(2, 'c')


@needs_tokenizer
def test_max_docs(tmp_path, monkeypatch):
    src = write_txt(tmp_path / 'stories.txt', STORIES)
    run_prepare(monkeypatch, f'--source={src}', f'--val_source={src}', '--max_docs=3', f'--data_dir={tmp_path / "d"}')
    meta, tokens = read_prepared(tmp_path / 'd')
    assert decode_docs(tokens['train']) == decode_docs(tokens['validation']) == STORIES[:3]
    assert meta['options']['max_docs'] == 3


@needs_tokenizer
@pytest.mark.parametrize('kind', ['jsonl', 'json', 'parquet'])
def test_json_and_parquet_sources_with_a_text_field(tmp_path, monkeypatch, kind):
    path = tmp_path / f'stories.{kind}'
    if kind == 'jsonl':
        path.write_text(''.join(json.dumps({'story': s, 'id': i}) + '\n' for i, s in enumerate(STORIES)))
    elif kind == 'json':
        path.write_text(json.dumps([{'story': s} for s in STORIES]))
    else:
        pq.write_table(pa.table({'story': STORIES}), path)
    run_prepare(monkeypatch, f'--source={path}', '--text_field=story', f'--data_dir={tmp_path / "d"}')
    meta, tokens = read_prepared(tmp_path / 'd')
    assert sorted(decode_docs(tokens['train']) + decode_docs(tokens['validation'])) == sorted(STORIES)
    assert meta['train']['documents'] + meta['validation']['documents'] == len(STORIES)


@needs_tokenizer
def test_directory_and_glob_of_txt_without_separators(tmp_path, monkeypatch):
    """A .txt without <|endoftext|> lines is one document, however many lines it has."""
    (tmp_path / 'stories' / 'more').mkdir(parents=True)
    for i, story in enumerate(STORIES[:4]):
        (tmp_path / 'stories' / f'{i}.txt').write_text(f"{story}\n\nSecond paragraph {i}.\n")
    write_txt(tmp_path / 'stories' / 'more' / 'sep.txt', STORIES[4:7])
    (tmp_path / 'stories' / 'notes.md').write_text('not a source')
    expected = [f"{s}\n\nSecond paragraph {i}." for i, s in enumerate(STORIES[:4])] + STORIES[4:7]
    run_prepare(monkeypatch, f'--source={tmp_path / "stories"}', f'--val_source={tmp_path / "stories" / "0.txt"}',
                f'--data_dir={tmp_path / "d"}')
    meta, tokens = read_prepared(tmp_path / 'd')
    assert decode_docs(tokens['train']) == expected and decode_docs(tokens['validation']) == expected[:1]
    run_prepare(monkeypatch, f'--source={tmp_path / "stories" / "[12].txt"}', f'--val_source={tmp_path / "stories" / "**" / "sep.txt"}',
                f'--data_dir={tmp_path / "g"}')
    meta, tokens = read_prepared(tmp_path / 'g')
    assert decode_docs(tokens['train']) == expected[1:3] and decode_docs(tokens['validation']) == STORIES[4:7]


@needs_tokenizer
def test_records_without_text_are_skipped_and_counted(tmp_path, monkeypatch, capsys):
    records = [{'text': s} for s in STORIES]
    records[3], records[8], records[20] = {'id': 3}, {'text': None}, {'text': ''}
    (tmp_path / 'stories.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in records))
    run_prepare(monkeypatch, f'--source={tmp_path / "stories.jsonl"}', f'--val_source={tmp_path / "stories.jsonl"}',
                f'--data_dir={tmp_path / "d"}')
    kept = [s for i, s in enumerate(STORIES) if i not in (3, 8, 20)]
    meta, tokens = read_prepared(tmp_path / 'd')
    assert decode_docs(tokens['train']) == decode_docs(tokens['validation']) == kept
    assert meta['train']['documents'] == meta['validation']['documents'] == 37
    note = f"note: {tmp_path / 'stories.jsonl'}: skipped 3 of its 40 records, which have no text in field 'text'"
    assert capsys.readouterr().err.count(note) == 2  # once for each split


@needs_tokenizer
def test_no_progress_bars_off_a_terminal(tmp_path):
    """Into a log file tqdm's bars (ours, datasets') would write hundreds of \\r updates on one line."""
    src = write_txt(tmp_path / 'stories.txt', STORIES)
    r = subprocess.run([sys.executable, 'prepare.py', f'--source={src}', '--tokenizer=bpe:300', f'--data_dir={tmp_path / "d"}'],
                       cwd=ROOT, capture_output=True, text=True, timeout=60,
                       env={**os.environ, 'HF_DATASETS_CACHE': str(tmp_path / 'hf-cache')})
    assert r.returncode == 0 and r.stdout.startswith('prepared'), r.stderr
    assert '\r' not in r.stderr and 'it/s' not in r.stderr and 'doc/s' not in r.stderr


def test_plain_progress_lines_off_a_terminal(monkeypatch, capsys):
    monkeypatch.setattr(prepare, 'PROGRESS_EVERY', 0)
    monkeypatch.setattr(prepare, 'batch_size', 16)
    assert sum(prepare.batches(datasets.Dataset.from_dict({'text': STORIES}), 'tokenizing x'), []) == STORIES
    assert capsys.readouterr().err.splitlines() == [f'tokenizing x: {n} of 40 documents' for n in (16, 32, 40)]


def test_prepare_does_not_import_torch():
    """prepare.py and the helpers it shares in common.py need no torch: importing it costs ~1 s and ~300 MB."""
    r = subprocess.run([sys.executable, '-c', "import prepare, common, sys; assert 'torch' not in sys.modules"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
