import asyncio
import os
from functools import partial

import pytest
import torch
from torch.nn import functional as F

import generate as generate_module
from batching import Batcher
from compiled import KEEP, tidy
from conftest import tiny, train_step
from generate import KVCache, Prefill, generate, shift_window, stream
from sampling import sample_logits, top_k_floor, top_k_groups, top_k_sample
from layouts import use_fast_linears
from model import GPT, GPTConfig
from rows import TOP_K, Rows, sample_rows


@pytest.mark.parametrize('onednn', [True, False])
def test_eager_cpu_cache_is_float32_under_bf16_weights_and_the_activations_stay_bf16(monkeypatch, onednn):
    model, idx = use_fast_linears(tiny().to(torch.bfloat16)), torch.randint(97, (2, 10))
    if not onednn:  # F.linear throughout, as on a CPU without oneDNN's bf16 kernels
        monkeypatch.setattr('layouts.fast_layout', lambda w, rows, dtype: None)
    dtypes = []
    empty = KVCache.empty
    monkeypatch.setattr(KVCache, 'empty', lambda *args: dtypes.append(args[-1]) or empty(*args))
    generate(model, idx, 3, temperature=0)
    assert dtypes == [torch.float32]
    cache = KVCache.empty(model.config, 2, 'cpu', torch.float32)
    with torch.no_grad():
        assert model.hidden_states(idx[:, :-1], cache).dtype == torch.bfloat16  # prefill
        cache.pos = idx.size(1) - 1
        assert model.hidden_states(idx[:, -1:], cache).dtype == torch.bfloat16  # one cached step


@pytest.mark.parametrize('options', [{}, dict(pos_emb='rope', norm='rmsnorm', mlp='swiglu', tie_embeddings=False)])
def test_compiled_decode_equals_full_recompute_and_follows_a_weight_change(options, tmp_path, monkeypatch):
    # fp32 greedy through the compiled step equals nanoGPT's re-reading of the window, past a slide
    # of the window too (block_size 16); then a weight changed in place (the frozen copy would be
    # stale) is followed. The packages kept in a folder serve another model of the same weights
    # without compiling, and a new weight's replace the old ones (the Llama-style blocks: each
    # compile takes ~20 s on 2 cores); the first weights' with the search for the fastest GEMMs that conftest
    # turns off elsewhere
    torch.manual_seed(0)
    config = GPTConfig(block_size=16, vocab_size=97, n_layer=2, n_head=2, n_embd=32, **options)
    model, idx, kept = GPT(config).eval(), torch.randint(97, (2, 5)), []
    if not options:  # the attention reading the cache as far as the rows in steps of 4 positions: one program for all
        full = generate(model, idx, 20, temperature=0, use_cache=False)
        monkeypatch.setattr(generate_module, 'SPAN', 4)
        assert torch.equal(generate(model, idx, 20, temperature=0, compile=True), full)
        return
    monkeypatch.setenv('TORCHINDUCTOR_MAX_AUTOTUNE', '1')
    for changed in (False, True):
        if changed:
            train_step(model, idx)
            model.eval()
            monkeypatch.setenv('TORCHINDUCTOR_MAX_AUTOTUNE', '0')
        full = generate(model, idx, 20, temperature=0, use_cache=False)
        assert torch.equal(generate(model, idx, 20, temperature=0, compile=str(tmp_path)), full)
        shifted = generate(model, idx, 20, temperature=0, window_shift=4, slide='shift')  # the same programs
        assert torch.equal(generate(model, idx, 20, temperature=0, window_shift=4, slide='shift', compile=str(tmp_path)), shifted)
        kept.append(sorted(p.name for p in tmp_path.iterdir()))
    assert [name.split('-')[0] for name in kept[0]] == ['prefill', 'step']
    assert {name.split('-')[2] for name in kept[0]}.isdisjoint(name.split('-')[2] for name in kept[1])  # the weights' hash
    assert sorted(p.name for p in tmp_path.iterdir()) == kept[1]
    monkeypatch.setattr(torch._inductor, 'aoti_compile_and_package', None)  # compiling now fails
    twin = GPT(config).eval()
    twin.load_state_dict(model.state_dict())
    assert torch.equal(generate(twin, idx, 20, temperature=0, compile=str(tmp_path)), full)


