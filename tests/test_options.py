"""GPTConfig's Llama-style options and the Muon optimizer: cached generation equals recompute for
each, each trains and resumes bit for bit through train.py, Muon's groups split the parameters
cleanly, old checkpoints still load, and the full Llama combination is Hugging Face's Llama."""
import shutil
import subprocess
import sys

import pytest
import torch

from common import load_checkpoint, load_model
from conftest import ENV, ROOT, assert_error, metrics, needs_tokenizer, train
from generate import generate
from model import GPT, GPTConfig

LLAMA = dict(pos_emb='rope', norm='rmsnorm', mlp='swiglu', bias=False, tie_embeddings=False)
OPTIONS = {
    'rope': dict(pos_emb='rope'),
    'rmsnorm': dict(norm='rmsnorm'),
    'swiglu': dict(mlp='swiglu'),
    'relu2': dict(mlp='relu2'),
    'no-bias': dict(bias=False),
    'untied': dict(tie_embeddings=False),
    'llama': LLAMA,
}


def tiny(block_size=16, **options):
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=block_size, vocab_size=97, n_layer=2, n_head=2, n_embd=32, **options)).eval()


def sharp(**options):
    """tiny() with its blocks' matrices at 5x GPT-2's init: at that init attention is nearly uniform,
    so the greedy tokens would not show a key or query rotated to the wrong position."""
    model = tiny(**options)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith('transformer.h.') and p.dim() == 2:
                p.mul_(5)
    return model


def windowed_recompute(model, idx, max_new_tokens, window_shift):
    """Greedy tokens, each from a fresh full forward pass over the context the cached stream keeps:
    past block_size it drops the oldest window_shift tokens at once and re-reads the rest from
    position 0."""
    block_size = model.config.block_size
    start = max(0, idx.size(1) - block_size)
    for _ in range(max_new_tokens):
        if idx.size(1) - start > block_size:
            start = idx.size(1) - (block_size - window_shift + 1)
        logits, _ = model(idx[:, start:])
        idx = torch.cat((idx, logits[:, -1].argmax(-1, keepdim=True)), dim=1)
    return idx


@pytest.mark.parametrize('name', OPTIONS)
@pytest.mark.parametrize('prompt_len', [5, 23])  # the window slides after 11 and from the start
@pytest.mark.parametrize('window_shift', [1, 4])  # exact, and sample.py's default of block_size // 4
def test_cached_greedy_equals_recompute(name, prompt_len, window_shift):
    model = sharp(**OPTIONS[name])
    idx = torch.randint(97, (2, prompt_len), generator=torch.Generator().manual_seed(prompt_len))
    cached = generate(model, idx, 30, temperature=0, window_shift=window_shift)
    assert torch.equal(cached, windowed_recompute(model, idx, 30, window_shift))
    if window_shift == 1:
        assert torch.equal(cached, generate(model, idx, 30, temperature=0, use_cache=False))


def test_options_change_the_modules_and_keep_the_defaults_gpt2():
    names = set(dict(tiny().named_parameters()))
    assert 'transformer.wpe.weight' in names and 'transformer.h.0.ln_1.bias' in names
    default = tiny()
    assert default.transformer.wte.weight is default.lm_head.weight
    llama = tiny(**LLAMA)
    assert 'wpe' not in llama.transformer and llama.transformer.wte.weight is not llama.lm_head.weight
    assert not any(name.endswith('.bias') for name, _ in llama.named_parameters())
    assert llama.transformer.h[0].mlp.c_fc.weight.shape == (2 * 128, 32)  # 8/3 * 32 = 85, rounded up to 64s


@pytest.mark.parametrize('n_embd, hidden', [(128, 384), (256, 704), (384, 1024), (512, 1408), (768, 2048)])
def test_swiglu_has_about_as_many_weights_as_the_gelu_mlp(n_embd, hidden):
    config = GPTConfig(n_layer=1, n_head=4, n_embd=n_embd, mlp='swiglu')
    mlp = GPT(config).transformer.h[0].mlp
    assert mlp.hidden == hidden
    swiglu = sum(p.numel() for p in mlp.parameters() if p.dim() == 2)
    assert 1.0 <= swiglu / (8 * n_embd * n_embd) < 1.13


