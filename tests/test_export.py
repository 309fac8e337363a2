"""Hugging Face interop as a user meets it: a transformers GPT-2 folder fine-tuned with
train.py --init_from, exported with export.py, and loaded back with transformers: the same
logits, the same greedy tokens as sample.py, a working pipeline, and one-line errors. Then a
Llama-style model on a trained BPE, exported after its data is gone, as LlamaForCausalLM; every
export read back by --init_from; and an export on a full disk, killed, or run twice at once."""
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from common import load_model
from tokenizer import get_tokenizer
from conftest import ROOT, TIKTOKEN_CACHE, needs_tokenizer, write_data

pytestmark = needs_tokenizer
transformers = pytest.importorskip('transformers')
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel  # noqa: E402

from model import GPT, GPTConfig  # noqa: E402

ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'HF_HUB_OFFLINE': '1'}
TINY = ['--batch_size=4', '--gradient_accumulation_steps=1', '--eval_iters=2', '--log_interval=1', '--warmup_iters=1',
        '--learning_rate=1e-3', '--device=cpu', '--dtype=float32', '--block_size=32', '--dropout=0.0']
TEXT = "Once upon a time, there was a little cat named Tom. Tom liked to play in the sun with his red ball."


def run(script, *args, ok=True, env=ENV):
    result = subprocess.run([sys.executable, script, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    if ok:
        assert result.returncode == 0, result.stderr
    return result


def assert_error(result, *hints):
    assert result.returncode == 1 and 'Traceback' not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith('error: ') and all(h in last for h in hints), result.stderr


def hf_logits(folder, idx):
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(idx).logits


def our_logits(model, idx):
    with torch.no_grad():
        return model(idx, targets=idx)[0]  # with targets: logits at every position


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    """GPT-2 tokens of a short story, many times over, as prepare.py lays them out."""
    enc = get_tokenizer()
    tokens = np.array(([enc.eot_token] + enc.encode(TEXT)) * 60, dtype=np.uint16)
    data_dir = tmp_path_factory.mktemp('data')
    for split in ('train', 'validation'):
        tokens.tofile(data_dir / f'{split}.bin')
    meta = {'tokenizer': 'gpt2', 'vocab_size': enc.n_vocab, 'eot_token': enc.eot_token, 'dtype': 'uint16',
            'train': {'tokens': len(tokens), 'documents': 60}, 'validation': {'tokens': len(tokens), 'documents': 60},
            'source': 'a test story'}
    (data_dir / 'meta.json').write_text(json.dumps(meta))
    return str(data_dir)


@pytest.fixture(scope='module')
def gpt2_folder(tmp_path_factory):
    """A small random GPT-2 as transformers saves one, with GPT-2's own (tanh) GELU."""
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=50257)
    folder = str(tmp_path_factory.mktemp('gpt2'))
    GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope='module')
def finetuned(data, gpt2_folder, tmp_path_factory):
    """step 0 (the GPT-2 weights as train.py loaded them) and the model after 6 steps, exported."""
    step0, out = str(tmp_path_factory.mktemp('step0')), str(tmp_path_factory.mktemp('out'))
    run('train.py', f'--data_dir={data}', f'--out_dir={step0}', f'--init_from={gpt2_folder}', '--max_iters=0', *TINY)
    run('train.py', f'--data_dir={data}', f'--out_dir={out}', f'--init_from={gpt2_folder}', '--max_iters=6',
        '--eval_interval=3', *TINY)
    export_dir = os.path.join(out, 'exported')
    result = run('export.py', f'--out_dir={out}', f'--export_dir={export_dir}')
    assert export_dir in result.stdout
    return step0, out, export_dir


