import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT, TINYSTORIES, needs_shared, needs_tokenizer
import sample
import tokenizer
from tokenizer import GPT2, EOT

TRICKY = ['', ' ', '  two leading spaces', 'trailing spaces  ', '\n', '\n\nnew\nlines\n\n', '\ttabs\t\tand\t',
          ' \t \n mixed \r\n', 'naïve café, Straße, Ωμέγα', 'emoji 😀🐉👩‍👩‍👧 done', '中文故事。小猫很开心！',
          '日本語とEnglish', "don't 'quote' it's", 'a<|endoftext|>b', EOT, ' <|endoftext|> ', '\x00\x7f\u200b',
          'Once upon a time, there was a little girl named Lily.']
STORIES = ["Once upon a time there was a cat named Tom. Tom liked to play.",
           "One day, a dog found a big red ball in the park. He was very happy!",
           "Lily and Ben went to the beach. They made a sand castle and swam."] * 20


def story_docs(name):
    """Documents of a TinyStories .txt file, split independently of prepare.py."""
    with open(os.path.join(TINYSTORIES, name), encoding='utf-8') as f:
        return [p.strip() for p in re.split(r'^<\|endoftext\|>$', f.read(), flags=re.M) if p.strip()]


@pytest.fixture(scope='module')
def bpe_json():
    """tokenizer.json text of bpe:512 and bpe:4096 trained once on the train sample."""
    if not os.path.isdir(TINYSTORIES):
        pytest.skip(f'{TINYSTORIES} is absent')
    docs = story_docs('train-sample.txt')
    return {n: tokenizer.train_bpe(docs, n) for n in (512, 4096)}


def bpe(text):
    return tokenizer.get_tokenizer({'name': 'bpe', 'json': text})


@needs_shared
@pytest.mark.parametrize('n', [512, 4096])
def test_every_story_round_trips(bpe_json, n):
    enc = bpe(bpe_json[n])
    assert (enc.name, enc.n_vocab, enc.eot_token) == (f'bpe:{n}', n, n - 1)
    docs = story_docs('train-sample.txt') + story_docs('valid-sample.txt')
    assert len(docs) > 1500
    for doc in docs:
        ids = enc.encode_ordinary(doc)
        assert enc.decode(ids) == doc
        assert max(ids) < enc.eot_token


@needs_shared
def test_splits_as_hugging_face_tokenizers_does(bpe_json):
    """bpe_encoding runs tiktoken over the tokens of the tokenizer.json; Hugging Face tools reading
    that file must find the same ids for the same text."""
    from tokenizers import Tokenizer
    docs = story_docs('valid-sample.txt') + TRICKY
    for n, text in bpe_json.items():
        hf = Tokenizer.from_str(text)
        hf.encode_special_tokens = True  # as encode_ordinary: <|endoftext|> in a text is text
        enc = bpe(text)
        assert [e.ids for e in hf.encode_batch(docs)] == [enc.encode_ordinary(d) for d in docs]
        assert hf.decode(enc.encode(' a<|endoftext|>b', allowed_special='all'), skip_special_tokens=False) == ' a<|endoftext|>b'


@pytest.mark.parametrize('n', [257, 300, 1000])
def test_tricky_text_round_trips(n):
    enc = bpe(tokenizer.train_bpe(STORIES + TRICKY, n))
    for s in TRICKY:
        ids = enc.encode_ordinary(s)
        assert enc.decode(ids) == s
        assert enc.eot_token not in ids  # <|endoftext|> in a text is only text
        assert b''.join(enc.decode_single_token_bytes(t) for t in ids) == s.encode('utf-8')
    assert enc.encode('a<|endoftext|>b', allowed_special='all') == [*enc.encode_ordinary('a'), enc.eot_token,
                                                                    *enc.encode_ordinary('b')]
    assert enc.decode_single_token_bytes(enc.eot_token) == EOT.encode()
    once = 'Once upon a time'
    assert (len(enc.encode_ordinary(once)) == len(once)) == (n == 257)  # bpe:257 has no merges, the others do


