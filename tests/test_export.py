"""Hugging Face interop as a user meets it: a transformers GPT-2 folder fine-tuned with
train.py --init_from, exported with export.py, and loaded back with transformers: the same
logits, the same greedy tokens as sample.py, a working pipeline, and one-line errors."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from common import load_model
from tokenizer import get_tokenizer
from conftest import ROOT, needs_tokenizer

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


def test_greedy_generate_gives_sample_pys_tokens(finetuned):
    from sample import decode_utf8
    _, out, export_dir = finetuned
    enc, start = get_tokenizer(), 'Once upon a time, there'
    story = run('sample.py', f'--out_dir={out}', f'--start={start}', '--temperature=0', '--max_new_tokens=24',
                '--device=cpu').stdout
    model = AutoModelForCausalLM.from_pretrained(export_dir)
    ids = [enc.eot_token] + enc.encode(start)  # sample.py starts a story as train.bin does
    new = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=24)[0, len(ids):].tolist()
    if enc.eot_token in new:
        new = new[:new.index(enc.eot_token)]
    assert len(new) > 0
    assert story == start + ''.join(decode_utf8(new, enc)) + '\n'


def test_a_pipeline_continues_the_prompt(finetuned):
    generate = transformers.pipeline('text-generation', model=finetuned[2])
    text = generate('Once upon a time', max_new_tokens=8, do_sample=False)[0]['generated_text']
    assert text.startswith('Once upon a time') and len(text) > len('Once upon a time')


def save_checkpoint(path, **model_args):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**model_args))
    torch.save({'model': model.state_dict(), 'model_args': model_args, 'iter_num': 0, 'best_val_loss': float('inf'),
                'config': {}}, path)
    return model


@pytest.mark.parametrize('options', [dict(bias=False), dict(vocab_size=50304)])
def test_no_biases_and_a_padded_vocabulary_export_the_same_logits(tmp_path, options):
    args = {**dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=50257, dropout=0.0, bias=True), **options}
    model = save_checkpoint(tmp_path / 'ckpt.pt', **args)
    run('export.py', f'--ckpt={tmp_path}/ckpt.pt', f'--export_dir={tmp_path}/hf')
    assert json.load(open(tmp_path / 'hf' / 'config.json'))['vocab_size'] == 50257
    idx = torch.randint(50257, (2, 16), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(hf_logits(tmp_path / 'hf', idx), our_logits(model.eval(), idx)[..., :50257], atol=1e-4, rtol=0)


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


def test_options_without_a_transformers_counterpart_are_named(tmp_path):
    save_checkpoint(tmp_path / 'ckpt.pt', n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=50257)
    ckpt = torch.load(tmp_path / 'ckpt.pt', weights_only=True)
    ckpt['model_args'].update(norm='rmsnorm', mlp='swiglu')
    torch.save(ckpt, tmp_path / 'ckpt.pt')
    assert_error(run('export.py', f'--ckpt={tmp_path}/ckpt.pt', f'--export_dir={tmp_path}/hf', ok=False),
                 "norm='rmsnorm'", "mlp='swiglu'")
    assert not os.path.exists(tmp_path / 'hf')


def test_init_from_gpt2_without_cache_or_hub_says_so(data, tmp_path):
    env = {**ENV, 'HF_HOME': str(tmp_path / 'empty-cache')}
    result = run('train.py', f'--data_dir={data}', f'--out_dir={tmp_path}', '--init_from=gpt2', *TINY, ok=False, env=env)
    assert_error(result, 'gpt2', 'cache', 'hub')


def test_init_from_a_folder_without_a_transformers_model_says_so(data, tmp_path):
    result = run('train.py', f'--data_dir={data}', f'--out_dir={tmp_path}', f'--init_from={tmp_path}', *TINY, ok=False)
    assert_error(result, 'no config.json', 'best.pt')
