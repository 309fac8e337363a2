"""
The GPT language model, in the shape of GPT-2 and nanoGPT (same module and parameter names):
token + learned position embeddings, pre-LayerNorm blocks of causal self-attention and a GELU
MLP, tied input/output embeddings. GPTConfig's options turn it into a Llama-style model piece by
piece (rotary positions, RMSNorm, SwiGLU, no biases, a separate output layer); with all of them it
maps one to one onto Hugging Face's LlamaForCausalLM, and with ReLU² for SwiGLU onto its
ArceeForCausalLM. This file is the network and what training
needs of it; generation (the KV cache, sampling, fast inference kernels) is generate.py.
"""
import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

from muon import MuonWithAdamW


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's own cannot drop just the bias)."""

    def __init__(self, ndim, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class RMSNorm(nn.Module):
    """Llama's normalisation: divide by the root mean square, scale by a gain; no mean, no bias."""

    def __init__(self, ndim):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))

    def forward(self, x):
        return F.rms_norm(x, self.weight.shape, self.weight, 1e-5)


def make_norm(config):
    return RMSNorm(config.n_embd) if config.norm == 'rmsnorm' else LayerNorm(config.n_embd, bias=config.bias)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Rotary(nn.Module):
    """Rotary position embeddings in Hugging Face Llama's convention: a head's dimension i is paired
    with i + head_dim/2 (rotate_half, not interleaved pairs), pair i turning at theta^(-2i/head_dim)
    radians per position."""

    def __init__(self, head_dim, block_size, theta):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        angles = torch.outer(torch.arange(block_size, dtype=torch.float), inv_freq)
        angles = torch.cat((angles, angles), dim=-1)
        self.register_buffer('cos', angles.cos(), persistent=False)
        self.register_buffer('sin', angles.sin(), persistent=False)

    def forward(self, x, pos):
        """x (B, T, heads, head_dim) at positions pos: (T,), or (B, T) for rows at positions of their own."""
        cos = self.cos[pos].unsqueeze(-2).to(x.dtype)  # broadcast over the heads
        sin = self.sin[pos].unsqueeze(-2).to(x.dtype)
        return x * cos + rotate_half(x) * sin


