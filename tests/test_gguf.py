"""GGUF as a user meets it: export.py --format=gguf on models of both recipes (GPT-2's, Llama's) and
both tokenizer kinds (tiktoken's GPT-2, a trained BPE), read back by transformers with model.py's
logits, and run by llama.cpp itself: its tokens are tokenizer.py's (with <|endoftext|> before the
prompt) and its greedy text is sample.py's. The other types within a stated perplexity; one-line
errors that leave nothing behind. llama.cpp's tests need its tools, which ../shared/tools/llama-cpp.sh
builds (LLAMA_CPP_BIN names their folder); without them they skip, saying so."""
import fcntl
import json
import os
import re
import subprocess
import sys
import tempfile

import pytest
import torch

import tokenizer
from common import load_model
from conftest import ROOT, needs_tokenizer, write_data

pytestmark = needs_tokenizer
gguf = pytest.importorskip('gguf')

LLAMA_CPP_BIN = os.environ.get('LLAMA_CPP_BIN') or os.path.expanduser('~/.cache/llama.cpp-tools/build/bin')
needs_llama_cpp = pytest.mark.skipif(
    not os.path.isfile(os.path.join(LLAMA_CPP_BIN, 'llama-completion')),
    reason=f"llama.cpp's tools are not in {LLAMA_CPP_BIN}: bash ../shared/tools/llama-cpp.sh builds them "
           "(it needs cmake and a C++ compiler), or set LLAMA_CPP_BIN to their folder")
ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'HF_HUB_OFFLINE': '1'}
TINY = ['--batch_size=4', '--gradient_accumulation_steps=1', '--eval_iters=2', '--log_interval=50', '--warmup_iters=1',
        '--learning_rate=1e-2', '--device=cpu', '--dtype=float32', '--block_size=32', '--dropout=0.0', '--n_layer=2',
        '--n_head=2', '--n_embd=32', '--max_iters=150', '--eval_interval=75', '--lr_decay_iters=150']
LLAMA = ['--pos_emb=rope', '--norm=rmsnorm', '--mlp=swiglu', '--bias=False', '--rope_theta=1000.0', '--tie_embeddings=False']
RECIPES = {'gpt2': [], 'llama': LLAMA, 'arcee': LLAMA + ['--mlp=relu2']}  # arcee: Llama's with ReLU² for SwiGLU
STORIES = ['Once upon a time, there was a little cat named Tom. Tom liked milk and naps in the sun.',
           'Lily saw a big red ball. "Can I play?" she asked. Her mom said yes, and Lily smiled.',
           'The café had a dog 🐶 who loved cake. Every day, the dog waited by the door for a treat.']
PROMPTS = ['Once upon a time', 'Lily saw', 'The café had a dog 🐶']


