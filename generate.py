"""
Generation with a model from model.py: a KV cache (the prompt is read once, then each new token
costs one position's pass), sampling (sampling.py's), and a token's whole step compiled into one call (on the CPU
ahead of time by AOTInductor, its package kept for later runs; the weights' layouts for decoding are layouts.py's, swapped in when a script loads a model).
  from generate import generate
  out = generate(model, idx, 100, temperature=0.8, top_k=200)  # idx (B, T) -> (B, T + up to 100)
The network knows only that a cache may take over its attention (positions and attend): KVCache
holds rows at one position, RowCache rows at their own (rows.py's Rows: requests decoded together).
"""
import math
import torch
from torch.nn import functional as F

from compiled import aot_compiled, weights_version
from model import rotate_half
from sampling import GREEDY, sample_logits


class KVCache:
    """Keys and values of every layer for up to block_size positions of a batch of rows, the first
    pos of them filled. The model asks it for the new tokens' positions and lets it attend."""

    def __init__(self, layers, pos=0):
        self.layers, self.pos = layers, pos  # [(keys, values) of each layer], each (B, n_head, block_size, head_dim)

    @classmethod
    def empty(cls, config, batch_size, device, dtype, spare=False):
        """spare: each tensor a view of block_size positions of block_size + 1, for a compiled step that reads
        the first L (RowCache's span), which torch.export would fix at block_size where those were a whole tensor."""
        shape = (batch_size, config.n_head, config.block_size + spare, config.n_embd // config.n_head)
        return cls([tuple(torch.empty(shape, device=device, dtype=dtype)[:, :, :config.block_size] for _ in 'kv')
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
        # one new token sees every cached one; new tokens after cached ones see those and the earlier new ones
        mask = None if T == 1 or pos == 0 else torch.ones(T, pos + T, dtype=torch.bool, device=q.device).tril(pos)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=T > 1 and pos == 0)
        return y.to(dtype)


def step_logits(model, idx, layers, pos):
    """Logits (B, 1, vocab) for the token after idx (B, T), which continues at position pos the rows
    whose keys and values layers hold (they receive idx's): the eager decoding step."""
    return model.lm_head(model.hidden_states(idx, KVCache(layers, pos))[:, -1:, :])


def next_tokens(model, token, pos, layers, u, seen, done, temperature, top_k, top_p, repetition_penalty, eos_token,
                span=None):
    """One decoding step with its sampling, whole, for torch.compile to make one call of (compiled_step):
    the rows' last tokens (B, 1) at positions pos (B,) over the keys and values in layers (each of
    block_size positions, whatever the step: one graph serves them all), u (B, 1) the uniform draws
    to sample with (None: greedy), seen (B, vocab) the tokens each row holds (for repetition_penalty),
    done (B,) the rows that produced eos_token, span RowCache's. Returns the next tokens (B, 1); pos, seen
    and done move on in place."""
    logits = model.lm_head(model.hidden_states(token, RowCache(layers, pos, span))[:, -1, :]).float()
    if repetition_penalty != 1.0:  # as stream's: a token the row holds is penalised once, however often it came
        logits = torch.where(seen, torch.where(logits > 0, logits / repetition_penalty, logits * repetition_penalty), logits)
    token = sample_logits(logits, temperature, top_k, top_p, u=u)
    if eos_token is not None:
        token = torch.where(done[:, None], eos_token, token)
        done |= token[:, 0] == eos_token
    if repetition_penalty != 1.0:
        seen.scatter_(1, token, True)
    pos += 1
    return token


class Step(torch.nn.Module):
    """next_tokens for torch.export, its settings fixed and its tensors flat: forward(span, token, pos, u,
    seen, done, keys0, values0, keys1, ...)."""

    def __init__(self, model, options):
        super().__init__()
        self.model, self.options = model, options

    def forward(self, span, token, pos, u, seen, done, *layers):
        return next_tokens(self.model, token, pos, list(zip(layers[0::2], layers[1::2])), u, seen, done, *self.options,
                           span=span)


class Prefill(torch.nn.Module):
    """A cache (keys0, values0, keys1, ...) filled with idx (B, T) from position 0, for torch.export, which
    makes one program for every T from 2 to block_size - 1 (a window but its newest token); returns the
    last position's hidden state."""

    def __init__(self, model):
        super().__init__()
        self.model, self.options = model, None

    def forward(self, idx, *layers):
        return self.model.hidden_states(idx, KVCache(list(zip(layers[0::2], layers[1::2]))))[:, -1]


def compiled_step(model, options, args, store=None):
    """next_tokens with options (temperature, top_k, top_p, repetition_penalty, eos_token) for args
    (span, token, pos, u, seen, done, keys0, values0, ...: as Step's forward) as one call of compiled code:
    returns step(*args) -> the next tokens, moving pos, seen, done and the cache on in place. On the
    CPU it is aot_compiled's (kept in store, if given); elsewhere torch.compile's, on CUDA one CUDA graph
    (mode='reduce-overhead'), made on first use and kept on the model. Either is made for the weights
    as they are now, and made again when they change (an optimizer step, load_state_dict)."""
    if model.transformer.wte.weight.device.type == 'cpu':
        run = aot_compiled(Step(model, options), args, store, lengths=(2, model.config.block_size))
        return lambda *args: run(list(args))[0]
    weights = weights_version(model)
    cuda = model.transformer.wte.weight.device.type == 'cuda'
    if getattr(model, 'compiled_next_tokens', None) is None:
        def step(weights, options, span, token, pos, u, seen, done, *layers):
            if not weights:  # read, so that torch.compile guards on it (it leaves an argument unread unguarded)
                raise ValueError("a model without weights")
            return next_tokens(model, token, pos, list(zip(layers[0::2], layers[1::2])), u, seen, done, *options,
                               span=span)
        model.compiled_next_tokens = torch.compile(step, fullgraph=True, dynamic=False, mode='reduce-overhead' if cuda else None)
    compiled = model.compiled_next_tokens

    def step(*args):
        if cuda:  # a new replay of the graph, whose output the caller keeps past the next one
            torch.compiler.cudagraph_mark_step_begin()
            return compiled(weights, options, *args).clone()
        return compiled(weights, options, *args)
    return step


SPAN = 32  # a step on the CPU attends over the cache's first positions in whole multiples of SPAN (span_for)
SPANS = {}  # span_for's tensors


def span_for(pos, block_size, device):
    """RowCache's span (1, L) for rows at positions up to pos: on the CPU the first multiple of SPAN past pos,
    at most block_size, elsewhere block_size (one compiled graph). The positions past every row's are
    masked anyway: a step early in a story reads a fraction of the cache (the attention of 8 rows of
    run.sh's model, compiled: ~19 us a layer at 32 positions, ~51 at 128)."""
    L = block_size if torch.device(device).type != 'cpu' else min(block_size, (pos // SPAN + 1) * SPAN)
    if (L, device) not in SPANS:
        SPANS[L, device] = torch.empty(1, L, device=device)
    return SPANS[L, device]


def span_made(block_size, device):
    """The span a step is compiled with: short of block_size, where the cache read is a whole tensor and
    torch's reshape would fix its length."""
    return span_for(max(0, block_size - SPAN - 1), block_size, device)


def window_shift_for(window_shift, block_size):
    """window_shift, or for None a quarter of block_size: re-reading the window at every token past it
    (1) is 3x slower than cached steps, every block_size // 4 tokens it adds ~5%, and the context
    stays at least 3/4 of it."""
    return max(1, block_size // 4) if window_shift is None else window_shift


def check_options(temperature=1.0, top_k=None, top_p=None, repetition_penalty=1.0, window_shift=None, block_size=None,
                  slide='reread', pos_emb=None):
    """Raise ValueError naming a sampling option out of its range (window_shift's upper bound once block_size is
    known, whether slide='shift' fits once the model's pos_emb is)."""
    if not 0 <= temperature < math.inf:
        raise ValueError(f"temperature must be >= 0 (0 is greedy) and finite, got {temperature}")
    if top_k is not None and not (type(top_k) is int and top_k >= 1):
        raise ValueError(f"top_k must be at least 1 or None, got {top_k!r}")
    if top_p is not None and not (type(top_p) in (int, float) and 0 < top_p <= 1):
        raise ValueError(f"top_p must be a number in (0, 1] or None, got {top_p!r}")
    if not 0 < repetition_penalty < math.inf:
        raise ValueError(f"repetition_penalty must be > 0 (1.0 is off) and finite, got {repetition_penalty}")
    if window_shift is not None and not (type(window_shift) is int and window_shift >= 1):
        raise ValueError(f"window_shift must be a whole number >= 1, got {window_shift!r}")
    if block_size is not None and window_shift is not None and window_shift > block_size:
        raise ValueError(f"window_shift must be at most block_size={block_size}, got {window_shift}")
    if slide not in ('reread', 'shift'):
        raise ValueError(f"slide must be 'reread' or 'shift', got {slide!r}")
    if slide == 'shift' and pos_emb not in (None, 'rope'):
        raise ValueError(f"slide='shift' turns the cached keys back by their rotary angles, and this model's positions are "
                         f"pos_emb={pos_emb!r}: use slide='reread'")


def shift_window(model, layers, n):
    """Slide the window of every layer's cached (keys, values) by n positions without re-reading it
    (llama.cpp's context shift): the oldest n are dropped, the others moved to the front, their keys
    turned back n positions by their rotary angles. Nearly free where a re-read is a pass over the
    window, but the kept positions keep what they saw of the dropped ones: not the re-read's text."""
    if n >= layers[0][0].size(2):
        return  # all dropped: the next token starts afresh at position 0, as a re-read would
    rotary = model.transformer.h[0].attn.rotary
    cos, sin = rotary.cos[n], rotary.sin[n]
    for keys, values in layers:
        k = keys[:, :, n:].float()
        keys[:, :, :-n] = (k * cos - rotate_half(k) * sin).to(keys.dtype)
        values[:, :, :-n] = values[:, :, n:].clone()


@torch.no_grad()
def generate(model, idx, max_new_tokens, **options):
    """Append up to max_new_tokens to each row of idx (B, T); see stream() for the options. Joined
    outside inference mode, the result is a plain tensor, which a caller may change in place."""
    return torch.cat([idx] + list(stream(model, idx, max_new_tokens, **options)), dim=1)


@torch.inference_mode()  # no autograd bookkeeping per op: an eager step ~20% faster than under no_grad
def stream(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, repetition_penalty=1.0,
           eos_token=None, use_cache=True, window_shift=1, slide='reread', compile=False):
    """Yield the next token of every row, shape (B, 1), one step at a time (an inference tensor:
    read it, or clone it to change it).

    temperature 0 is greedy; top_k / top_p keep the k likeliest tokens / the smallest set
    whose probability reaches p; repetition_penalty > 1 makes tokens already in the row less
    likely (CTRL-style). With eos_token, a row that produced it yields eos_token from then on,
    and the stream ends when every row has. Past block_size the context slides: without the
    cache (nanoGPT's way) the model re-reads the last block_size tokens every step; with the
    cache, once it is full the oldest window_shift tokens are dropped and the rest re-read
    in one pass. window_shift=1 gives exactly the no-cache result; larger shifts re-read
    less often, at the cost of a shorter context (at least block_size - window_shift + 1)
    for the tokens right after a shift. slide='shift' (rotary positions only) moves the cache
    instead of re-reading it (shift_window): nearly free, with other text. compile=True makes each token one call of compiled_step:
    slow to start (tens of seconds on a CPU, again for other sampling settings), then faster per token;
    compile=FOLDER keeps the CPU's compiled step there, which a later stream loads in under a second.
    """
    block_size = model.config.block_size
    window_shift = window_shift_for(window_shift, block_size)
    check_options(temperature, top_k, top_p, repetition_penalty, window_shift, block_size, slide, model.config.pos_emb)
    if compile and use_cache:
        yield from compiled_stream(model, idx, max_new_tokens, temperature, top_k, top_p, repetition_penalty,
                                   eos_token, window_shift, slide, None if compile is True else compile)
        return
    done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
    # eager on the CPU the cache stays float32 under bf16 weights: SDPA's bf16 kernel for one
    # query runs ~6x slower than its float32 one (batch 8, 144 positions: ~440 vs ~75 us a layer)
    cache_dtype = torch.float32 if idx.device.type == 'cpu' else model.transformer.wte.weight.dtype
    cache = None
    for _ in range(max_new_tokens):
        if not use_cache:
            logits, _ = model(idx[:, -block_size:])
        else:
            if cache is not None and cache.pos == block_size and slide == 'shift':
                shift_window(model, cache.layers, window_shift)
                cache.pos, new = block_size - window_shift, next_token
            elif cache is None or cache.pos == block_size:  # (re)start from the last tokens
                new = idx[:, -(block_size if cache is None else block_size - window_shift + 1):]
                cache = KVCache.empty(model.config, idx.size(0), idx.device, cache_dtype)
            else:
                new = next_token  # idx's last column; a view of idx would get a new stride every step
            logits = step_logits(model, new, cache.layers, cache.pos)
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


def compiled_stream(model, idx, max_new_tokens, temperature, top_k, top_p, repetition_penalty, eos_token, window_shift,
                    slide='reread', store=None):
    """stream's tokens, each from one call of compiled_step (kept in store, a folder, if given): the
    Python between two tokens is a draw of random numbers, the call and a copy. The prompt, and the
    window when it slides, are read in one pass (on the CPU a Prefill compiled by aot_compiled)."""
    (B, T), block_size, device = idx.shape, model.config.block_size, idx.device
    tokens = torch.empty(B, T + max_new_tokens, dtype=torch.long, device=device)  # for re-reading the window
    tokens[:, :T] = idx
    # zeros: the step weighs the positions past each row's by 0, and 0 * NaN (torch.empty's garbage) is NaN
    layers = [t.zero_() for kv in KVCache.empty(model.config, B, device, model.transformer.wte.weight.dtype, spare=True).layers
              for t in kv]
    seen = torch.zeros(B, model.config.vocab_size, dtype=torch.bool, device=device).scatter_(1, idx, True)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    sampled = temperature >= GREEDY
    u, token, positions = torch.zeros(B, 1, device=device), idx[:, -1:].clone(), torch.zeros(B, dtype=torch.long, device=device)
    step = compiled_step(model, (temperature, top_k, top_p, repetition_penalty, eos_token),
                         (span_made(block_size, device), token, positions, u, seen, done, *layers), store)
    prefill = eager = Prefill(model)
    if device.type == 'cpu' and (T > 2 or T + max_new_tokens > block_size and slide == 'reread'):  # AOTInductor's too, where it is read
        run = aot_compiled(eager, (tokens.new_zeros(B, 2), *layers), store, lengths=(2, block_size - 1), autotune=False)
        prefill = lambda idx, *layers: run([idx.contiguous(), *layers]) if idx.size(1) > 1 else eager(idx, *layers)
    n, pos = T, block_size  # tokens so far; the cached positions, here a full cache, to read the prompt
    for _ in range(max_new_tokens):
        if pos == block_size and n > T and slide == 'shift':
            shift_window(model, list(zip(layers[0::2], layers[1::2])), window_shift)
            pos = block_size - window_shift
            positions.fill_(pos)
        elif pos == block_size:  # (re)start from the last tokens: all but the newest read in one pass
            window = tokens[:, max(0, n - (block_size if n == T else block_size - window_shift + 1)):n]
            if window.size(1) > 1:
                prefill(window[:, :-1], *layers)
            pos, token = window.size(1) - 1, window[:, -1:].clone(memory_format=torch.contiguous_format)  # strides as the step's own: one graph
            positions.fill_(pos)
        if sampled:
            u = torch.rand(B, 1, device=device)
        token = step(span_for(pos, block_size, device), token, positions, u, seen, done, *layers)
        tokens[:, n:n + 1] = token
        n, pos = n + 1, pos + 1
        yield token
        if eos_token is not None and done.all():
            break


class RowCache:
    """A KVCache whose rows each sit at their own position, pos (B,), and take one new token a step; with
    span (1, L), the attention reads only the first L positions, past every row's (span_for)."""

    def __init__(self, layers, pos, span=None):
        self.layers, self.pos, self.span = layers, pos, span

    def positions(self, T):
        return self.pos[:, None]

    def attend(self, i, q, k, v):
        keys, values = self.layers[i]
        rows = torch.arange(len(self.pos), device=q.device)
        keys[rows, :, self.pos], values[rows, :, self.pos] = k[:, :, 0].to(keys.dtype), v[:, :, 0].to(values.dtype)
        if self.span is not None:
            keys, values = keys[:, :, :self.span.size(1)], values[:, :, :self.span.size(1)]
        seen = torch.arange(keys.size(2), device=q.device) <= self.pos[:, None]  # each row its own positions
        # the plain product, softmax and product: SDPA's CPU kernel splits its work by thread so that a
        # row's result depends on its slot in the batch (seen with 2 threads), and a row's text would
        # depend on which others are in flight
        att = (q.to(keys.dtype) @ keys.transpose(-2, -1)) * (1.0 / math.sqrt(keys.size(-1)))
        y = F.softmax(att.masked_fill(~seen[:, None, None, :], float('-inf')), dim=-1) @ values
        return y.to(q.dtype)
