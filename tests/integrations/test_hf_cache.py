"""longnet.hf.DilatedCache: the bounded KV cache of transformers models with dilated attention.

Reference: the same model decoding with transformers' dense DynamicCache (the integration's exact
dense-cache path, itself tested against a float64 dense reference in test_hf.py) and with no cache.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

transformers = pytest.importorskip("transformers", minversion="5")

from transformers import DynamicCache  # noqa: E402

import longnet.hf  # noqa: E402
from longnet.hf import DilatedCache  # noqa: E402
from longnet.integrations.hf_cache import bound_bytes  # noqa: E402

VOCAB = 61
FAMILIES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}


@pytest.fixture(scope="module", autouse=True)
def _registered():
    longnet.hf.register()


def make_model(family="llama", dtype=torch.float64, impl="dilated", seed=0, **overrides):
    mod = pytest.importorskip(f"transformers.models.{family}")
    prefix = FAMILIES[family]
    kw = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
              segment_lengths=[3, 8, 16], dilation_rates=[1, 2, 4], pad_token_id=0,
              bos_token_id=1, eos_token_id=None)
    if family != "llama":
        kw["sliding_window"] = None
    kw.update(overrides)
    config = getattr(mod, f"{prefix}Config")(**kw)
    torch.manual_seed(seed)
    model = getattr(mod, f"{prefix}ForCausalLM")(config).to(dtype).eval()
    model.set_attn_implementation(impl)
    return model


def left_padded(lengths, total, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(len(lengths), total, dtype=torch.long)
    mask = torch.zeros_like(x)
    for i, n in enumerate(lengths):
        x[i, total - n:] = torch.randint(1, VOCAB, (n,), generator=g)
        mask[i, total - n:] = 1
    return x, mask


def stepwise_logits(model, x, mask, cache, cuts):
    """Logits of ``x`` fed in the chunks ``x[:, a:b]`` (a, b from ``cuts``) through ``cache``."""
    parts = []
    with torch.no_grad():
        for a, b in zip(cuts[:-1], cuts[1:]):
            m = None if mask is None else mask[:, :b]
            pos = None if mask is None else (mask[:, :b].cumsum(-1) - 1).clamp(min=0)[:, a:b]
            out = model(input_ids=x[:, a:b], attention_mask=m, position_ids=pos, cache=cache,
                        use_cache=True)
            parts.append(out.logits)
    return torch.cat(parts, 1)


# ------------------------------------------------------------------------ exactness, forward
@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_chunks_and_tokens_equal_the_dense_cache(family, kv_heads):
    """Prefill, single tokens and chunks across segment boundaries, left padding, GQA: float64."""
    model = make_model(family, num_key_value_heads=kv_heads)
    x, mask = left_padded([37, 30, 21], 37, seed=kv_heads)
    cuts = [0, 10, 11, 12, 16, 17, 29, 30, 33, 37]  # chunks, tokens, boundaries of 3, 8 and 16
    got = stepwise_logits(model, x, mask, DilatedCache(model.config), cuts)
    ref = stepwise_logits(model, x, mask, DynamicCache(config=model.config), cuts)
    with torch.no_grad():
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        full = model(input_ids=x, attention_mask=mask, position_ids=pos).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], ref[real], atol=1e-10, rtol=0)
    torch.testing.assert_close(got[real], full[real], atol=1e-10, rtol=0)
    dense = copy.deepcopy(model)
    dense.set_attn_implementation("sdpa")
    with torch.no_grad():
        sdpa = dense(input_ids=x, attention_mask=mask, position_ids=pos).logits
    assert (sdpa[real] - got[real]).abs().max() > 1e-3  # the pattern is not dense attention


@settings(max_examples=12, deadline=None)
@given(data=st.data())
def test_random_patterns_and_chunks_equal_the_dense_cache(data):
    nb = data.draw(st.integers(1, 3), label="branches")
    segs = data.draw(st.lists(st.integers(1, 12), min_size=nb, max_size=nb), label="w")
    rates = data.draw(st.lists(st.integers(1, 4), min_size=nb, max_size=nb), label="r")
    kv = data.draw(st.sampled_from([1, 2, 4]), label="kv heads")
    n = data.draw(st.integers(2, 30), label="length")
    short = data.draw(st.integers(1, n), label="second row length")
    inner = sorted(set(data.draw(st.lists(st.integers(1, n - 1), max_size=5), label="cuts")))
    model = make_model(num_key_value_heads=kv, segment_lengths=segs, dilation_rates=rates,
                       num_hidden_layers=1)
    x, mask = left_padded([n, short], n, seed=n)
    cuts = [0, *inner, n]
    got = stepwise_logits(model, x, mask, DilatedCache(model.config), cuts)
    ref = stepwise_logits(model, x, mask, DynamicCache(config=model.config), cuts)
    torch.testing.assert_close(got[mask.bool()], ref[mask.bool()], atol=1e-10, rtol=0)


# ------------------------------------------------------------------------------ generation
@pytest.mark.parametrize("family,kv_heads", [("llama", 2), ("mistral", 1), ("qwen2", 4)])
def test_greedy_generate_equals_the_dense_cache(family, kv_heads):
    """float32, left padding, 40 tokens past a largest segment of 16: tokens equal, logits 1e-5."""
    model = make_model(family, torch.float32, num_key_value_heads=kv_heads)
    x, mask = left_padded([9, 5], 9)
    kw = dict(attention_mask=mask, max_new_tokens=40, do_sample=False, output_logits=True,
              return_dict_in_generate=True)
    cache = DilatedCache(model.config)
    with torch.no_grad():
        got = model.generate(x, cache=cache, **kw)
        ref = model.generate(x, **kw)  # transformers' DynamicCache
    assert cache.get_seq_length() == 9 + 40 - 1  # the last token is never fed back
    assert torch.equal(got.sequences, ref.sequences)
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(ref.logits), atol=1e-5, rtol=0)


def test_left_padded_rows_generate_what_each_prompt_generates_alone():
    model = make_model(num_key_value_heads=2)
    x, mask = left_padded([11, 4], 11, seed=3)
    kw = dict(max_new_tokens=25, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        batch = model.generate(x, attention_mask=mask, cache=DilatedCache(model.config), **kw)
        for i, n in enumerate((11, 4)):
            p = x[i:i + 1, 11 - n:]
            alone = model.generate(p, attention_mask=torch.ones_like(p),
                                   cache=DilatedCache(model.config), **kw)
            assert torch.equal(batch.sequences[i, 11:], alone.sequences[0, n:])
            torch.testing.assert_close(torch.stack(batch.logits)[:, i],
                                       torch.stack(alone.logits)[:, 0], atol=1e-6, rtol=0)


def test_beam_search_agrees_with_the_dense_cache():
    model = make_model(dtype=torch.float32)
    x, mask = left_padded([7, 5], 7, seed=1)
    kw = dict(attention_mask=mask, max_new_tokens=24, do_sample=False, num_beams=3,
              num_return_sequences=2, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        got = model.generate(x, cache=DilatedCache(model.config), **kw)
        ref = model.generate(x, **kw)
    assert got.sequences.shape == (4, 31)
    assert torch.equal(got.sequences, ref.sequences)
    torch.testing.assert_close(got.sequences_scores, ref.sequences_scores, atol=1e-5, rtol=0)


@pytest.mark.parametrize("seed", [0, 7])
def test_seeded_sampling_agrees_with_the_dense_cache(seed):
    model = make_model(dtype=torch.float32)
    x, mask = left_padded([8, 6], 8, seed=seed)
    kw = dict(attention_mask=mask, max_new_tokens=30, do_sample=True, top_k=20, temperature=1.3,
              num_return_sequences=2)
    with torch.no_grad():
        torch.manual_seed(seed)
        got = model.generate(x, cache=DilatedCache(model.config), **kw)
        torch.manual_seed(seed)
        ref = model.generate(x, **kw)
    assert torch.equal(got, ref)


@pytest.mark.parametrize("chunk", [1, 4, 16])
def test_chunked_prefill_equals_the_dense_cache(chunk):
    model = make_model()
    x, mask = left_padded([34, 20], 34, seed=chunk)
    kw = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, output_logits=True,
              return_dict_in_generate=True)
    with torch.no_grad():
        got = model.generate(x, cache=DilatedCache(model.config), prefill_chunk_size=chunk, **kw)
        ref = model.generate(x, **kw)
    assert torch.equal(got.sequences, ref.sequences)
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(ref.logits), atol=1e-6, rtol=0)


def test_both_cache_argument_names_work():
    """transformers 5.x renames past_key_values to cache; both names reach the cache."""
    model = make_model(dtype=torch.float32)
    assert longnet.hf.cache_argument(model) == "cache"
    x = torch.randint(1, VOCAB, (1, 6))
    kw = dict(attention_mask=torch.ones_like(x), max_new_tokens=5, do_sample=False)
    new, old = DilatedCache(model.config), DilatedCache(model.config)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        a = model.generate(x, cache=new, **kw)
        b = model.generate(x, past_key_values=old, **kw)
    assert torch.equal(a, b)
    assert new.get_seq_length() == old.get_seq_length() == 10 and old.nbytes == new.nbytes > 0


# ---------------------------------------------------------------------------------- memory
def test_bytes_are_the_bound_and_constant_while_the_dense_cache_grows():
    model = make_model(num_key_value_heads=2)  # segments 3, 8, 16; rates 1, 2, 4
    cache, dense = DilatedCache(model.config), DynamicCache(config=model.config)
    x = torch.randint(1, VOCAB, (2, 70))
    sizes, dense_sizes = [], []
    with torch.no_grad():
        for t in range(70):
            model(input_ids=x[:, t:t + 1], cache=cache, use_cache=True)
            model(input_ids=x[:, t:t + 1], cache=dense, use_cache=True)
            sizes.append(cache.nbytes)
            dense_sizes.append(sum(layer.keys.nbytes + layer.values.nbytes for layer in dense.layers))
    # per key/value head, its 2 query heads' residues once: (3, 1) -> 3, (8, 2) -> residues
    # {0, 1} of 2 -> 8, (16, 4) -> {0, 1} or {2, 3} of 4 -> 8 (per query head: 3 + 4 + 4 each)
    slots = 3 + 8 + 8
    assert cache.slots_per_kv_head == slots < 2 * (3 + 4 + 4)
    expected = 2 * 2 * 2 * slots * (2 * 8 * 8 + 8)  # layers * batch * kv heads * slots * bytes
    assert sizes == [expected] * 70 == [bound_bytes(model.config, 2, torch.float64)] * 70
    assert dense_sizes[-1] == 70 * dense_sizes[0] > sizes[-1]


@pytest.mark.parametrize("kv_heads, slots", [(4, 3 + 4 + 4), (2, 3 + 8 + 8), (1, 3 + 8 + 16)])
def test_layers_store_per_kv_head_the_union_of_their_query_heads_residues(kv_heads, slots):
    """4 query heads, segments 3, 8, 16, rates 1, 2, 4: a key/value head of G query heads keeps
    min(G, r) residues of each branch, once (per query head it would be G * (3 + 4 + 4))."""
    model = make_model(num_key_value_heads=kv_heads)
    cache = DilatedCache(model.config)
    with torch.no_grad():
        model(input_ids=torch.randint(1, VOCAB, (2, 5)), cache=cache, use_cache=True)
    assert cache.slots_per_kv_head == slots
    for layer in cache.layers:
        assert layer.slots.keys.shape == layer.slots.values.shape == (2, kv_heads, slots, 8)
    real = sum(t.nbytes for layer in cache.layers
               for t in (layer.slots.keys, layer.slots.values, layer.slots.positions))
    assert cache.nbytes == real == bound_bytes(model.config, 2, torch.float64)


def test_allocate_on_meta_counts_the_bytes_of_a_real_run():
    """benchmarks/gqa_cache_bytes.py counts bytes of caches allocated on the meta device."""
    model = make_model(num_key_value_heads=1)
    real, meta = DilatedCache(model.config), DilatedCache(model.config)
    with torch.no_grad():
        model(input_ids=torch.randint(1, VOCAB, (2, 3)), cache=real, use_cache=True)
    with pytest.raises(ValueError, match="lazy_initialization"):
        meta.layers[0].allocate()
    key = torch.empty(2, 1, 1, 8, dtype=torch.float64, device="meta")
    for layer in meta.layers:
        layer.lazy_initialization(key, key)
        layer.allocate()
        assert layer.slots.keys.is_meta
    assert meta.nbytes == real.nbytes == bound_bytes(model.config, 2, torch.float64)


def test_start_at_skips_what_no_query_reads():
    """Segments 4, 8, 16 nest: a 45-token prompt's continuation reads nothing before 32."""
    model = make_model(segment_lengths=[4, 8, 16], dilation_rates=[1, 2, 4])
    x = torch.randint(1, VOCAB, (2, 45))
    cache = DilatedCache(model.config)
    assert cache.first_needed(45) == 32 and cache.first_needed(32) == 16
    cache.start_at(32)
    with torch.no_grad():
        full = model(input_ids=x).logits
        part = model(input_ids=x[:, 32:], cache=cache, use_cache=True).logits
        nxt = model(input_ids=x[:, :1], cache=cache, use_cache=True).logits  # position 45
        ref = model(input_ids=torch.cat([x, x[:, :1]], 1)).logits[:, 45:]
    torch.testing.assert_close(part, full[:, 32:], atol=1e-10, rtol=0)
    torch.testing.assert_close(nxt, ref, atol=1e-10, rtol=0)
    with pytest.raises(ValueError, match="empty cache"):
        cache.start_at(16)
    with pytest.raises(ValueError, match="multiples of the largest segment"):
        DilatedCache(model.config).start_at(20)
    odd = make_model(segment_lengths=[3, 8], dilation_rates=[1, 2])
    assert DilatedCache(odd.config).first_needed(100) == 0
    with pytest.raises(ValueError, match="divide"):
        DilatedCache(odd.config).start_at(24)


