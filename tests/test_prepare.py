import atexit
import errno
import json
import os
import re
import runpy
import subprocess
import sys
import time

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tiktoken

from conftest import ROOT, TINYSTORIES, needs_shared, needs_tokenizer
import common
import prepare
import tokenizer

PREPARE = os.path.join(ROOT, 'prepare.py')
STORIES = [f"Story {i}: once upon a time a {animal} found {i} shiny stones. The end."
           for i, animal in enumerate(['cat', 'dog', 'fox', 'owl', 'bee', 'ant', 'cow', 'pig'] * 5)]


@pytest.fixture(autouse=True)
def hf_cache(tmp_path, monkeypatch):
    """Keep the Arrow files that datasets writes for local sources out of ~/.cache."""
    monkeypatch.setattr(datasets.config, 'HF_DATASETS_CACHE', str(tmp_path / 'hf-cache'))


def run_prepare(monkeypatch, *args):
    """`python prepare.py ARGS`, in this process (a subprocess would spend seconds importing). What it
    registers to run at exit (the release of its data_dir's lock) runs when it ends, as when a process exits."""
    at_exit = []
    with monkeypatch.context() as m:
        m.setattr(sys, 'argv', [PREPARE, *args])
        m.setattr(atexit, 'register', at_exit.append)
        try:
            runpy.run_path(PREPARE, run_name='__main__')
        except SystemExit as e:
            if e.code not in (None, 0):
                raise
        finally:
            for f in reversed(at_exit):
                f()


def read(data_dir):
    with open(os.path.join(data_dir, 'meta.json')) as f:
        meta = json.load(f)
    tokens = {split: np.fromfile(os.path.join(data_dir, f'{split}.bin'), dtype=meta['dtype'])
              for split in ('train', 'validation')}
    return meta, tokens


def decode_docs(tokens):
    """The documents of a token stream: text between end-of-text tokens."""
    enc = tiktoken.get_encoding('gpt2')
    assert tokens[-1] == enc.eot_token
    return enc.decode(tokens.tolist()).split('<|endoftext|>')[:-1]


def write_txt(path, docs):
    path.write_text(''.join(f"{d}\n<|endoftext|>\n" for d in docs))
    return str(path)


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
    meta, tokens = read(tmp_path / 'd')
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
        meta, tokens = read(tmp_path / name)
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
    meta, tokens = read(tmp_path / 'd')
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
    meta, tokens = read(tmp_path / 'd')
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
    meta, tokens = read(tmp_path / 'd')
    assert decode_docs(tokens['train']) == expected and decode_docs(tokens['validation']) == expected[:1]
    run_prepare(monkeypatch, f'--source={tmp_path / "stories" / "[12].txt"}', f'--val_source={tmp_path / "stories" / "**" / "sep.txt"}',
                f'--data_dir={tmp_path / "g"}')
    meta, tokens = read(tmp_path / 'g')
    assert decode_docs(tokens['train']) == expected[1:3] and decode_docs(tokens['validation']) == STORIES[4:7]


@needs_tokenizer
def test_rerun_skips_unless_forced_or_changed(tmp_path, monkeypatch, capsys):
    src = write_txt(tmp_path / 'stories.txt', STORIES)
    args = [f'--source={src}', f'--data_dir={tmp_path / "d"}']
    bin_path = tmp_path / 'd' / 'train.bin'
    def prepared(*extra):
        """Whether a run did the work (and wrote a new train.bin) rather than skip it."""
        before = bin_path.stat().st_mtime_ns if bin_path.exists() else None
        time.sleep(0.01)
        run_prepare(monkeypatch, *args, *extra)
        [line] = capsys.readouterr().out.splitlines()
        did = line.startswith('prepared')
        assert did != ('nothing to do' in line) and did == (bin_path.stat().st_mtime_ns != before)
        return did
    assert prepared()
    assert not prepared()
    assert prepared('--force=True')
    assert prepared('--max_docs=10')
    assert not prepared('--max_docs=10', '--batch_size=4', '--num_threads=1')  # no effect on the tokens
    write_txt(tmp_path / 'stories.txt', STORIES[:20])
    assert prepared('--max_docs=10')
    os.remove(tmp_path / 'd' / 'validation.bin')
    assert prepared('--max_docs=10')