def test_init_from_a_transformers_folder_gives_transformers_logits(finetuned, gpt2_folder):
    model, ckpt = load_model(os.path.join(finetuned[0], 'last.pt'))
    assert ckpt['iter_num'] == 0
    assert ckpt['model_args'] == dict(n_layer=2, n_head=2, n_embd=32, block_size=32, bias=True, vocab_size=50257, dropout=0.0)
    idx = torch.randint(50257, (3, 32), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(our_logits(model, idx), hf_logits(gpt2_folder, idx), atol=1e-4, rtol=0)


def test_fine_tuning_learns_and_the_export_has_its_logits(finetuned):
    step0, out, export_dir = finetuned
    assert sorted(os.listdir(export_dir)) == ['README.md', 'config.json', 'generation_config.json', 'model.safetensors',
                                              'tokenizer.json', 'tokenizer_config.json']
    before, _ = load_model(os.path.join(step0, 'last.pt'))
    model, ckpt = load_model(os.path.join(out, 'best.pt'))
    assert ckpt['iter_num'] > 0
    idx = torch.tensor([get_tokenizer().encode(TEXT)[:32]])
    assert model(idx, idx)[1] < before(idx, idx)[1]  # it learned the story
    idx = torch.randint(50257, (4, 32), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(hf_logits(export_dir, idx), our_logits(model, idx), atol=1e-4, rtol=0)


def test_the_model_card_gives_data_steps_loss_and_bits_per_byte(finetuned, data):
    _, out, export_dir = finetuned
    ckpt = torch.load(os.path.join(out, 'best.pt'), weights_only=True)
    card = open(os.path.join(export_dir, 'README.md')).read()
    assert data in card and 'a test story' in card
    assert f"Steps: {ckpt['iter_num']}" in card
    assert f"Validation loss: {ckpt['best_val_loss']:.4f}" in card and 'Bits per byte: ' in card
    assert 'Fine-tuned from ' in card


def test_the_tokenizer_is_tiktokens_gpt2(finetuned):
    enc, tok = get_tokenizer(), AutoTokenizer.from_pretrained(finetuned[2])
    for text in (TEXT, "naïve café 日本語 🙂  two  spaces\n\nnew\tlines 12345 it's <|endoftext|>Next", open(__file__).read()):
        assert tok(text)['input_ids'] == enc.encode(text, allowed_special='all')
        assert tok.decode(enc.encode(text, allowed_special='all')) == text
    assert tok.eos_token_id == enc.eot_token


def assert_greedy_is_sample_pys(out_dir, export_dir, enc):
    from tokenizer import decode_utf8
    start = 'Once upon a time, there'
    story = run('sample.py', f'--out_dir={out_dir}', f'--start={start}', '--temperature=0', '--max_new_tokens=24',
                '--device=cpu').stdout
    model = AutoModelForCausalLM.from_pretrained(export_dir)
    ids = [enc.eot_token] + enc.encode_ordinary(start)  # sample.py starts a story as train.bin does
    new = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=24)[0, len(ids):].tolist()
    if enc.eot_token in new:
        new = new[:new.index(enc.eot_token)]
    assert len(new) > 0
    assert story == start + ''.join(decode_utf8(new, enc)) + '\n'


def assert_a_pipeline_continues(export_dir):
    generate = transformers.pipeline('text-generation', model=export_dir)
    text = generate('Once upon a time', max_new_tokens=8, do_sample=False)[0]['generated_text']
    assert text.startswith('Once upon a time') and len(text) > len('Once upon a time')


def test_greedy_generate_gives_sample_pys_tokens(finetuned):
    assert_greedy_is_sample_pys(finetuned[1], finetuned[2], get_tokenizer())


def test_a_pipeline_continues_the_prompt(finetuned):
    assert_a_pipeline_continues(finetuned[2])


def save_checkpoint(path, **model_args):
    """A checkpoint of a random model as train.py saves one, its gains and biases away from 1 and 0
    (so that a misplaced or dropped one would show in the logits)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**model_args))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    torch.save({'model': model.state_dict(), 'model_args': model_args, 'iter_num': 0, 'best_val_loss': float('inf'),
                'config': {}}, path)
    return model


LLAMA = dict(pos_emb='rope', norm='rmsnorm', mlp='swiglu', bias=False)


@pytest.mark.parametrize('options, arch', [
    (dict(bias=False), 'GPT2LMHeadModel'),
    (dict(vocab_size=50304), 'GPT2LMHeadModel'),
    (dict(tie_embeddings=False), 'GPT2LMHeadModel'),
    (LLAMA, 'LlamaForCausalLM'),
    ({**LLAMA, 'tie_embeddings': False, 'vocab_size': 50304, 'rope_theta': 500.0}, 'LlamaForCausalLM'),
    ({**LLAMA, 'bias': True}, 'LlamaForCausalLM'),  # Llama's attention_bias and mlp_bias
    ({**LLAMA, 'mlp': 'relu2'}, 'ArceeForCausalLM'),
])
def test_each_architecture_exports_the_same_logits(tmp_path, options, arch):
    args = {**dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=50257, dropout=0.0, bias=True), **options}
    model = save_checkpoint(tmp_path / 'ckpt.pt', **args)
    run('export.py', f'--ckpt={tmp_path}/ckpt.pt', f'--export_dir={tmp_path}/hf')
    config = json.load(open(tmp_path / 'hf' / 'config.json'))
    assert config['architectures'] == [arch] and config['vocab_size'] == 50257
    assert config['tie_word_embeddings'] == args.get('tie_embeddings', True)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / 'hf').eval()
    assert type(loaded).__name__ == arch
    idx = torch.randint(50257, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx).logits, our_logits(model.eval(), idx)[..., :50257], atol=1e-4, rtol=0)


def test_export_refuses_a_folder_with_files_unless_told(finetuned, tmp_path):
    _, out, export_dir = finetuned
    (tmp_path / 'keep.txt').write_text('mine')
    assert_error(run('export.py', f'--out_dir={out}', f'--export_dir={tmp_path}', ok=False), str(tmp_path), '--overwrite=True')
    assert os.listdir(tmp_path) == ['keep.txt']
    run('export.py', f'--out_dir={out}', f'--export_dir={tmp_path}', '--overwrite=True')
    assert sorted(os.listdir(tmp_path)) == sorted(os.listdir(export_dir))
    assert [p for p in os.listdir(tmp_path.parent) if '.tmp' in p] == []  # no temporary folder left behind
    assert_error(run('export.py', f'--out_dir={out}', f'--export_dir={out}', '--overwrite=True', ok=False), 'holds the checkpoint')
    assert os.path.isfile(os.path.join(out, 'best.pt'))


@pytest.mark.parametrize('options, hints', [
    (dict(pos_emb='rope'), ["pos_emb='rope': none in GPT2LMHeadModel", "norm='layernorm', mlp='gelu': none in Llama"]),
    (dict(norm='rmsnorm', mlp='swiglu'), ["norm='rmsnorm', mlp='swiglu': none in GPT2", "pos_emb='learned': none in Llama"]),
    ({**LLAMA, 'mlp': 'gelu'}, ["mlp='gelu': none in LlamaForCausalLM"]),
])
def test_options_without_a_transformers_counterpart_are_named(tmp_path, options, hints):
    save_checkpoint(tmp_path / 'ckpt.pt', n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=50257, **options)
    assert_error(run('export.py', f'--ckpt={tmp_path}/ckpt.pt', f'--export_dir={tmp_path}/hf', ok=False), *hints)
    assert not os.path.exists(tmp_path / 'hf')


def test_init_from_gpt2_without_cache_or_hub_says_so(data, tmp_path):
    env = {**ENV, 'HF_HOME': str(tmp_path / 'empty-cache')}
    result = run('train.py', f'--data_dir={data}', f'--out_dir={tmp_path}', '--init_from=gpt2', *TINY, ok=False, env=env)
    assert_error(result, 'gpt2', 'cache', 'hub')


def test_init_from_gpt2_without_cache_answers_at_once_when_the_hub_is_unreachable(data, tmp_path):
    # offline mode off, and a hub address that refuses at once: its client's retries would sleep 23 s
    env = {**{k: v for k, v in ENV.items() if k != 'HF_HUB_OFFLINE'}, 'HF_HOME': str(tmp_path / 'empty-cache'),
           'HF_ENDPOINT': 'http://127.0.0.1:9'}
    start = time.time()
    result = run('train.py', f'--data_dir={data}', f'--out_dir={tmp_path}', '--init_from=gpt2', *TINY, ok=False, env=env)
    assert_error(result, 'gpt2', 'cache', 'hub cannot be reached')
    assert time.time() - start < 23 and 'Retrying' not in result.stderr, result.stderr


class Payload:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


def test_init_from_a_folder_holding_a_pickle_refuses_it_in_one_line(data, tmp_path):
    folder = tmp_path / 'pickled'
    GPT2Config(n_layer=1, n_head=2, n_embd=32, n_positions=64, vocab_size=50257).save_pretrained(folder)
    with open(folder / 'pytorch_model.bin', 'wb') as f:
        pickle.dump(Payload(str(tmp_path / 'ran')), f)
    result = run('train.py', f'--data_dir={data}', f'--out_dir={tmp_path / "out"}', f'--init_from={folder}', *TINY, ok=False)
    assert_error(result, str(folder), 'pickle', 'model.safetensors')
    assert not os.path.exists(tmp_path / 'ran')


@pytest.mark.parametrize('options', [
    dict(tie_embeddings=False),
    {**LLAMA, 'tie_embeddings': False, 'bias': True, 'rope_theta': 500.0},
    {**LLAMA, 'mlp': 'relu2', 'bias': True},
])
def test_init_from_an_export_gives_its_logits(data, tmp_path, options):
    args = dict(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=50257, dropout=0.0, **options)
    model = save_checkpoint(tmp_path / 'ckpt.pt', **args)
    run('export.py', f'--ckpt={tmp_path}/ckpt.pt', f'--export_dir={tmp_path}/hf')
    run('train.py', f'--data_dir={data}', f'--out_dir={tmp_path}/out', f'--init_from={tmp_path}/hf', '--max_iters=0', *TINY)
    loaded, ckpt = load_model(os.path.join(tmp_path, 'out', 'last.pt'))
    assert {k: ckpt['model_args'].get(k, getattr(GPTConfig, k)) for k in options} == options
    idx = torch.randint(50257, (2, 32), generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(our_logits(loaded, idx), our_logits(model.eval(), idx), atol=1e-5, rtol=0)


def test_init_from_a_folder_without_a_transformers_model_says_so(data, tmp_path):
    result = run('train.py', f'--data_dir={data}', f'--out_dir={tmp_path}', f'--init_from={tmp_path}', *TINY, ok=False)
    assert_error(result, 'no config.json', 'best.pt')


# ---------------------------------------------------------------------------- Llama on a trained BPE

STORIES = ['Once upon a time, there was a little cat named Tom. Tom liked milk and naps in the sun.',
           'Lily saw a big red ball. "Can I play?" she asked. Her mom said yes, and Lily smiled.',
           'The café had a dog 🐶 who loved cake. Every day, the dog waited by the door for a treat.']


@pytest.fixture(scope='module')
def llama(tmp_path_factory):
    """A Llama-style model trained a few steps on bpe:300 data, exported after the data is deleted."""
    import tokenizer
    root = tmp_path_factory.mktemp('llama')
    state = {'name': 'bpe:300', 'json': tokenizer.train_bpe(STORIES * 5, 300)}
    data_dir, out = root / 'data', root / 'out'
    enc = write_data(data_dir, state, STORIES)
    run('train.py', f'--data_dir={data_dir}', f'--out_dir={out}', '--n_layer=2', '--n_head=2', '--n_embd=32',
        '--pos_emb=rope', '--norm=rmsnorm', '--mlp=swiglu', '--bias=False', '--rope_theta=1000.0', '--max_iters=30',
        '--eval_interval=10', '--lr_decay_iters=30', *TINY, '--learning_rate=1e-2')  # the last one counts
    shutil.rmtree(data_dir)  # the checkpoint holds its tokenizer: export needs nothing else
    export_dir = root / 'hf'
    run('export.py', f'--out_dir={out}', f'--export_dir={export_dir}')
    return str(out), str(export_dir), enc


def test_llama_options_export_as_llama_with_its_logits(llama):
    out, export_dir, enc = llama
    model, ckpt = load_model(os.path.join(out, 'best.pt'))
    assert {k: ckpt['model_args'][k] for k in ('pos_emb', 'norm', 'mlp', 'bias')} == LLAMA
    config = json.load(open(os.path.join(export_dir, 'config.json')))
    assert {k: config[k] for k in ('architectures', 'hidden_size', 'intermediate_size', 'num_hidden_layers',
                                   'num_attention_heads', 'num_key_value_heads', 'rms_norm_eps', 'rope_theta',
                                   'max_position_embeddings', 'tie_word_embeddings', 'bos_token_id', 'eos_token_id',
                                   'vocab_size')} == dict(
        architectures=['LlamaForCausalLM'], hidden_size=32, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=1000.0, max_position_embeddings=32,
        tie_word_embeddings=True, bos_token_id=299, eos_token_id=299, vocab_size=300)
    assert type(AutoModelForCausalLM.from_pretrained(export_dir)).__name__ == 'LlamaForCausalLM'
    idx = torch.randint(300, (4, 32), generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(hf_logits(export_dir, idx), our_logits(model, idx), atol=1e-4, rtol=0)
    card = open(os.path.join(export_dir, 'README.md')).read()
    assert 'Llama-shaped' in card and 'byte-level BPE of 300 tokens' in card and 'not there at export' in card


def test_llama_greedy_generate_gives_sample_pys_tokens(llama):
    assert_greedy_is_sample_pys(*llama)


def test_llama_pipeline_continues_the_prompt(llama):
    assert_a_pipeline_continues(llama[1])


def test_a_trained_bpe_loads_with_autotokenizer_and_encodes_as_ours(llama):
    _, export_dir, enc = llama
    tok = AutoTokenizer.from_pretrained(export_dir)
    for text in STORIES + ["naïve café 日本語 🙂🐶  two  spaces\n\nnew\tlines  \n 12345 it's   "]:
        assert tok(text)['input_ids'] == enc.encode_ordinary(text)
        assert tok.decode(enc.encode_ordinary(text)) == text
    text = open(__file__).read()  # it holds <|endoftext|>, which transformers reads as the token, as train.bin has it
    assert tok(text)['input_ids'] == enc.encode(text, allowed_special='all') and enc.eot_token in tok(text)['input_ids']
    assert tok.decode(tok(text)['input_ids']) == text
    assert (tok.eos_token_id, tok.bos_token_id, tok.pad_token_id, tok.model_max_length) == (299, 299, 299, 32)


def test_init_from_a_bpe_export_needs_the_datas_own_tokenizer(llama):
    import hf
    import tokenizer
    out, export_dir, enc = llama
    model, ckpt = load_model(os.path.join(out, 'best.pt'))
    meta = tokenizer.meta_fields(enc)
    args, state = hf.from_pretrained(export_dir, meta, 32, 0.0, ckpt['tokenizer'])
    loaded = GPT(GPTConfig(**args))
    loaded.load_state_dict(state)
    idx = torch.randint(300, (2, 32), generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(our_logits(loaded.eval(), idx), our_logits(model, idx), atol=1e-5, rtol=0)
    other = {'name': 'bpe:300', 'json': tokenizer.train_bpe([TEXT] * 5, 300)}  # the same name, trained on other text
    with pytest.raises(SystemExit, match=r'has another tokenizer \(its tokenizer.json\) than the bpe:300 that made the data'):
        hf.from_pretrained(export_dir, meta, 32, 0.0, other)


# ---------------------------------------------------------------------------- litter, full disks, two exports at once

@pytest.fixture
def checkpoint(tmp_path):
    save_checkpoint(tmp_path / 'ckpt.pt', n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=50257)
    return f'--ckpt={tmp_path}/ckpt.pt'


@pytest.mark.parametrize('size', ['1m', '8m'])  # the weights (6.5 MB) do not fit; they do, the tokenizer does not
def test_export_onto_a_full_disk_says_so_and_leaves_nothing(tmp_path, checkpoint, size):
    disk = tmp_path / 'disk'
    disk.mkdir()
    if subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', str(disk)], capture_output=True).returncode:
        pytest.skip('cannot mount a tmpfs here (needs root)')
    try:
        result = run('export.py', checkpoint, f'--export_dir={disk}/hf', ok=False)
        assert_error(result, f'{disk}/hf', 'No space left on device', 'make room')
        assert os.listdir(disk) == []
    finally:
        subprocess.run(['umount', str(disk)], check=True)


def test_a_gpt2_export_leaves_the_tiktoken_cache_as_it_was(tmp_path, checkpoint):
    cache = tmp_path / 'tiktoken-cache'
    shutil.copytree(os.environ.get('TIKTOKEN_CACHE_DIR', TIKTOKEN_CACHE), cache)
    before = sorted(os.listdir(cache))
    run('export.py', checkpoint, f'--export_dir={tmp_path}/hf', env={**ENV, 'TIKTOKEN_CACHE_DIR': str(cache)})
    assert sorted(os.listdir(cache)) == before


def test_the_next_export_removes_what_a_killed_one_left(tmp_path, checkpoint):
    export = subprocess.Popen([sys.executable, 'export.py', checkpoint, f'--export_dir={tmp_path}/hf'], cwd=ROOT, env=ENV,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    half = tmp_path / f'.hf.tmp{export.pid}'
    while not (half / 'model.safetensors').exists():  # then GPT-2's tokenizer takes it a second to build
        assert export.poll() is None, 'the export ended before it could be killed'
        time.sleep(0.005)
    export.send_signal(signal.SIGKILL)
    export.wait()
    assert half.is_dir()
    result = run('export.py', checkpoint, f'--export_dir={tmp_path}/hf')
    assert str(half) in result.stderr
    assert sorted(p for p in os.listdir(tmp_path) if p.startswith('.hf')) == []
    assert 'model.safetensors' in os.listdir(tmp_path / 'hf')


def test_a_second_export_into_one_folder_names_the_first(tmp_path, checkpoint):
    holder = subprocess.Popen([sys.executable, '-c', f'from common import lock_folder; lock_folder({str(tmp_path / "hf")!r}, '
                               '""); print(flush=True); input()'], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        holder.stdout.readline()  # it holds the lock
        result = run('export.py', checkpoint, f'--export_dir={tmp_path}/hf', ok=False)
        assert_error(result, f'in use by process {holder.pid}', 'choose another --export_dir')
        assert not os.path.exists(tmp_path / 'hf')
    finally:
        holder.communicate(b'\n')


@pytest.mark.parametrize('started_from, says', [
    (None, 'in more than one run (resumed), from a start its checkpoint does not record'),
    ('gpt2', 'Fine-tuned from gpt2 with'),
])
def test_the_model_card_of_a_resumed_run_says_where_it_started(tmp_path, checkpoint, started_from, says):
    ckpt = torch.load(tmp_path / 'ckpt.pt', weights_only=True)
    ckpt['config'] = {'init_from': 'resume'}
    if started_from:
        ckpt['started_from'] = started_from
    torch.save(ckpt, tmp_path / 'ckpt.pt')
    run('export.py', checkpoint, f'--export_dir={tmp_path}/hf')
    card = open(tmp_path / 'hf' / 'README.md').read()
    assert says in card and 'from resume' not in card
