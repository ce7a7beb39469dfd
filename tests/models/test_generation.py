"""Generation with the dilated KV cache equals full recomputation; sampling, eos, batching."""

import pytest
import torch

from longnet import DilatedKVCache, LongNetConfig, LongNetLM
from longnet.models.cache import DenseLayerCache, SlotLayerCache
from longnet.models.generation import cached_forward, sample_next_token
from longnet.testing.reference_cache import DilatedLayerCache

V = 61  # vocabulary of the tiny models
TOP = 16  # largest segment of the tiny pattern



def tiny_lm(dtype=torch.float32, **overrides) -> LongNetLM:
    kw = dict(vocab_size=V, embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=48,
              segment_lengths=(4, 8, TOP), dilation_rates=(1, 2, 4), max_train_length=TOP,
              sparse_block=4, sparse_stride=2)
    kw.update(overrides)
    torch.manual_seed(1)
    return LongNetLM(LongNetConfig(**kw)).to(dtype).eval()


def full_logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


# ------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("attention, position, layer_cache", [
    ("dilated", "xpos", "slots"), ("dilated", "rope", "slots"), ("dilated", "xpos", DilatedLayerCache),
    ("sparse", "xpos", "slots"), ("sparse", "rope", DilatedLayerCache), ("dense", "rope", "slots"),
    ("dense", "xpos", "slots")])
def test_token_by_token_logits_equal_full_recomputation(attention, position, layer_cache):
    model = tiny_lm(attention=attention, position=position)
    N = 3 * TOP + 5  # crosses three boundaries of the largest segment, beyond max_train_length
    ids = torch.randint(0, V, (2, N))
    full = full_logits(model, ids)  # (2, N, V)
    cache = model.make_cache(2, layer_cache=layer_cache)
    for t in range(N):
        step = cached_forward(model, ids[:, t:t + 1], cache)  # (2, V)
        torch.testing.assert_close(step, full[:, t], rtol=1e-5, atol=1e-5)
    assert cache.lengths.tolist() == [N, N]


@pytest.mark.parametrize("layer_cache", ["slots", DilatedLayerCache])
def test_chunked_prefill_equals_one_shot_prefill(layer_cache):
    model = tiny_lm()
    ids = torch.randint(0, V, (2, 45))
    full = full_logits(model, ids)
    one_shot = cached_forward(model, ids, model.make_cache(2, layer_cache=layer_cache),
                              logits="all")
    torch.testing.assert_close(one_shot, full, rtol=1e-5, atol=1e-5)
    cache = model.make_cache(2, layer_cache=layer_cache)
    outs, t = [], 0
    for n in (7, 1, 13, 2, 22):
        outs.append(cached_forward(model, ids[:, t:t + n], cache, logits="all"))
        t += n
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-5, atol=1e-5)
    a = model.generate(ids, 12, prefill_chunk_size=3)
    b = model.generate(ids, 12, prefill_chunk_size=1000)
    assert torch.equal(a, b)


@pytest.mark.parametrize("attention", ["dilated", "dense"])
def test_greedy_generation_picks_the_argmax_of_recomputation(attention):
    model = tiny_lm(torch.float64, attention=attention)
    prompt = torch.randint(0, V, (2, 2 * TOP + 3))  # longer than the largest segment
    out = model.generate(prompt, 2 * TOP, prefill_chunk_size=5)
    assert out.shape == (2, prompt.shape[1] + 2 * TOP)
    assert torch.equal(out[:, :prompt.shape[1]], prompt)
    logits = full_logits(model, out)  # (2, N + T, V)
    N = prompt.shape[1]
    assert torch.equal(out[:, N:], logits[:, N - 1:-1].argmax(-1))
    # default chunks (the period, 16): the prompt's last 16-segment runs the operator at once
    assert torch.equal(model.generate(prompt, 2 * TOP), out)


def test_prompt_prefix_before_the_last_top_segment_is_skipped_exactly():
    model = tiny_lm(torch.float64)
    cache = model.make_cache(1, layer_cache=DilatedLayerCache)
    assert cache.unread_before(3 * TOP + 2) == 3 * TOP
    prompt = torch.randint(0, V, (1, 3 * TOP + 3))
    out = model.generate(prompt, 1, cache=cache)
    assert cache.lengths.tolist() == [3 * TOP + 3]
    # only the last top segment was fed: the cache holds no position before it
    for layer in cache.layers:
        for pos in layer.positions:
            assert int(pos[pos >= 0].min()) >= 3 * TOP
    assert out[0, -1] == full_logits(model, prompt)[0, -1].argmax()
    # non-nested patterns and dense layers skip nothing
    assert tiny_lm(segment_lengths=(4, 6), dilation_rates=(1, 2)).make_cache(1).unread_before(100) == 0
    assert tiny_lm(attention="dense").make_cache(1).unread_before(100) == 0