def bpe_docs(data_dir):
    """The documents of data_dir's splits, decoded with its own tokenizer.json, and that tokenizer."""
    meta, tokens = read(data_dir)
    enc = tokenizer.get_tokenizer(tokenizer.data_tokenizer(str(data_dir), meta))
    docs = {split: enc.decode(ids.tolist()).split('<|endoftext|>')[:-1] for split, ids in tokens.items()}
    return docs, enc


# validation documents full of words the train documents never use: a tokenizer trained on them too would differ
ODD = ["Zyx quuxed the vorpal jabberwock; zyx quux vorpal jabberwock, frabjous zyx." * 3] * 4


def test_bpe_trains_on_the_train_documents_only(tmp_path, monkeypatch):
    src = write_txt(tmp_path / 'stories.txt', STORIES)
    jsons = []
    for name, val in (('a', STORIES[:3]), ('b', ODD)):
        val_src = write_txt(tmp_path / f'val-{name}.txt', val)
        run_prepare(monkeypatch, f'--source={src}', f'--val_source={val_src}', '--tokenizer=bpe:300',
                    f'--data_dir={tmp_path / name}')
        meta, _ = read(tmp_path / name)
        assert {k: meta[k] for k in ('tokenizer', 'vocab_size', 'eot_token', 'dtype')} == \
            {'tokenizer': 'bpe:300', 'vocab_size': 300, 'eot_token': 299, 'dtype': 'uint16'}
        docs, enc = bpe_docs(tmp_path / name)
        assert docs == {'train': STORIES, 'validation': val} and enc.name == 'bpe:300'
        assert sorted(os.listdir(tmp_path / name)) == ['meta.json', 'tokenizer.json', 'train.bin', 'validation.bin']
        jsons.append((tmp_path / name / 'tokenizer.json').read_bytes())
    assert jsons[0] == jsons[1] == tokenizer.train_bpe(STORIES, 300).encode()
    assert tokenizer.train_bpe(STORIES + ODD, 300).encode() != jsons[0]  # so ODD would have shown


def test_held_out_documents_are_not_trained_on(tmp_path, monkeypatch):
    src = write_txt(tmp_path / 'stories.txt', STORIES)
    run_prepare(monkeypatch, f'--source={src}', '--val_fraction=0.2', '--tokenizer=bpe:300', f'--data_dir={tmp_path / "d"}')
    docs, _ = bpe_docs(tmp_path / 'd')
    assert len(docs['validation']) == 8 and sorted(docs['train'] + docs['validation']) == sorted(STORIES)
    assert (tmp_path / 'd' / 'tokenizer.json').read_text(encoding='utf-8') == tokenizer.train_bpe(docs['train'], 300)


@needs_tokenizer
def test_a_data_dirs_or_checkpoints_tokenizer_is_reused(tmp_path, monkeypatch):
    """New data in the tokens a model already reads, to fine-tune it: the tokenizer is copied, not trained."""
    import torch
    src, other = write_txt(tmp_path / 'stories.txt', STORIES), write_txt(tmp_path / 'other.txt', ODD * 3)
    run_prepare(monkeypatch, f'--source={src}', '--tokenizer=bpe:300', f'--data_dir={tmp_path / "a"}')
    state = {'name': 'bpe:300', 'json': (tmp_path / 'a' / 'tokenizer.json').read_text(encoding='utf-8')}
    torch.save({'model': {}, 'model_args': {}, 'tokenizer': state}, tmp_path / 'ckpt.pt')
    for given, folder in ((tmp_path / 'a', 'b'), (tmp_path / 'ckpt.pt', 'c')):
        run_prepare(monkeypatch, f'--source={other}', f'--tokenizer={given}', f'--data_dir={tmp_path / folder}')
        docs, enc = bpe_docs(tmp_path / folder)
        assert (tmp_path / folder / 'tokenizer.json').read_text(encoding='utf-8') == state['json']
        assert enc.name == 'bpe:300' and sorted(docs['train'] + docs['validation']) == sorted(ODD * 3)
    torch.save({'model': {}, 'model_args': {}}, tmp_path / 'gpt2.pt')  # nanoGPT's checkpoints name no tokenizer: GPT-2's
    run_prepare(monkeypatch, f'--source={other}', f'--tokenizer={tmp_path / "gpt2.pt"}', f'--data_dir={tmp_path / "d"}')
    assert read(tmp_path / 'd')[0]['tokenizer'] == 'gpt2' and not (tmp_path / 'd' / 'tokenizer.json').exists()