def test_num_params_and_crop_without_position_embeddings():
    model = tiny(pos_emb='rope', tie_embeddings=False)
    total = sum(p.numel() for p in model.parameters())
    assert model.get_num_params(non_embedding=False) == total
    assert model.get_num_params() == total - 97 * 32  # the input table is only looked up; lm_head is a matmul
    # the same matmuls in all three: tied, the table is counted once, as the output layer
    assert tiny(tie_embeddings=False).get_num_params() == tiny().get_num_params() == model.get_num_params()
    model.crop_block_size(8)
    assert model(torch.zeros(1, 8, dtype=torch.long))[0].shape == (1, 1, 97)


@pytest.mark.parametrize('options, hint', [
    (dict(pos_emb='alibi'), r"need pos_emb in \('learned', 'rope'\), got pos_emb='alibi'"),
    (dict(norm='batchnorm'), "norm='batchnorm'"),
    (dict(mlp='relu'), "mlp='relu'"),
    (dict(rope_theta=0.0), 'need rope_theta > 0, got rope_theta=0.0'),
    (dict(pos_emb='rope', n_head=32), "need pos_emb != 'rope' or n_embd // n_head % 2 == 0, got pos_emb='rope', n_embd=32, n_head=32"),
    (dict(n_head=5), 'need n_embd % n_head == 0, got n_embd=32, n_head=5'),
    (dict(dropout=1.0), 'need 0 <= dropout < 1, got dropout=1.0'),
    (dict(n_layer=0), 'need n_layer >= 1, got n_layer=0'),
])
def test_bad_options_are_value_errors(options, hint):
    with pytest.raises(ValueError, match=hint):
        GPTConfig(**{'n_embd': 32, 'n_head': 2, **options})


# ---------------------------------------------------------------------------- Muon

@pytest.mark.parametrize('name', ['default', *OPTIONS])
def test_muon_groups_cover_every_parameter_once(name):
    model = tiny(**OPTIONS.get(name, {}))
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), 'cpu', 'muon', muon_learning_rate=0.02)
    muon, decay, no_decay = opt.param_groups
    grouped = [p for group in opt.param_groups for p in group['params']]
    assert len(grouped) == len(set(grouped)) == len(set(model.parameters()))
    names = {p: name for name, p in model.named_parameters()}
    block_matrices = {n for n, p in model.named_parameters() if n.startswith('transformer.h.') and p.dim() == 2}
    assert {names[p] for p in muon['params']} == block_matrices
    assert {names[p] for p in decay['params'] + no_decay['params']} == set(names.values()) - block_matrices
    assert 'transformer.wte.weight' in {names[p] for p in decay['params']}
    assert ('lm_head.weight' in {names[p] for p in decay['params']}) == (name in ('untied', 'llama'))
    assert muon['lr'] == 0.02 and muon['adjust_lr_fn'] == 'match_rms_adamw' and muon['weight_decay'] == 0.1
    assert decay['lr'] == no_decay['lr'] == 1e-3 and no_decay['weight_decay'] == 0.0


def one_step(model, opt, scaler=None):
    _, loss = model(*torch.randint(97, (2, 2, 16), generator=torch.Generator().manual_seed(0)))
    if scaler is None:
        loss.backward()
        opt.step()
    else:
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        scaler.step(opt)
        scaler.update()
    opt.zero_grad(set_to_none=True)


def test_muon_and_adamw_step_save_and_load_as_one_optimizer():
    model = tiny(**LLAMA).train()
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), 'cpu', 'muon')
    one_step(model, opt)
    state = opt.state_dict()
    assert set(state) == {'muon', 'adamw'} and state['muon']['state'] and state['adamw']['state']
    fresh = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), 'cpu', 'muon')
    fresh.load_state_dict(state)
    fresh.param_groups[0]['lr'] = 0.5  # train.py's schedule must reach the loaded groups
    assert fresh.muon.param_groups[0]['lr'] == 0.5
    # a GradScaler (fp16 training) unscales and steps the pair as it does one optimizer: scaling by
    # a power of two and back is exact, so the step equals the unscaled one
    a, b = tiny(**LLAMA).train(), tiny(**LLAMA).train()
    one_step(a, a.configure_optimizers(0.1, 1e-3, (0.9, 0.95), 'cpu', 'muon'))
    one_step(b, b.configure_optimizers(0.1, 1e-3, (0.9, 0.95), 'cpu', 'muon'), torch.amp.GradScaler('cpu'))
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
    assert not torch.equal(a.transformer.h[0].attn.c_attn.weight, tiny(**LLAMA).transformer.h[0].attn.c_attn.weight)



