"""Hugging Face causal LMs with dilated attention on several processes, as LongNet models run.

A tiny Llama (GQA, float64) wrapped in :class:`HFCausalLM`, on gloo:

* sequence parallel (``sequence_parallel(model, group)``, each rank a chunk of every sequence):
  logits, loss and every parameter gradient equal one process on the full sequences, for 2 and 4
  ranks, a pattern with branches local to a rank and spanning 2 and 4 ranks, a single dense
  branch, Mistral and Qwen2 (tied embeddings), and with gradient checkpointing; a bare
  transformers model with the chunk's ``position_ids`` gives the same logits;
* FSDP2 (``fully_shard_model`` over the decoder layers, tied embeddings) over 2 data-parallel
  ranks and over 2 sequence-parallel ranks, and DDP (``data_parallel``) over 2 ranks: one AdamW
  step gives the weights of one process;
* what cannot run sequence parallel is refused with a ``ValueError`` on every rank;
* ``longnet.integrations.hf_cache`` and ``longnet.integrations.transformers`` import each other in
  no way (their shared pieces live in ``hf_pattern``).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers", minversion="5")

from transformers import (  # noqa: E402
    DynamicCache,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import longnet.hf  # noqa: E402
from longnet.integrations.hf_train import HFCausalLM, decoder_layers  # noqa: E402
from longnet.ops.pattern import DilatedPattern  # noqa: E402
from longnet.parallel import CommCounter, run_workers, sequence_parallel, shard_sequence  # noqa: E402
from longnet.parallel.mesh import (  # noqa: E402
    all_reduce_gradients,
    build_mesh,
    data_parallel,
    global_token_count,
    reduce_loss,
)

V, B, N = 97, 2, 64
PATTERN = ([16, 32, 64], [1, 2, 4])  # P=2: local, local, 2 ranks; P=4: local, 2 ranks, 4 ranks
DENSE = ([64], [1])  # one dense branch over the whole sequence: spans every rank
SRC = Path(longnet.hf.__file__).resolve().parents[1]


def _config(pattern=PATTERN, tied=False, kind="llama"):
    config_class = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[kind]
    extra = {"llama": {}, "mistral": {"sliding_window": None}, "qwen2": {"use_sliding_window": False}}[kind]
    return config_class(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
                        segment_lengths=pattern[0], dilation_rates=pattern[1], tie_word_embeddings=tied,
                        pad_token_id=0, bos_token_id=1, eos_token_id=2, **extra)


def _model(pattern=PATTERN, tied=False, kind="llama", checkpointing=False) -> HFCausalLM:
    torch.manual_seed(0)
    model_class = {"llama": LlamaForCausalLM, "mistral": MistralForCausalLM, "qwen2": Qwen2ForCausalLM}[kind]
    model = HFCausalLM(model_class(_config(pattern, tied, kind))).double()
    model.config.grad_checkpointing = checkpointing
    return model


def _data():
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, V, (B, N + 1), generator=g)
    labels = tokens[:, 1:].clone()
    labels[0, 40:] = -100  # rank 1 of 2 (and ranks 2, 3 of 4) count fewer tokens than rank 0
    labels[1, :5] = -100
    return tokens[:, :-1], labels


def _reference(model):
    """Loss (mean over the labelled tokens), logits and gradients of one process."""
    inputs, labels = _data()
    out = model(inputs, labels=labels)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    return out.loss.item(), out.logits.detach(), grads


def _max_err(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


# ------------------------------------------------------------------------- sequence parallel
def _sequence_worker(rank, world, cases):
    results = []
    pm = build_mesh(1, world)
    for case in cases:
        model = _model(**case)
        ref_loss, ref_logits, ref_grads = _reference(model)
        inputs, labels = _data()
        inp, lab = (shard_sequence(t, 1, pm.sp_rank, world) for t in (inputs, labels))
        with sequence_parallel(model, pm.sp_group), CommCounter() as counter:
            attn = decoder_layers(model.model)[0].self_attn
            state = (model.sequence_rank, attn.longnet_sequence_rank, attn.longnet_attention_fn is not None)
            out = model(inp, labels=lab)
            loss = out.loss * out.num_tokens / global_token_count(out.num_tokens, pm)  # global token mean
            loss.backward()
            sent = {b: (d["forward"] > 0, d["backward"] > 0) for b, d in counter.by_branch().items()}
            all_reduce_gradients(model.parameters(), pm)
            # a bare transformers model: the caller passes the chunk's global positions
            n = inp.shape[1]
            with torch.no_grad():
                bare = model.model(input_ids=inp, position_ids=rank * n + torch.arange(n)[None],
                                   use_cache=False).logits
        after = (model.sequence_rank, attn.longnet_sequence_rank, attn.longnet_attention_fn)
        chunk = ref_logits[:, rank * n:(rank + 1) * n]
        results.append({
            "state": state, "after": after, "sent": sent,
            "logits": (out.logits - chunk).abs().max().item(),
            "bare": (bare - chunk).abs().max().item(),
            "loss": abs(reduce_loss(loss, pm).item() - ref_loss),
            "grads": _max_err({k: p.grad for k, p in model.named_parameters()}, ref_grads),
        })
    return results


def _check_sequence(per_rank, world, shared):
    """``shared``: per pattern, the branches spanning several ranks (they must communicate)."""
    for rank, rows in enumerate(per_rank):
        for row, branches in zip(rows, shared, strict=True):
            assert row["state"] == (rank, rank, True) and row["after"] == (0, 0, None)
            assert row["sent"] == {b: (True, True) for b in branches}, (world, rank, row["sent"])
            for key in ("logits", "bare", "loss", "grads"):
                assert row[key] < 1e-11, (world, rank, key, row[key])


def test_sequence_parallel_two_ranks_equals_one_process():
    cases = [{}, {"pattern": DENSE}, {"kind": "mistral"}, {"kind": "qwen2", "tied": True},
             {"checkpointing": True}]  # the model's own gradient checkpointing recomputes attention
    per_rank = run_workers(_sequence_worker, 2, cases, timeout_s=120, start_method="fork")
    _check_sequence(per_rank, 2, [[2], [0], [2], [2], [2]])


def test_sequence_parallel_four_ranks_equals_one_process():
    _check_sequence(run_workers(_sequence_worker, 4, [{}], timeout_s=120, start_method="fork"), 4, [[1, 2]])


def _refusal_worker(rank, world):
    """Every refusal happens on every rank before any collective (no rank is left waiting)."""
    errors = {}
    inp = shard_sequence(_data()[0], 1, rank, world)

    def refused(key, fn):
        try:
            fn()
        except ValueError as err:
            errors[key] = str(err)

    sdpa = LlamaForCausalLM(_config()).double()
    sdpa.set_attn_implementation("sdpa")
    refused("sdpa", lambda: sequence_parallel(sdpa).__enter__())
    dropout = LlamaForCausalLM(_config())
    dropout.config.attention_dropout = 0.1
    for layer in decoder_layers(dropout):
        layer.self_attn.attention_dropout = 0.1
    dropout = HFCausalLM(dropout)
    refused("dropout", lambda: sequence_parallel(dropout).__enter__())
    model = _model()
    bare = model.model
    with sequence_parallel(model):
        padding = torch.ones_like(inp, dtype=torch.bool)
        padding[0, 0] = False
        refused("padding", lambda: bare(input_ids=inp, attention_mask=padding, use_cache=False))
        refused("dilated cache", lambda: bare(input_ids=inp, cache=longnet.hf.DilatedCache(bare.config)))
        cache = DynamicCache(config=bare.config)
        with torch.no_grad():
            bare(input_ids=inp, cache=cache, use_cache=True, position_ids=rank * inp.shape[1] + torch.arange(inp.shape[1])[None])
        refused("decoding", lambda: bare(input_ids=inp[:, :1], cache=cache, use_cache=True))
    return errors


def test_what_cannot_run_sequence_parallel_is_refused_on_every_rank():
    for errors in run_workers(_refusal_worker, 2, timeout_s=120, start_method="fork"):
        assert "'sdpa'" in errors["sdpa"] and "set_attn_implementation('dilated')" in errors["sdpa"]
        assert "attention_dropout = 0.0" in errors["dropout"]
        assert "padding attention_mask" in errors["padding"]
        assert "KV cache" in errors["dilated cache"] and "KV cache" in errors["decoding"]


def test_wrong_positions_are_refused_under_sequence_parallelism():
    """One process, the attributes set by hand: rank 1 must get positions n + arange(n)."""
    longnet.hf.register()
    model = _model()
    calls = []
    for layer in decoder_layers(model.model):
        layer.self_attn.longnet_attention_fn = lambda q, k, v, **kw: calls.append(kw) or torch.zeros_like(q)
        layer.self_attn.longnet_sequence_rank = 1
    inp = _data()[0][:, :32]
    with pytest.raises(ValueError, match=r"position_ids start at 0: pass position_ids = 32 \+ arange\(32\)"):
        model.model(input_ids=inp, use_cache=False)
    model.sequence_rank = 1  # what parallelize_sequence sets: the adapter passes the positions
    model(inp)
    assert len(calls) == 2 and calls[0]["is_causal"] and calls[0]["enable_gqa"]
    assert calls[0]["segment_lengths"].segment_lengths == tuple(PATTERN[0])


# ------------------------------------------------------------------------------ FSDP and DDP
def _adamw_reference(tied):
    model = _model(tied=tied)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    inputs, labels = _data()
    loss = model(inputs, labels=labels).loss
    loss.backward()
    opt.step()
    return loss.item(), {k: v.detach().clone() for k, v in model.state_dict().items()}


def _step(model, forward, pm, tied):
    """One AdamW step of this rank's rows and chunk; the global loss."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    inputs, labels = _data()
    b = B // pm.dp
    rows = slice(pm.dp_rank * b, (pm.dp_rank + 1) * b)
    inp, lab = (shard_sequence(t[rows], 1, pm.sp_rank, pm.sp) for t in (inputs, labels))
    with sequence_parallel(model, pm.sp_group):
        out = forward(inp, labels=lab)
    loss = out.loss * out.num_tokens / global_token_count(out.num_tokens, pm)
    loss.backward()
    opt.step()
    return reduce_loss(loss, pm).item()


