import pytest
import torch

import generate as gen
import layouts
from conftest import tiny, train_step
from generate import KVCache, generate
from layouts import FastLinear, Int8Linear, fast_layout, lay_out, use_fast_linears, use_int8_weights
from model import GPT, GPTConfig


def fast_logits(model, idx):
    """Logits of every position from a cached decode, one token per step (the fast path)."""
    use_fast_linears(model)
    cache = KVCache.empty(model.config, idx.size(0), idx.device, model.lm_head.weight.dtype)
    logits = []
    with torch.no_grad():
        for t in range(idx.size(1)):
            logits.append(gen.step_logits(model, idx[:, t:t + 1], cache.layers, cache.pos))
            cache.pos += 1
    return torch.cat(logits, dim=1)


def plain_logits(model, idx):
    """Logits of every position through F.linear: with gradients on, the fast path stays off."""
    with torch.enable_grad():
        return model(idx, targets=torch.zeros_like(idx))[0].detach()


def test_fast_path_is_taken_and_agrees_with_f_linear():
    model, idx = tiny(), torch.randint(97, (3, 10))
    fast = fast_logits(model, idx)
    assert all(m.laid_out is not None for m in model.modules() if isinstance(m, FastLinear))
    torch.testing.assert_close(fast, plain_logits(model, idx))


@pytest.mark.parametrize('mode', ['train', 'eval'])
def test_fast_path_follows_an_optimizer_step(mode):
    model, idx = tiny(), torch.randint(97, (2, 10))
    before = fast_logits(model, idx)
    if mode == 'train':
        model.train()
    train_step(model, idx)  # in eval mode (dropout 0) no train() call drops the copies
    if mode == 'train':
        model.eval()
    after = fast_logits(model, idx)
    assert not torch.allclose(before, after, atol=1e-3)
    torch.testing.assert_close(after, plain_logits(model, idx))


def test_fast_path_takes_a_model_made_in_inference_mode():
    with torch.inference_mode():  # its weights keep no version to check
        model, idx = tiny(), torch.randint(97, (2, 10))
        out = generate(use_fast_linears(model), idx, 5, temperature=0)
    assert torch.equal(out, generate(model, idx, 5, temperature=0, use_cache=False))


def test_fast_path_follows_load_state_dict():
    model, other, idx = tiny(0), tiny(1), torch.randint(97, (2, 10))
    fast_logits(model, idx)
    model.load_state_dict(other.state_dict())
    torch.testing.assert_close(fast_logits(model, idx), plain_logits(other, idx))


def test_copies_stay_out_of_the_state_dict_and_go_with_train():
    model, idx = tiny(), torch.randint(97, (1, 4))
    names = list(model.state_dict())
    fast_logits(model, idx)
    assert list(model.state_dict()) == names
    assert model.lm_head.weight is model.transformer.wte.weight
    model.train()
    assert all(m.laid_out is None for m in model.modules() if isinstance(m, FastLinear))


def test_each_layouts_copy_is_made_once_for_prompts_and_steps_alike(monkeypatch):
    layer, made = FastLinear(64, 96).eval(), []
    layouts = {fast_layout(layer.weight, rows, torch.float32) for rows in (1, 5)}
    if len(layouts) == 1:
        pytest.skip("one layout for one row and five on this CPU (no oneDNN x86 kernels)")
    monkeypatch.setattr('layouts.lay_out', lambda w, layout: made.append(layout) or lay_out(w, layout))
    with torch.no_grad():
        for rows in (5, 1, 5, 1):  # a prompt's read, a step, the window's re-read, a step
            x = torch.randn(rows, 64)
            torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))
    assert sorted(made) == sorted(layouts) and set(layer.laid_out) == {(l, torch.float32) for l in layouts}


@pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="no bf16 oneDNN kernels on this CPU")
def test_bf16_fast_path_agrees_with_f_linear():
    model, idx = tiny().to(torch.bfloat16), torch.randint(97, (2, 10))
    fast = fast_logits(model, idx)
    assert list(model.lm_head.laid_out) == [('packed', torch.bfloat16)]
    torch.testing.assert_close(fast, plain_logits(model, idx), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize('width, shape, layout', [(8192, (1, 1), 'columns'), (8192, (3, 5), 'packed'),
                                                 (64, (1, 1), 'transposed')])
def test_each_fp32_layout_agrees_with_f_linear(width, shape, layout):
    torch.manual_seed(0)
    layer = FastLinear(512, width).eval()  # 2**22 weights: one row takes the column blocks; 2**15: the transposed copy
    if fast_layout(layer.weight, shape[0] * shape[1], torch.float32) != layout:
        pytest.skip(f"this CPU has no {layout} layout (no oneDNN x86 kernels)")
    x = torch.randn(*shape, 512)
    with torch.no_grad():
        y = layer(x)
    assert list(layer.laid_out) == [(layout, torch.float32)]
    torch.testing.assert_close(y, torch.nn.functional.linear(x, layer.weight, layer.bias))


@pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="no bf16 oneDNN kernels on this CPU")
def test_fast_path_under_autocast_runs_in_bf16_like_f_linear():
    torch.manual_seed(0)
    layer, x = FastLinear(64, 96).eval(), torch.randn(4, 64)
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        y, ref = layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias)
    assert y.dtype == ref.dtype == torch.bfloat16 and list(layer.laid_out) == [('packed', torch.bfloat16)]
    torch.testing.assert_close(y, ref, atol=2e-2, rtol=2e-2)