# ------------------------------------------------------------------------------ memory
@pytest.mark.parametrize("layer_cache, kind", [("slots", SlotLayerCache),
                                               (DilatedLayerCache, DilatedLayerCache)])
def test_cache_bytes_stop_growing_after_the_largest_segment(layer_cache, kind):
    model = tiny_lm()
    cache = model.make_cache(1, layer_cache=layer_cache)
    ids = torch.randint(0, V, (1, 5 * TOP))
    sizes = []
    for t in range(ids.shape[1]):
        cached_forward(model, ids[:, t:t + 1], cache)
        sizes.append(cache.nbytes)
    assert all(isinstance(layer, kind) for layer in cache.layers)
    assert sizes[TOP - 1] == max(sizes) == cache.max_nbytes
    assert max(sizes[TOP:]) == max(sizes)
    # full at the end of every top segment, the same size each time
    assert {sizes[k * TOP - 1] for k in range(1, 6)} == {max(sizes)}
    if layer_cache == "slots":  # preallocated: the bound from the first token on
        assert set(sizes) == {cache.max_nbytes}


def test_dense_cache_grows_with_the_context():
    model = tiny_lm(attention="dense")
    cache = model.make_cache(1)
    assert isinstance(cache.layers[0], DenseLayerCache) and cache.max_nbytes is None
    ids = torch.randint(0, V, (1, 40))
    sizes = []
    for t in range(40):
        cached_forward(model, ids[:, t:t + 1], cache)
        sizes.append(cache.nbytes)
    assert sizes == [sizes[0] * (t + 1) for t in range(40)]


# ---------------------------------------------------------------------------- sampling
def test_top_k_1_equals_greedy_and_tiny_top_p_equals_greedy():
    model = tiny_lm()
    prompt = torch.randint(0, V, (3, 9))
    greedy = model.generate(prompt, 20)
    assert torch.equal(model.generate(prompt, 20, do_sample=True, top_k=1), greedy)
    assert torch.equal(model.generate(prompt, 20, do_sample=True, top_p=1e-9), greedy)