def test_bpe_dropout_adds_copies_of_the_train_documents_split_otherwise(tmp_path, monkeypatch, capsys):
    """train.bin: the documents as the tokenizer splits them, then bpe_copies more passes that decode to the same
    documents in other, mostly smaller pieces; validation.bin and the tokenizer as without it."""
    src, val = write_txt(tmp_path / 'stories.txt', STORIES), write_txt(tmp_path / 'val.txt', STORIES[:4])
    common_args = [f'--source={src}', f'--val_source={val}', '--tokenizer=bpe:300']
    run_prepare(monkeypatch, *common_args, f'--data_dir={tmp_path / "plain"}')
    run_prepare(monkeypatch, *common_args, '--bpe_dropout=0.3', '--bpe_copies=3', f'--data_dir={tmp_path / "d"}')
    assert '3 BPE-dropout copies among them' in capsys.readouterr().out
    (meta, tokens), (_, plain) = read(tmp_path / 'd'), read(tmp_path / 'plain')
    assert (tmp_path / 'd' / 'tokenizer.json').read_text() == (tmp_path / 'plain' / 'tokenizer.json').read_text()
    assert np.array_equal(tokens['validation'], plain['validation'])
    assert np.array_equal(tokens['train'][:len(plain['train'])], plain['train'])
    copies = tokens['train'][len(plain['train']):]
    assert meta['train']['tokens'] == len(tokens['train']) and meta['train']['bpe_dropout_copies'] == 3
    assert meta['options']['bpe_dropout'] == 0.3 and meta['options']['bpe_copies'] == 3
    docs, _ = bpe_docs(tmp_path / 'd')
    assert docs['train'] == STORIES * 4  # the documents, then three copies of them
    assert len(copies) > 3 * 1.1 * len(plain['train'])  # merges skipped: more, smaller pieces
    ends = np.flatnonzero(copies == meta['eot_token'])
    first, second = copies[:ends[len(STORIES) - 1] + 1], copies[ends[len(STORIES) - 1] + 1:ends[2 * len(STORIES) - 1] + 1]
    assert not np.array_equal(first, second)  # each copy drawn anew
    assert 'bpe_dropout needs a BPE tokenizer' in error(monkeypatch, f'--source={src}', '--bpe_dropout=0.1',
                                                        f'--data_dir={tmp_path / "g"}')


@needs_tokenizer
def test_rerun_skip_knows_the_tokenizer(tmp_path, monkeypatch, capsys):
    src = write_txt(tmp_path / 'stories.txt', STORIES)
    tok = tmp_path / 'd' / 'tokenizer.json'
    def prepared(*extra):
        run_prepare(monkeypatch, f'--source={src}', f'--data_dir={tmp_path / "d"}', *extra)
        return capsys.readouterr().out.startswith('prepared')
    assert prepared('--tokenizer=bpe:300') and tok.exists()
    assert not prepared('--tokenizer=bpe:300')
    assert prepared('--tokenizer=bpe:290') and read(tmp_path / 'd')[0]['vocab_size'] == 290
    os.remove(tok)
    assert prepared('--tokenizer=bpe:290') and tok.exists()  # the data is no use without it
    assert prepared() and not tok.exists()  # gpt2 again: a tokenizer.json would mislead
    assert not prepared('--tokenizer=gpt2')
    assert read(tmp_path / 'd')[0]['tokenizer'] == 'gpt2'


@needs_tokenizer
def test_failed_bpe_rerun_keeps_the_old_tokenizer(tmp_path, monkeypatch):
    """tokenizer.json is replaced with the .bin files, only once all of them are complete."""
    src = write_txt(tmp_path / 'stories.txt', STORIES)
    run_prepare(monkeypatch, f'--source={src}', '--tokenizer=bpe:300', f'--data_dir={tmp_path / "d"}')
    before, counts = snapshot(tmp_path / 'd'), usable(tmp_path / 'd')
    full = disk_fills_at(tmp_path, monkeypatch)
    new = write_txt(tmp_path / 'new.txt', STORIES[:5] + ODD)
    for name in ('bpe:280', 'gpt2'):  # fails at validation.bin, after the new tokenizer is trained
        assert 'No space left' in error(monkeypatch, f'--source={new}', f'--val_source={full}', f'--tokenizer={name}',
                                        '--force=True', f'--data_dir={tmp_path / "d"}')
        assert snapshot(tmp_path / 'd') == before and usable(tmp_path / 'd') == counts
    meta = common.read_meta(str(tmp_path / 'd'))
    assert tokenizer.data_tokenizer(str(tmp_path / 'd'), meta)['json'] == before['tokenizer.json'].decode()