def _fsdp_worker(rank, world, shapes):
    from longnet.parallel.fsdp import full_model_state, fully_shard_model, is_sharded

    ref_loss, ref_state = _adamw_reference(tied=True)
    results = []
    for dp, sp in shapes:
        pm = build_mesh(dp, sp)
        model = _model(tied=True)
        fully_shard_model(model, pm, reduce_dtype=torch.float64)
        sharded = [is_sharded(block) for block in model.blocks] + [is_sharded(model)]
        tied = model.model.lm_head.weight is model.model.model.embed_tokens.weight
        loss = _step(model, model, pm, True)
        state = full_model_state(model)
        err = _max_err(state, ref_state) if rank == 0 else 0.0
        results.append(((dp, sp), all(sharded), tied, abs(loss - ref_loss), err))
    return results


def test_fsdp2_step_equals_one_process():
    shapes = [(2, 1), (1, 2)]  # data parallel, and sharded over the two ranks of one sequence
    per_rank = run_workers(_fsdp_worker, 2, shapes, timeout_s=120, start_method="fork")
    for rank, rows in enumerate(per_rank):
        assert [r[0] for r in rows] == shapes
        for shape, sharded, tied, loss_err, weight_err in rows:
            assert sharded and tied, (rank, shape)
            assert loss_err < 1e-12 and weight_err < 1e-12, (rank, shape, loss_err, weight_err)


