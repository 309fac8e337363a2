"""
Generation with a model from model.py: a KV cache (the prompt is read once, then each new token
costs one position's pass), sampling, a decoding step compiled by torch.compile, and, on the CPU,
weight layouts that let a decoding step read its weights near memory speed.
  from generate import generate
  out = generate(model, idx, 100, temperature=0.8, top_k=200)  # idx (B, T) -> (B, T + up to 100)
The network knows only that a cache may take over its attention (positions and attend): KVCache
holds rows at one position, RowCache rows at their own, for Rows (requests decoded together: serve.py).
"""
import functools
import math
from typing import NamedTuple

import torch
import torch.nn as nn
from torch.nn import functional as F


class KVCache:
    """Keys and values of every layer for up to block_size positions of a batch of rows, the first
    pos of them filled. The model asks it for the new tokens' positions and lets it attend."""

    def __init__(self, layers, pos=0):
        self.layers, self.pos = layers, pos  # [(keys, values) of each layer], each (B, n_head, block_size, head_dim)

    @classmethod
    def empty(cls, config, batch_size, device, dtype):
        shape = (batch_size, config.n_head, config.block_size, config.n_embd // config.n_head)
        return cls([(torch.empty(shape, device=device, dtype=dtype), torch.empty(shape, device=device, dtype=dtype))
                    for _ in range(config.n_layer)])

    def positions(self, T):
        block_size = self.layers[0][0].size(2)
        if self.pos + T > block_size:
            raise ValueError(f"sequence of length {self.pos + T} is longer than block_size={block_size}")
        return torch.arange(self.pos, self.pos + T, device=self.layers[0][0].device)

    def attend(self, i, q, k, v):
        """Layer i's attention of the new queries q over the cached keys and values and the new k, v."""
        keys, values = self.layers[i]
        pos, T = self.pos, q.size(2)
        keys[:, :, pos:pos + T], values[:, :, pos:pos + T] = k, v
        k, v = keys[:, :, :pos + T], values[:, :, :pos + T]
        dtype, q = q.dtype, q.to(k.dtype)  # the cache may be float32 under bf16 weights (see stream)
        if T == 1 and q.device.type == 'cpu' and torch.compiler.is_compiling():
            # one query in a CPU graph: inductor fuses the plain product, softmax and product into fewer
            # passes than SDPA's kernel (compiled bf16 decoding step: ~1.25x at batch 1, ~1.45x at 8)
            y = F.softmax((q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1))), dim=-1) @ v
        else:
            # one new token sees every cached one; new tokens after cached ones see those and the earlier new ones
            mask = None if T == 1 or pos == 0 else torch.ones(T, pos + T, dtype=torch.bool, device=q.device).tril(pos)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=T > 1 and pos == 0)
        return y.to(dtype)


def decode(model, idx, layers, pos):
    """Logits (B, 1, vocab) for the token after idx (B, T), which continues at position pos the rows
    whose keys and values layers hold (they receive idx's). Tensors and an int in, no cache object,
    so that torch.compile takes a decoding step whole (compiled_decode)."""
    return model.lm_head(model.hidden_states(idx, KVCache(layers, pos))[:, -1:, :])


def compiled_decode(model):
    """decode compiled by torch.compile, made on first use and kept on the model. On the CPU inductor
    freezes the weights into it as constants, which it lays out for its own matrix kernels and fuses
    with the ops around them (bench.py on a 2-core CPU: 1.4-2.5x eager decoding at batch 1). Nothing
    would notice frozen weights going stale, so a weight that changes afterwards (an optimizer step,
    load_state_dict) resets torch.compile (every compiled function of the process) and compiles again."""
    weights = [(p.data_ptr(), p._version) for p in model.parameters()]
    made = getattr(model, 'compiled_decode', None)  # (the weights' storage and versions when compiled, the function)
    if made is not None and made[0] == weights:
        return made[1]
    if made is not None:
        torch._dynamo.reset()
    # dynamic: one graph for every position (ints 0 and 1 still get their own)
    compiled = step = torch.compile(lambda idx, layers, pos: decode(model, idx, layers, pos), dynamic=True, fullgraph=True)
    if model.lm_head.weight.device.type == 'cpu':
        # inductor picks each product's kernel by timing its own C++ one against oneDNN's, quietly.
        # Given as torch.compile(options=...) these settings freeze the weights but leave every
        # product to plain ATen (torch 2.13); patched around each call they also reach recompiles
        settings = torch._inductor.config.patch(
            freezing=True, max_autotune=True, max_autotune_gemm_backends='CPP,ATEN',
            autotune_num_choices_displayed=0, max_autotune_report_choices_stats=False)

        def step(*args):
            with settings:
                return compiled(*args)
    model.compiled_decode = (weights, step)
    return step