# ---------------------------------------------------------------------------------- errors
def test_other_attention_implementations_are_refused():
    model = make_model(impl="sdpa")
    with pytest.raises(ValueError, match="only with dilated attention"):
        model(input_ids=torch.randint(1, VOCAB, (1, 4)), cache=DilatedCache(model.config))


def test_rollback_and_speculative_decoding_are_refused():
    model = make_model()
    cache = DilatedCache(model.config)
    with torch.no_grad():
        model(input_ids=torch.randint(1, VOCAB, (1, 5)), cache=cache, use_cache=True)
    assert not cache.is_croppable
    cache.crop(0)  # a no-op is fine
    with pytest.raises(ValueError, match="speculative"):
        cache.crop(-1)
    with pytest.raises(ValueError, match="speculative"):
        cache.activate_past_recording()
    with pytest.raises(ValueError, match="speculative"):  # transformers >= 5.25 passes this keyword
        cache.activate_past_recording(recurrent_states_to_keep=3)
    assistant = make_model(seed=1)
    x = torch.randint(1, VOCAB, (1, 5))
    with pytest.raises(ValueError, match="speculative|cropped"):
        model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=4,
                       assistant_model=assistant, cache=DilatedCache(model.config))


@pytest.mark.parametrize("field,value,match", [
    ("sliding_window", 4, "sliding_window"),
    ("layer_types", ["full_attention", "sliding_attention"], "full_attention"),
    ("is_causal", False, "causal"),
    ("segment_lengths", None, "segment_lengths"),
])
def test_configs_it_cannot_serve_raise(field, value, match):
    model = make_model("mistral")
    config = copy.deepcopy(model.config)
    setattr(config, field, value)
    with pytest.raises(ValueError, match=match):
        DilatedCache(config)


