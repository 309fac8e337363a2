"""
The GPT language model, in the shape of GPT-2 and nanoGPT (same module and parameter names):
token + learned position embeddings, pre-LayerNorm blocks of causal self-attention and a GELU
MLP, tied input/output embeddings. GPTConfig's options turn it into a Llama-style model piece by
piece (rotary positions, RMSNorm, SwiGLU, no biases, a separate output layer); with all of them it
maps one to one onto Hugging Face's LlamaForCausalLM. Generation uses a KV cache: one pass over
the prompt, then one token per step.
"""
import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F


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
        """x (B, n_head, T, head_dim) holds positions pos..pos+T-1."""
        cos = self.cos[pos:pos + x.size(2)].to(x.dtype)
        sin = self.sin[pos:pos + x.size(2)].to(x.dtype)
        return x * cos + rotate_half(x) * sin


class Linear(nn.Linear):
    """nn.Linear that, in inference on the CPU, multiplies by a copy of its weight laid out for a
    faster kernel (fast_layout). Decoding one token reads every weight once, and F.linear reads
    PyTorch's (out, in) layout at a fraction of memory speed. The copy is made on first use in the
    dtype the product runs in (autocast's, else the weight's), remade when the weight changes (an
    optimizer step or load_state_dict bumps its version) or another layout is due, and dropped by
    train(); parameters, state_dict and weight tying are those of nn.Linear."""
    fast = None  # (the weight it was made from, its version at the time, (layout, dtype), the copy)

    def forward(self, x):
        w = self.weight
        # under torch.compile the compiler lays the weights out itself (and the checks below would break its graph)
        if self.training or torch.is_grad_enabled() or w.device.type != 'cpu' or torch.compiler.is_compiling():
            return F.linear(x, w, self.bias)
        dtype = torch.get_autocast_dtype('cpu') if torch.is_autocast_enabled('cpu') else w.dtype
        key = (fast_layout(w, x.numel() // x.size(-1), dtype), dtype)
        if key[0] is None:
            return F.linear(x, w, self.bias)
        src, version, have, fast = self.fast or (None, None, None, None)
        # holding src keeps its memory, so a new weight cannot reuse its address
        if src is None or src.data_ptr() != w.data_ptr() or version != w._version or have != key:
            fast = make_fast(w.detach().to(dtype), key[0])
            self.fast = (w.detach(), w._version, key, fast)
        x, bias = x.to(dtype), None if self.bias is None else self.bias.to(dtype)
        if key[0] == 'packed':
            return torch.ops.mkldnn._linear_pointwise(x, fast, bias, 'none', [], '')
        x2 = x.reshape(-1, x.size(-1))
        if key[0] == 'transposed':
            y = x2 @ fast if bias is None else torch.addmm(bias, x2, fast)
        else:  # 'columns': one matmul per column block, run in parallel as a batch
            y = torch.bmm(x2.expand(len(fast), -1, -1), fast).transpose(0, 1).reshape(len(x2), -1)[:, :len(w)]
            y = y if bias is None else y + bias
        return y.view(*x.shape[:-1], -1)

    def train(self, mode=True):
        self.fast = None
        return super().train(mode)


ONEDNN_X86 = torch.backends.mkldnn.is_available() and torch.backends.cpu.get_cpu_capability() in ('AVX2', 'AVX512')
ONEDNN_X86_BF16 = ONEDNN_X86 and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def fast_layout(w, rows, dtype):
    """The layout of w's inference copy for a product with `rows` rows in dtype, None for F.linear.
    Measured on a 2-core AVX-512 CPU (bench.py --parts=sample and the products alone): oneDNN's
    packed layout runs 1.5-3x F.linear in fp32 and bf16, but its ~15 us per call loses to MKL on
    the transposed matrix for one row through a small fp32 matrix (under 2^18 weights), and one row
    through a large one (the output layer) streams fastest as the transposed matrix cut into 4
    column blocks whose products run in parallel. Without oneDNN's x86 kernels fp32 keeps the
    transposed matrix (~3x F.linear at one row here) and bf16 F.linear."""
    if dtype == torch.float32:
        if not ONEDNN_X86 or rows == 1 and w.numel() < 2 ** 18:
            return 'transposed'
        return 'columns' if rows == 1 and w.numel() >= 2 ** 22 else 'packed'
    return 'packed' if dtype == torch.bfloat16 and ONEDNN_X86_BF16 else None


def make_fast(w, layout):
    """w's inference copy in the layout fast_layout chose."""
    if layout == 'packed':  # the batch size is only a hint to oneDNN: 8 measured as fast as 1 at batch 1
        return torch.ops.mkldnn._reorder_linear_weight(w, 8)
    if layout == 'transposed':
        return w.t().contiguous()
    out_features, in_features = w.shape
    blocks = 4  # 2 and 8 measured slower on the output layer
    width = -(-out_features // blocks)
    wt = w.new_zeros(in_features, blocks * width)  # padded, so the blocks are equally wide
    wt[:, :out_features] = w.t()
    return wt.view(in_features, blocks, width).transpose(0, 1).contiguous()


class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        if config.n_embd % config.n_head != 0:
            raise ValueError(f"n_embd={config.n_embd} must be a multiple of n_head={config.n_head}")
        self.c_attn = Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        # SDPA picks a flash/memory-efficient kernel where it can; the manual path is the reference.
        self.flash = hasattr(F, 'scaled_dot_product_attention')
        mask = torch.tril(torch.ones(config.block_size, config.block_size, dtype=torch.bool))
        self.register_buffer('mask', mask, persistent=False)
        self.rotary = (Rotary(config.n_embd // config.n_head, config.block_size, config.rope_theta)
                       if config.pos_emb == 'rope' else None)

    def forward(self, x, kv=None, pos=0):
        """x holds the tokens at positions pos..pos+T-1; kv, when given, is this layer's
        (k, v) cache holding positions 0..pos-1, and receives the new keys and values."""
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if self.rotary is not None:  # the cache keeps keys already rotated to their positions
            q, k = self.rotary(q, pos), self.rotary(k, pos)
        if kv is not None:
            kv[0][:, :, pos:pos + T] = k
            kv[1][:, :, pos:pos + T] = v
            k, v = kv[0][:, :, :pos + T], kv[1][:, :, :pos + T]
            q = q.to(k.dtype)  # a float32 cache under bf16 weights (stream)
        # one query in a CPU graph of torch.compile: inductor fuses the plain product, softmax and
        # product into fewer passes than SDPA's kernel (compiled bf16 decoding step: ~1.25x at batch 1, ~1.45x at 8)
        if self.flash and not (T == 1 and x.device.type == 'cpu' and torch.compiler.is_compiling()):
            # one new token may see every cached one; a block starting at 0 is plain causal
            mask = None if T == 1 or pos == 0 else self.mask[pos:pos + T, :pos + T]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=(T > 1 and pos == 0),
                                               dropout_p=self.dropout if self.training else 0.0)
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
            att = att.masked_fill(~self.mask[pos:pos + T, :pos + T], float('-inf'))
            att = self.attn_dropout(F.softmax(att, dim=-1))
            y = att @ v
        y = y.transpose(1, 2).contiguous().view(B, T, C).to(x.dtype)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class SwiGLU(nn.Module):
    """Llama's MLP, silu(x W_gate) * (x W_up) W_down, with gate and up in one matmul (c_fc). Its
    hidden size is Llama's: 2/3 of 4 * n_embd, rounded up to a multiple of 64, so its three
    matrices hold about as many weights as the GELU MLP's two (exactly as many at n_embd=384, 768)."""

    def __init__(self, config):
        super().__init__()
        self.hidden = math.ceil(8 * config.n_embd // 3 / 64) * 64
        self.c_fc = Linear(config.n_embd, 2 * self.hidden, bias=config.bias)
        self.c_proj = Linear(self.hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        gate, up = self.c_fc(x).split(self.hidden, dim=-1)
        return self.dropout(self.c_proj(F.silu(gate) * up))


class Block(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = make_norm(config)
        self.mlp = SwiGLU(config) if config.mlp == 'swiglu' else MLP(config)

    def forward(self, x, kv=None, pos=0):
        x = x + self.attn(self.ln_1(x), kv, pos)
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
    mlp: str = 'gelu'  # 'gelu' or 'swiglu' (Llama's)
    tie_embeddings: bool = True  # the output layer reuses the token embedding, as GPT-2; False: its own
    rope_theta: float = 10000.0  # rotary base: pair i turns at rope_theta^(-2i/head_dim) per position

    def __post_init__(self):
        for name, allowed in (('pos_emb', ('learned', 'rope')), ('norm', ('layernorm', 'rmsnorm')),
                              ('mlp', ('gelu', 'swiglu'))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of {', '.join(map(repr, allowed))}")
        if self.pos_emb == 'rope' and (self.n_embd % self.n_head or self.n_embd // self.n_head % 2):
            raise ValueError(f"pos_emb='rope' needs an even head size, n_embd/n_head = {self.n_embd}/{self.n_head}")
        if not self.rope_theta > 0:
            raise ValueError(f"rope_theta must be > 0, got {self.rope_theta}")


class MuonWithAdamW:
    """Muon and AdamW stepped as one optimizer, so that train.py's learning-rate schedule, gradient
    clipping, GradScaler and checkpoints handle it as they handle AdamW alone: one param_groups
    list (Muon's group first; the dicts are the optimizers' own), one state_dict."""

    def __init__(self, muon, adamw):
        self.muon, self.adamw = muon, adamw

    @property
    def param_groups(self):  # looked up each time: load_state_dict replaces an optimizer's groups
        return self.muon.param_groups + self.adamw.param_groups

    def step(self):
        self.muon.step()
        self.adamw.step()

    def zero_grad(self, set_to_none=True):
        self.muon.zero_grad(set_to_none)
        self.adamw.zero_grad(set_to_none)

    def state_dict(self):
        return {'muon': self.muon.state_dict(), 'adamw': self.adamw.state_dict()}

    def load_state_dict(self, state):
        self.muon.load_state_dict(state['muon'])
        self.adamw.load_state_dict(state['adamw'])


class KVCache:
    """Keys and values of every layer for up to block_size positions of a batch of rows."""

    def __init__(self, config, batch_size, device, dtype):
        shape = (batch_size, config.n_head, config.block_size, config.n_embd // config.n_head)
        self.layers = [(torch.empty(shape, device=device, dtype=dtype), torch.empty(shape, device=device, dtype=dtype))
                       for _ in range(config.n_layer)]
        self.pos = 0  # positions filled so far


class GPT(nn.Module):
    _compiled = None  # (the weights' storage and versions when compiled, compiled_step's function)

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            # rotary positions live in the attention; learned ones are added to the input here
            **({'wpe': nn.Embedding(config.block_size, config.n_embd)} if config.pos_emb == 'learned' else {}),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=make_norm(config),
        ))
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)
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

    def forward(self, idx, targets=None, cache=None):
        """Logits for every position and the mean cross-entropy when targets are given (-1 is
        ignored); otherwise logits for the last position only. With a KVCache, idx continues
        the cached sequence at position cache.pos."""
        x = self.hidden_states(idx, cache)
        if targets is not None:
            logits = self.lm_head(x)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
            return logits, loss
        return self.lm_head(x[:, [-1], :]), None  # the list index keeps the time dimension

    def hidden_states(self, idx, cache=None):
        """The final (normalised) hidden state of every position, before the output layer."""
        if cache is None:
            return self.decode(idx)
        x = self.decode(idx, cache.layers, cache.pos)
        cache.pos += idx.size(1)
        return x

    def decode(self, idx, layers=None, pos=0):
        """hidden_states of idx, which continues at position pos the sequence whose keys and values
        layers (a KVCache's) hold; they receive idx's. Tensors and an int in, no cache object, so
        that torch.compile takes a decoding step whole (compiled_step)."""
        B, T = idx.size()
        if pos + T > self.config.block_size:
            raise ValueError(f"sequence of length {pos + T} is longer than block_size={self.config.block_size}")
        x = self.transformer.wte(idx)
        if 'wpe' in self.transformer:
            x = x + self.transformer.wpe(torch.arange(pos, pos + T, dtype=torch.long, device=idx.device))
        x = self.transformer.drop(x)
        for i, block in enumerate(self.transformer.h):
            x = block(x, layers[i] if layers is not None else None, pos)
        return self.transformer.ln_f(x)

    def step(self, idx, layers, pos):
        """Logits (B, 1, vocab) for the token after idx (B, T); idx, layers and pos as in decode."""
        return self.lm_head(self.decode(idx, layers, pos)[:, -1:, :])

    def compiled_step(self):
        """step compiled by torch.compile, made on first use and kept. On the CPU inductor freezes
        the weights into it as constants, which it lays out for its own matrix kernels and fuses
        with the ops around them (bench.py on a 2-core CPU: 1.4-2.5x eager generate at batch 1).
        Nothing would notice frozen weights going stale, so a weight that changes afterwards
        (an optimizer step, load_state_dict) resets torch.compile (every compiled function of
        the process) and compiles the step again."""
        weights = [(p.data_ptr(), p._version) for p in self.parameters()]
        if self._compiled is not None and self._compiled[0] == weights:
            return self._compiled[1]
        if self._compiled is not None:
            torch._dynamo.reset()
        # dynamic: one graph for every position (ints 0 and 1 still get their own)
        compiled = step = torch.compile(self.step, dynamic=True, fullgraph=True)
        if self.lm_head.weight.device.type == 'cpu':
            # inductor picks each product's kernel by timing its own C++ one against oneDNN's, quietly.
            # Given as torch.compile(options=...) these settings freeze the weights but leave every
            # product to plain ATen (torch 2.13); patched around each call they also reach recompiles
            settings = torch._inductor.config.patch(
                freezing=True, max_autotune=True, max_autotune_gemm_backends='CPP,ATEN',
                autotune_num_choices_displayed=0, max_autotune_report_choices_stats=False)

            def step(*args):
                with settings:
                    return compiled(*args)
        self._compiled = (weights, step)
        return step

    def crop_block_size(self, block_size):
        """Shrink the context length of a trained model (e.g. to fine-tune with shorter blocks)."""
        if block_size > self.config.block_size:
            raise ValueError(f"cannot grow block_size from {self.config.block_size} to {block_size}")
        self.config.block_size = block_size
        if 'wpe' in self.transformer:
            self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])
        for block in self.transformer.h:
            block.attn.mask = block.attn.mask[:block_size, :block_size]

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type, optimizer='adamw',
                             muon_learning_rate=1e-3, muon_momentum=0.95):
        """AdamW with weight decay on 2-D weights only (matmuls and embeddings), not on biases and
        norm gains; the fused kernel on CUDA. optimizer='muon' moves the blocks' matrices to Muon
        (the rest stays with AdamW): see MuonWithAdamW."""
        if optimizer not in ('adamw', 'muon'):
            raise ValueError(f"optimizer={optimizer!r} is not one of 'adamw', 'muon'")
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
        # match_rms_adamw (Moonshot's "Muon is Scalable"): the update's RMS matches a typical AdamW
        # step's, so muon_learning_rate and weight_decay live on AdamW's scale rather than Keller
        # Jordan's original (lr ~0.02, whose step size also depends on the matrix's aspect ratio)
        muon = torch.optim.Muon(to_muon, lr=muon_learning_rate, weight_decay=weight_decay, momentum=muon_momentum,
                                adjust_lr_fn='match_rms_adamw')
        return MuonWithAdamW(muon, adamw)

    def flops_per_token(self):
        """Training FLOPs per token (forward + backward), PaLM appendix B: 6N + 12 L H Q T."""
        cfg = self.config
        return 6 * self.get_num_params() + 12 * cfg.n_layer * cfg.n_head * (cfg.n_embd // cfg.n_head) * cfg.block_size

    def estimate_mfu(self, fwdbwd_per_iter, dt, peak_flops=None):
        """Model FLOPs utilisation: achieved training FLOP/s over the device's peak.
        fwdbwd_per_iter sequences of block_size tokens took dt seconds."""
        achieved = self.flops_per_token() * self.config.block_size * fwdbwd_per_iter / dt
        return achieved / (peak_flops or device_peak_flops(self.lm_head.weight.device))

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, **kwargs):
        """Append up to max_new_tokens to each row of idx (B, T); see stream() for the options."""
        tokens = list(self.stream(idx, max_new_tokens, **kwargs))
        return torch.cat([idx] + tokens, dim=1)

    @torch.no_grad()
    def stream(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, repetition_penalty=1.0,
               eos_token=None, use_cache=True, window_shift=1, compile=False):
        """Yield the next token of every row, shape (B, 1), one step at a time.

        temperature 0 is greedy; top_k / top_p keep the k likeliest tokens / the smallest set
        whose probability reaches p; repetition_penalty > 1 makes tokens already in the row less
        likely (CTRL-style). With eos_token, a row that produced it yields eos_token from then on,
        and the stream ends when every row has. Past block_size the context slides: without the
        cache (nanoGPT's way) the model re-reads the last block_size tokens every step; with the
        cache, once it is full the oldest window_shift tokens are dropped and the rest re-read
        in one pass. window_shift=1 gives exactly the no-cache result; larger shifts re-read
        less often, at the cost of a shorter context (at least block_size - window_shift + 1)
        for the tokens right after a shift. compile=True runs the cached steps through
        compiled_step: slow to start (tens of seconds on a CPU), then faster per token.
        """
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if top_p is not None and not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {repetition_penalty}")
        block_size = self.config.block_size
        if not 1 <= window_shift <= block_size:
            raise ValueError(f"window_shift must be in 1..{block_size}, got {window_shift}")
        done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
        cache = None
        # eager on the CPU the cache stays float32 under bf16 weights: SDPA's bf16 kernel for one
        # query runs ~6x slower than its float32 one (batch 8, 144 positions: ~440 vs ~75 us a
        # layer); the compiled step fuses its own bf16 attention and gains from reading half the bytes
        cache_dtype = torch.float32 if idx.device.type == 'cpu' and not compile else self.lm_head.weight.dtype
        step = self.compiled_step() if compile and use_cache else self.step
        for _ in range(max_new_tokens):
            if not use_cache:
                logits, _ = self(idx[:, -block_size:])
            elif cache is None or cache.pos == block_size:
                keep = block_size if cache is None else block_size - window_shift + 1
                cache = KVCache(self.config, idx.size(0), idx.device, cache_dtype)
                logits, _ = self(idx[:, -keep:], cache=cache)
            else:
                # torch.compile would give positions 0, 1 and the last (the cache read whole) graphs of
                # their own, and a view of idx a new stride every step: one graph serves all the others
                run = step if 1 < cache.pos < block_size - 1 else self.step
                logits = run(next_token, cache.layers, cache.pos)  # idx's last column
                cache.pos += 1
            logits = logits[:, -1, :].float()
            if repetition_penalty != 1.0:
                seen = torch.gather(logits, 1, idx)
                logits.scatter_(1, idx, torch.where(seen > 0, seen / repetition_penalty, seen * repetition_penalty))
            next_token = sample_logits(logits, temperature, top_k, top_p)
            if eos_token is not None:
                next_token = torch.where(done[:, None], eos_token, next_token)
                done |= next_token[:, 0] == eos_token
            idx = torch.cat((idx, next_token), dim=1)
            yield next_token
            if done.all():
                break


def sample_logits(logits, temperature=1.0, top_k=None, top_p=None):
    """Pick one token per row from logits (B, vocab)."""
    # below float32's smallest normal number a temperature is greedy in all but name (and float32
    # rounds one below ~1e-45 to 0, which would divide 0 by 0)
    if temperature < torch.finfo(torch.float32).tiny:
        return torch.argmax(logits, dim=-1, keepdim=True)
    # top_k / top_p work on the likeliest tokens sorted, and the pick maps back to its id: masking
    # the whole vocabulary and sampling it costs ~3x more (batch 8, 50,257 tokens: ~1.4 vs ~0.5 ms)
    ids = None
    if top_k is not None and top_k < logits.size(-1):
        logits, ids = torch.topk(logits, top_k)
    elif top_p is not None and top_p < 1.0:
        logits, ids = torch.sort(logits, descending=True)
    # shifted by its max, the top logit stays 0 and the others reach -inf at worst; unshifted, a
    # small temperature overflows the top ones to inf and softmax's inf - inf is NaN
    top = logits[:, :1] if ids is not None else logits.amax(dim=-1, keepdim=True)
    probs = F.softmax((logits - top) / temperature, dim=-1)
    if top_p is not None and top_p < 1.0:
        # drop a token once the likelier ones already reach top_p; the top token always stays
        probs = probs.masked_fill(probs.cumsum(dim=-1) - probs >= top_p, 0)
    # inverse-CDF sampling: torch.multinomial draws an exponential per vocabulary entry, which
    # costs more than a whole cached forward pass of a small model on the CPU
    cdf = torch.cumsum(probs, dim=-1)
    u = torch.rand(cdf.size(0), 1, device=cdf.device) * cdf[:, -1:]
    pick = torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.size(-1) - 1)
    return pick if ids is None else ids.gather(1, pick)


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
