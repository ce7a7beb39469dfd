"""Dilated attention inside transformers models: exactness, causality, cache, padding, GQA."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

transformers = pytest.importorskip("transformers", minversion="5")

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import longnet  # noqa: E402
import longnet.hf  # noqa: E402
from longnet.ops.dilated_rows import dilated_attention_rows  # noqa: E402
from longnet.ops.pattern import DilatedPattern  # noqa: E402
from longnet.testing.reference import count_matrix, reference_dilated_attention  # noqa: E402

VOCAB = 61
SRC = os.path.dirname(os.path.dirname(os.path.abspath(longnet.__file__)))


@pytest.fixture(scope="module", autouse=True)
def _registered():
    """Register once for the module (tests/conftest.py runs every test on one thread)."""
    longnet.hf.register()


def tiny_config(**overrides) -> LlamaConfig:
    kw = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
              segment_lengths=[4, 8], dilation_rates=[1, 2], pad_token_id=0, bos_token_id=1,
              eos_token_id=None)
    kw.update(overrides)
    return LlamaConfig(**kw)


def tiny_model(config: LlamaConfig, dtype=torch.float64, impl: str = "dilated"):
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(dtype).eval()
    model.set_attn_implementation(impl)
    return model


def with_impl(model, impl: str):
    other = copy.deepcopy(model)
    other.set_attn_implementation(impl)
    return other


def pattern_bias(config: LlamaConfig, length: int, dtype=torch.float64) -> torch.Tensor:
    """(1, H, N, N) additive mask: log(branch count), -inf where no branch (the one-softmax reference of docs/design.md)."""
    pattern = DilatedPattern(config.segment_lengths, config.dilation_rates)
    counts = count_matrix(pattern, length, config.num_attention_heads, is_causal=True)
    return counts.log().to(dtype).unsqueeze(0)


# ----------------------------------------------------------------------------------- imports
def test_transformers_stays_optional():
    """``import longnet`` never imports transformers; ``longnet.hf`` without it says what to do."""
    code = ("import sys, longnet\n"
            "assert 'transformers' not in sys.modules, 'import longnet imported transformers'\n"
            "sys.modules['transformers'] = None  # as if it were not installed\n"
            "try:\n    import longnet.hf\nexcept ImportError as e:\n    print(e)\n"
            "else:\n    raise SystemExit('import longnet.hf did not raise ImportError')\n")
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "longnet-torch[hf]" in res.stdout


# ------------------------------------------------------------------------------ registration
def test_register_is_idempotent_and_refuses_foreign_names():
    assert longnet.hf.register() == "dilated"
    assert longnet.hf.register("dilated") == "dilated"
    assert "dilated" in longnet.hf.registered_names()
    with pytest.raises(ValueError, match="transformers"):
        longnet.hf.register("sdpa")
    transformers.AttentionInterface.register("someone_else", lambda *a, **k: None)
    try:
        with pytest.raises(ValueError, match="already registered"):
            longnet.hf.register("someone_else")
        with pytest.raises(ValueError, match="not registered by longnet"):
            longnet.hf.unregister("someone_else")
    finally:
        del transformers.AttentionInterface._global_mapping["someone_else"]
    longnet.hf.register("dilated_tmp")
    longnet.hf.unregister("dilated_tmp")
    assert "dilated_tmp" not in longnet.hf.registered_names()
    longnet.hf.unregister("dilated_tmp")  # absent: no-op


def test_missing_config_fields_raise_naming_them():
    config = tiny_config()
    del config.segment_lengths
    model = tiny_model(config, impl="sdpa")
    model.set_attn_implementation("dilated")
    with pytest.raises(ValueError, match="segment_lengths") as err:
        model(torch.randint(1, VOCAB, (1, 5)))
    assert "dilation_rates" in str(err.value)


# -------------------------------------------------------------------------- rows (decoding)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("n,q,segs,rates,H,Hkv", [
    (13, 1, (4, 8), (1, 2), 4, 4),
    (13, 5, (3, 8, 16), (1, 2, 3), 6, 2),
    (21, 4, (5, 6, 32), (2, 3, 4), 4, 1),
    (9, 9, (4,), (3,), 3, 3),
])
def test_rows_equal_the_operator_on_the_last_rows(causal, n, q, segs, rates, H, Hkv):
    g = torch.Generator().manual_seed(n * 7 + q)
    B, D = 3, 5
    qq = torch.randn(B, H, n, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, Hkv, n, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, Hkv, n, D, generator=g, dtype=torch.float64)
    pattern = DilatedPattern(segs, rates)
    # row 0: no padding; row 1: 3 leading pads; row 2: 2 leading pads and a hole
    kpm = torch.ones(B, n, dtype=torch.bool)
    kpm[1, :3] = False
    kpm[2, :2] = False
    kpm[2, 6] = False
    offsets = torch.tensor([0, 3, 2])
    got = dilated_attention_rows(qq[:, :, n - q:], k, v, pattern, query_start=n - q,
                                 is_causal=causal, key_padding_mask=kpm, row_offsets=offsets)
    for b in range(B):  # reference: shift the row so position 0 is its first real token
        idx = (torch.arange(n) + offsets[b]) % n
        ref, _ = reference_dilated_attention(
            qq[b:b + 1, :, idx], k[b:b + 1, :, idx], v[b:b + 1, :, idx], segs, rates,
            is_causal=causal, key_padding_mask=kpm[b:b + 1, idx], enable_gqa=True)
        back = (torch.arange(n) - offsets[b]) % n
        ref = ref[:, :, back][:, :, n - q:]
        real = kpm[b, n - q:]  # padded query rows are unspecified
        torch.testing.assert_close(got[b:b + 1, :, real], ref[:, :, real], atol=1e-10, rtol=1e-10)


@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_rows_equal_the_fast_operator_hypothesis(data):
    n = data.draw(st.integers(1, 24), label="n")
    q = data.draw(st.integers(1, n), label="q")
    nb = data.draw(st.integers(1, 3), label="branches")
    segs = data.draw(st.lists(st.integers(1, 30), min_size=nb, max_size=nb), label="w")
    rates = data.draw(st.lists(st.integers(1, 4), min_size=nb, max_size=nb), label="r")
    Hkv = data.draw(st.integers(1, 2), label="Hkv")
    H = Hkv * data.draw(st.integers(1, 3), label="groups")
    causal = data.draw(st.booleans(), label="causal")
    lead = data.draw(st.integers(0, n - 1), label="leading pads of row 1")
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16), label="seed"))
    B, D = 2, 3
    qq = torch.randn(B, H, n, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, Hkv, n, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, Hkv, n, D, generator=g, dtype=torch.float64)
    kpm = torch.ones(B, n, dtype=torch.bool)
    kpm[1, :lead] = False
    got = dilated_attention_rows(qq[:, :, n - q:], k, v, DilatedPattern(segs, rates),
                                 query_start=n - q, is_causal=causal, key_padding_mask=kpm,
                                 row_offsets=torch.tensor([0, lead]))
    full = longnet.dilated_attention(qq[:1], k[:1], v[:1], segment_lengths=segs,
                                     dilation_rates=rates, is_causal=causal, enable_gqa=True)
    torch.testing.assert_close(got[:1], full[:, :, n - q:], atol=1e-10, rtol=1e-10)
    idx = torch.arange(lead, n)  # row 1 = its real tokens alone
    alone = longnet.dilated_attention(qq[1:, :, idx], k[1:, :, idx], v[1:, :, idx],
                                      segment_lengths=segs, dilation_rates=rates,
                                      is_causal=causal, enable_gqa=True)
    real = max(0, lead - (n - q))  # query rows that are real tokens of row 1
    torch.testing.assert_close(got[1:, :, real:], alone[:, :, alone.shape[2] - (q - real):],
                               atol=1e-10, rtol=1e-10)


def test_rows_gradients_are_finite_with_empty_rows():
    q = torch.randn(1, 2, 3, 4, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 2, 6, 4, dtype=torch.float64, requires_grad=True)
    kpm = torch.tensor([[False, False, False, False, True, True]])  # query 3 sees no key
    out = dilated_attention_rows(q, k, k, DilatedPattern((4,), (1,)), query_start=3,
                                 is_causal=True, key_padding_mask=kpm)
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()
    assert out[0, :, 0].abs().max() == 0


# ----------------------------------------------------------------------------- model level
@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-9), (torch.float32, 1e-5)])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_one_full_branch_equals_sdpa(dtype, atol, kv_heads):
    config = tiny_config(segment_lengths=[64], dilation_rates=[1], num_key_value_heads=kv_heads)
    model = tiny_model(config, dtype)
    x = torch.randint(1, VOCAB, (2, 19))
    with torch.no_grad():
        got = model(x).logits
        ref = with_impl(model, "sdpa")(x).logits
    torch.testing.assert_close(got, ref, atol=atol, rtol=0)


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_other_model_families_take_it_too(family):
    mod = pytest.importorskip(f"transformers.models.{family}")
    prefix = {"mistral": "Mistral", "qwen2": "Qwen2"}[family]
    config = getattr(mod, f"{prefix}Config")(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, sliding_window=None,
        segment_lengths=[3, 8], dilation_rates=[1, 2])
    torch.manual_seed(0)
    model = getattr(mod, f"{prefix}ForCausalLM")(config).double().eval()
    model.set_attn_implementation("dilated")
    x = torch.randint(1, VOCAB, (2, 15))
    with torch.no_grad():
        got = model(x).logits
        ref = with_impl(model, "eager")(x, attention_mask=pattern_bias(config, 15)).logits
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


@pytest.mark.cuda
def test_cuda_matches_cpu_and_caches_exactly():
    config = tiny_config(segment_lengths=[3, 8], dilation_rates=[1, 2], num_key_value_heads=2)
    model = tiny_model(config, torch.float32)
    gpu = copy.deepcopy(model).cuda()
    x = torch.randint(1, VOCAB, (2, 17))
    mask = torch.ones_like(x)
    mask[1, :4] = 0  # left padding
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, output_logits=True,
              return_dict_in_generate=True)
    with torch.no_grad():
        cpu_out = model.generate(x, **kw)
        gpu_out = gpu.generate(x.cuda(), **{**kw, "attention_mask": mask.cuda()})
        gpu_full = gpu.generate(x.cuda(), use_cache=False, **{**kw, "attention_mask": mask.cuda()})
    torch.testing.assert_close(torch.stack(gpu_out.logits).cpu(), torch.stack(cpu_out.logits),
                               atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(torch.stack(gpu_out.logits), torch.stack(gpu_full.logits),
                               atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_matches_eager_with_the_pattern_as_bias(kv_heads):
    """The whole model equals eager attention with a log(branch count) bias (GQA included)."""
    config = tiny_config(segment_lengths=[3, 8, 16], dilation_rates=[1, 2, 4],
                         num_key_value_heads=kv_heads)
    model = tiny_model(config)
    x = torch.randint(1, VOCAB, (2, 21))
    with torch.no_grad():
        got = model(x).logits
        ref = with_impl(model, "eager")(x, attention_mask=pattern_bias(config, 21)).logits
        dense = with_impl(model, "sdpa")(x).logits
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)  # eager's softmax runs in float32
    assert (got - dense).abs().max() > 1e-3  # a real pattern is not dense attention


def test_non_causal_modules_match_eager_with_the_bidirectional_pattern():
    """Causality comes from ``module.is_causal``; padding keys stay out (right padding)."""
    config = tiny_config(segment_lengths=[3, 8], dilation_rates=[1, 2], num_key_value_heads=2,
                         is_causal=False)
    model = tiny_model(config)
    for layer in model.model.layers:
        layer.self_attn.is_causal = False
    x = torch.randint(1, VOCAB, (2, 13))
    pattern = DilatedPattern(config.segment_lengths, config.dilation_rates)
    bias = count_matrix(pattern, 13, 4).log().unsqueeze(0)  # (1, H, N, N), not causal
    with torch.no_grad():
        got = model(x).logits
        ref = with_impl(model, "eager")(x, attention_mask=bias).logits
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
        mask = torch.ones_like(x)
        mask[1, 9:] = 0
        padded = model(x, attention_mask=mask).logits
        torch.testing.assert_close(padded[1, :9], model(x[1:, :9]).logits[0], atol=1e-10,
                                   rtol=0)
        torch.testing.assert_close(padded[0], got[0], atol=1e-10, rtol=0)


def test_gradients_match_eager_with_the_pattern_as_bias():
    config = tiny_config(segment_lengths=[4, 8], dilation_rates=[1, 2], num_key_value_heads=2)
    model = tiny_model(config).train()
    ref = with_impl(model, "eager").train()
    x = torch.randint(1, VOCAB, (2, 14))
    model(x, labels=x).loss.backward()
    ref(x, labels=x, attention_mask=pattern_bias(config, 14)).loss.backward()
    for (name, p), p_ref in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, atol=1e-6, rtol=1e-5, msg=name)


def test_no_future_token_leaks():
    config = tiny_config(segment_lengths=[4, 8], dilation_rates=[1, 2])
    model = tiny_model(config)
    x = torch.randint(1, VOCAB, (1, 17))
    with torch.no_grad():
        base = model(x).logits
        for t in (0, 5, 11, 16):
            y = x.clone()
            y[0, t] = (y[0, t] + 1) % VOCAB
            out = model(y).logits
            assert torch.equal(out[:, :t], base[:, :t]), t
            assert (out[:, t] - base[:, t]).abs().max() > 0


def test_cached_logits_equal_full_recomputation():
    config = tiny_config(segment_lengths=[3, 8, 16], dilation_rates=[1, 2, 4],
                         num_key_value_heads=2)
    model = tiny_model(config)
    x = torch.randint(1, VOCAB, (2, 20))
    with torch.no_grad():
        full = model(x).logits
        out = model(x[:, :9], use_cache=True)
        parts, cache = [out.logits], out.cache
        for a, b in ((9, 10), (10, 13), (13, 14), (14, 20)):  # one token and chunks
            out = model(x[:, a:b], cache=cache, use_cache=True)
            parts.append(out.logits)
            cache = out.cache
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-10, rtol=0)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_generate_with_and_without_cache_agree(cache):
    config = tiny_config(segment_lengths=[3, 8], dilation_rates=[1, 2])
    model = tiny_model(config)
    x = torch.randint(1, VOCAB, (2, 7))
    kw = dict(max_new_tokens=12, do_sample=False, attention_mask=torch.ones_like(x),
              output_logits=True, return_dict_in_generate=True)
    extra = {"cache_implementation": "static"} if cache == "static" else {}
    with torch.no_grad():
        cached = model.generate(x, use_cache=True, **kw, **extra)
        uncached = model.generate(x, use_cache=False, **kw)
    assert cached.sequences.shape == (2, 19)
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(torch.stack(cached.logits), torch.stack(uncached.logits),
                               atol=1e-10, rtol=0)


def test_right_padding_gives_each_sequence_its_own_outputs():
    config = tiny_config(segment_lengths=[3, 8], dilation_rates=[1, 2], num_key_value_heads=2)
    model = tiny_model(config)
    lengths = (15, 9)
    seqs = [torch.randint(1, VOCAB, (1, n)) for n in lengths]
    x = torch.zeros(2, 15, dtype=torch.long)
    mask = torch.zeros(2, 15, dtype=torch.long)
    for i, (s, n) in enumerate(zip(seqs, lengths)):
        x[i, :n], mask[i, :n] = s[0], 1
    with torch.no_grad():
        batch = model(x, attention_mask=mask).logits
        for i, (s, n) in enumerate(zip(seqs, lengths)):
            torch.testing.assert_close(batch[i, :n], model(s).logits[0], atol=1e-10, rtol=0)


def test_left_padding_with_position_ids_gives_each_sequence_its_own_outputs():
    config = tiny_config(segment_lengths=[3, 8], dilation_rates=[1, 2])
    model = tiny_model(config)
    lengths = (13, 6)
    seqs = [torch.randint(1, VOCAB, (1, n)) for n in lengths]
    x = torch.zeros(2, 13, dtype=torch.long)
    mask = torch.zeros(2, 13, dtype=torch.long)
    for i, (s, n) in enumerate(zip(seqs, lengths)):
        x[i, 13 - n:], mask[i, 13 - n:] = s[0], 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        batch = model(x, attention_mask=mask, position_ids=pos).logits
        for i, (s, n) in enumerate(zip(seqs, lengths)):
            torch.testing.assert_close(batch[i, 13 - n:], model(s).logits[0], atol=1e-10, rtol=0)


def test_left_padded_batch_generates_what_each_prompt_generates_alone():
    config = tiny_config(segment_lengths=[3, 8], dilation_rates=[1, 2], num_key_value_heads=2)
    model = tiny_model(config)
    prompts = [torch.randint(1, VOCAB, (1, n)) for n in (8, 5)]
    x = torch.zeros(2, 8, dtype=torch.long)
    mask = torch.zeros(2, 8, dtype=torch.long)
    for i, p in enumerate(prompts):
        x[i, 8 - p.shape[1]:], mask[i, 8 - p.shape[1]:] = p[0], 1
    kw = dict(max_new_tokens=10, do_sample=False, output_logits=True,
              return_dict_in_generate=True)
    with torch.no_grad():
        batch = model.generate(x, attention_mask=mask, **kw)
        for i, p in enumerate(prompts):
            alone = model.generate(p, attention_mask=torch.ones_like(p), **kw)
            assert torch.equal(batch.sequences[i, 8:], alone.sequences[0, p.shape[1]:]), i
            torch.testing.assert_close(torch.stack(batch.logits)[:, i],
                                       torch.stack(alone.logits)[:, 0], atol=1e-10, rtol=0)


def test_attention_dropout_applies_only_in_training():
    config = tiny_config(attention_dropout=0.5)
    model = tiny_model(config)
    x = torch.randint(1, VOCAB, (1, 11))
    with torch.no_grad():
        eval_a, eval_b = model(x).logits, model(x).logits
        model.train()
        train_a, train_b = model(x).logits, model(x).logits
    assert torch.equal(eval_a, eval_b)
    assert not torch.equal(train_a, train_b)
    assert torch.isfinite(train_a).all()


def test_training_steps_reduce_the_loss():
    config = tiny_config(num_key_value_heads=2)
    model = tiny_model(config, torch.float32).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randint(1, VOCAB, (4, 24))
    losses = []
    for _ in range(8):
        loss = model(x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5


def test_unsupported_masks_raise():
    config = tiny_config()
    model = tiny_model(config)
    x = torch.randint(1, VOCAB, (1, 6))
    with pytest.raises(ValueError, match="2-D"):
        model(x, attention_mask=torch.zeros(1, 1, 6, 6, dtype=torch.float64))
    packed = torch.tensor([[0, 1, 2, 0, 1, 2]])  # two sequences in one row
    with pytest.raises(ValueError, match="packed"):
        model(x, position_ids=packed, use_cache=False)


@pytest.mark.parametrize("kwarg", [{"sliding_window": 4}, {"softcap": 30.0},
                                   {"output_attentions": True}])
def test_unsupported_attention_arguments_raise(kwarg):
    model = tiny_model(tiny_config())
    attn = model.model.layers[0].self_attn
    q = torch.randn(1, 4, 5, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match=next(iter(kwarg)).split("_")[0]):
        longnet.hf.dilated_attention_forward(attn, q, q, q, None, **kwarg)


def test_sliding_window_model_raises():
    mistral = pytest.importorskip("transformers.models.mistral")
    config = mistral.MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                                   num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=2, sliding_window=4,
                                   segment_lengths=[4], dilation_rates=[1])
    model = mistral.MistralForCausalLM(config).eval()
    model.set_attn_implementation("dilated")
    with pytest.raises(ValueError, match="sliding"):
        model(torch.randint(1, VOCAB, (1, 6)))


@pytest.mark.slow
def test_example_script_learns_to_continue_the_sequence():
    script = os.path.join(os.path.dirname(SRC), "examples", "hf_llama_dilated.py")
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr
    assert "generated [10, 11, 12, 13, 14" in res.stdout, res.stdout