def test_misuse_during_decoding_raises():
    model = make_model()
    x, mask = left_padded([6, 4], 6)
    cache = DilatedCache(model.config)
    with torch.no_grad():
        model(input_ids=x, attention_mask=mask, cache=cache, use_cache=True)
        moved = torch.cat([torch.ones_like(mask), torch.ones(2, 1, dtype=torch.long)], 1)
        with pytest.raises(ValueError, match="padding"):  # the mask of earlier tokens changed
            model(input_ids=x[:, :1], attention_mask=moved, cache=cache, use_cache=True)
    cache = DilatedCache(model.config)
    k = torch.zeros(1, 2, 3, 8, dtype=torch.float64)
    cache.update(k, k, 0)
    with pytest.raises(RuntimeError, match="never attended"):  # keys changed before attention
        cache.update(k, k, 0)
    model.train()
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.1
    with pytest.raises(ValueError, match="dropout"):
        model(input_ids=x, cache=DilatedCache(model.config), use_cache=True)


def test_attention_function_refuses_foreign_keys_and_paged_caches():
    model = make_model()
    attn = model.model.layers[0].self_attn
    q = torch.randn(1, 4, 3, 8, dtype=torch.float64)
    k = torch.randn(1, 2, 3, 8, dtype=torch.float64)
    cache = DilatedCache(model.config)
    with pytest.raises(ValueError, match="what its update returned"):
        longnet.hf.dilated_attention_forward(attn, q, k, k, None, cache=cache)

    class PagedAttentionCache:  # stands in for continuous batching's cache
        pass

    with pytest.raises(ValueError, match="paged"):
        longnet.hf.dilated_attention_forward(attn, q, k, k, None, cache=PagedAttentionCache())
    dense = DynamicCache(config=model.config)  # a dense cache handed over: keys are complete
    out, _ = longnet.hf.dilated_attention_forward(attn, q, k, k, None, cache=dense)
    ref, _ = longnet.hf.dilated_attention_forward(attn, q, k, k, None)
    assert torch.equal(out, ref)


@pytest.mark.cuda
def test_cuda_generate_equals_the_dense_cache_and_cpu():
    model = make_model(dtype=torch.float32, num_key_value_heads=2)
    gpu = copy.deepcopy(model).cuda()
    x, mask = left_padded([9, 5], 9)
    kw = dict(max_new_tokens=30, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        cpu = model.generate(x, attention_mask=mask, cache=DilatedCache(model.config), **kw)
        cache = DilatedCache(gpu.config)
        got = gpu.generate(x.cuda(), attention_mask=mask.cuda(), cache=cache, **kw)
        ref = gpu.generate(x.cuda(), attention_mask=mask.cuda(), **kw)
    assert cache.layers[0].slots.keys.is_cuda
    assert torch.equal(got.sequences, ref.sequences)
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(ref.logits), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.stack(got.logits).cpu(), torch.stack(cpu.logits), atol=1e-3, rtol=1e-3)
