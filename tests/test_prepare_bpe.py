"""prepare.py's tokenizers: a BPE trained on the train documents only, one reused from a data_dir or a
checkpoint, BPE-dropout copies, and a rerun that knows which tokenizer made the data."""
import os

import numpy as np
import pytest

from conftest import ODD, STORIES, needs_tokenizer, prepare_error, read_prepared, run_prepare, write_txt
import tokenizer

pytestmark = pytest.mark.usefixtures('hf_cache')  # datasets' Arrow files for local sources stay out of ~/.cache


def bpe_docs(data_dir):
    """The documents of data_dir's splits, decoded with its own tokenizer.json, and that tokenizer."""
    meta, tokens = read_prepared(data_dir)
    enc = tokenizer.get_tokenizer(tokenizer.data_tokenizer(str(data_dir), meta))
    docs = {split: enc.decode(ids.tolist()).split('<|endoftext|>')[:-1] for split, ids in tokens.items()}
    return docs, enc


def test_bpe_trains_on_the_train_documents_only(tmp_path, monkeypatch):
    src = write_txt(tmp_path / 'stories.txt', STORIES)
    jsons = []
    for name, val in (('a', STORIES[:3]), ('b', ODD)):
        val_src = write_txt(tmp_path / f'val-{name}.txt', val)
        run_prepare(monkeypatch, f'--source={src}', f'--val_source={val_src}', '--tokenizer=bpe:300',
                    f'--data_dir={tmp_path / name}')
        meta, _ = read_prepared(tmp_path / name)
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
    assert read_prepared(tmp_path / 'd')[0]['tokenizer'] == 'gpt2' and not (tmp_path / 'd' / 'tokenizer.json').exists()


def test_bpe_dropout_adds_copies_of_the_train_documents_split_otherwise(tmp_path, monkeypatch, capsys):
    """train.bin: the documents as the tokenizer splits them, then bpe_copies more passes that decode to the same
    documents in other, mostly smaller pieces; validation.bin and the tokenizer as without it."""
    src, val = write_txt(tmp_path / 'stories.txt', STORIES), write_txt(tmp_path / 'val.txt', STORIES[:4])
    common_args = [f'--source={src}', f'--val_source={val}', '--tokenizer=bpe:300']
    run_prepare(monkeypatch, *common_args, f'--data_dir={tmp_path / "plain"}')
    run_prepare(monkeypatch, *common_args, '--bpe_dropout=0.3', '--bpe_copies=3', f'--data_dir={tmp_path / "d"}')
    assert '3 BPE-dropout copies among them' in capsys.readouterr().out
    (meta, tokens), (_, plain) = read_prepared(tmp_path / 'd'), read_prepared(tmp_path / 'plain')
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
    assert 'bpe_dropout needs a BPE tokenizer' in prepare_error(monkeypatch, f'--source={src}', '--bpe_dropout=0.1',
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
    assert prepared('--tokenizer=bpe:290') and read_prepared(tmp_path / 'd')[0]['vocab_size'] == 290
    os.remove(tok)
    assert prepared('--tokenizer=bpe:290') and tok.exists()  # the data is no use without it
    assert prepared() and not tok.exists()  # gpt2 again: a tokenizer.json would mislead
    assert not prepared('--tokenizer=gpt2')
    assert read_prepared(tmp_path / 'd')[0]['tokenizer'] == 'gpt2'
