"""
Sampling the next token from logits (B, vocab): temperature, top_k and top_p, with uniform draws made
outside (so that a compiled step picks as the eager one does), for generate.py's steps and rows.py's.
  from sampling import sample_logits
  token = sample_logits(logits, temperature=0.8, top_k=200)  # (B, 1)
"""
import torch
from torch.nn import functional as F


# below float32's smallest normal number a temperature is greedy in all but name (and float32 rounds one
# below ~1e-45 to 0, which would divide 0 by 0): sampling takes argmax and reads no draw
GREEDY = torch.finfo(torch.float32).tiny


def sample_logits(logits, temperature=1.0, top_k=None, top_p=None, generator=None, u=None):
    """Pick one token per row from logits (B, vocab) with u (B, 1), uniform draws in [0, 1); None draws
    them from generator (torch's default one if None)."""
    if temperature < GREEDY:
        return torch.argmax(logits, dim=-1, keepdim=True)
    u = torch.rand(logits.size(0), 1, device=logits.device, generator=generator) if u is None else u
    # top_k alone keeps the tokens at or above its floor and samples them in the vocabulary's order:
    # compiled, the rest masked (no sort of the logits: top_k_floor, or top_k_groups' candidates); eagerly,
    # those tokens alone (top_k_sample).
    # top_p works on the likeliest tokens sorted, and the pick maps back to its id
    ids = None
    if top_k is not None and top_k < logits.size(-1):
        if top_p is not None and top_p < 1.0:
            logits, ids = torch.topk(logits, top_k)
        elif not torch.compiler.is_compiling():
            return top_k_sample(logits, top_k, temperature, u)
        elif isinstance(top_k, int) and logits.size(-1) >= 4 * GROUP * top_k and logits.device.type == 'cpu':
            return top_k_groups(logits, top_k, temperature, u)  # measured on the CPU; a GPU's step keeps no torch.cond
        else:
            logits = logits.masked_fill(logits < top_k_floor(logits, top_k), float('-inf'))
    elif top_p is not None and top_p < 1.0:
        logits, ids = torch.sort(logits, descending=True)
    # shifted by its max, the top logit stays 0 and the others reach -inf at worst; unshifted, a
    # small temperature overflows the top ones to inf and softmax's inf - inf is NaN
    top = logits[:, :1] if ids is not None else logits.amax(dim=-1, keepdim=True)
    probs = F.softmax((logits - top) / temperature, dim=-1)
    if top_p is not None and top_p < 1.0:
        probs = top_p_kept(probs, top_p)
    pick = inverse_cdf(probs, u, probs.size(-1) - 1)
    return pick if ids is None else ids.gather(1, pick)


def top_k_sample(logits, k, temperature, u):
    """Eagerly, the pick (B, 1) that a compiled step makes with top_k, k a number or (B, 1): the logits
    below the k-th largest masked, the vocabulary sampled in its order with u (B, 1). Here over the
    tokens kept alone, gathered and put in the vocabulary's order: masking the whole vocabulary took
    ~2x longer (batch 8, 50,257 tokens: ~1.46 against 0.68-0.78 ms)."""
    values, ids = torch.topk(logits, (k if isinstance(k, int) else int(k.max())) + 1)  # one more: ties past the k-th show
    if isinstance(k, int) and not (values[:, k] == values[:, k - 1]).any():  # the usual case: exactly k, no masks
        ids, order = ids[:, :k].sort(dim=-1)
        probs = F.softmax((values[:, :k].gather(1, order) - values[:, :1]) / temperature, dim=-1)
        return ids.gather(1, inverse_cdf(probs, u, k - 1))
    k = torch.full((logits.size(0), 1), k, device=logits.device) if isinstance(k, int) else k
    floor, top, kept = values.gather(1, k - 1), values[:, :1], k
    if (values.gather(1, k) == floor).any():  # ties at the floor are all kept: count them
        kept = (logits >= floor).sum(-1, keepdim=True)
        values, ids = torch.topk(logits, int(kept.max()))
    ids = ids.masked_fill(values < floor, logits.size(-1))  # a row's extra places: past every id, last once sorted
    ids, order = ids.sort(dim=-1)
    probs = F.softmax((values.gather(1, order).masked_fill(ids == logits.size(-1), float('-inf')) - top) / temperature, dim=-1)
    return ids.gather(1, inverse_cdf(probs, u, kept - 1))