def test_token_bytes_can_end_inside_a_character():
    """sample.py streams a token's bytes through an incremental UTF-8 decoder and eval.py counts them:
    both need each token's exact bytes, even those that hold part of a character."""
    text = 'The 🐉 dragon said 你好 and ünïcödé.'
    enc = bpe(tokenizer.train_bpe(STORIES + [text] * 5, 320))
    ids = enc.encode_ordinary(text)
    pieces = [enc.decode_single_token_bytes(t) for t in ids]
    assert b''.join(pieces) == text.encode('utf-8')
    assert any(not valid_utf8(p) for p in pieces)  # some token ends inside a character
    assert ''.join(sample.decode_utf8(ids, enc)) == text
    assert sum(map(len, pieces)) == len(text.encode('utf-8'))


def valid_utf8(b):
    try:
        b.decode('utf-8')
        return True
    except UnicodeDecodeError:
        return False


def test_training_is_deterministic_and_only_its_texts_count():
    docs = STORIES + TRICKY
    a = tokenizer.train_bpe(docs, 400)
    assert tokenizer.train_bpe(iter(docs), 400) == a  # a stream, as prepare.py gives
    assert tokenizer.train_bpe(docs + ['The zebra quietly zigzagged.'] * 9, 400) != a


def test_a_word_of_megabytes_trains_in_seconds_and_round_trips():
    """One 2 MB run of letters (a line of '=' or of digits is another): the trainer, whose time grows with
    the square of a word's length, would take hours; it sees the run cut into words of MAX_WORD characters."""
    code = ("import random, tokenizer; random.seed(0); text = ''.join(random.choices('abcdefghijklmnopqrstuvwxyz', k=2_000_000)); "
            "enc = tokenizer.get_tokenizer({'name': 'bpe', 'json': tokenizer.train_bpe(['Once upon a time', text], 512)}); "
            "ids = enc.encode_ordinary(text); assert enc.decode(ids) == text and enc.n_vocab == 512, enc.n_vocab; "
            "assert len(ids) < len(text) * 0.8, len(ids)")  # merges were learned from the run
    # in a process of its own, which the timeout can end: training runs in Rust, out of Python's reach
    r = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def prepare(name, texts, data_dir):
    """What prepare.py does with a tokenizer: train it, write its tokenizer.json, encode with it."""
    state = tokenizer.train_tokenizer(name, texts)
    if state['json'] is not None:
        (data_dir / 'tokenizer.json').write_text(state['json'], encoding='utf-8')
    return tokenizer.get_tokenizer(state)


@needs_shared
def test_deterministic_on_the_sample(bpe_json):
    docs = story_docs('train-sample.txt')
    assert tokenizer.train_bpe(docs, 4096) == bpe_json[4096]


@pytest.mark.parametrize('name', ['bpe:256', 'bpe:65536', 'bpe:0', 'bpe:', 'bpe:4k', 'bpe:-5', 'sentencepiece', 'GPT2', 4096])
def test_bad_names_end_the_run_in_one_line(name, tmp_path):
    with pytest.raises(SystemExit) as e:
        prepare(name, STORIES, tmp_path)
    assert str(e.value).startswith(f'error: tokenizer={name} is not gpt2, bpe:N with N from 257 to 65535')
    assert '\n' not in str(e.value) and not os.listdir(tmp_path)


def test_name_range():
    assert tokenizer.parse_name('bpe:257') == 257 and tokenizer.parse_name('bpe:65535') == 65535
    assert tokenizer.parse_name('gpt2') == 0


def test_prepare_then_load_from_meta_and_from_checkpoint(tmp_path):
    data_dir = str(tmp_path)
    enc = prepare('bpe:300', iter(STORIES + TRICKY), tmp_path)
    with open(tmp_path / 'tokenizer.json', encoding='utf-8') as f:
        text = f.read()
    meta = tokenizer.meta_fields(enc)
    assert meta == {'tokenizer': 'bpe:300', 'vocab_size': 300, 'eot_token': 299, 'dtype': 'uint16'}
    state = tokenizer.data_tokenizer(data_dir, meta)
    assert state == {'name': 'bpe:300', 'json': text}
    ckpt = {'model': {}, 'tokenizer': state}
    assert tokenizer.checkpoint_tokenizer(ckpt) == state
    from_meta, from_ckpt = tokenizer.get_tokenizer(state), tokenizer.get_tokenizer(tokenizer.checkpoint_tokenizer(ckpt))
    for s in STORIES[:3] + TRICKY:
        assert from_meta.encode_ordinary(s) == from_ckpt.encode_ordinary(s) == enc.encode_ordinary(s)
    tokenizer.check_same(state, tokenizer.checkpoint_tokenizer(ckpt), data_dir, 'out/best.pt')