def _ddp_worker(rank, world):
    ref_loss, ref_state = _adamw_reference(tied=False)
    pm = build_mesh(2, 1)
    model = _model()
    with torch.no_grad():  # replicas differ until DDP's broadcast
        for p in model.parameters():
            p.add_(rank)
    loss = _step(model, data_parallel(model, pm), pm, False)
    return abs(loss - ref_loss), _max_err({k: v.detach() for k, v in model.state_dict().items()}, ref_state)


def test_ddp_step_equals_one_process():
    for rank, (loss_err, weight_err) in enumerate(run_workers(_ddp_worker, 2, timeout_s=120,
                                                              start_method="fork")):
        assert loss_err < 1e-12 and weight_err < 1e-12, (rank, loss_err, weight_err)


def test_blocks_are_the_decoder_layers():
    model = _model()
    assert model.blocks is model.model.model.layers and len(model.blocks) == 2


def test_configs_give_the_pattern_to_split_over_ranks():
    """``pattern()`` / ``shift_segments`` as a LongNetConfig: the split checks read HF runs too."""
    from longnet.integrations.hf_train import HFRunConfig
    from longnet.parallel.layout import place_branches

    model = _model()
    run = HFRunConfig("llama", model.model.config)
    assert run.pattern() == model.config.pattern() == DilatedPattern(*PATTERN)
    assert not run.shift_segments and not model.config.shift_segments
    assert [pl.local for pl in place_branches(run.pattern(), N, 4)] == [True, False, False]
    with pytest.raises(ValueError, match="divide"):
        place_branches(HFRunConfig("x", _config(([48], [1]))).pattern(), N, 2)


# --------------------------------------------------------------------------------- imports
def _imports(path: Path) -> set[str]:
    """longnet modules a file imports, at any level (inside functions too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return {name for name in found if name.startswith("longnet")}


def test_no_import_circle_between_the_transformers_modules():
    modules = ["longnet.hf", "longnet.integrations.transformers", "longnet.integrations.hf_cache",
               "longnet.integrations.hf_pattern", "longnet.integrations.hf_train",
               "longnet.integrations.hf_parallel", "longnet.parallel.sequence"]
    graph = {m: _imports(SRC / (m.replace(".", "/") + ".py")) & set(modules) for m in modules}

    def reaches(start, goal, seen=()):
        return any(d == goal or (d not in seen and reaches(d, goal, (*seen, d))) for d in graph[start])

    assert [m for m in modules if reaches(m, m)] == []
    assert graph["longnet.integrations.hf_pattern"] == set()
    # the cache module alone first, in a fresh interpreter (the other order is every other test's)
    code = ("import longnet.integrations.hf_cache as cache; import longnet.integrations.transformers as tf; "
            "assert cache.is_dilated_implementation(tf.register()) and tf.registered_names() == ['dilated']")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