def check_options(temperature=1.0, top_k=None, top_p=None, repetition_penalty=1.0, window_shift=1, block_size=None):
    """Raise ValueError naming a sampling option out of its range (window_shift's upper bound once block_size is known)."""
    if not 0 <= temperature < math.inf:
        raise ValueError(f"temperature must be >= 0 (0 is greedy) and finite, got {temperature}")
    if top_k is not None and not (type(top_k) is int and top_k >= 1):
        raise ValueError(f"top_k must be at least 1 or None, got {top_k!r}")
    if top_p is not None and not (type(top_p) in (int, float) and 0 < top_p <= 1):
        raise ValueError(f"top_p must be a number in (0, 1] or None, got {top_p!r}")
    if not 0 < repetition_penalty < math.inf:
        raise ValueError(f"repetition_penalty must be > 0 (1.0 is off) and finite, got {repetition_penalty}")
    if not (type(window_shift) is int and window_shift >= 1):
        raise ValueError(f"window_shift must be a whole number >= 1, got {window_shift!r}")
    if block_size is not None and window_shift > block_size:
        raise ValueError(f"window_shift must be at most block_size={block_size}, got {window_shift}")


def sample_logits(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """Pick one token per row from logits (B, vocab), drawing from generator (torch's default one if None)."""
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
        # drop a token once the likelier ones already reach top_p; the top token always stays, even
        # where top_p rounds to 0 in float32 (below ~1e-45), which would drop them all
        drop = probs.cumsum(dim=-1) - probs >= top_p
        drop[:, 0] = False
        probs = probs.masked_fill(drop, 0)
    # inverse-CDF sampling: torch.multinomial draws an exponential per vocabulary entry, which
    # costs more than a whole cached forward pass of a small model on the CPU
    cdf = torch.cumsum(probs, dim=-1)
    u = torch.rand(cdf.size(0), 1, device=cdf.device, generator=generator) * cdf[:, -1:]
    pick = torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.size(-1) - 1)
    return pick if ids is None else ids.gather(1, pick)


@torch.no_grad()
def generate(model, idx, max_new_tokens, **options):
    """Append up to max_new_tokens to each row of idx (B, T); see stream() for the options."""
    return torch.cat([idx] + list(stream(model, idx, max_new_tokens, **options)), dim=1)


