import math

import pytest
import torch

from model import GPT, GPTConfig, sample_logits


def tiny(block_size=16, **kw):
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=block_size, vocab_size=97, n_layer=2, n_head=2, n_embd=32, **kw)).eval()


def test_forward_shapes_and_loss():
    model = tiny()
    idx = torch.randint(97, (3, 10))
    logits, loss = model(idx, idx)
    assert logits.shape == (3, 10, 97)
    assert abs(loss.item() - math.log(97)) < 0.5  # near-uniform at init
    logits, loss = model(idx)
    assert logits.shape == (3, 1, 97) and loss is None


def test_too_long_input_is_an_error():
    with pytest.raises(ValueError, match='block_size'):
        tiny()(torch.zeros(1, 17, dtype=torch.long))


def test_flash_and_manual_attention_agree():
    model = tiny()
    idx = torch.randint(97, (2, 16))
    flash, _ = model(idx, idx)
    for block in model.transformer.h:
        block.attn.flash = False
    manual, _ = model(idx, idx)
    torch.testing.assert_close(flash, manual, rtol=1e-4, atol=1e-5)


def test_weight_tying_and_gpt2_init():
    model = GPT(GPTConfig(n_layer=4, n_head=2, n_embd=64, vocab_size=500))
    assert model.transformer.wte.weight is model.lm_head.weight
    assert abs(model.transformer.h[0].mlp.c_fc.weight.std().item() - 0.02) < 0.002
    assert abs(model.transformer.h[0].mlp.c_proj.weight.std().item() - 0.02 / math.sqrt(8)) < 0.001


def test_num_params_counts_tied_weights_once():
    model = tiny()
    unique = sum(p.numel() for p in set(model.parameters()))
    assert model.get_num_params(non_embedding=False) == unique
    assert model.get_num_params() == unique - 16 * 32


def test_crop_block_size():
    model = tiny()
    model.crop_block_size(8)
    logits, _ = model(torch.zeros(1, 8, dtype=torch.long))
    assert model.transformer.wpe.weight.shape[0] == 8 and logits.shape == (1, 1, 97)
    with pytest.raises(ValueError):
        model.crop_block_size(32)


def test_optimizer_decays_only_matrices():
    opt = tiny().configure_optimizers(0.1, 1e-3, (0.9, 0.95), 'cpu')
    decay, no_decay = opt.param_groups
    assert decay['weight_decay'] == 0.1 and all(p.dim() == 2 for p in decay['params'])
    assert no_decay['weight_decay'] == 0.0 and all(p.dim() == 1 for p in no_decay['params'])


@pytest.mark.parametrize('prompt_len', [5, 16, 23])
def test_cached_greedy_equals_full_recompute(prompt_len):
    model = tiny()
    idx = torch.randint(97, (2, prompt_len), generator=torch.Generator().manual_seed(prompt_len))
    full = model.generate(idx, 30, temperature=0, use_cache=False)
    cached = model.generate(idx, 30, temperature=0, use_cache=True)
    assert torch.equal(full, cached)
    assert full.shape == (2, prompt_len + 30)


def test_wider_window_shift_matches_until_the_window_fills():
    model = tiny()
    idx = torch.randint(97, (2, 4))
    full = model.generate(idx, 30, temperature=0, use_cache=False)
    shifted = model.generate(idx, 30, temperature=0, window_shift=8)
    assert torch.equal(full[:, :17], shifted[:, :17])  # 16 context tokens + the first prediction past them
    assert shifted.shape == full.shape


def test_same_seed_same_sample_with_and_without_cache():
    model = tiny()
    idx = torch.randint(97, (3, 6))
    torch.manual_seed(1)
    a = model.generate(idx, 12, temperature=0.8, top_k=20)
    torch.manual_seed(1)
    b = model.generate(idx, 12, temperature=0.8, top_k=20, use_cache=False)
    assert torch.equal(a, b)


def test_stream_yields_the_generated_tokens():
    model = tiny()
    idx = torch.randint(97, (2, 3))
    streamed = torch.cat([idx] + list(model.stream(idx, 7, temperature=0)), dim=1)
    assert torch.equal(streamed, model.generate(idx, 7, temperature=0))


def test_eos_stops_each_row():
    model = tiny()
    idx = torch.randint(97, (2, 3))
    greedy = model.generate(idx, 10, temperature=0)
    eos = greedy[0, 5].item()  # the third token row 0 generates
    out = model.generate(idx, 10, temperature=0, eos_token=eos)
    assert (out[0, 5:] == eos).all()
    row1 = greedy[1, 3:].tolist()
    if eos not in row1:  # row 1 never stops, so the stream runs its full length
        assert out.shape[1] == 13 and torch.equal(out[1], greedy[1])


def test_top_k_and_top_p_restrict_choices():
    torch.manual_seed(0)
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(2000, 1)
    assert set(sample_logits(logits.clone(), top_k=2).flatten().tolist()) == {0, 1}
    assert set(sample_logits(logits.clone(), top_p=0.75).flatten().tolist()) == {0, 1}
    assert set(sample_logits(logits.clone(), top_p=0.4).flatten().tolist()) == {0}
    assert sample_logits(logits.clone(), temperature=0).unique().tolist() == [0]
    hot = sample_logits(logits.clone(), temperature=5.0).flatten()
    assert (hot == 3).float().mean() > 0.1  # flattened towards uniform


def test_repetition_penalty_discourages_seen_tokens():
    model = tiny()
    idx = torch.randint(97, (1, 4))
    plain = model.generate(idx, 40, temperature=0)[0, 4:]
    penalised = model.generate(idx, 40, temperature=0, repetition_penalty=3.0)[0, 4:]
    assert len(set(penalised.tolist())) > len(set(plain.tolist()))


@pytest.mark.parametrize('kw', [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(repetition_penalty=0),
                                dict(window_shift=0)])
def test_bad_generation_options(kw):
    with pytest.raises(ValueError):
        tiny().generate(torch.zeros(1, 1, dtype=torch.long), 2, **kw)


def test_estimate_mfu_uses_given_peak():
    model = tiny()
    mfu = model.estimate_mfu(fwdbwd_per_iter=4, dt=1.0, peak_flops=1e9)
    assert mfu == pytest.approx(model.flops_per_token() * 16 * 4 / 1e9)