def test_a_new_package_removes_older_weights_of_its_precision_and_all_but_the_last_used(tmp_path):
    def used(name, when):
        (tmp_path / name).write_bytes(b'')
        os.utime(tmp_path / name, (when, when))
    for when, name in enumerate(['step-float32-aaaa-1111.pt2', 'step-bfloat16-aaaa-1111.pt2', 'prefill-float32-aaaa-2222.pt2',
                                 'step-aaaa-1111.pt2', 'step-float32-bbbb-1111.pt2']):  # a retrained checkpoint's last
        used(name, when)
    tidy(str(tmp_path), 'step-float32-bbbb-1111.pt2')
    assert sorted(p.name for p in tmp_path.iterdir()) == ['step-bfloat16-aaaa-1111.pt2', 'step-float32-bbbb-1111.pt2']
    for when in range(KEEP + 2):
        used(f'step-float32-bbbb-{when:04}.pt2', 10 + when)
    tidy(str(tmp_path), f'step-float32-bbbb-{KEEP + 1:04}.pt2')
    assert sorted(p.name for p in tmp_path.iterdir()) == [f'step-float32-bbbb-{when:04}.pt2' for when in range(2, KEEP + 2)]


@pytest.mark.parametrize('prompt_len', [5, 16, 23])
def test_cached_greedy_equals_full_recompute(prompt_len):
    model = tiny()
    idx = torch.randint(97, (2, prompt_len), generator=torch.Generator().manual_seed(prompt_len))
    full = generate(model, idx, 30, temperature=0, use_cache=False)
    cached = generate(model, idx, 30, temperature=0, use_cache=True)
    assert torch.equal(full, cached)
    assert full.shape == (2, prompt_len + 30)


def test_wider_window_shift_matches_until_the_window_fills():
    model = tiny()
    idx = torch.randint(97, (2, 4))
    full = generate(model, idx, 30, temperature=0, use_cache=False)
    shifted = generate(model, idx, 30, temperature=0, window_shift=8)
    assert torch.equal(full[:, :17], shifted[:, :17])  # 16 context tokens + the first prediction past them
    assert shifted.shape == full.shape


def test_same_seed_same_sample_with_and_without_cache():
    model = tiny()
    idx = torch.randint(97, (3, 6))
    torch.manual_seed(1)
    a = generate(model, idx, 12, temperature=0.8, top_k=20)
    torch.manual_seed(1)
    b = generate(model, idx, 12, temperature=0.8, top_k=20, use_cache=False)
    assert torch.equal(a, b)


def test_stream_yields_the_generated_tokens():
    model = tiny()
    idx = torch.randint(97, (2, 3))
    streamed = torch.cat([idx] + list(stream(model, idx, 7, temperature=0)), dim=1)
    out = generate(model, idx, 7, temperature=0)
    assert torch.equal(streamed, out)
    out[:, -1] = 0  # stream decodes in inference mode, and what generate returns is still a plain tensor


def scripted(rows):
    """A tiny GPT that ignores its input: at step i, row r's likeliest token is rows[r][i]."""
    model, steps = tiny(), iter(range(100))
    def hidden_states(idx, cache=None):
        i, logits = next(steps), torch.zeros(len(rows), idx.size(1), 97)
        for r, row in enumerate(rows):
            logits[r, -1, row[i]] = 1.0
        return logits
    model.hidden_states = hidden_states
    model.lm_head = torch.nn.Identity()  # the "hidden states" are the logits
    return model


def test_end_of_text_ends_each_row_then_the_stream():
    eos, start = 9, torch.zeros(2, 1, dtype=torch.long)
    rows = [[1, eos, 2, 3, 4, 5, 6, 7], [1, 2, 3, eos, 4, 5, 6, 7]]
    # row 0 keeps emitting eos though its model says 2, 3; once row 1 is done too, the stream ends
    out = generate(scripted(rows), start, 8, temperature=0, eos_token=eos)
    assert out[:, 1:].tolist() == [[1, eos, eos, eos], [1, 2, 3, eos]]
    # while one row is unfinished, the stream runs its full length
    rows[1][3] = 8
    out = generate(scripted(rows), start, 8, temperature=0, eos_token=eos)
    assert out[:, 1:].tolist() == [[1] + [eos] * 7, rows[1]]
    # without eos_token, eos is a token like any other
    assert generate(scripted(rows), start, 8, temperature=0)[:, 1:].tolist() == rows


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