class CausalSelfAttention(nn.Module):

    def __init__(self, config, layer_idx):
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = nn.Dropout(config.attention_dropout())
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.attention_dropout()
        self.layer_idx = layer_idx  # which of a KV cache's layers is this one's
        # F.scaled_dot_product_attention (fused kernels); False: the plain reference, which is also taken for
        # short bf16 sequences on the CPU, where the fused backward is several times slower (bench.py --parts=attention)
        self.use_sdpa = True
        self.rotary = (Rotary(config.n_embd // config.n_head, config.block_size, config.rope_theta)
                       if config.pos_emb == 'rope' else None)

    def forward(self, x, pos, cache=None):
        """x holds the tokens at positions pos; a cache (generate.py), when given, holds the keys and
        values of the positions before them, takes the new ones, and attends over them all."""
        B, T, C = x.size()
        qkv = self.c_attn(x).view(B, T, 3 * self.n_head, C // self.n_head)
        qk, v = qkv[:, :, :2 * self.n_head], qkv[:, :, 2 * self.n_head:]
        if self.rotary is not None:  # keys go into a cache already rotated to their positions
            qk = self.rotary(qk, pos)  # queries and keys in one pass: half the calls of an eager decoding step
        q, k, v = (t.transpose(1, 2) for t in (qk[:, :, :self.n_head], qk[:, :, self.n_head:], v))
        fused_is_slow = x.device.type == 'cpu' and q.dtype == torch.bfloat16 and T <= 256  # see use_sdpa
        if cache is not None:
            y = cache.attend(self.layer_idx, q, k, v)
        elif self.use_sdpa and not fused_is_slow:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
            causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            att = self.attn_dropout(F.softmax(att.masked_fill(~causal, float('-inf')), dim=-1))
            y = att @ v
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """GPT-2's MLP; with mlp='relu2' the same matrices around relu(x)^2 instead of GELU (ReLU², as
    Arcee's AFM and modded-nanogpt have it)."""

    def __init__(self, config):
        super().__init__()
        self.hidden = 4 * config.n_embd
        self.c_fc = nn.Linear(config.n_embd, self.hidden, bias=config.bias)
        self.gelu = nn.GELU()
        self.relu2 = config.mlp == 'relu2'
        self.c_proj = nn.Linear(self.hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        x = self.c_fc(x)
        return self.dropout(self.c_proj(F.relu(x).square() if self.relu2 else self.gelu(x)))


class SwiGLU(nn.Module):
    """Llama's MLP, silu(x W_gate) * (x W_up) W_down, with gate and up in one matmul (c_fc). Its
    hidden size is Llama's: 2/3 of 4 * n_embd, rounded up to a multiple of 64, so its three
    matrices hold about as many weights as the GELU MLP's two (exactly as many at n_embd=384, 768)."""

    def __init__(self, config):
        super().__init__()
        self.hidden = math.ceil(8 * config.n_embd // 3 / 64) * 64
        self.c_fc = nn.Linear(config.n_embd, 2 * self.hidden, bias=config.bias)
        self.c_proj = nn.Linear(self.hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        gate, up = self.c_fc(x).split(self.hidden, dim=-1)
        return self.dropout(self.c_proj(F.silu(gate) * up))


class Block(nn.Module):

    def __init__(self, config, layer_idx):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = make_norm(config)
        self.mlp = SwiGLU(config) if config.mlp == 'swiglu' else MLP(config)

    def forward(self, x, pos, cache=None):
        x = x + self.attn(self.ln_1(x), pos, cache)
        return x + self.mlp(self.ln_2(x))


@dataclass
class GPTConfig:
    block_size: int = 128
    vocab_size: int = 50257  # GPT-2 BPE
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    dropout: float = 0.0
    bias: bool = True  # bias in Linears and LayerNorms, like GPT-2
    pos_emb: str = 'learned'  # 'learned' (GPT-2's wpe) or 'rope' (rotary, as Llama)
    norm: str = 'layernorm'  # 'layernorm' or 'rmsnorm' (Llama's; it never has a bias)
    mlp: str = 'gelu'  # 'gelu', 'swiglu' (Llama's) or 'relu2' (GELU's shape, relu(x)^2)
    tie_embeddings: bool = True  # the output layer reuses the token embedding, as GPT-2; False: its own
    rope_theta: float = 10000.0  # rotary base: pair i turns at rope_theta^(-2i/head_dim) per position
    attn_dropout: float | None = None  # dropout on the attention weights; None: dropout's (GPT-2 has one rate)

    def __post_init__(self):
        """Every option's range, checked once here: train.py, load_model and hf.py all build one."""
        for k in ('block_size', 'vocab_size', 'n_layer', 'n_head', 'n_embd'):
            if getattr(self, k) < 1:
                raise ValueError(f"need {k} >= 1, got {k}={getattr(self, k)!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"need n_embd % n_head == 0, got n_embd={self.n_embd!r}, n_head={self.n_head!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"need 0 <= dropout < 1, got dropout={self.dropout!r}")
        for k, choices in (('pos_emb', ('learned', 'rope')), ('norm', ('layernorm', 'rmsnorm')),
                           ('mlp', ('gelu', 'swiglu', 'relu2'))):
            if getattr(self, k) not in choices:
                raise ValueError(f"need {k} in {choices}, got {k}={getattr(self, k)!r}")
        if self.pos_emb == 'rope' and self.n_embd // self.n_head % 2:  # rotary turns pairs of a head's dimensions
            raise ValueError(f"need pos_emb != 'rope' or n_embd // n_head % 2 == 0, got pos_emb='rope', "
                             f"n_embd={self.n_embd!r}, n_head={self.n_head!r}")
        if not self.rope_theta > 0:
            raise ValueError(f"need rope_theta > 0, got rope_theta={self.rope_theta!r}")
        if not (self.attn_dropout is None or 0 <= self.attn_dropout < 1):
            raise ValueError(f"need attn_dropout is None or 0 <= attn_dropout < 1, "
                             f"got attn_dropout={self.attn_dropout!r}")

    def attention_dropout(self):
        return self.dropout if self.attn_dropout is None else self.attn_dropout


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            # rotary positions live in the attention; learned ones are added to the input here
            **({'wpe': nn.Embedding(config.block_size, config.n_embd)} if config.pos_emb == 'learned' else {}),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=make_norm(config),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:  # the output layer reuses the token embedding (saves vocab*n_embd params)
            self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        # GPT-2: residual projections scaled so the residual stream's variance stays put with depth
        for name, p in self.named_parameters():
            if name.endswith('c_proj.weight'):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def get_num_params(self, non_embedding=True):
        """Parameter count; by default without the tables that are only looked up, not multiplied:
        the position embeddings, and the token embeddings when the output layer has its own weights
        (tied, they are counted once, as the output layer's)."""
        n_params = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n_params -= sum(self.transformer[name].weight.numel() for name in ('wpe', 'wte')
                            if name in self.transformer and self.transformer[name].weight is not self.lm_head.weight)
        return n_params

    def forward(self, idx, targets=None):
        """Logits for every position and the mean cross-entropy when targets are given (-1 is
        ignored); otherwise logits for the last position only."""
        x = self.hidden_states(idx)
        if targets is not None:
            logits = self.lm_head(x)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
            return logits, loss
        return self.lm_head(x[:, [-1], :]), None  # the list index keeps the time dimension

    def hidden_states(self, idx, cache=None):
        """The final (normalised) hidden state of every position, before the output layer. With a
        cache (generate.py), idx continues the rows it holds, at the positions it gives them."""
        T = idx.size(1)
        if cache is not None:
            pos = cache.positions(T)
        elif T <= self.config.block_size:
            pos = torch.arange(T, device=idx.device)
        else:
            raise ValueError(f"sequence of length {T} is longer than block_size={self.config.block_size}")
        x = self.transformer.wte(idx)
        if 'wpe' in self.transformer:
            x = x + self.transformer.wpe(pos)
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            x = block(x, pos, cache)
        return self.transformer.ln_f(x)

    def crop_block_size(self, block_size):
        """Shrink the context length of a trained model (e.g. to fine-tune with shorter blocks)."""
        if block_size > self.config.block_size:
            raise ValueError(f"cannot grow block_size from {self.config.block_size} to {block_size}")
        self.config.block_size = block_size
        if 'wpe' in self.transformer:
            self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type, optimizer='adamw',
                             muon_learning_rate=1e-3, muon_momentum=0.95):
        """AdamW with weight decay on 2-D weights only (matmuls and embeddings), not on biases and
        norm gains; the fused kernel on CUDA. optimizer='muon' moves the blocks' matrices to Muon
        (the rest stays with AdamW): see muon.py. train.py checks the name with its settings."""
        to_muon, rest = [], []
        for name, p in self.named_parameters():  # a tied weight comes once, as transformer.wte.weight
            if p.requires_grad:
                in_block = name.startswith('transformer.h.') and p.dim() == 2
                (to_muon if optimizer == 'muon' and in_block else rest).append(p)
        groups = [
            {'params': [p for p in rest if p.dim() >= 2], 'weight_decay': weight_decay},
            {'params': [p for p in rest if p.dim() < 2], 'weight_decay': 0.0},
        ]
        fused = device_type == 'cuda' and 'fused' in inspect.signature(torch.optim.AdamW).parameters
        adamw = torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **({'fused': True} if fused else {}))
        if optimizer == 'adamw':
            return adamw
        return MuonWithAdamW(to_muon, adamw, muon_learning_rate, weight_decay, muon_momentum, device_type)

    def flops_per_token(self):
        """Training FLOPs per token (forward + backward), PaLM appendix B: 6N + 12 L H Q T."""
        cfg = self.config
        return 6 * self.get_num_params() + 12 * cfg.n_layer * cfg.n_head * (cfg.n_embd // cfg.n_head) * cfg.block_size

    def estimate_mfu(self, fwdbwd_per_iter, dt, peak_flops=None):
        """Model FLOPs utilisation: achieved training FLOP/s over the device's peak.
        fwdbwd_per_iter sequences of block_size tokens took dt seconds."""
        achieved = self.flops_per_token() * self.config.block_size * fwdbwd_per_iter / dt
        return achieved / (peak_flops or device_peak_flops(self.lm_head.weight.device))


def device_peak_flops(device):
    """Dense bf16 peak FLOP/s of a known GPU; on the CPU a rough 2-core AVX-512 figure
    (pass peak_flops to estimate_mfu for a measured one)."""
    if device.type == 'cuda':
        name = torch.cuda.get_device_name(device)
        for key, peak in (('H200', 989e12), ('H100', 989e12), ('A100', 312e12), ('L4', 121e12), ('4090', 165e12)):
            if key in name:
                return peak
        return 312e12
    return 1e12
