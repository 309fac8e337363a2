import fcntl
import io
import os
import runpy
import signal
import subprocess
import sys
import termios
import time
from contextlib import redirect_stderr, redirect_stdout

import pytest
import torch

from conftest import ROOT, needs_tokenizer, put_where_the_hint_trains
from model import GPT, GPTConfig

pytestmark = needs_tokenizer
EOT = 50256
MODEL_ARGS = dict(n_layer=1, n_head=2, n_embd=16, block_size=32, vocab_size=50257)


def save_checkpoint(model, path):
    torch.save({'model': model.state_dict(), 'model_args': MODEL_ARGS, 'config': {'data_dir': 'nowhere'}}, path)


@pytest.fixture(scope='module')
def enc():
    from tokenizer import get_tokenizer
    return get_tokenizer()


@pytest.fixture(scope='module')
def random_dir(tmp_path_factory):
    """A tiny untrained model: its text is noise, but noise that depends on the seed."""
    out = tmp_path_factory.mktemp('random')
    torch.manual_seed(0)
    save_checkpoint(GPT(GPTConfig(**MODEL_ARGS)), out / 'best.pt')
    return out


@pytest.fixture(scope='module')
def chain(tmp_path_factory, enc):
    """A model that writes ' one two three', then <|endoftext|>, then ' one two three' again, at any
    seed: a large position embedding points each position at its next token's row of the (tied)
    embedding. The prompt is <|endoftext|> + 'Once', so the story starts at position 2."""
    out = tmp_path_factory.mktemp('chain')
    torch.manual_seed(0)
    model = GPT(GPTConfig(**MODEL_ARGS))
    words = [enc.encode(w)[0] for w in (' one', ' two', ' three')] + [EOT]
    with torch.no_grad():
        wte, wpe = model.transformer.wte.weight, model.transformer.wpe.weight
        for i, token in enumerate(words):
            wte[token] = 0
            wte[token, i] = 10
        for pos in range(1, 32):
            wpe[pos] = 0
            wpe[pos, (pos - 1) % len(words)] = 100  # position pos predicts the token at pos + 1
    save_checkpoint(model, out / 'best.pt')
    return out


# a story whose emoji (4 bytes) and accented letter (2 bytes) a BPE trained on English splits across tokens
BPE_STORY = 'The dragon said 🐉olé!'


@pytest.fixture(scope='module')
def bpe_chain(tmp_path_factory):
    """As chain, with a bpe tokenizer: a model that writes BPE_STORY, then <|endoftext|>, after the
    prompt <|endoftext|>. Its checkpoint holds the tokenizer and names a data_dir that does not exist."""
    import tokenizer
    out = tmp_path_factory.mktemp('bpe-chain')
    text = tokenizer.train_bpe(['The dragon and the cat said hello to the dog.'] * 20, 300)
    enc = tokenizer.get_tokenizer({'name': 'bpe', 'json': text})
    words = enc.encode_ordinary(BPE_STORY) + [enc.eot_token]
    assert len(set(words)) == len(words) <= MODEL_ARGS['n_embd'], 'each token needs its own direction'
    assert sum(not ok_utf8(enc.decode_single_token_bytes(t)) for t in words) >= 3, 'tokens must split characters'
    args = {**MODEL_ARGS, 'vocab_size': enc.n_vocab}
    torch.manual_seed(0)
    model = GPT(GPTConfig(**args))
    with torch.no_grad():
        wte, wpe = model.transformer.wte.weight, model.transformer.wpe.weight
        for i, token in enumerate(words):
            wte[token] = 0
            wte[token, i] = 10
        for pos in range(32):
            wpe[pos] = 0
            wpe[pos, pos % len(words)] = 100  # position pos predicts the token at pos + 1
    state = {'name': enc.name, 'json': text}
    torch.save({'model': model.state_dict(), 'model_args': args, 'config': {'data_dir': str(out / 'deleted')},
                'tokenizer': state}, out / 'best.pt')
    torch.save({'model': model.state_dict(), 'model_args': args}, out / 'no-tokenizer.pt')  # as from before bpe
    return out


def ok_utf8(b):
    try:
        b.decode('utf-8')
        return True
    except UnicodeDecodeError:
        return False


