"""What prepare.py does to its data_dir: a rerun does nothing unless asked or changed, a failed or
interrupted run keeps the old data (and tokenizer) whole, killed runs' temporary files go, and one run at a time."""
import errno
import os
import subprocess
import sys
import time

import pytest
import tiktoken

from conftest import ODD, ROOT, STORIES, needs_tokenizer, prepare_error, run_prepare, write_txt
import common
import tokenizer

pytestmark = pytest.mark.usefixtures('hf_cache')  # datasets' Arrow files for local sources stay out of ~/.cache


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


@needs_tokenizer
def test_failed_bpe_rerun_keeps_the_old_tokenizer(tmp_path, monkeypatch):
    """tokenizer.json is replaced with the .bin files, only once all of them are complete."""
    src = write_txt(tmp_path / 'stories.txt', STORIES)
    run_prepare(monkeypatch, f'--source={src}', '--tokenizer=bpe:300', f'--data_dir={tmp_path / "d"}')
    before, counts = snapshot(tmp_path / 'd'), usable(tmp_path / 'd')
    full = disk_fills_at(tmp_path, monkeypatch)
    new = write_txt(tmp_path / 'new.txt', STORIES[:5] + ODD)
    for name in ('bpe:280', 'gpt2'):  # fails at validation.bin, after the new tokenizer is trained
        assert 'No space left' in prepare_error(monkeypatch, f'--source={new}', f'--val_source={full}', f'--tokenizer={name}',
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
    assert 'No space left' in prepare_error(monkeypatch, f'--source={new}', f'--val_source={disk_fills_at(tmp_path, monkeypatch)}',
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