def test_top_k_floor_is_torch_topk_kth_value():
    """The floor found bit by bit, compiled and eagerly, is torch.topk's k-th value, ties, -inf and
    signed zeros included, for one k or a k a row (0: none, -inf)."""
    torch.manual_seed(0)
    floor = torch.compile(top_k_floor, fullgraph=True, dynamic=False)
    logits = (torch.randn(6, 300) * 4).bfloat16().float()  # bf16's steps: many ties
    logits[1, :250] = float('-inf')  # fewer finite logits than k
    logits[2, ::3] = 0.0
    logits[2, 1::3] = -0.0
    for k in (1, 7, 200, 299, torch.tensor([[0], [3], [300], [1], [150], [0]])):
        got = top_k_floor(logits, k)
        ks = torch.full((6, 1), k) if isinstance(k, int) else k
        kth = torch.topk(logits, 300).values.gather(1, (ks - 1).clamp(min=0))
        assert torch.equal(got, torch.where(ks > 0, kth, float('-inf'))), k  # -0.0 == 0.0
        if isinstance(k, torch.Tensor) or k == 7:  # compiled too (a graph each: ~10 s)
            assert torch.equal(floor(logits, k), got), k
    # given k's largest, over a vocabulary of 64 times it, from the likeliest groups' logits
    logits = (torch.randn(6, 4 * 16 * 8 + 3) * 4).bfloat16().float()
    logits[1, :17] = 9.0  # more tied group maxima than the groups read
    logits[2, 5:] = float('-inf')
    for k in (1, 8, torch.tensor([[0], [8], [8], [1], [5], [3]])):
        ks = torch.full((6, 1), k) if isinstance(k, int) else k
        kth = torch.topk(logits, 8).values.gather(1, (ks - 1).clamp(min=0))
        assert torch.equal(top_k_floor(logits, k, 8), torch.where(ks > 0, kth, float('-inf'))), k


def test_top_k_sample_is_the_masked_vocabulary_sampled():
    """Eagerly, top_k samples the kept tokens alone; a compiled step masks the others and samples the
    whole vocabulary in its order: the same pick for the same draw, ties at the floor kept."""
    torch.manual_seed(0)
    logits = (torch.randn(64, 500) * 3).bfloat16().float()
    u = torch.rand(64, 1)
    for k in (1, 5, 40):
        floor = torch.topk(logits, k).values[:, -1:]
        probs = F.softmax((logits.masked_fill(logits < floor, float('-inf')) - logits.amax(-1, keepdim=True)) / 0.7, dim=-1)
        masked = torch.searchsorted(probs.cumsum(-1), u * probs.sum(-1, keepdim=True), right=True)
        picks = sample_logits(logits, 0.7, top_k=k, u=u)
        assert torch.equal(picks, masked), k
        assert (logits.gather(1, picks) >= floor).all()


def test_top_k_groups_pick_as_the_masked_vocabulary_eagerly_and_compiled():
    """Over a large vocabulary a compiled step picks from the likeliest groups' tokens alone: the same pick
    for the same draw as the whole vocabulary masked, also where a tie at the floor lies in another group
    (the whole vocabulary then) or a row holds fewer than k finite logits."""
    torch.manual_seed(0)
    k, vocab = 8, 4 * 16 * 8 + 3  # the last 3 tokens belong to no group

    def masked(logits, u):
        floor = torch.topk(logits, k).values[:, -1:]
        probs = F.softmax((logits.masked_fill(logits < floor, float('-inf')) - logits.amax(-1, keepdim=True)) / 0.7, dim=-1)
        return torch.searchsorted(probs.cumsum(-1), u * probs.sum(-1, keepdim=True), right=True).clamp(max=vocab - 1)
    logits, u = (torch.randn(32, vocab) * 3).bfloat16().float(), torch.rand(32, 1)  # bf16's steps: ties
    logits[2, 5:] = float('-inf')
    assert torch.equal(top_k_groups(logits, k, 0.7, u), masked(logits, u))
    compiled = torch.compile(lambda logits, u: sample_logits(logits, 0.7, top_k=k, u=u), fullgraph=True, dynamic=False)
    assert torch.equal(compiled(logits, u), masked(logits, u))  # through top_k_groups: the vocabulary is 4 * 16 * k and more
    assert torch.equal(top_k_sample(logits, k, 0.7, u), masked(logits, u))
    # 17 groups' maxima (every 32nd token is a group's) tie at the floor, one more than the 2k groups read: a draw
    # for each tied token picks it
    ties = torch.full((34, vocab), -10.0)
    ties[:, :17] = 5.0
    u = (torch.arange(34.0)[:, None] + 0.5) / 34
    assert top_k_groups(ties, k, 0.7, u).unique().tolist() == list(range(17))