def test_bpe_checkpoint_streams_whole_characters_without_its_data(bpe_chain):
    assert not (bpe_chain / 'deleted').exists()
    out, err = sample(bpe_chain)
    assert out == BPE_STORY + '\n'  # streamed a piece at a time, no U+FFFD
    assert 'tokens/s' in err.splitlines()[-1]
    assert story(bpe_chain, '--num_samples=2') == f'{BPE_STORY}\n---------------\n{BPE_STORY}\n'


def test_checkpoint_without_a_tokenizer_means_gpt2(bpe_chain):
    with pytest.raises(SystemExit, match=r'^error: .*no-tokenizer.pt has vocab_size=\d+, too small for its tokenizer gpt2 \(50257\)$'):
        sample(bpe_chain, f'--ckpt={bpe_chain / "no-tokenizer.pt"}')


def sample(out_dir, *args):
    """Run sample.py in this process, as `python sample.py --out_dir=... args` would (None: no --out_dir)
    but without starting Python and torch again; returns (stdout, stderr). An error is the
    SystemExit('error: ...') that exits with status 1."""
    argv, sys.argv = sys.argv, ['sample.py', *([f'--out_dir={out_dir}'] if out_dir else []), *args]
    out, err = io.StringIO(), io.StringIO()
    try:
        with redirect_stdout(out), redirect_stderr(err):
            runpy.run_path(os.path.join(ROOT, 'sample.py'), run_name='__main__')
    finally:
        sys.argv = argv
    return out.getvalue(), err.getvalue()


def story(out_dir, *args):
    return sample(out_dir, *args)[0]