def test_muon_steps_as_torchs_with_each_shape_orthogonalised_at_once():
    """MuonWithAdamW orthogonalises the matrices of one shape together (muon.orthogonalise): its
    steps are torch.optim.Muon's, matrix by matrix, from the same momentum state."""
    a, b = tiny(**LLAMA).train(), tiny(**LLAMA).train()
    ours = a.configure_optimizers(0.1, 1e-3, (0.9, 0.95), 'cpu', 'muon')
    ours.float32 = False  # torch's own dtype, bf16, whatever the CPU
    matrices = [p for name, p in b.named_parameters() if name.startswith('transformer.h.') and p.dim() == 2]
    torchs = torch.optim.Muon(matrices, lr=1e-3, weight_decay=0.1, adjust_lr_fn='match_rms_adamw')
    assert len({p.shape for p in matrices}) < len(matrices)  # some shapes come more than once
    for i in range(3):
        ours.zero_grad()
        a(*torch.randint(97, (2, 2, 16), generator=torch.Generator().manual_seed(i)))[1].backward()
        for p, q in zip(a.parameters(), b.parameters()):
            q.grad = p.grad.clone()
        ours.step()
        torchs.step()
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        if name.startswith('transformer.h.') and p.dim() == 2:
            assert torch.equal(p, q), name


@pytest.mark.parametrize('has_bf16', [True, False])
def test_muon_orthogonalises_in_float32_on_a_cpu_without_bf16(monkeypatch, has_bf16):
    """There bf16 products are emulated and slow: the same iteration runs in float32, which torch's
    bf16 result approximates."""
    from torch.optim import _muon
    from muon import orthogonalise
    g = torch.randn(48, 32, generator=torch.Generator().manual_seed(0))
    args = (3.4445, -4.7750, 2.0315), 5, 1e-7  # torch's coefficients, steps and eps
    ours, torchs = orthogonalise(g[None], *args, torch.float32)[0], _muon._zeropower_via_newtonschulz(g, *args)
    assert ours.dtype == torch.float32 and torchs.dtype == torch.bfloat16
    torch.testing.assert_close(ours, torchs.float(), atol=0.03, rtol=0.03)
    monkeypatch.setattr(torch.cpu, '_is_avx512_bf16_supported', lambda: has_bf16, raising=False)
    dtypes = []
    monkeypatch.setattr('muon.orthogonalise', lambda *args: dtypes.append(args[-1]) or orthogonalise(*args))
    model = tiny(**LLAMA).train()
    one_step(model, model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), 'cpu', 'muon'))
    assert set(dtypes) == {torch.bfloat16 if has_bf16 else torch.float32}


# ---------------------------------------------------------------------------- train.py (on conftest's data)

def flags(options):
    return [f'--{k}={v}' for k, v in options.items()]


TRAIN_OPTIONS = {name: flags(options) for name, options in OPTIONS.items() if name != 'llama'}
TRAIN_OPTIONS['muon'] = ['--optimizer=muon', '--muon_learning_rate=2e-2']  # twice TINY's learning_rate
TRAIN_OPTIONS['llama+muon'] = flags(LLAMA) + TRAIN_OPTIONS['muon']
RUN = ['--dtype=float32', '--eval_interval=4', '--lr_decay_iters=8', '--dropout=0.1']


@pytest.mark.parametrize('name', TRAIN_OPTIONS)
def test_each_option_trains_and_resumes_exactly(data, tmp_path, name):
    args = RUN + TRAIN_OPTIONS[name]
    train(data, tmp_path / 'straight', '--max_iters=8', *args)
    train(data, tmp_path / 'halves', '--max_iters=4', *args)
    train(data, tmp_path / 'halves', '--max_iters=8', '--init_from=resume', *args)
    straight = load_checkpoint(tmp_path / 'straight' / 'last.pt')
    halves = load_checkpoint(tmp_path / 'halves' / 'last.pt')
    for name_, weight in straight['model'].items():
        assert torch.equal(weight, halves['model'][name_]), name_
    losses = [[(r['iter'], r.get('loss'), r.get('val_loss')) for r in metrics(tmp_path / out)]
              for out in ('straight', 'halves')]
    assert losses[0] == losses[1]
    evals = [r['val_loss'] for r in metrics(tmp_path / 'straight') if 'val_loss' in r]
    assert evals[-1] < evals[0] - 0.3  # it learns (from ln(64) = 4.16)
    for key, value in OPTIONS.get(name.split('+')[0], {}).items():
        assert straight['model_args'][key] == value
    assert straight['config']['optimizer'] == ('muon' if 'muon' in name else 'adamw')
    if 'muon' in name:  # the schedule ends both at a tenth of their peaks (min_lr = learning_rate / 10)
        assert straight['optimizer']['muon']['param_groups'][0]['lr'] == pytest.approx(2e-3)
        assert [g['lr'] for g in straight['optimizer']['adamw']['param_groups']] == [1e-3, 1e-3]


