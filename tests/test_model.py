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


def scripted(rows):
    """A tiny GPT whose forward pass ignores its input: at step i, row r's likeliest token is rows[r][i]."""
    model, steps = tiny(), iter(range(100))
    def forward(idx, targets=None, cache=None):
        i, logits = next(steps), torch.zeros(len(rows), 1, 97)
        for r, row in enumerate(rows):
            logits[r, 0, row[i]] = 1.0
        return logits, None
    model.forward = forward
    model.step = lambda idx, layers, pos: forward(idx)[0]  # stream's cached steps
    return model


def test_end_of_text_ends_each_row_then_the_stream():
    eos, start = 9, torch.zeros(2, 1, dtype=torch.long)
    rows = [[1, eos, 2, 3, 4, 5, 6, 7], [1, 2, 3, eos, 4, 5, 6, 7]]
    # row 0 keeps emitting eos though its model says 2, 3; once row 1 is done too, the stream ends
    out = scripted(rows).generate(start, 8, temperature=0, eos_token=eos)
    assert out[:, 1:].tolist() == [[1, eos, eos, eos], [1, 2, 3, eos]]
    # while one row is unfinished, the stream runs its full length
    rows[1][3] = 8
    out = scripted(rows).generate(start, 8, temperature=0, eos_token=eos)
    assert out[:, 1:].tolist() == [[1] + [eos] * 7, rows[1]]
    # without eos_token, eos is a token like any other
    assert scripted(rows).generate(start, 8, temperature=0)[:, 1:].tolist() == rows


def test_top_k_and_top_p_restrict_choices():
    torch.manual_seed(0)
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(2000, 1)
    assert set(sample_logits(logits.clone(), top_k=2).flatten().tolist()) == {0, 1}
    assert set(sample_logits(logits.clone(), top_p=0.75).flatten().tolist()) == {0, 1}
    assert set(sample_logits(logits.clone(), top_p=0.4).flatten().tolist()) == {0}
    assert sample_logits(logits.clone(), temperature=0).unique().tolist() == [0]
    hot = sample_logits(logits.clone(), temperature=5.0).flatten()
    assert (hot == 3).float().mean() > 0.1  # flattened towards uniform


def test_top_k_and_top_p_sample_the_renormalised_distribution():
    # the kept tokens are sampled in order of likelihood and mapped back to their ids: the ids and
    # their frequencies must both survive, with the vocabulary in no particular order
    torch.manual_seed(0)
    probs = torch.tensor([0.05, 0.3, 0.15, 0.5])
    logits = torch.log(probs).repeat(40000, 1)
    for kw, kept in ((dict(top_k=3), [1, 2, 3]), (dict(top_p=0.7), [1, 3]), (dict(top_k=3, top_p=0.9), [1, 2, 3]),
                     (dict(top_k=2, temperature=0.5), [1, 3])):
        picks = sample_logits(logits.clone(), **kw).flatten()
        p = probs[kept] ** (1 / kw.get('temperature', 1.0))
        expected = torch.zeros(4).index_put_((torch.tensor(kept),), p / p.sum())
        assert torch.allclose(torch.bincount(picks, minlength=4) / len(picks), expected, atol=0.01), kw


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


def test_flops_and_mfu_by_hand():
    """PaLM appendix B, as nanoGPT counts: 6 FLOPs per parameter per token (2 forward, 4 backward)
    plus 12 * n_layer * n_head * head_size * block_size for attention's scores and weighted sum."""
    model = tiny()  # 2 layers, 2 heads, n_embd 32 (head_size 16), block_size 16, vocab 97, biases
    # a layer: ln_1 2*32, c_attn 32*96+96, attention's c_proj 32*32+32, ln_2 2*32, c_fc 32*128+128, MLP's c_proj 128*32+32
    assert 64 + 3168 + 1056 + 64 + 4224 + 4128 == 12704
    # 2 layers, the token embedding (also the output layer), ln_f; the position embedding is left out
    assert model.get_num_params() == 2 * 12704 + 97 * 32 + 64 == 28576
    assert model.flops_per_token() == 6 * 28576 + 12 * 2 * 2 * 16 * 16 == 183744
    # 4 sequences of 16 tokens in 2 s on a 1 GFLOP/s device
    assert model.estimate_mfu(fwdbwd_per_iter=4, dt=2.0, peak_flops=1e9) == pytest.approx(183744 * 64 / 2 / 1e9)
    assert 183744 * 64 / 2 / 1e9 == pytest.approx(0.005879808)