def test_repetition_penalty_discourages_seen_tokens():
    model = tiny()
    idx = torch.randint(97, (1, 4))
    plain = generate(model, idx, 40, temperature=0)[0, 4:]
    penalised = generate(model, idx, 40, temperature=0, repetition_penalty=3.0)[0, 4:]
    assert len(set(penalised.tolist())) > len(set(plain.tolist()))


@pytest.mark.parametrize('kw', [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(repetition_penalty=0),
                                dict(window_shift=0), dict(window_shift=17), dict(top_k=0), dict(slide='drop'),
                                dict(slide='shift')])  # tiny()'s positions are learned: no angles to turn keys back by
def test_bad_generation_options(kw):
    with pytest.raises(ValueError):
        generate(tiny(), torch.zeros(1, 1, dtype=torch.long), 2, **kw)


def test_a_shifted_window_keeps_the_first_layers_cache_and_decodes_alike_everywhere():
    torch.manual_seed(0)
    config = GPTConfig(block_size=16, vocab_size=97, n_layer=2, n_head=2, n_embd=32, pos_emb='rope', norm='rmsnorm')
    model, idx = GPT(config).eval(), torch.randint(97, (1, 16))
    with torch.no_grad():
        model.lm_head.weight.mul_(10)  # sharp logits: no near-ties for the kernels' rounding to break
        shifted, fresh = KVCache.empty(config, 1, 'cpu', torch.float32), KVCache.empty(config, 1, 'cpu', torch.float32)
        model.hidden_states(idx, shifted)
        shift_window(model, shifted.layers, 4)
        model.hidden_states(idx[:, 4:], fresh)
    # the first layer's keys and values are a token's at its position, whatever came before: a fresh read's;
    # the next layer's remember the dropped tokens
    (k, v), (k0, v0) = shifted.layers[0], fresh.layers[0]
    assert torch.allclose(k[:, :, :12], k0[:, :, :12], atol=1e-5) and torch.equal(v[:, :, :12], v0[:, :, :12])
    assert not torch.allclose(shifted.layers[1][0][:, :, :12], fresh.layers[1][0][:, :, :12], atol=1e-3)
    streamed = [generate(model, torch.tensor([p[-16:]]), 30, temperature=0, window_shift=4, slide='shift')[0, len(p[-16:]):].tolist()
                for p in PROMPTS]
    assert decode_rows(model, [[i] for i in range(8)], temperature=0, slide='shift') == dict(enumerate(streamed))
    assert decode_rows(model, [list(range(8))], temperature=0, slide='shift') == dict(enumerate(streamed))


# ---------------------------------------------------------------------------- Rows: continuous batching

PROMPTS = [[1, 2, 3], [5], list(range(10, 30)), [7, 8], [40] * 15, [3, 1], [90, 91, 92, 93], [11]]


def decode_rows(model, which, steps=30, **options):
    """Each prompt of PROMPTS named in which (a list of lists: the groups that join together, one after another), its tokens."""
    rows = Rows(model, max_rows=8, window_shift=options.pop('window_shift', 4), compile=options.pop('compile', False),
                fixed_batch=options.pop('fixed_batch', True), slide=options.pop('slide', 'reread'))
    out = {}
    for group in which:
        slots = {rows.add(PROMPTS[i], seed=i, **options): i for i in group}
        out.update({i: [] for i in group})
        for _ in range(steps):
            for slot, token in rows.step().items():
                out[slots[slot]].append(token)
        for slot in slots:
            rows.remove(slot)
    return out


@pytest.mark.parametrize('options', [{}, dict(pos_emb='rope', norm='rmsnorm', mlp='swiglu', tie_embeddings=False)])
@pytest.mark.parametrize('sampling', [dict(temperature=0), dict(temperature=1.0, top_k=20), dict(temperature=0.8, top_p=0.9)])
def test_a_rows_tokens_are_the_same_alone_or_among_eight(options, sampling):
    # float32; prompts of 1 to 20 tokens (block_size 16: the window slides, for some at once)
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=97, n_layer=2, n_head=2, n_embd=32, **options)).eval()
    alone = decode_rows(model, [[i] for i in range(8)], **sampling)
    assert decode_rows(model, [list(range(8))], **sampling) == alone
    assert decode_rows(model, [[0, 3, 5], [1, 2, 4, 6, 7]], **sampling) == alone  # others join in other slots