def top_k_groups(logits, k, temperature, u):
    """Compiled, the pick (B, 1) of top_k k (a number) as the vocabulary masked and sampled would make it, from
    likeliest_groups' tokens alone: they hold the floor (their own k-th largest logit) and every kept token
    but ties at the floor in other groups; where a row has one, all rows take the whole vocabulary
    (torch.cond). Over a 50,257-token vocabulary the 32 counts of top_k_floor, the softmax and the running
    sum took ~0.45 ms of a ~3 ms step (config/small.py's shape, int8, AVX2); 6,401 candidates cost a fraction."""
    vocab = logits.size(-1)
    ids, candidates = likeliest_groups(logits, k)
    # torch.topk, not top_k_floor: inductor reads the gather anew in each of its 32 counts, slower than the whole vocabulary
    floor = torch.topk(candidates, k, sorted=False).values.amin(-1, keepdim=True)
    kept = candidates.masked_fill(candidates < floor, float('-inf'))
    probs = F.softmax((kept - kept.amax(-1, keepdim=True)) / temperature, dim=-1)
    pick = inverse_cdf(probs, u, probs.size(-1))  # past the end: where the whole vocabulary's search ends, its last id
    picked = torch.where(pick < ids.size(1), ids.gather(1, pick.clamp(max=ids.size(1) - 1)), vocab - 1)
    missed = ((logits >= floor).sum(-1) != (kept > float('-inf')).sum(-1)).any()

    def whole(logits, floor, u, picked):
        probs = F.softmax((logits.masked_fill(logits < floor, float('-inf')) - logits.amax(-1, keepdim=True)) / temperature, dim=-1)
        return inverse_cdf(probs, u, probs.size(-1) - 1)
    return torch.cond(missed, whole, lambda logits, floor, u, picked: picked.clone(), (logits, floor, u, picked))


def likeliest_groups(logits, k):
    """The ids (B, C), in the vocabulary's order, and logits (B, C) of the tokens in the 2k groups of GROUP
    (every n-th token, from one of the first n) whose largest logits are the largest, and of the last vocab %
    GROUP, which no group holds: every logit above the 2k-th largest group maximum, which each row's k-th
    largest logit, and any before it, cannot be below (2k groups each hold one at or above it). So their own
    j-th largest is the row's, for every j up to k."""
    rows, vocab = logits.shape
    n = vocab // GROUP
    best = torch.topk(logits[:, :n * GROUP].view(rows, GROUP, n).amax(1), 2 * k, sorted=False).indices.sort(dim=-1).values
    ids = torch.cat([(torch.arange(GROUP, device=logits.device)[:, None] * n + best[:, None, :]).flatten(1),
                     torch.arange(n * GROUP, vocab, device=logits.device).expand(rows, -1)], dim=1)
    return ids, logits.gather(1, ids)


GROUP = 16  # the tokens in each of likeliest_groups' groups; they serve vocabularies of 4 * GROUP * k tokens and more


def top_k_floor(logits, k, most=None):
    """Each row's k-th largest logit (B, 1), k a number or (B, 1) with 0 for none (-inf), without a sort,
    for a compiled step: the tokens at or above it are top_k's (ties at the floor kept, as nanoGPT keeps
    them). Given most, k's largest, over a vocabulary of 4 * GROUP * most tokens and more, it is read from
    likeliest_groups' logits (torch.topk), as rows.sample_rows does with TOP_K. Otherwise found bit by bit
    in the integers that order floats as they compare, each bit one vectorised count of the row: torch.topk
    took ~40 us a row of run.sh's model's logits, ~3x what it takes on random ones (its selection's time
    depends on the values), and it is serial across rows (eight: ~250 us). Eagerly, 32 counts are slower
    than torch.topk: top_k_sample."""
    rows, vocab = logits.size(0), logits.size(-1)
    k = torch.full((rows, 1), k, device=logits.device) if isinstance(k, int) else k
    if most is not None and vocab >= 4 * GROUP * most:
        largest = torch.topk(likeliest_groups(logits, most)[1], most).values
        return torch.where(k > 0, largest.gather(1, (k - 1).clamp(min=0)), float('-inf'))
    need = torch.where(k > 0, k, vocab)  # the logits each row's floor must keep
    as_float = lambda t: torch.where(t < 0, t ^ 0x7fffffff, t).view(torch.float32)  # the integer order, back to floats
    enough = lambda t: (logits >= as_float(t)).sum(-1, keepdim=True, dtype=torch.int32) >= need
    t = torch.where(enough(torch.zeros(rows, 1, dtype=torch.int32, device=logits.device)), 0, -2**31).to(torch.int32)
    for bit in reversed(range(31)):
        t = torch.where(enough(t | (1 << bit)), t | (1 << bit), t)
    # below -inf's integer lie NaNs, which no count reaches: a row of fewer than k finite logits keeps them all
    return torch.where(k > 0, as_float(t.clamp(min=-2**31 + 0x7fffff)), float('-inf'))


def top_p_kept(probs, top_p):
    """probs (B, V), each row sorted likeliest first, with a token dropped (0) once the likelier ones already
    reach top_p (a number, or (B, 1)); the top token always stays, even where top_p rounds to 0 in float32
    (below ~1e-45), which would drop them all."""
    later = torch.arange(probs.size(-1), device=probs.device) > 0  # no in-place writes: it runs inside torch.cond too
    return probs.masked_fill((probs.cumsum(dim=-1) - probs >= top_p) & later, 0)


def inverse_cdf(probs, u, last):
    """The index (B, 1) where each row's draw u (B, 1), scaled to its total, falls in probs' (B, V) running
    sum, at most last (a number, or (B, 1)): inverse-CDF sampling. torch.multinomial draws an exponential
    per vocabulary entry, which costs more than a whole cached forward pass of a small model on the CPU."""
    cdf = torch.cumsum(probs, dim=-1)
    return torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp(max=last)