def test_few_documents_give_fewer_tokens(tmp_path, capsys):
    enc = prepare('bpe:5000', ['a tiny story about a cat.'], tmp_path)
    assert 257 < enc.n_vocab < 5000 and enc.eot_token == enc.n_vocab - 1
    assert f'trained {enc.name}' in capsys.readouterr().err
    assert tokenizer.meta_fields(enc)['vocab_size'] == enc.n_vocab
    assert tokenizer.data_tokenizer(str(tmp_path), tokenizer.meta_fields(enc))['name'] == enc.name


def test_a_data_dir_that_lost_or_changed_its_tokenizer_json_is_refused(tmp_path):
    enc = prepare('bpe:300', STORIES, tmp_path)
    meta = tokenizer.meta_fields(enc)
    other = tokenizer.train_bpe(STORIES, 280)
    (tmp_path / 'tokenizer.json').write_text(other, encoding='utf-8')
    with pytest.raises(SystemExit, match='not what .*meta.json says: run prepare.py again'):
        tokenizer.data_tokenizer(str(tmp_path), meta)
    os.remove(tmp_path / 'tokenizer.json')
    with pytest.raises(SystemExit, match='names tokenizer bpe:300, but .*tokenizer.json is unreadable'):
        tokenizer.data_tokenizer(str(tmp_path), meta)
    with pytest.raises(SystemExit, match="names tokenizer 'sp:9', neither gpt2 nor bpe:N"):
        tokenizer.data_tokenizer(str(tmp_path), {**meta, 'tokenizer': 'sp:9'})
    for bad in ('{"model": 1}', other.replace(EOT, '<|im_end|>'), 'not json'):
        with pytest.raises(SystemExit, match='the tokenizer.json of bpe:300 is not one that prepare.py wrote'):
            tokenizer.get_tokenizer({'name': 'bpe:300', 'json': bad})


def test_old_data_and_checkpoints_mean_gpt2(tmp_path):
    assert tokenizer.data_tokenizer(str(tmp_path), {'vocab_size': 50257, 'dtype': 'uint16'}) == GPT2
    assert tokenizer.checkpoint_tokenizer({'model': {}, 'model_args': {}}) == GPT2
    for bad in ('gpt2', {'name': 'bpe:300', 'json': None}, {'name': 'gpt2'}):
        with pytest.raises(SystemExit, match="checkpoint's 'tokenizer' is not"):
            tokenizer.checkpoint_tokenizer({'tokenizer': bad})


def test_mismatches_are_one_line_errors():
    a = {'name': 'bpe:300', 'json': tokenizer.train_bpe(STORIES, 300)}
    b = {'name': 'bpe:300', 'json': tokenizer.train_bpe(STORIES + TRICKY, 300)}
    for data, ckpt, says in ((a, GPT2, 'prepared with tokenizer bpe:300, but out/best.pt was trained with gpt2'),
                             (GPT2, a, 'prepared with tokenizer gpt2, but out/best.pt was trained with bpe:300'),
                             (a, b, 'trained with another bpe:300, trained on other documents')):
        with pytest.raises(SystemExit) as e:
            tokenizer.check_same(data, ckpt, 'data/x', 'out/best.pt')
        assert says in str(e.value) and '\n' not in str(e.value)
    tokenizer.check_same(GPT2, dict(GPT2), 'data/x', 'out/best.pt')


@needs_tokenizer
def test_gpt2_through_the_same_interface(tmp_path):
    enc = prepare('gpt2', iter(()), tmp_path)
    assert not os.listdir(tmp_path)  # gpt2 needs no tokenizer.json
    assert tokenizer.meta_fields(enc) == {'tokenizer': 'gpt2', 'vocab_size': 50257, 'eot_token': 50256, 'dtype': 'uint16'}
    assert tokenizer.data_tokenizer(str(tmp_path), tokenizer.meta_fields(enc)) == GPT2
    enc = tokenizer.get_tokenizer(tokenizer.checkpoint_tokenizer({}))
    assert enc.name == 'gpt2' and enc.encode_ordinary('Hello world') == [15496, 995]
    for s in TRICKY:
        assert enc.decode(enc.encode_ordinary(s)) == s
    assert enc.encode('a<|endoftext|>', allowed_special='all')[-1] == enc.eot_token
