"""prepare.py's errors: one line, before any work, and no files left behind."""
import json
import os
import subprocess
import sys
import time

import pytest

from conftest import ROOT, STORIES, needs_tokenizer, prepare_error, write_txt

pytestmark = pytest.mark.usefixtures('hf_cache')  # datasets' Arrow files for local sources stay out of ~/.cache


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
        assert expected in prepare_error(monkeypatch, f'--data_dir={out}', *args)
        assert not out.exists() or os.listdir(out) == []


@needs_tokenizer
@pytest.mark.parametrize('values, kind', [([5, 7], 'int64'), ([1.5, 2.5], 'double'), ([['a'], ['b']], 'list'),
                                          (['a', 7], 'mixed')])
def test_text_field_that_is_not_text_is_named(tmp_path, monkeypatch, values, kind):
    (tmp_path / 'nums.jsonl').write_text(''.join(json.dumps({'story': v}) + '\n' for v in values))
    good = write_txt(tmp_path / 'stories.txt', STORIES)
    msg = prepare_error(monkeypatch, f'--source={tmp_path / "nums.jsonl"}', '--text_field=story', f'--val_source={good}',
                f'--data_dir={tmp_path / "d"}')
    assert "field 'story' holds" in msg and 'not text' in msg and '--text_field' in msg
    assert not (tmp_path / 'd').exists()


@pytest.mark.parametrize('arg', ['--batch_size=0', '--num_threads=-1', '--val_fraction=0', '--val_fraction=1.0',
                                 '--max_docs=-1', '--seed=-1', '--source=', '--data_dir=', '--tokenizer=bpe:256',
                                 '--tokenizer=bpe:65536', '--tokenizer=sentencepiece', '--bpe_dropout=1.0',
                                 '--bpe_copies=0'])
def test_settings_out_of_range_are_one_error_line_before_any_work(tmp_path, monkeypatch, arg):
    src = write_txt(tmp_path / 'stories.txt', STORIES)
    setting = arg[2:arg.index('=')]
    assert prepare_error(monkeypatch, f'--source={src}', f'--data_dir={tmp_path / "d"}', arg).startswith(f'error: {setting}')
    assert not (tmp_path / 'd').exists()


@needs_tokenizer
def test_default_hub_source_offline_fails_fast_with_a_hint(tmp_path, monkeypatch):
    start = time.time()
    msg = prepare_error(monkeypatch, f'--data_dir={tmp_path / "d"}')
    assert time.time() - start < 10
    assert "Hugging Face hub" in msg and '--source=../shared/data/tinystories/train-sample.txt' in msg
    assert not (tmp_path / 'd').exists()


def test_command_line_error_exit_status(tmp_path):
    r = subprocess.run([sys.executable, 'prepare.py', f'--source={tmp_path / "missing.txt"}', f'--data_dir={tmp_path / "d"}'],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stdout == ''
    assert r.stderr.strip().splitlines()[-1] == f"error: no such file or directory: {tmp_path / 'missing.txt'}"
    assert not (tmp_path / 'd').exists()