def test_a_step_decodes_the_slots_in_use_rounded_up_to_a_power_of_two():
    model = tiny()
    with torch.no_grad():
        model.lm_head.weight.mul_(10)  # sharp logits: no near-ties that other kernels' rounding could break
    rows = Rows(model, max_rows=8)
    seen = []
    eager_logits = rows.logits
    rows.logits = lambda span, next, *args: seen.append(len(next)) or eager_logits(span, next, *args)
    for slot in range(6):
        rows.add(PROMPTS[slot], temperature=0)
    for leaving, width in ((5, 8), (4, 4), (2, 4), (3, 2), (1, 1)):
        rows.remove(leaving)
        rows.step()
        assert seen[-1] == width
    rows.remove(0)
    assert rows.step() == {} and len(seen) == 5
    # the kernels for a batch of 1, 2 or 4 rows write the same tokens as the whole batch's here
    fixed = decode_rows(model, [[i] for i in range(8)], temperature=0)
    assert decode_rows(model, [[i] for i in range(8)], temperature=0, fixed_batch=False) == fixed


@pytest.mark.parametrize('span', [None, 4])
def test_rows_decode_as_full_recompute_with_window_shift_1(span, monkeypatch):
    # span: the attention reads the cache as far as the furthest row, in steps of 4 positions
    model = tiny()
    with torch.no_grad():
        model.lm_head.weight.mul_(10)  # sharp logits: no near-ties for greedy to break
    monkeypatch.setattr(generate_module, 'SPAN', span or generate_module.SPAN)
    got = decode_rows(model, [list(range(8))], temperature=0, window_shift=1, fixed_batch=span is None)
    for i, prompt in enumerate(PROMPTS):
        idx = torch.tensor([prompt[-16:]])
        assert got[i] == generate(model, idx, 30, temperature=0, use_cache=False)[0, idx.size(1):].tolist(), i


def test_sample_rows_samples_as_sample_logits():
    """Each row at its own settings (greedy, plain, top_k, top_k with top_p, up to TOP_K), with its own
    draw, picks what sample_logits picks for that row alone: in the step, the same tokens."""
    torch.manual_seed(0)
    for vocab in (97, 1000):
        settings = [(0.0, 0, None), (1.0, 0, None), (0.8, 5, None), (1.2, 50, 0.8), (1.0, min(TOP_K, vocab - 1), None),
                    (0.7, 1, 0.5)]
        for _ in range(50):
            logits, u = torch.randn(len(settings), vocab) * 3, torch.rand(len(settings), 1)
            temperature = torch.tensor([[t] for t, _, _ in settings])
            top_k = torch.tensor([[k] for _, k, _ in settings])
            top_p = torch.tensor([[float('inf') if p is None else p] for _, _, p in settings])
            picks = sample_rows(logits, temperature, u, top_k, top_p).flatten().tolist()
            for i, (t, k, p) in enumerate(settings):
                alone = sample_logits(logits[i:i + 1], t, k or None, p, u=u[i:i + 1]).item()
                assert picks[i] == alone, (vocab, settings[i])


def test_compiled_rows_decode_as_eager_alone_or_among_eight(monkeypatch):
    # one graph for every step (the shapes never change); greedy, with sharp logits: no near-ties
    model = tiny()
    with torch.no_grad():
        model.lm_head.weight.mul_(10)
    eager = decode_rows(model, [list(range(8))], temperature=0)
    assert decode_rows(model, [[i] for i in range(8)], temperature=0, compile=True) == eager
    assert decode_rows(model, [[0, 3, 5], [1, 2, 4, 6, 7]], temperature=0, compile=True) == eager
    # one program for every span of the cache the attention reads (here in steps of 4 positions)
    monkeypatch.setattr(generate_module, 'SPAN', 4)
    assert decode_rows(model, [[0, 3, 5], [1, 2, 4, 6, 7]], temperature=0, compile=True, fixed_batch=False) == eager
    monkeypatch.undo()
    # top_k sampled inside the compiled step (torch.cond), as eagerly
    eager = decode_rows(model, [list(range(8))], temperature=1.0, top_k=20)
    assert decode_rows(model, [[0, 3, 5], [1, 2, 4, 6, 7]], temperature=1.0, top_k=20, compile=True) == eager