def disk_fills_at(tmp_path, monkeypatch):
    """A source whose document fills the disk as it is written (tiktoken encodes every tokenizer's)."""
    encode = tiktoken.Encoding.encode_ordinary
    def encode_ordinary(self, text):
        if text == 'The disk fills here.':
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return encode(self, text)
    monkeypatch.setattr(tiktoken.Encoding, 'encode_ordinary', encode_ordinary)
    return write_txt(tmp_path / 'full.txt', ['The disk fills here.'])


def snapshot(data_dir):
    return {name: (data_dir / name).read_bytes() for name in sorted(os.listdir(data_dir))}


def usable(data_dir):
    """What train.py and eval.py read: meta.json and both splits, checked against each other."""
    meta = common.read_meta(str(data_dir))
    return {split: len(common.open_split(str(data_dir), meta, split)) for split in ('train', 'validation')}


@needs_tokenizer
def test_failed_rerun_keeps_the_old_data(tmp_path, monkeypatch):
    """--force=True with a run that fails once the train split is written: the old data stays."""
    src = write_txt(tmp_path / 'stories.txt', STORIES)
    run_prepare(monkeypatch, f'--source={src}', f'--data_dir={tmp_path / "d"}')
    before, counts = snapshot(tmp_path / 'd'), usable(tmp_path / 'd')
    assert sorted(before) == ['meta.json', 'train.bin', 'validation.bin']
    new = write_txt(tmp_path / 'new.txt', STORIES[:5])
    assert 'No space left' in error(monkeypatch, f'--source={new}', f'--val_source={disk_fills_at(tmp_path, monkeypatch)}',
                                    '--force=True', f'--data_dir={tmp_path / "d"}')
    assert snapshot(tmp_path / 'd') == before and usable(tmp_path / 'd') == counts


@needs_tokenizer
def test_interrupted_run_keeps_the_old_data_and_leaves_nothing_new(tmp_path, monkeypatch):
    src = write_txt(tmp_path / 'stories.txt', STORIES)
    run_prepare(monkeypatch, f'--source={src}', f'--data_dir={tmp_path / "d"}')
    encode, calls = tiktoken.Encoding.encode_ordinary, []
    def interrupted(self, text):
        calls.append(text)
        if len(calls) > 20:  # after the first batches reached the temporary file
            raise KeyboardInterrupt
        return encode(self, text)
    monkeypatch.setattr(tiktoken.Encoding, 'encode_ordinary', interrupted)
    before = snapshot(tmp_path / 'd')
    for data_dir in ('d', 'fresh'):  # over a finished run, and into a new directory
        calls.clear()
        with pytest.raises(KeyboardInterrupt):
            run_prepare(monkeypatch, f'--source={src}', '--batch_size=4', '--num_threads=1', '--force=True',
                        f'--data_dir={tmp_path / data_dir}')
    assert snapshot(tmp_path / 'd') == before
    assert os.listdir(tmp_path / 'fresh') == []


@needs_tokenizer
def test_stale_temporary_files_are_removed(tmp_path, monkeypatch):
    """kill -9 leaves NAME.tmpPID files: removed at start once process PID is gone, kept while it runs."""
    src = write_txt(tmp_path / 'stories.txt', STORIES)
    run_prepare(monkeypatch, f'--source={src}', f'--data_dir={tmp_path / "d"}')
    dead = subprocess.Popen([sys.executable, '-c', '']); dead.wait()
    alive = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])
    try:
        for name in (f'train.bin.tmp{dead.pid}', f'meta.json.tmp{dead.pid}', f'train.bin.tmp{alive.pid}', 'notes.tmpx'):
            (tmp_path / 'd' / name).write_text('partial')
        run_prepare(monkeypatch, f'--source={src}', f'--data_dir={tmp_path / "d"}')  # nothing else to do
        assert sorted(os.listdir(tmp_path / 'd')) == sorted(
            ['meta.json', 'train.bin', 'validation.bin', f'train.bin.tmp{alive.pid}', 'notes.tmpx'])
    finally:
        alive.kill()
        alive.wait()
    assert common.remove_stale_temps(str(tmp_path / 'd')) == [str(tmp_path / 'd' / f'train.bin.tmp{alive.pid}')]
    assert common.remove_stale_temps(str(tmp_path / 'nowhere')) == []