def test_seeded_sampling_reproduces():
    model = tiny_lm()
    prompt = torch.randint(0, V, (2, 5))
    kw = dict(do_sample=True, temperature=1.5, top_k=20, top_p=0.9)
    a = model.generate(prompt, 30, generator=torch.Generator().manual_seed(7), **kw)
    b = model.generate(prompt, 30, generator=torch.Generator().manual_seed(7), **kw)
    c = model.generate(prompt, 30, generator=torch.Generator().manual_seed(8), **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.manual_seed(3)
    d = model.generate(prompt, 30, **kw)
    torch.manual_seed(3)
    assert torch.equal(model.generate(prompt, 30, **kw), d)


def test_sampling_filters_keep_the_right_tokens():
    logits = torch.tensor([[2.0, 1.5, 1.0, -1.0]]).log_softmax(-1).expand(4000, 4)
    g = torch.Generator().manual_seed(0)
    probs = logits.exp()[0]
    # top_p: the fewest tokens whose probability reaches p (the first two reach 0.6 here)
    assert probs[0] < 0.6 <= probs[0] + probs[1]
    seen = sample_next_token(logits, do_sample=True, top_p=0.6, generator=g).unique().tolist()
    assert seen == [0, 1]
    seen = sample_next_token(logits, do_sample=True, top_k=3, generator=g).unique().tolist()
    assert seen == [0, 1, 2]
    counts = sample_next_token(logits, do_sample=True, generator=g).bincount(minlength=4) / 4000
    torch.testing.assert_close(counts, probs, atol=0.03, rtol=0)
    hot = sample_next_token(logits, do_sample=True, temperature=100.0, generator=g)
    assert hot.bincount(minlength=4).min() > 800  # nearly uniform


# ----------------------------------------------------------------------------- batching
def test_left_padded_batch_equals_each_sequence_alone():
    model = tiny_lm(torch.float64)
    lengths = [TOP + 7, 3, 2 * TOP + 1]
    prompts = [torch.randint(0, V, (1, n)) for n in lengths]
    N = max(lengths)
    ids = torch.zeros(len(lengths), N, dtype=torch.long)
    mask = torch.zeros(len(lengths), N, dtype=torch.bool)
    for b, p in enumerate(prompts):
        ids[b, N - p.shape[1]:] = p[0]
        mask[b, N - p.shape[1]:] = True
    out = model.generate(ids, 2 * TOP, key_padding_mask=mask, prefill_chunk_size=6)
    for b, p in enumerate(prompts):
        alone = model.generate(p, 2 * TOP)
        assert torch.equal(out[b, N:], alone[0, p.shape[1]:])
    same = model.generate(ids, 2 * TOP, attention_mask=mask.long(), prefill_chunk_size=6)
    assert torch.equal(same, out)


def test_eos_stops_a_sequence_and_pads_after_it():
    model = tiny_lm()
    prompt = torch.randint(0, V, (2, 6))
    free = model.generate(prompt, 12)
    eos = int(free[0, 6 + 3])  # row 0 produces it at step 3 (or earlier)
    first = int((free[0, 6:] == eos).nonzero()[0])
    out = model.generate(prompt, 12, eos_token_id=eos, pad_token_id=V - 1)
    assert torch.equal(out[0, :6 + first + 1], free[0, :6 + first + 1])
    assert (out[0, 6 + first + 1:] == V - 1).all()
    hits = (free[1, 6:] == eos).nonzero()
    if len(hits) == 0:  # row 1 never stops: unchanged
        assert torch.equal(out[1], free[1])
    # both rows stopping ends generation early
    both = model.generate(prompt, 12, eos_token_id=[int(free[0, 6]), int(free[1, 6])])
    assert both.shape == (2, 7)


def test_streamer_receives_every_new_token():
    model = tiny_lm()
    prompt = torch.randint(0, V, (2, 4))
    seen = []
    out = model.generate(prompt, 7, streamer=seen.append)
    assert torch.equal(torch.stack(seen, 1), out[:, 4:])

    class Streamer:
        def __init__(self):
            self.tokens, self.ended = [], 0

        def put(self, ids):
            self.tokens.append(ids)

        def end(self):
            self.ended += 1

    s = Streamer()
    model.generate(prompt, 7, streamer=s)
    assert torch.equal(torch.stack(s.tokens, 1), out[:, 4:]) and s.ended == 1


def test_continuing_with_a_cache_equals_one_call():
    model = tiny_lm(torch.float64)
    prompt = torch.randint(0, V, (2, 11))
    whole = model.generate(prompt, 2 * TOP)
    cache = model.make_cache(2)
    first = model.generate(prompt, TOP, cache=cache)
    assert cache.lengths.tolist() == [11 + TOP - 1] * 2  # the last new token is not fed yet
    second = model.generate(first[:, -1:], TOP, cache=cache)
    assert torch.equal(torch.cat([first, second[:, 1:]], 1), whole)


def test_generation_runs_in_eval_mode_and_restores_training_mode():
    model = tiny_lm(dropout=0.5)
    model.train()
    prompt = torch.randint(0, V, (1, 5))
    a = model.generate(prompt, 5)
    assert model.training
    assert torch.equal(a, tiny_lm(dropout=0.5).generate(prompt, 5))


# --------------------------------------------------------------------------- validation
@pytest.mark.parametrize("kwargs, name", [
    (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(max_new_tokens=2.5), "max_new_tokens"),
    (dict(do_sample=True, temperature=0.0), "temperature"),
    (dict(do_sample=True, temperature=-1.0), "temperature"),
    (dict(top_k=0), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(prefill_chunk_size=0), "prefill_chunk_size"),
    (dict(eos_token_id=V), "eos_token_id"),
    (dict(eos_token_id=[]), "eos_token_id"),
    (dict(pad_token_id=-2), "pad_token_id"),
    (dict(key_padding_mask=torch.tensor([[True, False, True]])), "left padding"),
    (dict(key_padding_mask=torch.tensor([[False, False, False]])), "at least one real token"),
    (dict(key_padding_mask=torch.ones(1, 2, dtype=torch.bool)), "key_padding_mask"),
    (dict(key_padding_mask=torch.ones(1, 3, dtype=torch.bool),
          attention_mask=torch.ones(1, 3)), "not both"),
    (dict(input_ids=torch.tensor([[1, V, 2]])), "input_ids"),
    (dict(input_ids=torch.tensor([1, 2, 3])), "input_ids"),
    (dict(cache="nope"), "cache"),
])
def test_bad_arguments_raise_value_error_naming_them(kwargs, name):
    model = tiny_lm()
    args = dict(input_ids=torch.tensor([[1, 2, 3]]), max_new_tokens=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        model.generate(args.pop("input_ids"), args.pop("max_new_tokens"), **args)


def test_zero_new_tokens_returns_the_prompt_and_make_cache_checks_batch_size():
    model = tiny_lm()
    prompt = torch.randint(0, V, (2, 3))
    assert torch.equal(model.generate(prompt, 0), prompt)
    with pytest.raises(ValueError, match="batch_size"):
        model.make_cache(0)
    with pytest.raises(ValueError, match="layer_cache"):
        model.make_cache(1, layer_cache="ring")
    assert isinstance(model.make_cache(2), DilatedKVCache)
    with pytest.raises(ValueError, match="cache"):
        model.generate(prompt, 2, cache=model.make_cache(3))