def test_rows_decode_bf16_weights_over_their_float32_cache():
    # as serve.py does on a CPU with bf16: the new keys and values are bf16, the cache they go into float32
    model = tiny()
    with torch.no_grad():
        model.lm_head.weight.mul_(10)
    model = model.to(torch.bfloat16)
    got = decode_rows(model, [list(range(8))], temperature=0)
    for i, prompt in enumerate(PROMPTS[:3]):
        idx = torch.tensor([prompt[-16:]])
        assert got[i][:5] == generate(model, idx, 5, temperature=0)[0, idx.size(1):].tolist(), i


def test_rows_wide_threads(monkeypatch):
    """A step of more than one row and a prompt's read compute with wide_threads, a step of one row with the
    threads set, and the count set is back after each; the tokens are those of a Rows without it."""
    model, before = tiny(), torch.get_num_threads()
    plain, wide = Rows(model, max_rows=2), Rows(model, max_rows=2, wide_threads=before + 1)
    seen, run, read, forward = [], wide.run_logits, [], Prefill.forward
    monkeypatch.setattr(wide, 'run_logits', lambda *args: seen.append(torch.get_num_threads()) or run(*args))
    monkeypatch.setattr(Prefill, 'forward', lambda *args: read.append(torch.get_num_threads()) or forward(*args))
    for rows in (plain, wide):
        rows.add(PROMPTS[0], temperature=0)
    assert read == [before, before + 1]  # the prompt is read with wide_threads
    assert wide.step() == plain.step()
    for rows in (plain, wide):
        rows.add(PROMPTS[1], temperature=0)
    assert [wide.step() for _ in range(3)] == [plain.step() for _ in range(3)]
    assert seen == [before] + [before + 1] * 3 and torch.get_num_threads() == before


def test_rows_join_and_leave():
    rows = Rows(tiny(), max_rows=2)
    a, b = rows.add([1, 2]), rows.add([3])
    assert rows.free == 0 and set(rows.step()) == {a, b}
    with pytest.raises(ValueError, match='all 2 rows are taken'):
        rows.add([4])
    rows.remove(a)
    assert rows.free == 1 and set(rows.step()) == {b}
    with pytest.raises(ValueError, match='temperature'):
        rows.add([4], temperature=-1)


# ---------------------------------------------------------------------------- batching.Batcher: Rows for a server

class Characters:
    """A tokenizer for tiny()'s ids: id i is chr(32 + i), 95 is <|endoftext|>, 96 is past the vocabulary (padding)."""
    n_vocab, eot_token = 96, 95

    def decode_single_token_bytes(self, i):
        return bytes([32 + i])


def test_batcher_writes_each_job_as_its_row_alone():
    """Jobs past the rows wait for one, and past max_queue get no place; each job's text is its row's tokens
    alone, in pieces, up to <|endoftext|> or max_tokens, as serve.py reads them."""
    model = tiny()

    def alone(i, max_tokens):
        rows = Rows(model, max_rows=2)
        rows.add(PROMPTS[i], seed=i)
        tokens = []
        while len(tokens) < max_tokens and Characters.eot_token not in tokens:
            tokens.append(rows.step()[0])
        text = ''.join(chr(32 + t) for t in tokens if t < Characters.n_vocab and t != Characters.eot_token)
        return text, 'stop' if Characters.eot_token in tokens else 'length'

    async def serve():
        batcher = Batcher(partial(Rows, model, max_rows=2), max_rows=2, max_queue=1)
        batcher.start()
        batcher.ready(Characters())
        try:
            jobs = [batcher.admit(PROMPTS[i], dict(seed=i), 20) for i in range(3)]
            assert batcher.admit(PROMPTS[3], {}, 20) is None  # 2 rows and 1 place in the queue, all taken
            pieces = await asyncio.gather(*[collect(batcher.pieces(job, [])) for job in jobs])
            generated = batcher.generated
            for job in jobs:
                batcher.release(job)
            assert batcher.admit(PROMPTS[3], {}, 20) is not None
            return pieces, generated, [job.used for job in jobs]
        finally:
            batcher.stop()

    async def collect(pieces):
        return [piece async for piece in pieces]
    pieces, generated, used = asyncio.run(serve())
    for i, written in enumerate(pieces):
        assert all(reason is None for _, reason in written[:-1])
        assert (''.join(text for text, _ in written), written[-1][1]) == alone(i, 20), i
    assert generated == sum(used) and all(1 <= n <= 20 for n in used)