def test_resume_needs_the_same_options_and_optimizer(data, tmp_path):
    train(data, tmp_path, '--max_iters=2', '--eval_interval=2', '--optimizer=muon', *flags(LLAMA), *RUN)
    assert_error(train(data, tmp_path, '--init_from=resume', '--max_iters=4', *flags(LLAMA), *RUN, ok=False),
                 'was trained with optimizer=muon')
    assert_error(train(data, tmp_path, '--init_from=resume', '--max_iters=4', '--optimizer=muon', *RUN, ok=False),
                 "pos_emb=rope (the config says learned)")
    # fine-tuning starts a fresh optimizer, so it may switch
    train(data, tmp_path / 'tuned', f'--init_from={tmp_path}/last.pt', '--max_iters=2', *flags(LLAMA), *RUN)


# ---------------------------------------------------------------------------- old checkpoints

def test_a_checkpoint_without_the_new_model_args_resumes_as_before(data, tmp_path):
    """A GPT-2 recipe checkpoint from before the options: model_args and config lack their keys."""
    train(data, tmp_path / 'new', '--max_iters=4', *RUN)
    shutil.copytree(tmp_path / 'new', tmp_path / 'old')
    train(data, tmp_path / 'new', '--max_iters=6', '--init_from=resume', *RUN)
    ckpt = load_checkpoint(tmp_path / 'old' / 'last.pt')
    for key in ('pos_emb', 'norm', 'mlp', 'tie_embeddings', 'rope_theta'):
        ckpt['model_args'].pop(key, None)  # a default model's model_args hold none of them
    for key in ('pos_emb', 'norm', 'mlp', 'tie_embeddings', 'rope_theta', 'optimizer', 'muon_learning_rate',
                'muon_momentum'):
        del ckpt['config'][key]
    torch.save(ckpt, tmp_path / 'old' / 'last.pt')
    train(data, tmp_path / 'old', '--max_iters=6', '--init_from=resume', *RUN)
    new, old = (load_checkpoint(tmp_path / out / 'last.pt')['model'] for out in ('new', 'old'))
    assert all(torch.equal(new[k], old[k]) for k in new)


@needs_tokenizer
def test_a_nanogpt_checkpoint_loads_and_samples(tmp_path):
    """nanoGPT's ckpt.pt: its own model_args (a vocabulary padded to 50304), optimizer and config."""
    model_args = dict(n_layer=1, n_head=2, n_embd=16, block_size=32, bias=True, vocab_size=50304, dropout=0.0)
    torch.manual_seed(0)
    model = GPT(GPTConfig(**model_args))
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), 'cpu')
    torch.save({'model': model.state_dict(), 'optimizer': opt.state_dict(), 'model_args': model_args,
                'iter_num': 0, 'best_val_loss': 9.0, 'config': {'dataset': 'shakespeare'}}, tmp_path / 'ckpt.pt')
    loaded, _ = load_model(tmp_path / 'ckpt.pt')
    assert loaded.config.pos_emb == 'learned' and loaded.lm_head.weight is loaded.transformer.wte.weight
    idx = torch.randint(50257, (1, 40))
    assert torch.equal(generate(loaded, idx, 8, temperature=0), generate(model.eval(), idx, 8, temperature=0))
    run = subprocess.run([sys.executable, 'sample.py', f'--ckpt={tmp_path}/ckpt.pt', '--start=Once',
                          '--max_new_tokens=8', '--device=cpu'], cwd=ROOT, env=ENV, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith('Once') and 'tokens/s' in run.stderr


# ---------------------------------------------------------------------------- Hugging Face Llama

@pytest.mark.parametrize('options', [dict(tie_embeddings=False), dict(tie_embeddings=True, rope_theta=100.0),
                                     dict(mlp='relu2')])  # Llama with ReLU²: transformers' Arcee
def test_the_llama_combination_is_hugging_face_llama(options):
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=97, n_layer=2, n_head=4, n_embd=64,
                          **{**LLAMA, **options})).eval()
    with torch.no_grad():  # gains away from 1, so that a misplaced norm weight would show
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    pytest.importorskip('transformers')
    from hf import to_llama
    llama = to_llama(model)
    idx = torch.randint(97, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, _ = model(idx, idx)
        theirs = llama(idx).logits
    assert ours.abs().max() > 0.1  # logits worth comparing
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