@torch.no_grad()
def stream(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, repetition_penalty=1.0,
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
    compiled_decode: slow to start (tens of seconds on a CPU), then faster per token.
    """
    block_size = model.config.block_size
    check_options(temperature, top_k, top_p, repetition_penalty, window_shift, block_size)
    use_fast_linears(model)
    done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
    # eager on the CPU the cache stays float32 under bf16 weights: SDPA's bf16 kernel for one
    # query runs ~6x slower than its float32 one (batch 8, 144 positions: ~440 vs ~75 us a
    # layer); the compiled step fuses its own bf16 attention and gains from reading half the bytes
    cache_dtype = torch.float32 if idx.device.type == 'cpu' and not compile else model.lm_head.weight.dtype
    eager = functools.partial(decode, model)
    compiled = compiled_decode(model) if compile and use_cache else None
    cache = None
    for _ in range(max_new_tokens):
        if not use_cache:
            logits, _ = model(idx[:, -block_size:])
        else:
            if cache is None or cache.pos == block_size:  # (re)start from the last tokens
                new = idx[:, -(block_size if cache is None else block_size - window_shift + 1):]
                cache = KVCache.empty(model.config, idx.size(0), idx.device, cache_dtype)
            else:
                new = next_token  # idx's last column; a view of idx would get a new stride every step
            # torch.compile would give positions 0, 1 and the last (the cache read whole) graphs of their own
            run = compiled if compiled and 1 < cache.pos < block_size - 1 else eager
            logits = run(new, cache.layers, cache.pos)
            cache.pos += new.size(1)
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


class RowCache:
    """A KVCache whose rows each sit at their own position, pos (B,), and take one new token a step."""

    def __init__(self, layers, pos):
        self.layers, self.pos = layers, pos

    def positions(self, T):
        return self.pos[:, None]

    def attend(self, i, q, k, v):
        keys, values = self.layers[i]
        rows = torch.arange(len(self.pos), device=q.device)
        keys[rows, :, self.pos], values[rows, :, self.pos] = k[:, :, 0].to(keys.dtype), v[:, :, 0].to(values.dtype)
        seen = torch.arange(keys.size(2), device=q.device) <= self.pos[:, None]  # each row its own positions
        # the plain product, softmax and product: SDPA's CPU kernel splits its work by thread so that a
        # row's result depends on its slot in the batch (seen with 2 threads), and a row's text would
        # depend on which others are in flight
        att = (q.to(keys.dtype) @ keys.transpose(-2, -1)) * (1.0 / math.sqrt(keys.size(-1)))
        y = F.softmax(att.masked_fill(~seen[:, None, None, :], float('-inf')), dim=-1) @ values
        return y.to(q.dtype)


class Row(NamedTuple):
    tokens: list  # the prompt's and the new ones, for re-reading the window when it slides
    temperature: float
    top_k: int
    top_p: float
    generator: torch.Generator


class Rows:
    """Rows decoded together, one batched step for all (continuous batching, as a server needs):
    each sits at its own position, with its own sampling settings and random generator, and slides
    its own window past block_size; a row joins (add) or leaves (remove) between steps. A step always
    decodes max_rows rows, free ones as padding, and a prompt is read alone: a row's tokens do not
    depend on the others (in float32, the same alone as in a full batch). compile=True runs the step
    through torch.compile. Not thread-safe."""

    def __init__(self, model, max_rows=8, window_shift=None, compile=False):
        self.model = use_fast_linears(model)
        # the step's shapes never change (max_rows rows, a full-length cache): one graph, compiled on the first step
        self.logits = torch.compile(self.eager_logits, fullgraph=True) if compile else self.eager_logits
        self.block_size = model.config.block_size
        self.window_shift = max(1, self.block_size // 4) if window_shift is None else window_shift  # as sample.py
        check_options(window_shift=self.window_shift, block_size=self.block_size)
        weight = model.lm_head.weight
        self.device = weight.device
        dtype = torch.float32 if self.device.type == 'cpu' else weight.dtype  # as stream's eager cache
        # zeros: the plain attention weighs the unfilled positions by 0, and 0 * NaN (torch.empty's garbage) is NaN
        self.layers = [(k.zero_(), v.zero_()) for k, v in KVCache.empty(model.config, max_rows, self.device, dtype).layers]
        self.pos, self.next = [0] * max_rows, [0] * max_rows  # each row's cached positions and token to feed
        self.rows = [None] * max_rows

    @property
    def free(self):
        return self.rows.count(None)

    def add(self, ids, temperature=1.0, top_k=None, top_p=None, seed=None):
        """A new row for the prompt ids (its last block_size tokens); returns its slot."""
        check_options(temperature, top_k, top_p)
        if None not in self.rows:
            raise ValueError(f"all {len(self.rows)} rows are taken")
        slot = self.rows.index(None)
        generator = torch.Generator(self.device)
        generator.seed() if seed is None else generator.manual_seed(seed)
        self.rows[slot] = Row(list(ids[-self.block_size:]), temperature, top_k, top_p, generator)
        self.read(slot, self.rows[slot].tokens)
        return slot

    def remove(self, slot):
        self.rows[slot] = None

    @torch.no_grad()
    def read(self, slot, ids):
        """Fill slot's cache with all of ids but the last, alone, which the next step feeds."""
        if len(ids) > 1:
            cache = KVCache([(k[slot:slot + 1], v[slot:slot + 1]) for k, v in self.layers])  # views of slot's row
            self.model.hidden_states(torch.tensor([ids[:-1]], device=self.device), cache)
        self.pos[slot], self.next[slot] = len(ids) - 1, ids[-1]

    def eager_logits(self, next, pos):
        x = self.model.hidden_states(next[:, None], RowCache(self.layers, pos))
        return self.model.lm_head(x[:, -1, :]).float()

    @torch.no_grad()
    def step(self):
        """One decoding step of every row: {slot: its next token}."""
        logits = self.logits(torch.tensor(self.next, device=self.device), torch.tensor(self.pos, device=self.device))
        picks = {slot: sample_logits(logits[slot:slot + 1], row.temperature, row.top_k, row.top_p, row.generator)
                 for slot, row in enumerate(self.rows) if row is not None}
        tokens = dict(zip(picks, torch.cat(list(picks.values())).flatten().tolist())) if picks else {}
        for slot, token in tokens.items():
            self.rows[slot].tokens.append(token)
            self.pos[slot], self.next[slot] = self.pos[slot] + 1, token
            if self.pos[slot] == self.block_size:  # full: re-read the last tokens, as stream does
                self.read(slot, self.rows[slot].tokens[-(self.block_size - self.window_shift + 1):])
        return tokens


# ---------------------------------------------------------------------------------------------------
# The CPU weight layouts. Decoding one token reads every weight once, and F.linear reads PyTorch's
# (out, in) layout at a fraction of memory speed; a copy laid out for a faster kernel reads it faster.

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


def lay_out(w, layout):
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


class LaidOut(NamedTuple):
    source: torch.Tensor  # the weight it was made from; held, so that a new weight cannot reuse its address
    version: int  # the weight's version then: an optimizer step or load_state_dict bumps it
    layout: str
    dtype: torch.dtype
    weight: torch.Tensor  # the copy


class FastLinear(nn.Linear):
    """nn.Linear that, in inference on the CPU, multiplies by a copy of its weight in fast_layout's
    layout, made on first use in the dtype the product runs in (autocast's, else the weight's),
    remade when the weight changes or another layout is due, and dropped by train(). Its
    parameters, state_dict and weight tying are those of the nn.Linear it replaced."""
    laid_out = None

    def forward(self, x):
        w = self.weight
        # under torch.compile the compiler lays the weights out itself (and the checks below would break its graph)
        if self.training or torch.is_grad_enabled() or w.device.type != 'cpu' or torch.compiler.is_compiling():
            return F.linear(x, w, self.bias)
        dtype = torch.get_autocast_dtype('cpu') if torch.is_autocast_enabled('cpu') else w.dtype
        layout = fast_layout(w, x.numel() // x.size(-1), dtype)
        if layout is None:
            return F.linear(x, w, self.bias)
        copy = self.laid_out
        if (copy is None or copy.source.data_ptr() != w.data_ptr() or copy.version != w._version
                or (copy.layout, copy.dtype) != (layout, dtype)):
            copy = self.laid_out = LaidOut(w.detach(), w._version, layout, dtype, lay_out(w.detach().to(dtype), layout))
        x, bias = x.to(dtype), None if self.bias is None else self.bias.to(dtype)
        if layout == 'packed':
            return torch.ops.mkldnn._linear_pointwise(x, copy.weight, bias, 'none', [], '')
        x2 = x.reshape(-1, x.size(-1))
        if layout == 'transposed':
            y = x2 @ copy.weight if bias is None else torch.addmm(bias, x2, copy.weight)
        else:  # 'columns': one matmul per column block, run in parallel as a batch
            blocks = copy.weight
            y = torch.bmm(x2.expand(len(blocks), -1, -1), blocks).transpose(0, 1).reshape(len(x2), -1)[:, :len(w)]
            y = y if bias is None else y + bias
        return y.view(*x.shape[:-1], -1)

    def train(self, mode=True):
        self.laid_out = None
        return super().train(mode)


def use_fast_linears(model):
    """Swap every nn.Linear of a model on the CPU for a FastLinear holding the same parameters (tied
    weights stay tied; state_dict is unchanged). Done once; nothing to do on other devices."""
    if next(model.parameters()).device.type != 'cpu':
        return model
    for module in list(model.modules()):
        for name, child in module.named_children():
            if type(child) is nn.Linear:
                with torch.device('meta'):  # no memory for weights that are replaced at once
                    fast = FastLinear(child.in_features, child.out_features, bias=child.bias is not None)
                fast.weight, fast.bias = child.weight, child.bias
                fast.train(child.training)
                setattr(module, name, fast)
    return model