def test_command_line(chain, tmp_path):
    run = subprocess.run([sys.executable, 'sample.py', f'--out_dir={chain}', '--start=Once'],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout == 'Once one two three\n'
    assert run.stderr.splitlines()[-1].startswith('3 tokens in') and 'tokens/s' in run.stderr
    run = subprocess.run([sys.executable, 'sample.py', f'--out_dir={tmp_path}', '--temperature=-1'],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and run.stdout == ''
    assert run.stderr.splitlines()[-1] == 'error: temperature must be >= 0 (0 is greedy) and finite, got -1.0'


def test_bare_sample_reads_what_its_hint_trains(chain, tmp_path, monkeypatch):
    """No --out_dir: sample.py reads what the command its error names (the README's first run) writes."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        sample(None)
    put_where_the_hint_trains(e.value, chain / 'best.pt')
    assert story(None, '--start=Once') == 'Once one two three\n'


def test_same_seed_same_stories_other_seed_other_stories(random_dir):
    args = ['--start=Once upon a time', '--num_samples=2', '--max_new_tokens=12']
    a, b = story(random_dir, *args, '--seed=1'), story(random_dir, *args, '--seed=1')
    assert a == b and a != story(random_dir, *args, '--seed=2')
    stories = a.split('\n---------------\n')
    assert len(stories) == 2 and all(s.startswith('Once upon a time') for s in stories)


def test_stories_stop_at_end_of_text(chain):
    assert story(chain, '--start=Once') == 'Once one two three\n'
    batch = story(chain, '--start=Once', '--num_samples=2', '--temperature=1.0')
    assert batch == 'Once one two three\n---------------\nOnce one two three\n'
    on = story(chain, '--start=Once', '--max_new_tokens=7', '--stop_at_eot=False')
    assert on == 'Once one two three<|endoftext|> one two three\n'


def test_streamed_story_is_the_generated_one(random_dir, enc):
    from common import load_model
    from generate import generate
    opts = dict(temperature=1.0, top_k=None, top_p=0.9, repetition_penalty=1.3, window_shift=4)
    streamed = story(random_dir, '--start=Hi', '--seed=7', '--max_new_tokens=40', '--dtype=float32',
                     *(f'--{k}={v}' for k, v in opts.items()))
    model, _ = load_model(os.path.join(random_dir, 'best.pt'))
    torch.manual_seed(7)
    y = generate(model, torch.tensor([[EOT] + enc.encode('Hi')]), 40, eos_token=EOT, **opts)[0, 2:].tolist()
    y = y[:y.index(EOT)] if EOT in y else y
    assert streamed == 'Hi' + enc.decode(y) + '\n'


@pytest.mark.parametrize('cpu_bf16, expected', [(True, torch.bfloat16), (False, torch.float32)])
def test_default_precision_follows_the_rule(random_dir, monkeypatch, cpu_bf16, expected):
    """dtype=auto casts the weights to bf16 on a CPU with bf16 instructions, as train.py and
    eval.py pick bf16 there, and keeps float32 on one without them."""
    import common
    models = []

    loaded = common.load_model

    def load_model(*args, **kwargs):
        model, checkpoint = loaded(*args, **kwargs)
        models.append(model)
        return model, checkpoint
    monkeypatch.setattr(common, 'load_model', load_model)
    monkeypatch.setattr(torch.cpu, '_is_avx512_bf16_supported', lambda: cpu_bf16, raising=False)
    assert story(random_dir, '--start=Once', '--max_new_tokens=4').startswith('Once')
    assert next(models[0].parameters()).dtype == expected


def test_sampling_options_reach_the_model(random_dir):
    args = ['--start=Once', '--max_new_tokens=15']
    greedy = story(random_dir, *args, '--temperature=0')
    assert story(random_dir, *args, '--top_k=1', '--seed=1') == greedy
    assert story(random_dir, *args, '--top_p=1e-6', '--top_k=None', '--seed=2') == greedy
    assert story(random_dir, *args, '--temperature=0', '--repetition_penalty=100.0') != greedy


@pytest.mark.parametrize('temperature', [1e-37, 1e-45, 1e-300, 5e-324])
def test_tiny_temperature_is_greedy(temperature):
    """Dividing by a temperature this small overflows float32 logits (inf - inf = NaN, and every
    token became the last id, <|endoftext|>); in the limit it is greedy."""
    from sampling import sample_logits
    logits = torch.randn(64, 50257, generator=torch.Generator().manual_seed(0)) * 10
    assert torch.equal(sample_logits(logits.clone(), temperature), logits.argmax(-1, keepdim=True))
    assert torch.equal(sample_logits(logits.clone(), temperature, top_k=5, top_p=0.9), logits.argmax(-1, keepdim=True))


def test_int8_weights_write_the_chain(chain):
    # int8 rounds the weights to 1/127 of each row's largest: the chain's wide margins survive it
    assert story(chain, '--start=Once', '--int8=True', '--dtype=float32') == 'Once one two three\n'
    assert story(chain, '--start=Once', '--int8=True', '--dtype=bfloat16', '--compile=True') == 'Once one two three\n'


def test_compiled_decoding_writes_the_same_stories(random_dir):
    args = ['--start=Once upon a time', '--max_new_tokens=12', '--num_samples=2', '--temperature=0', '--dtype=float32']
    assert story(random_dir, *args, '--compile=True') == story(random_dir, *args)


def test_compile_without_a_cpp_compiler_is_one_clear_error(random_dir):
    import torch._inductor.config
    from torch._inductor.cpp_builder import cpp_compiler_search
    cpp_compiler_search.cache_clear()  # it remembers the compiler it found
    try:
        with torch._inductor.config.patch({'cpp.cxx': ('no-such-c++-compiler',)}):
            with pytest.raises(SystemExit, match=r'^error: --compile=True on the CPU needs a C\+\+ compiler'):
                story(random_dir, '--compile=True', '--max_new_tokens=2')
    finally:
        cpp_compiler_search.cache_clear()


def test_tiny_temperature_story_is_the_greedy_one(random_dir):
    args = ['--start=Once', '--max_new_tokens=8', '--num_samples=2']
    assert story(random_dir, *args, '--temperature=1e-45') == story(random_dir, *args, '--temperature=0')


@pytest.mark.parametrize('num_samples', [1, 3])
def test_ctrl_c_prints_what_exists_of_every_story(chain, monkeypatch, num_samples):
    """KeyboardInterrupt after two tokens: each story so far is printed, and the exit status is 130."""
    import generate
    stream = generate.stream
    def interrupted(*args, **kwargs):
        for i, token in enumerate(stream(*args, **kwargs)):
            if i == 2:
                raise KeyboardInterrupt
            yield token
    monkeypatch.setattr(generate, 'stream', interrupted)
    out, err = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, 'argv', ['sample.py', f'--out_dir={chain}', '--start=Once', f'--num_samples={num_samples}'])
    previous = signal.getsignal(signal.SIGINT)
    with pytest.raises(SystemExit) as e, redirect_stdout(out), redirect_stderr(err):
        try:
            runpy.run_path(os.path.join(ROOT, 'sample.py'), run_name='__main__')
        except KeyboardInterrupt:
            pytest.fail('the KeyboardInterrupt escaped sample.py')
        finally:
            signal.signal(signal.SIGINT, previous)  # sample.py's, for a second Ctrl-C, would end pytest
    assert e.value.code == 130
    assert out.getvalue() == '\n---------------\n'.join(['Once one two'] * num_samples) + '\n'
    assert 'interrupted' in err.getvalue()


def popen(out_dir, *args, stdout=subprocess.PIPE):
    # a shell's background job starts with SIGINT ignored, which the tests and then sample.py would
    # inherit (Python leaves an ignored SIGINT ignored): the child gets the default a terminal gives
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return subprocess.Popen([sys.executable, 'sample.py', f'--out_dir={out_dir}', '--start=Once', *args], cwd=ROOT,
                                stdout=stdout, stderr=subprocess.PIPE, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    finally:
        signal.signal(signal.SIGINT, previous)


def test_sigint_during_a_long_story_exits_130_without_a_traceback(random_dir):
    run = popen(random_dir, '--max_new_tokens=1000000', '--stop_at_eot=False')
    shown = os.read(run.stdout.fileno(), 1000)  # the story has begun
    run.send_signal(signal.SIGINT)
    rest, err = run.communicate(timeout=60)
    assert run.returncode == 130, err
    assert (shown + rest).startswith(b'Once') and rest.endswith(b'\n') and b'Traceback' not in err


@pytest.mark.skipif(not hasattr(fcntl, 'F_SETPIPE_SZ'), reason="needs Linux's pipe sizes")
def test_a_second_sigint_while_the_stories_print_exits_130_at_once(random_dir, tmp_path):
    """A reader that has stopped reading: the first Ctrl-C leaves sample.py waiting to print more than the
    pipe holds, and a second one ends it, without a traceback."""
    (tmp_path / 'prompt.txt').write_text('Once upon a time ' * 300)  # 5 KB a story: more than the pipe
    r, w = os.pipe()
    fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 4096)
    run = popen(random_dir, f'--start=FILE:{tmp_path / "prompt.txt"}', '--num_samples=2', '--max_new_tokens=1000000',
                stdout=w)
    os.close(w)
    with open(r, 'rb') as out:
        try:
            for line in run.stderr:  # logged just before the stories begin
                if line.startswith(b'warning: the prompt is'):
                    break
            time.sleep(0.5)
            run.send_signal(signal.SIGINT)
            deadline = time.time() + 60
            while int.from_bytes(fcntl.ioctl(r, termios.FIONREAD, bytes(4)), sys.byteorder) < 4000:  # full
                assert run.poll() is None and time.time() < deadline
                time.sleep(0.1)
            time.sleep(0.5)
            run.send_signal(signal.SIGINT)
            assert out.read().startswith(b'Once upon a time')
        finally:
            run.kill()  # nothing, unless the test failed with sample.py still waiting for the pipe
    err = run.stderr.read()
    assert run.wait(timeout=60) == 130 and b'Traceback' not in err, err


@pytest.mark.parametrize('num_samples', [1, 2])
def test_a_closed_pipe_ends_quietly(random_dir, num_samples):
    """`python sample.py | head -c 4`: the reader goes away, sample.py stops without a traceback."""
    run = popen(random_dir, f'--num_samples={num_samples}', '--stop_at_eot=False',
                f'--max_new_tokens={1000000 if num_samples == 1 else 5}')
    if num_samples == 1:
        os.read(run.stdout.fileno(), 4)
    run.stdout.close()
    err = run.stderr.read()
    assert run.wait(timeout=60) == 141 and b'Traceback' not in err and b'BrokenPipe' not in err, err


def test_prompt_from_a_file(chain, tmp_path):
    (tmp_path / 'prompt.txt').write_text('Once')
    assert story(chain, f'--start=FILE:{tmp_path / "prompt.txt"}') == 'Once one two three\n'
    with pytest.raises(SystemExit, match='error: cannot read the prompt file .*nope.txt'):
        sample(chain, f'--start=FILE:{tmp_path / "nope.txt"}')


def test_too_long_prompt_keeps_its_end_and_warns(random_dir):
    out, err = sample(random_dir, '--start=' + 'Once upon a time ' * 20, '--max_new_tokens=3')
    assert out.startswith('Once upon a time ' * 20)
    assert 'warning: the prompt is 82 tokens' in err and 'its last 32' in err  # with <|endoftext|>


@pytest.mark.parametrize('what, message', [('missing', 'no checkpoint at .*best.pt .*train'),
                                           ('foreign', 'is not a train.py checkpoint'),
                                           ('corrupt', 'cannot read checkpoint')])
def test_bad_checkpoints(tmp_path, what, message):
    if what == 'foreign':
        torch.save({'foo': 1}, tmp_path / 'best.pt')
    elif what == 'corrupt':
        (tmp_path / 'best.pt').write_bytes(b'not a checkpoint')
    with pytest.raises(SystemExit, match=f'^error: .*{message}'):
        sample(tmp_path)


@pytest.mark.parametrize('arg, message', [
    ('--temperature=-1', 'temperature must be >= 0'), ('--top_p=0', 'top_p must be'), ('--top_p=1.5', 'top_p must be'),
    ('--top_p=x', 'top_p expects float or None'), ('--top_k=0', 'top_k must be'), ('--num_samples=0', 'num_samples must be'),
    ('--max_new_tokens=0', 'max_new_tokens must be'), ('--repetition_penalty=0', 'repetition_penalty must be'),
    ('--window_shift=0', 'window_shift must be'), ('--dtype=float16', 'dtype=float16 is for GPUs'),
    ('--temperature=1e999', 'temperature must be'), ('--repetition_penalty=1e999', 'repetition_penalty must be'),
    ('--ckpt=', 'ckpt must be'), ('--threads=-1', r'threads must be a whole number >= 0 \(0: one per core\), got -1$'),
    ('--temprature=1', "unknown config key 'temprature'")])
def test_bad_options_are_errors_before_loading(tmp_path, arg, message):
    with pytest.raises(SystemExit, match=f'^error: {message}'):
        sample(tmp_path, arg)  # no checkpoint in tmp_path: caught before loading one


@pytest.mark.parametrize('device, message', [('gpu', 'device=gpu is not one of auto, cpu, cuda, cuda:N, mps'),
                                             ('cuda:99', 'device=cuda:99 is not available here'),
                                             ('mps', 'device=mps is not available here')])
def test_unknown_or_missing_device_is_named_before_loading(tmp_path, device, message):
    if device == 'mps' and torch.backends.mps.is_available():
        pytest.skip('this machine has mps')
    with pytest.raises(SystemExit, match=f'^error: {message}.*this machine has cpu'):
        sample(tmp_path, f'--device={device}')  # no checkpoint in tmp_path: caught before loading one


def test_threads_sets_torchs_thread_count(chain):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert story(chain, '--start=Once', '--threads=2') == 'Once one two three\n'
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_window_shift_past_block_size(random_dir):
    with pytest.raises(SystemExit, match='^error: window_shift must be at most block_size=32'):
        sample(random_dir, '--window_shift=33')


def test_utf8_decoder_waits_for_whole_characters(enc):
    from tokenizer import decode_utf8
    text = 'Café 🐶 naïve'
    tokens = enc.encode(text)
    pieces = [enc.decode_single_token_bytes(t) for t in tokens]
    assert any(p.decode('utf-8', errors='replace') != p.decode('utf-8', errors='ignore') for p in pieces), \
        'the test needs a token that splits a character'
    out = list(decode_utf8(tokens, enc))
    assert ''.join(out) == text and '\ufffd' not in ''.join(out)
    assert len(out) < len(tokens)  # a split character waited for its last byte
    # the emoji's first byte alone never completes: it ends as one replacement character, like decode()
    cut = enc.encode('🐶')[:1]
    assert ''.join(decode_utf8(cut, enc)) == enc.decode(cut) == '\ufffd'
    assert ''.join(decode_utf8([EOT], enc)) == '<|endoftext|>'


def test_utf8_decoder_equals_decode_on_random_tokens(enc):
    from tokenizer import decode_utf8
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        tokens = torch.randint(enc.n_vocab, (8,), generator=g).tolist()
        assert ''.join(decode_utf8(tokens, enc)) == enc.decode(tokens)