@pytest.mark.skipif(not layouts.ONEDNN_X86, reason="not an x86 CPU with oneDNN's kernels")
def test_bf16_products_of_many_rows_run_in_float32_without_bf16_kernels(monkeypatch):
    """On an x86 CPU without oneDNN's bf16 kernels, a bf16 product of more than BF16_ROWS rows is float32's, rounded:
    eagerly (a float32 copy of the weight, under autocast too) and compiled for any prompt length; fewer rows stay bf16."""
    monkeypatch.setattr(layouts, 'ONEDNN_X86_BF16', False)
    torch.manual_seed(0)
    layer = FastLinear(64, 96).eval().to(torch.bfloat16)
    wide, narrow = torch.randn(2, 5, 64).bfloat16(), torch.randn(layouts.BF16_ROWS, 64).bfloat16()
    in_float32 = lambda x, layer: torch.nn.functional.linear(x.float(), layer.weight.float(), layer.bias.float()).bfloat16()
    with torch.no_grad():
        y = layer(wide)
        assert y.dtype == torch.bfloat16 and [d for _, d in layer.laid_out] == [torch.float32]
        torch.testing.assert_close(y, in_float32(wide, layer), atol=1e-2, rtol=0)  # the float32 sum, rounded once
        assert torch.equal(layer(narrow), torch.nn.functional.linear(narrow, layer.weight, layer.bias))
        program = torch.export.export(layer, (wide,), dynamic_shapes=({1: torch.export.Dim('T', min=2, max=64)},), strict=False)
    with torch.no_grad():
        assert torch.equal(program.module()(wide[:, :3]), in_float32(wide[:, :3], layer))
    f32 = FastLinear(64, 96).eval()
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        y = f32(wide.float())
    assert y.dtype == torch.bfloat16 and [d for _, d in f32.laid_out] == [torch.float32]
    torch.testing.assert_close(y, in_float32(wide, f32), atol=1e-2, rtol=0)


def test_swapped_layers_keep_the_parameters_state_dict_and_tying():
    model = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = list(model.parameters())
    use_fast_linears(model)
    assert all(type(m) is not torch.nn.Linear for m in model.modules())
    assert list(model.parameters()) == params and model.lm_head.weight is model.transformer.wte.weight
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and list(before) == list(model.state_dict())


# ---------------------------------------------------------------------------- int8 weights

def sharp(options=None):
    """A tiny model whose logits have no near-ties, so that greedy text does not hang on rounding."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=97, n_layer=2, n_head=2, n_embd=32, **(options or {}))).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(10)
    return model


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_int8_linear_multiplies_by_its_rounded_weight(dtype):
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 96).to(dtype)
    layer, x = Int8Linear(linear), torch.randn(3, 5, 64, dtype=dtype)
    assert layer.weight.dtype == torch.int8 and layer.weight.abs().max() == 127 and layer.bias is linear.bias
    rounded = layer.weight.float() * layer.scales.float()[:, None]
    step = layer.scales.float()[:, None] * (0.5 if dtype == torch.float32 else 1.0)  # half a step; bf16's scales are rounded too
    assert ((rounded - linear.weight.float()).abs() <= step + 1e-6).all()
    with torch.no_grad():
        y = layer(x)
    assert y.dtype == dtype and y.shape == (3, 5, 96)
    tol = 3e-2  # float32 activations too go through bf16 for the kernel
    torch.testing.assert_close(y.float(), torch.nn.functional.linear(x.float(), rounded, linear.bias.float()), atol=tol, rtol=tol)


@pytest.mark.parametrize('options', [{}, dict(pos_emb='rope', norm='rmsnorm', mlp='swiglu', tie_embeddings=False)])
def test_int8_weights_decode_near_the_model_and_compiled_as_eager(options):
    model, idx = sharp(options), torch.randint(97, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(idx)[0]
    use_int8_weights(model)
    assert not any(type(m) is torch.nn.Linear for m in model.modules())
    with torch.no_grad():
        out = model(idx)[0]
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()  # int8's rounding, a few percent of the logits' range
    if options:  # compiled (a minute on 2 cores), for the Llama-style blocks only
        eager = generate(model, idx, 20, temperature=0)
        assert torch.equal(generate(model, idx, 20, temperature=0, compile=True), eager)