def error(monkeypatch, *args):
    with pytest.raises(SystemExit) as e:
        run_prepare(monkeypatch, *args)
    assert str(e.value).startswith('error: ') and '\n' not in str(e.value)
    return str(e.value)


@needs_tokenizer
def test_bad_inputs_give_one_error_line_and_no_files(tmp_path, monkeypatch):
    out = tmp_path / 'out'
    (tmp_path / 'empty.txt').write_text('')
    (tmp_path / 'separators.txt').write_text('<|endoftext|>\n\n<|endoftext|>\n')
    (tmp_path / 'empty.jsonl').write_text('')
    (tmp_path / 'blank.jsonl').write_text('{"text": ""}\n{"text": null}\n')
    (tmp_path / 'stories.jsonl').write_text(''.join(json.dumps({'story': s}) + '\n' for s in STORIES))
    (tmp_path / 'stories.csv').write_text('text\nhello\n')
    (tmp_path / 'a_file').write_text('')
    good = write_txt(tmp_path / 'stories.txt', STORIES)
    cases = {
        'no such file or directory': [f'--source={tmp_path / "missing.txt"}'],
        'no .txt, .jsonl, .json or .parquet files': [f'--source={tmp_path / "*.nothing"}'],
        'holds .csv files': [f'--source={tmp_path / "stories.csv"}'],
        f'no documents in {tmp_path / "empty.txt"}': [f'--source={tmp_path / "empty.txt"}'],
        'no documents in': [f'--source={tmp_path / "separators.txt"}'],
        'cannot read': [f'--source={tmp_path / "empty.jsonl"}'],
        "none of its 2 records has text in field 'text'": [f'--source={tmp_path / "blank.jsonl"}', f'--val_source={good}'],
        "has no field 'text' (it has story)": [f'--source={tmp_path / "stories.jsonl"}'],
        'too few to hold out': [f'--source={good}', '--max_docs=1'],
        'val_fraction': [f'--source={good}', '--val_fraction=1.5'],
        'cannot write to data_dir': [f'--source={good}', f'--data_dir={tmp_path / "a_file"}'],
        'cannot create the lock file': [f'--source={good}', f'--data_dir={tmp_path / "a_file" / "sub"}'],
    }
    for expected, args in cases.items():
        assert expected in error(monkeypatch, f'--data_dir={out}', *args)
        assert not out.exists() or os.listdir(out) == []


@needs_tokenizer
@pytest.mark.parametrize('values, kind', [([5, 7], 'int64'), ([1.5, 2.5], 'double'), ([['a'], ['b']], 'list'),
                                          (['a', 7], 'mixed')])
def test_text_field_that_is_not_text_is_named(tmp_path, monkeypatch, values, kind):
    (tmp_path / 'nums.jsonl').write_text(''.join(json.dumps({'story': v}) + '\n' for v in values))
    good = write_txt(tmp_path / 'stories.txt', STORIES)
    msg = error(monkeypatch, f'--source={tmp_path / "nums.jsonl"}', '--text_field=story', f'--val_source={good}',
                f'--data_dir={tmp_path / "d"}')
    assert "field 'story' holds" in msg and 'not text' in msg and '--text_field' in msg
    assert not (tmp_path / 'd').exists()