def run(script, *args, ok=True):
    result = subprocess.run([sys.executable, script, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    if ok:
        assert result.returncode == 0, result.stderr
    return result


def llama_cpp(tool, *args, done=None):
    """Run one of llama.cpp's tools; done: a text its output ends with once the tool has finished its work.
    Run side by side or beside a busy process, llama-completion and llama-perplexity at times stopped
    early, exit status 0, their text cut short (seen with the build llama-cpp.sh makes): one tool at a
    time across the test workers, and a run cut short is run again, twice at most."""
    for _ in range(3):
        with open(os.path.join(tempfile.gettempdir(), 'tinystories-gpt-llama-cpp.lock'), 'w') as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            result = subprocess.run([os.path.join(LLAMA_CPP_BIN, tool), *args], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr[-3000:]
        if done is None or done in result.stdout + result.stderr:
            break
    return result


def assert_error(result, *hints):
    assert result.returncode == 1 and 'Traceback' not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith('error: ') and all(h in last for h in hints), result.stderr


@pytest.fixture(scope='module', params=['gpt2/gpt2', 'gpt2/bpe', 'llama/gpt2', 'llama/bpe', 'arcee/bpe'])
def model(request, tmp_path_factory):
    """A model of the recipe trained 150 steps on three stories in the tokenizer's tokens (recipe/tokenizer),
    and its f32 GGUF file."""
    recipe, kind = request.param.split('/')
    root = tmp_path_factory.mktemp(request.param.replace('/', '-'))
    state = tokenizer.GPT2 if kind == 'gpt2' else {'name': 'bpe:300', 'json': tokenizer.train_bpe(STORIES * 5, 300)}
    data, out = root / 'data', root / 'out'
    enc = write_data(data, state, STORIES)
    run('train.py', f'--data_dir={data}', f'--out_dir={out}', *TINY, *RECIPES[recipe])
    result = run('export.py', f'--out_dir={out}', '--format=gguf')
    assert f'{out}/model-f32.gguf' in result.stdout
    return recipe, str(out), enc


def test_transformers_reads_it_with_model_pys_logits(model):
    from transformers import AutoModelForCausalLM
    recipe, out, enc = model
    if enc.name == 'gpt2':
        pytest.skip("the trained BPE's models cover both recipes, in a quarter of the time")
    if recipe == 'arcee':
        pytest.skip("transformers' GGUF reader has no arcee architecture")
    ours, _ = load_model(os.path.join(out, 'best.pt'))
    # transformers' GGUF reader takes a gpt2 file's context as n_ctx, not the n_positions its model is built
    # with, and GPT-2's tanh GELU (llama.cpp's too; model.py's is the exact one, as GPT2Config's 'gelu')
    gpt2 = {'n_positions': 32, 'activation_function': 'gelu'} if recipe == 'gpt2' else {}
    hf = AutoModelForCausalLM.from_pretrained(out, gguf_file='model-f32.gguf', **gpt2)
    assert type(hf).__name__ == ('GPT2LMHeadModel' if recipe == 'gpt2' else 'LlamaForCausalLM')
    idx = torch.randint(enc.n_vocab, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs, logits = hf.eval()(idx).logits, ours(idx, targets=idx)[0]
    torch.testing.assert_close(theirs, logits[..., :enc.n_vocab], atol=1e-4, rtol=0)


def test_the_file_says_what_it_holds(model):
    recipe, out, enc = model
    reader = gguf.GGUFReader(os.path.join(out, 'model-f32.gguf'))
    field = lambda key: reader.fields[key].contents()
    arch = field('general.architecture')
    assert arch == recipe
    assert (field(f'{arch}.context_length'), field(f'{arch}.block_count'), field(f'{arch}.embedding_length')) == (32, 2, 32)
    assert field('general.name') == 'model-f32' and 'Trained from scratch' in field('general.description')
    assert len(field('tokenizer.ggml.tokens')) == enc.n_vocab
    assert field('tokenizer.ggml.tokens')[enc.eot_token] == '<|endoftext|>'
    assert field('tokenizer.ggml.bos_token_id') == field('tokenizer.ggml.eos_token_id') == enc.eot_token
    assert field('tokenizer.ggml.add_bos_token') is True
    assert (field('tokenizer.ggml.model'), field('tokenizer.ggml.pre')) == ('gpt2', 'gpt-2')
    assert field('tinystories_gpt.iter_num') == 150 and field('tinystories_gpt.tokenizer') == enc.name
    assert field('tinystories_gpt.bits_per_byte') > 0  # the data is still there
    names = {t.name for t in reader.tensors}
    assert 'output.weight' in names if recipe != 'gpt2' else 'output.weight' not in names  # untied, tied


@needs_llama_cpp
def test_llama_cpp_tokenizes_as_tokenizer_py(model, tmp_path):
    _, out, enc = model
    for text in PROMPTS + ["naïve café 日本語 🙂  two  spaces\n\nnew\tlines  \n 12345 it's   "]:
        result = llama_cpp('llama-tokenize', '-m', os.path.join(out, 'model-f32.gguf'), '-p', text, '--ids', '--log-disable')
        assert json.loads(result.stdout.strip().splitlines()[-1]) == [enc.eot_token] + enc.encode_ordinary(text)


@needs_llama_cpp
def test_llama_cpp_writes_sample_pys_greedy_text(model):
    _, out, enc = model
    prompt = PROMPTS[0]
    # within the trained context: past it llama.cpp does not slide a window as sample.py does
    n = 32 - 1 - len(enc.encode_ordinary(prompt))
    ours = run('sample.py', f'--out_dir={out}', f'--start={prompt}', '--temperature=0', '--dtype=float32', '--device=cpu',
               f'--max_new_tokens={n}').stdout
    theirs = llama_cpp('llama-completion', '-m', os.path.join(out, 'model-f32.gguf'), '-p', prompt, '-n', str(n),
                       '--temp', '0', '-no-cnv', '-t', '1', done='total time').stdout
    assert theirs.rstrip('\n').removesuffix(' [end of text]') == ours.rstrip('\n')
    assert len(ours) > len(prompt) + 20, ours  # it wrote a story, not nothing


def perplexity(model, ids, n_ctx, bos, n_chunks):
    """What llama-perplexity computes over its first n_chunks: the ids in chunks of n_ctx tokens, each
    chunk's first token made bos, the second half of each chunk predicted."""
    chunks = torch.tensor(ids[:n_chunks * n_ctx]).view(-1, n_ctx)
    x = chunks.clone()
    x[:, 0] = bos
    with torch.no_grad():
        logits = model(x, targets=x)[0]
    first = n_ctx // 2
    nll = torch.nn.functional.cross_entropy(logits[:, first:-1].flatten(0, 1), chunks[:, first + 1:].flatten())
    return nll.exp().item()


@needs_llama_cpp
def test_llama_cpps_perplexity_is_ours_and_smaller_types_keep_it_within_1_percent(model, tmp_path):
    recipe, out, enc = model
    if (recipe, enc.name) not in (('gpt2', 'gpt2'), ('llama', 'bpe:300'), ('arcee', 'bpe:300')):
        pytest.skip('each architecture and both tokenizers are covered by the other three models')
    text = '\n'.join(STORIES[::-1] * 8)
    (tmp_path / 'stories.txt').write_text(text)
    ids = [enc.eot_token] + enc.encode_ordinary(text)
    gpt = load_model(os.path.join(out, 'best.pt'))[0]
    for kind in ('f32', 'f16', 'bf16', 'q8_0') if recipe == 'llama' else ('f32', 'q8_0'):  # the others' take longer
        path = f'{tmp_path}/{kind}.gguf'
        run('export.py', f'--out_dir={out}', '--format=gguf', f'--gguf_type={kind}', f'--gguf_file={path}')
        result = llama_cpp('llama-perplexity', '-m', path, '-f', str(tmp_path / 'stories.txt'), '-c', '32', '-b', '32', '-t', '1')
        # The running figure after each chunk, "[k]ppl,". The tool at times drops the end of its output
        # (see llama_cpp), so the last chunk it printed is compared, and most chunks must be there.
        printed = re.findall(r'\[(\d+)\]([\d.]+),', result.stdout + result.stderr)
        assert printed and int(printed[-1][0]) >= len(ids) // 32 // 2, result.stdout + result.stderr[-3000:]
        n_chunks, theirs = int(printed[-1][0]), float(printed[-1][1])
        ours = perplexity(gpt, ids, 32, enc.eot_token, n_chunks)
        print(f'{recipe}/{enc.name} {kind}: ours {ours:.4f}, llama.cpp {theirs} over {n_chunks} chunks')
        assert abs(theirs / ours - 1) < (1e-3 if kind == 'f32' else 0.01), (kind, ours, theirs)


# ---------------------------------------------------------------------------- a padded vocabulary, bad input

@pytest.fixture
def padded(tmp_path):
    """A checkpoint of a random GPT-2-shaped model whose vocabulary is padded past GPT-2's 50,257 tokens."""
    from model import GPT, GPTConfig
    args = dict(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=50304)
    torch.manual_seed(0)
    torch.save({'model': GPT(GPTConfig(**args)).state_dict(), 'model_args': args, 'iter_num': 0,
                'best_val_loss': float('inf'), 'config': {}}, tmp_path / 'ckpt.pt')
    return f'--ckpt={tmp_path}/ckpt.pt'


def test_a_padded_vocabulary_ends_at_the_tokenizers(padded, tmp_path):
    run('export.py', padded, '--format=gguf', f'--gguf_file={tmp_path}/m.gguf', '--gguf_type=q8_0')
    reader = gguf.GGUFReader(tmp_path / 'm.gguf')
    embedding = next(t for t in reader.tensors if t.name == 'token_embd.weight')
    assert list(embedding.shape) == [32, 50257] and embedding.tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert len(reader.fields['tokenizer.ggml.tokens'].contents()) == 50257
    if os.path.isfile(os.path.join(LLAMA_CPP_BIN, 'llama-tokenize')):  # llama.cpp loads it
        llama_cpp('llama-tokenize', '-m', str(tmp_path / 'm.gguf'), '-p', 'Once', '--ids', '--log-disable')


def test_bad_settings_and_targets_are_one_line_each_and_leave_nothing(padded, tmp_path):
    (tmp_path / 'empty').mkdir()
    assert_error(run('export.py', f'--out_dir={tmp_path}/empty', '--format=gguf', ok=False), 'no checkpoint at')
    assert os.listdir(tmp_path / 'empty') == []
    assert_error(run('export.py', padded, '--format=gguf', '--gguf_type=q4_k', ok=False), "gguf_type='q4_k'", 'f32, f16, bf16, q8_0')
    assert_error(run('export.py', padded, '--format=onnx', ok=False), "format='onnx'", "'gguf'")
    assert_error(run('export.py', padded, '--format=gguf', f'--gguf_file={tmp_path}/empty', ok=False), 'is a folder')
    (tmp_path / 'm.gguf').write_text('mine')
    assert_error(run('export.py', padded, '--format=gguf', f'--gguf_file={tmp_path}/m.gguf', ok=False),
                 'already exists', '--overwrite=True')
    assert (tmp_path / 'm.gguf').read_text() == 'mine'
    run('export.py', padded, '--format=gguf', f'--gguf_file={tmp_path}/m.gguf', '--overwrite=True')
    assert gguf.GGUFReader(tmp_path / 'm.gguf').fields['general.architecture'].contents() == 'gpt2'
    assert sorted(os.listdir(tmp_path)) == ['ckpt.pt', 'empty', 'm.gguf']  # no temporary file or lock left


def test_a_file_in_use_names_its_writer(padded, tmp_path):
    holder = subprocess.Popen([sys.executable, '-c', f'from common import lock_folder; lock_folder({str(tmp_path / "m.gguf")!r}, '
                               '""); print(flush=True); input()'], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        holder.stdout.readline()  # it holds the lock
        result = run('export.py', padded, '--format=gguf', f'--gguf_file={tmp_path}/m.gguf', ok=False)
        assert_error(result, f'in use by process {holder.pid}', 'choose another --gguf_file')
        assert not os.path.exists(tmp_path / 'm.gguf')
    finally:
        holder.communicate(b'\n')


def test_a_full_disk_is_one_line_and_leaves_nothing(padded, tmp_path):
    disk = tmp_path / 'disk'
    disk.mkdir()
    if subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=1m', 'tmpfs', str(disk)], capture_output=True).returncode:
        pytest.skip('cannot mount a tmpfs here (needs root)')
    try:
        result = run('export.py', padded, '--format=gguf', f'--gguf_file={disk}/m.gguf', ok=False)
        assert_error(result, f'{disk}/m.gguf', 'No space left on device', 'make room')
        assert os.listdir(disk) == []
    finally:
        subprocess.run(['umount', str(disk)], check=True)


def test_options_llama_cpp_cannot_run_are_named(tmp_path):
    from model import GPT, GPTConfig
    args = dict(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=50257, pos_emb='rope')
    torch.save({'model': GPT(GPTConfig(**args)).state_dict(), 'model_args': args, 'iter_num': 0, 'config': {}},
               tmp_path / 'ckpt.pt')
    result = run('export.py', f'--ckpt={tmp_path}/ckpt.pt', '--format=gguf', f'--gguf_file={tmp_path}/m.gguf', ok=False)
    assert_error(result, "pos_emb='rope': none in GPT2LMHeadModel", "norm='layernorm', mlp='gelu': none in Llama")
    assert not os.path.exists(tmp_path / 'm.gguf')
