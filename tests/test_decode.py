import pytest
import torch

from model import GPT, GPTConfig, KVCache, Linear, fast_layout


def tiny(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=16, vocab_size=97, n_layer=2, n_head=2, n_embd=32)).eval()


def fast_logits(model, idx):
    """Logits of every position from a cached decode, one token per step (the fast path)."""
    cache = KVCache(model.config, idx.size(0), idx.device, model.lm_head.weight.dtype)
    with torch.no_grad():
        return torch.cat([model(idx[:, t:t + 1], cache=cache)[0] for t in range(idx.size(1))], dim=1)


def plain_logits(model, idx):
    """Logits of every position through F.linear: with gradients on, the fast path stays off."""
    with torch.enable_grad():
        return model(idx, targets=torch.zeros_like(idx))[0].detach()


def train_step(model, idx):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    _, loss = model(idx, targets=idx)
    loss.backward()
    optimizer.step()


def test_fast_path_is_taken_and_agrees_with_f_linear():
    model, idx = tiny(), torch.randint(97, (3, 10))
    fast = fast_logits(model, idx)
    assert all(m.fast is not None for m in model.modules() if isinstance(m, Linear))
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
    assert all(m.fast is None for m in model.modules() if isinstance(m, Linear))


@pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="no bf16 oneDNN kernels on this CPU")
def test_bf16_fast_path_agrees_with_f_linear():
    model, idx = tiny().to(torch.bfloat16), torch.randint(97, (2, 10))
    fast = fast_logits(model, idx)
    assert model.lm_head.fast[2] == ('packed', torch.bfloat16)
    torch.testing.assert_close(fast, plain_logits(model, idx), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize('onednn', [True, False])
def test_eager_cpu_cache_is_float32_under_bf16_weights_and_the_activations_stay_bf16(monkeypatch, onednn):
    model, idx = tiny().to(torch.bfloat16), torch.randint(97, (2, 10))
    if not onednn:  # F.linear throughout, as on a CPU without oneDNN's bf16 kernels
        monkeypatch.setattr('model.fast_layout', lambda w, rows, dtype: None)
    dtypes = []
    monkeypatch.setattr('model.KVCache', lambda *args: dtypes.append(args[-1]) or KVCache(*args))
    model.generate(idx, 3, temperature=0)
    assert dtypes == [torch.float32]
    cache = KVCache(model.config, 2, 'cpu', torch.float32)
    with torch.no_grad():
        assert model.hidden_states(idx[:, :-1], cache).dtype == torch.bfloat16  # prefill
        assert model.hidden_states(idx[:, -1:], cache).dtype == torch.bfloat16  # one cached step


@pytest.mark.parametrize('width, shape, layout', [(8192, (1, 1), 'columns'), (8192, (3, 5), 'packed'),
                                                 (64, (1, 1), 'transposed')])
def test_each_fp32_layout_agrees_with_f_linear(width, shape, layout):
    torch.manual_seed(0)
    layer = Linear(512, width).eval()  # 2**22 weights: one row takes the column blocks; 2**15: the transposed copy
    if fast_layout(layer.weight, shape[0] * shape[1], torch.float32) != layout:
        pytest.skip(f"this CPU has no {layout} layout (no oneDNN x86 kernels)")
    x = torch.randn(*shape, 512)
    with torch.no_grad():
        y = layer(x)
    assert layer.fast[2] == (layout, torch.float32)
    torch.testing.assert_close(y, torch.nn.functional.linear(x, layer.weight, layer.bias))


@pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="no bf16 oneDNN kernels on this CPU")
def test_fast_path_under_autocast_runs_in_bf16_like_f_linear():
    torch.manual_seed(0)
    layer, x = Linear(64, 96).eval(), torch.randn(4, 64)
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        y, ref = layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias)
    assert y.dtype == ref.dtype == torch.bfloat16 and layer.fast[2] == ('packed', torch.bfloat16)
    torch.testing.assert_close(y, ref, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize('options', [{}, dict(pos_emb='rope', norm='rmsnorm', mlp='swiglu', tie_embeddings=False)])
def test_compiled_step_decodes_as_full_recompute_and_follows_a_weight_change(options):
    # fp32 greedy through torch.compile's step equals nanoGPT's re-reading of the window, past a
    # slide of the window too (block_size 16); then a weight changed in place (the frozen copy
    # would be stale) is followed
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=97, n_layer=2, n_head=2, n_embd=32, **options)).eval()
    idx = torch.randint(97, (2, 5))
    for changed in (False, True):
        if changed:
            train_step(model, idx)
            model.eval()
        full = model.generate(idx, 20, temperature=0, use_cache=False)
        assert torch.equal(model.generate(idx, 20, temperature=0, compile=True), full)
