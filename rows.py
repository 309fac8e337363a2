"""
Rows decoded together, one batched step for all (continuous batching, as serve.py needs), over
generate.py's RowCache: each row at its own position, with its own sampling settings and random
generator, joining and leaving between steps.
  rows = Rows(model, max_rows=8)
  slot = rows.add(ids, temperature=0.8, seed=1)
  tokens = rows.step()  # {slot: its next token}
"""
from typing import NamedTuple

import torch
from torch.nn import functional as F

from compiled import aot_compiled
from generate import KVCache, Prefill, RowCache, check_options, shift_window, span_for, span_made, window_shift_for
from sampling import GREEDY, inverse_cdf, sample_logits, top_k_floor, top_k_sample, top_p_kept


class Logits(torch.nn.Module):
    """Rows' step, for torch.export: after each row's token next (B,) at its position pos (B,) over the
    cache (keys0, values0, ...), which takes them in, read as far as span (RowCache's), the logits (B, vocab) and a token (B, 1) sampled
    at each row's temperature (B, 1), top_k (B, 1) and top_p (B, 1) with its draw u (B, 1) (sample_rows)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.options = model, None

    def forward(self, span, next, pos, temperature, u, top_k, top_p, *layers):
        x = self.model.hidden_states(next[:, None], RowCache(list(zip(layers[0::2], layers[1::2])), pos, span))
        logits = self.model.lm_head(x[:, -1, :]).float()
        return sample_rows(logits, temperature, u, top_k, top_p), logits


TOP_K = 256  # the most top_k that sample_rows samples in the step; larger, and top_p alone, are sampled eagerly


def sample_rows(logits, temperature, u, top_k, top_p):
    """sample_logits in one graph with the step, each row at its own settings: temperature (B, 1; 0
    greedy), top_k (B, 1; 0 none, else at most TOP_K and below the vocabulary's size) and top_p among
    those top_k (B, 1; inf none), with its own draw u (B, 1). As sample_logits, top_k alone keeps the
    tokens at or above its floor, in the vocabulary's order; compiled, the floor's work and the sorted
    top-k work of top_p each run only in steps where a row needs it (torch.cond)."""
    greedy = temperature < GREEDY
    temperature = torch.where(greedy, 1.0, temperature)
    sorted_rows = (top_k > 0) & (top_p < float('inf'))
    floored = (top_k > 0) & ~sorted_rows
    compiled, kept = torch.compiler.is_compiling(), logits
    if compiled:  # the floor (top_k_floor) only in steps where a row has top_k alone
        kept = torch.cond(floored.any(), lambda x, k: x.masked_fill(x < top_k_floor(x, k, TOP_K), float('-inf')),
                          lambda x, k: x.clone(), (logits, torch.where(floored, top_k, 0)))
    probs = F.softmax((kept - kept.amax(dim=-1, keepdim=True)) / temperature, dim=-1)
    pick = inverse_cdf(probs, u, probs.size(-1) - 1)
    if not compiled and floored.any():
        rows = floored[:, 0].nonzero()[:, 0]
        pick = pick.index_put((rows,), top_k_sample(logits[rows], top_k[rows], temperature[rows], u[rows]))
    operands = (logits, temperature, u, top_k, top_p, pick, sorted_rows)
    if compiled:
        pick = torch.cond(sorted_rows.any(), top_k_rows, lambda *args: args[-2].clone(), operands)
    elif sorted_rows.any():
        pick = top_k_rows(*operands)
    return torch.where(greedy, logits.argmax(dim=-1, keepdim=True), pick)


def top_k_rows(logits, temperature, u, top_k, top_p, pick, rows):
    """pick, with rows (B, 1) sampled again as sample_logits does: among their top_k likeliest tokens,
    sorted, those that top_p keeps."""
    values, ids = torch.topk(logits, min(TOP_K, logits.size(-1)))
    ranks = torch.arange(values.size(-1), device=values.device)
    scaled = ((values - values[:, :1]) / temperature).masked_fill(ranks >= top_k, float('-inf'))
    at = inverse_cdf(top_p_kept(F.softmax(scaled, dim=-1), top_p), u, (top_k - 1).clamp(min=0))
    return torch.where(rows, ids.gather(1, at), pick)


class Row(NamedTuple):
    tokens: list  # the prompt's and the new ones, for re-reading the window when it slides
    temperature: float
    top_k: int
    top_p: float
    generator: torch.Generator


class Rows:
    """Rows decoded together, one batched step for all (continuous batching, as a server needs):
    each sits at its own position, with its own sampling settings and random generator, and slides
    its own window past block_size; a row joins (add) or leaves (remove) between steps, and takes the
    lowest free slot. A step decodes the slots up to the highest in use, free ones as padding, rounded
    up to one of a few widths: powers of two, or with compile (compiled_step's way; a folder keeps the
    code as stream's does) one row or max_rows, each slow to make the first time. slide is stream's.
    fixed_batch=True always decodes all max_rows, so that a row's tokens never depend on the others (in
    float32 the same alone as in a full batch), where otherwise the kernels for another batch size may
    round differently. A prompt is read alone. wide_threads: the CPU threads a step of more than one row
    and a prompt's read compute with (0: torch's, as for all else). Not thread-safe."""

    def __init__(self, model, max_rows=8, window_shift=None, compile=False, fixed_batch=False, slide='reread',
                 wide_threads=0):
        self.model, self.compile, self.store, self.runs = model, compile, None if compile is True else compile, {}
        self.slide, self.wide_threads, self.fixed_batch = slide, wide_threads, fixed_batch
        if compile and model.transformer.wte.weight.device.type != 'cpu':
            self.compiled = torch.compile(Logits(model), fullgraph=True, dynamic=False)
        self.block_size, self.vocab = model.config.block_size, model.config.vocab_size
        self.window_shift = window_shift_for(window_shift, self.block_size)
        check_options(window_shift=self.window_shift, block_size=self.block_size, slide=slide, pos_emb=model.config.pos_emb)
        self.widths = ([max_rows] if fixed_batch else [1, max_rows] if compile else
                       sorted({min(max_rows, 1 << i) for i in range(max_rows.bit_length() + 1)}))
        weight = model.transformer.wte.weight  # (lm_head may hold int8 weights)
        self.device = weight.device
        # as stream's cache: compiled, in the weights' precision (bf16 halves what a step reads); eager on the CPU, float32
        dtype = torch.float32 if self.device.type == 'cpu' and not compile else weight.dtype
        # zeros: the plain attention weighs the unfilled positions by 0, and 0 * NaN (torch.empty's garbage) is NaN
        self.layers = [(k.zero_(), v.zero_()) for k, v in KVCache.empty(model.config, max_rows, self.device, dtype, spare=True).layers]
        self.pos, self.next = [0] * max_rows, [0] * max_rows  # each row's cached positions and token to feed
        self.rows, self.slots = [None] * max_rows, {}
        self.no_draw = torch.zeros(1, 1, device=self.device)

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

    @torch.inference_mode()
    def read(self, slot, ids):
        """Fill slot's cache with all of ids but the last, alone, which the next step feeds."""
        layers = [t[slot:slot + 1] for kv in self.layers for t in kv]  # views of slot's row
        idx = torch.tensor([ids[:-1]], device=self.device)

        def prefill():
            if len(ids) > 2 and self.compile and self.device.type == 'cpu':
                aot_compiled(Prefill(self.model), (idx, *layers), self.store, lengths=(2, self.block_size - 1),
                             autotune=False)([idx, *layers])
            elif len(ids) > 1:
                Prefill(self.model)(idx, *layers)
        self.wide(prefill)  # many tokens at once (a window's re-read: ~100), with every core
        self.pos[slot], self.next[slot] = len(ids) - 1, ids[-1]

    @torch.inference_mode()
    def warm(self):
        """Make the step of every width and the prompts' read (compile: before the first rows, which would
        wait for them)."""
        self.read(0, [0] * 3)  # into a free slot, which add overwrites
        span = span_made(self.block_size, self.device)
        for n in self.widths:  # tensors of their own: inputs that alias one another would be compiled as one
            self.logits(span, *(torch.zeros(n, dtype=torch.long, device=self.device) for _ in range(2)),
                        *(torch.zeros(n, 1, device=self.device) for _ in range(2)),
                        torch.zeros(n, 1, dtype=torch.long, device=self.device), torch.zeros(n, 1, device=self.device))

    def logits(self, span, next, pos, temperature, u, top_k, top_p):
        """Logits' (tokens, logits) for the first len(next) slots."""
        if len(next) == 1:
            return self.run_logits(span, next, pos, temperature, u, top_k, top_p)
        return self.wide(self.run_logits, span, next, pos, temperature, u, top_k, top_p)

    def wide(self, run, *args):
        """run(*args) computing with wide_threads, if set."""
        if not self.wide_threads:
            return run(*args)
        threads = torch.get_num_threads()
        torch.set_num_threads(self.wide_threads)  # a compiled program keeps the count it was made with
        try:
            return run(*args)
        finally:
            torch.set_num_threads(threads)

    def run_logits(self, span, next, pos, temperature, u, top_k, top_p):
        if len(next) not in self.slots:  # the cache's first len(next) slots, kept: slicing 12 tensors a step costs ~20 us
            self.slots[len(next)] = [t[:len(next)] for kv in self.layers for t in kv]
        args = [span, next, pos, temperature, u, top_k, top_p] + self.slots[len(next)]
        if not self.compile:
            return Logits(self.model)(*args)
        if self.device.type != 'cpu':
            return self.compiled(*args)
        if len(next) not in self.runs:
            self.runs[len(next)] = aot_compiled(Logits(self.model), args, self.store, lengths=(2, self.block_size))
        return self.runs[len(next)](args)

    @torch.inference_mode()
    def step(self):
        """One decoding step of every row: {slot: its next token}."""
        used = [slot for slot, row in enumerate(self.rows) if row is not None]
        if not used:
            return {}
        n = min(w for w in self.widths if w > used[-1])
        next, pos = torch.tensor(self.next[:n], device=self.device), torch.tensor(self.pos[:n], device=self.device)
        # each row's draw from its own generator (free slots and greedy rows draw none) and temperature
        sampled = [row is not None and row.temperature >= GREEDY for row in self.rows[:n]]
        u = torch.cat([torch.rand(1, 1, device=self.device, generator=row.generator) if draws else self.no_draw
                       for row, draws in zip(self.rows, sampled)])
        temperature = torch.tensor([[row.temperature if row else 0.0] for row in self.rows[:n]], device=self.device)
        # top_k up to TOP_K, with its top_p, in the step; the others' rows sampled again eagerly below
        most = min(TOP_K, self.vocab - 1)
        inside = [row is not None and row.top_k is not None and row.top_k <= most for row in self.rows[:n]]
        top_k = torch.tensor([[row.top_k if ok else 0] for row, ok in zip(self.rows, inside)], device=self.device)
        top_p = torch.tensor([[row.top_p if ok and row.top_p is not None else float('inf')]
                              for row, ok in zip(self.rows, inside)], device=self.device)
        # the attention reads as far as the furthest row (span_for); with fixed_batch, the whole cache always
        span = span_for(self.block_size - 1 if self.fixed_batch else max(self.pos[:n]), self.block_size, self.device)
        tokens, logits = self.logits(span, next, pos, temperature, u, top_k, top_p)
        picked = tokens[:, 0].tolist()
        # rows with top_p alone or a larger top_k: sampled again from the logits with the same draws, those of the same settings together
        alike = {}
        for slot in used:
            row = self.rows[slot]
            if not inside[slot] and (row.top_k is not None or row.top_p is not None):
                alike.setdefault((row.temperature, row.top_k, row.top_p), []).append(slot)
        for (temperature, top_k, top_p), slots in alike.items():
            picks = sample_logits(logits[slots], temperature, top_k, top_p, u=u[slots]).flatten().tolist()
            for slot, token in zip(slots, picks):
                picked[slot] = token
        tokens = {slot: picked[slot] for slot in used}
        for slot, token in tokens.items():
            self.rows[slot].tokens.append(token)
            self.pos[slot], self.next[slot] = self.pos[slot] + 1, token
            if self.pos[slot] == self.block_size and self.slide == 'shift':
                shift_window(self.model, [(k[slot:slot + 1], v[slot:slot + 1]) for k, v in self.layers], self.window_shift)
                self.pos[slot] = self.block_size - self.window_shift
            elif self.pos[slot] == self.block_size:  # full: re-read the last tokens, as stream does
                self.read(slot, self.rows[slot].tokens[-(self.block_size - self.window_shift + 1):])
        return tokens