@needs_tokenizer
def test_records_without_text_are_skipped_and_counted(tmp_path, monkeypatch, capsys):
    records = [{'text': s} for s in STORIES]
    records[3], records[8], records[20] = {'id': 3}, {'text': None}, {'text': ''}
    (tmp_path / 'stories.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in records))
    run_prepare(monkeypatch, f'--source={tmp_path / "stories.jsonl"}', f'--val_source={tmp_path / "stories.jsonl"}',
                f'--data_dir={tmp_path / "d"}')
    kept = [s for i, s in enumerate(STORIES) if i not in (3, 8, 20)]
    meta, tokens = read(tmp_path / 'd')
    assert decode_docs(tokens['train']) == decode_docs(tokens['validation']) == kept
    assert meta['train']['documents'] == meta['validation']['documents'] == 37
    note = f"note: {tmp_path / 'stories.jsonl'}: skipped 3 of its 40 records, which have no text in field 'text'"
    assert capsys.readouterr().err.count(note) == 2  # once for each split


def hold_lock(data_dir):
    """Another process that holds data_dir's lock, as a running prepare.py does."""
    holder = subprocess.Popen([sys.executable, '-c', 'import common, sys, time; common.lock_folder(sys.argv[1], "");'
                               'print("locked", flush=True); time.sleep(60)', str(data_dir)],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == 'locked\n'
    return holder


@needs_tokenizer
def test_a_second_run_into_a_data_dir_in_use_is_refused(tmp_path, monkeypatch):
    src = write_txt(tmp_path / 'stories.txt', STORIES)
    dead = subprocess.Popen([sys.executable, '-c', '']); dead.wait()
    (tmp_path / 'd').mkdir()
    (tmp_path / 'd' / f'train.bin.tmp{dead.pid}').write_text('partial')  # the running one's, for all a second run knows
    holder = hold_lock(tmp_path / 'd')
    try:
        r = subprocess.run([sys.executable, 'prepare.py', f'--source={src}', f'--data_dir={tmp_path / "d"}'],
                           cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert r.returncode == 1 and 'Traceback' not in r.stderr
        assert r.stderr.strip().splitlines()[-1] == (f"error: {tmp_path / 'd'} is in use by process {holder.pid} "
                                                     f"(-c {tmp_path / 'd'}): wait for it to end, or prepare into another --data_dir")
        assert os.listdir(tmp_path / 'd') == [f'train.bin.tmp{dead.pid}']
    finally:
        holder.kill()
        holder.wait()
    run_prepare(monkeypatch, f'--source={src}', f'--data_dir={tmp_path / "d"}')  # a killed run's lock is taken over
    assert sorted(os.listdir(tmp_path / 'd')) == ['meta.json', 'train.bin', 'validation.bin']


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


@pytest.mark.parametrize('arg', ['--batch_size=0', '--num_threads=-1', '--val_fraction=0', '--val_fraction=1.0',
                                 '--max_docs=-1', '--seed=-1', '--source=', '--data_dir=', '--tokenizer=bpe:256',
                                 '--tokenizer=bpe:65536', '--tokenizer=sentencepiece', '--bpe_dropout=1.0',
                                 '--bpe_copies=0'])
def test_settings_out_of_range_are_one_error_line_before_any_work(tmp_path, monkeypatch, arg):
    src = write_txt(tmp_path / 'stories.txt', STORIES)
    setting = arg[2:arg.index('=')]
    assert error(monkeypatch, f'--source={src}', f'--data_dir={tmp_path / "d"}', arg).startswith(f'error: {setting}')
    assert not (tmp_path / 'd').exists()


@needs_tokenizer
def test_default_hub_source_offline_fails_fast_with_a_hint(tmp_path, monkeypatch):
    start = time.time()
    msg = error(monkeypatch, f'--data_dir={tmp_path / "d"}')
    assert time.time() - start < 10
    assert "Hugging Face hub" in msg and '--source=../shared/data/tinystories/train-sample.txt' in msg
    assert not (tmp_path / 'd').exists()


def test_command_line_error_exit_status(tmp_path):
    r = subprocess.run([sys.executable, 'prepare.py', f'--source={tmp_path / "missing.txt"}', f'--data_dir={tmp_path / "d"}'],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stdout == ''
    assert r.stderr.strip().splitlines()[-1] == f"error: no such file or directory: {tmp_path / 'missing.txt'}"
    assert not (tmp_path / 'd').exists()


def test_prepare_does_not_import_torch():
    """prepare.py and the helpers it shares in common.py need no torch: importing it costs ~1 s and ~300 MB."""
    r = subprocess.run([sys.executable, '-c', "import prepare, common, sys; assert 'torch' not in sys.modules"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
