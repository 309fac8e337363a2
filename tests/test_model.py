import math

import pytest
import torch

from model import GPT, GPTConfig


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


def test_sdpa_and_plain_attention_agree():
    model = tiny()
    idx = torch.randint(97, (2, 16))
    sdpa, _ = model(idx, idx)
    for block in model.transformer.h:
        block.attn.use_sdpa = False
    plain, _ = model(idx, idx)
    torch.testing.assert_close(sdpa, plain, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('use_sdpa', [True, False])
def test_attn_dropout_sets_the_attention_weights_rate_apart(use_sdpa):
    """Training, with every other dropout off: attn_dropout=0.0 leaves nothing random, while the default
    (None: dropout's rate) drops attention weights, so two passes differ; either attention path."""
    def two_passes(**options):
        model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=97, dropout=0.3, **options))
        model.train()
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Dropout) and not name.endswith('attn_dropout'):
                module.p = 0.0
        for block in model.transformer.h:
            block.attn.use_sdpa = use_sdpa
        idx = torch.randint(97, (2, 16))
        return model(idx, idx)[1], model(idx, idx)[1]
    assert torch.equal(*two_passes(attn_dropout=0.0))
    assert not torch.equal(*two_passes())
    with pytest.raises(ValueError, match='attn_dropout is None or 0 <= attn_dropout < 1'):
        GPTConfig(attn_dropout=1.0)


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


def test_flops_and_mfu_by_hand():
    """PaLM appendix B, as nanoGPT counts: 6 FLOPs per parameter per token (2 forward, 4 backward)
    plus 12 * n_layer * n_head * head_size * block_size for attention's scores and weighted sum."""
    model = tiny()  # 2 layers, 2 heads, n_embd 32 (head_size 16), block_size 16, vocab 97, biases
    # a layer: ln_1 2*32, c_attn 32*96+96, attention's c_proj 32*32+32, ln_2 2*32, c_fc 32*128+128, MLP's c_proj 128*32+32
    assert sum(p.numel() for p in model.transformer.h[0].parameters()) == 64 + 3168 + 1056 + 64 + 4224 + 4128 == 12704
    # 2 layers, the token embedding (also the output layer), ln_f; the position embedding is left out
    assert model.get_num_params() == 2 * 12704 + 97 * 32 + 64 == 28576
    assert model.flops_per_token() == 6 * 28576 + 12 * 2 * 2 * 16 * 16 == 183744
    # 4 sequences of 16 tokens in 2 s on a 1 GFLOP/s device: 183744 * 64 / 2 / 1e9
    assert model.estimate_mfu(fwdbwd_per_iter=4, dt=2.0, peak_flops=1e9) == pytest.approx(0.005879808)
