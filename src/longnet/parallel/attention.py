"""Sequence-parallel dilated attention (LongNet, section 3): exact, constant communication per rank.

Each rank of ``group`` holds one contiguous chunk of ``n`` positions. Per branch (see
:mod:`longnet.parallel.layout`):

* local branches (segments inside a chunk) run the single-device operator on the chunk;
* remote branches (segments spanning ``s`` chunks): every rank keeps, per (key/value head,
  residue) pair, the ``ceil(n / r)`` slots of its chunk at that residue, all-gathers
  ``[k | v (| padding column)]`` once within the ``s`` ranks of its segment, and its local queries
  attend to the gathered rows with a mask built from their true positions (causal, padding,
  slots past a chunk's end). With ``is_causal`` only the rows of ranks up to this one are used.

All branches merge by log-sum-exp. Backward evaluates each branch's kernel backward with the merged
output and log-sum-exp (the exact-merge identity, docs/design.md "Backward"); the gradients of the
gathered rows go back to their owners with one reduce-scatter per remote branch, in the same
branch order on every rank. Communication per rank and branch is
``(s - 1) * batch * pairs * ceil(n / r) * (2 D) * bytes``: independent of ``N`` for a fixed chunk.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from longnet.ops.backends import get_backend
from longnet.ops.dilated import (
    _check_scalar_args,
    check_attention_inputs,
    dilated_attention_backward,
    dilated_attention_forward,
)
from longnet.ops.merge import acc_dtype, merge_partials
from longnet.ops.pattern import DilatedPattern
from longnet.parallel import comm
from longnet.parallel.layout import BranchPlacement, kv_pairs, place_branches, residue_slots

__all__ = ["dilated_attention"]

_NEG_INF = float("-inf")


@dataclass
class _Setup:
    """Everything about one call that is not a tensor."""

    group: object
    ranks: tuple[int, ...]  # global ranks of ``group``, in group order
    me: int  # rank inside ``group``
    world: int
    chunk: int  # n
    placements: list[BranchPlacement]
    local_pattern: DilatedPattern | None  # the local branches, segments as min(w, N)
    is_causal: bool
    scale: float
    backend: str


class _Remote:
    """Index tensors of one remote branch on this rank (no communication happens here)."""

    def __init__(self, pl: BranchPlacement, s: _Setup, H: int, Hkv: int, padded: bool, device):
        members = pl.group_of(s.me, s.world)
        self.tag = f"branch {pl.branch}"
        self.size = len(members)
        self.t = s.me - members[0]  # my index among the members
        # held weakly: a cache entry must never keep a destroyed group alive (see longnet.parallel.comm)
        self._pg = (comm.GroupRef(comm.subgroup(tuple(s.ranks[i] for i in members), s.group))
                    if self.size > 1 else None)
        n, r = s.chunk, pl.dilation
        self.chunk = n
        m = self.slots = residue_slots(n, r)
        pairs, head_pair = kv_pairs(H, Hkv, r)
        self.pair_kv = torch.tensor([g for g, _ in pairs], device=device)  # (U,)
        rho = torch.tensor([x for _, x in pairs], device=device).view(-1, 1, 1)  # (U, 1, 1)
        self.head_pair = torch.tensor(head_pair, device=device)  # (H,)
        # slot j of member i for pair (g, rho): position i*n + ((rho - i*n) mod r) + j*r of the
        # segment; valid while inside member i's chunk
        off = torch.arange(self.size, device=device).view(1, -1, 1) * n  # (1, s, 1)
        branch = DilatedPattern([pl.segment], [r])  # the selection rule of this branch
        first = branch.next_kept_offset(0, off, rho)  # (U, s, 1)
        rel = first + torch.arange(m, device=device).view(1, 1, m) * r  # (U, s, m)
        valid = rel < n
        kpos = off + rel  # (U, s, m) position in the segment
        self.send_pos = torch.where(valid[:, self.t], rel[:, self.t], 0)  # (U, m) local
        self.send_valid = valid[:, self.t]  # (U, m)
        keys = (self.t + 1) * m if s.is_causal else self.size * m  # later ranks: all masked
        self.keys, self.causal = keys, s.is_causal
        self.kpos = kpos.reshape(len(pairs), -1)[:, :keys]  # (U, S) position in the segment
        self.kvalid = valid.reshape(len(pairs), -1)[:, :keys]  # (U, S)
        self.q_pos = self.send_pos[self.head_pair]  # (H, m) local positions of my queries
        self.q_valid = self.send_valid[self.head_pair]  # (H, m)
        self.out_idx = torch.where(self.q_valid, self.q_pos, n)  # (H, m), n = trash row
        # every slot real and no padding: no mask at all (causal: earlier ranks' rows in full,
        # my own rows as a causal square block, since my queries and keys share their slots)
        self.unmasked = n % r == 0 and not padded

    @property
    def pg(self):
        return None if self._pg is None else self._pg.get()

    @property
    def alive(self) -> bool:
        """False once the group of this branch was destroyed (the entry must be rebuilt)."""
        return self._pg is None or self._pg.alive

    def calls(self, gathered: torch.Tensor, padded: bool, dtype) -> list[tuple]:
        """The kernel calls of this branch: ``(k0, k1, mask, is_causal, empty)`` each.

        Keys ``[k0, k1)`` of the gathered rows, an additive mask (B or 1, H, m, k1 - k0) or None,
        and the rows that have no key at all (or None when every row has one).
        """
        if self.unmasked:
            if not self.causal:
                return [(0, self.keys, None, False, None)]
            own = self.t * self.slots
            earlier = [(0, own, None, False, None)] if own else []
            return earlier + [(own, self.keys, None, True, None)]
        H, m = self.q_pos.shape
        ok = self.kvalid[self.head_pair].unsqueeze(1).expand(H, m, self.keys)  # (H, m, S)
        if self.causal:
            q_seg = (self.t * self.chunk + self.q_pos).unsqueeze(-1)  # (H, m, 1)
            ok = ok & (self.kpos[self.head_pair].unsqueeze(1) <= q_seg)
        ok = ok.unsqueeze(0)  # (1, H, m, S)
        if padded:  # padding column of the gathered rows: 1 = real token
            real = gathered[:, self.head_pair, :, -1] > 0.5  # (B, H, S)
            ok = ok & real.unsqueeze(2)
        add = torch.zeros(ok.shape, dtype=dtype, device=ok.device).masked_fill_(~ok, _NEG_INF)
        empty = ~ok.any(-1) | ~self.q_valid
        return [(0, self.keys, add, False, empty)]

    def send(self, key, value, key_padding_mask) -> torch.Tensor:
        """(B, U, m, 2D (+1)): this rank's residue rows of ``[k | v (| mask)]``."""
        g, pos = self.pair_kv.unsqueeze(1), self.send_pos
        parts = [key[:, g, pos], value[:, g, pos]]  # (B, U, m, D) each
        if key_padding_mask is not None:
            parts.append(key_padding_mask[:, pos].unsqueeze(-1).to(key.dtype))
        rows = torch.cat(parts, -1)
        return rows * self.send_valid.unsqueeze(-1).to(rows.dtype)

    def queries(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, m, ...) rows of a per-query tensor (B, H, n, ...) at my queries' positions."""
        return x[:, torch.arange(x.shape[1], device=x.device).unsqueeze(1), self.q_pos]

    def kv(self, gathered: torch.Tensor, D: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per query head keys and values (B, H, S, D) from the gathered rows."""
        per_head = gathered[:, self.head_pair]
        return per_head[..., :D].contiguous(), per_head[..., D:2 * D].contiguous()


_REMOTE_CACHE: dict[tuple, _Remote] = comm.group_bound_cache()


def _remote(pl: BranchPlacement, s: _Setup, H: int, Hkv: int, padded: bool, device) -> _Remote:
    """The cached :class:`_Remote` of this branch and call signature (built once per process)."""
    key = (pl, s.ranks, s.me, s.chunk, s.is_causal, H, Hkv, padded, str(device))
    rb = _REMOTE_CACHE.get(key)
    if rb is None or not rb.alive:
        if len(_REMOTE_CACHE) >= 256:
            _REMOTE_CACHE.clear()
        rb = _REMOTE_CACHE[key] = _Remote(pl, s, H, Hkv, padded, device)
    return rb


def _merge(o_acc, l_acc, idx, ob, lb):
    """Merge branch rows (B, H, m, D)/(B, H, m) into the accumulators at positions idx (H, m)."""
    B, H, m, D = ob.shape
    idx3 = idx.unsqueeze(0).expand(B, H, m)
    idx4 = idx3.unsqueeze(-1).expand(B, H, m, D)
    o, new_l = merge_partials(o_acc.gather(2, idx4), l_acc.gather(2, idx3), ob, lb)
    o_acc.scatter_(2, idx4, o)
    l_acc.scatter_(2, idx3, new_l)


def _add_rows(x, heads, pos, rows) -> None:
    """x[:, heads[i], pos[i, j]] += rows[:, i, j] for x (B, Hx, n, D), duplicates accumulated."""
    B, Hx, n, D = x.shape
    flat = (heads * n + pos).reshape(-1)
    x.view(B, Hx * n, D).index_add_(1, flat, rows.reshape(B, -1, D))


class _SequenceParallelAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, key, value, key_padding_mask, s: _Setup):
        B, H, n, D = query.shape
        Hkv = key.shape[1]
        acc = acc_dtype(query.dtype)
        o_acc = torch.zeros(B, H, n + 1, D, dtype=acc, device=query.device)  # row n: trash
        l_acc = torch.full((B, H, n + 1), _NEG_INF, dtype=acc, device=query.device)
        local_aux = None
        if s.local_pattern is not None:
            out, lse, local_aux = dilated_attention_forward(
                query, key, value, s.local_pattern, is_causal=s.is_causal, scale=s.scale,
                key_padding_mask=key_padding_mask, backend=s.backend)
            o_acc[:, :, :n] = out
            l_acc[:, :, :n] = lse
        remotes, gathered, auxes = [], [], []
        padded = key_padding_mask is not None
        for pl in s.placements:
            if pl.local:
                continue
            rb = _remote(pl, s, H, Hkv, padded, query.device)
            rows = rb.send(key, value, key_padding_mask)  # (B, U, m, C)
            allg = comm.all_gather(rows, rb.pg, rb.size, tag=rb.tag, phase="forward")
            U, m, C = rows.shape[1:]
            g = allg.permute(1, 2, 0, 3, 4).reshape(B, U, rb.size * m, C)[:, :, :rb.keys]
            g = g.contiguous()  # (B, U, S, C)
            qb = rb.queries(query)  # (B, H, m, D)
            kb, vb = rb.kv(g, D)  # (B, H, S, D)
            call_aux = []
            for k0, k1, mask, causal, empty in rb.calls(g, padded, query.dtype):
                be = get_backend(s.backend, qb, has_mask=mask is not None)
                ob, lb, aux = be.forward(qb, kb[:, :, k0:k1].contiguous(),
                                         vb[:, :, k0:k1].contiguous(), mask, causal, s.scale)
                lb, ob = lb.to(acc), ob.to(acc)
                if empty is not None:
                    lb = lb.masked_fill(empty, _NEG_INF)
                    ob = ob.masked_fill(empty.unsqueeze(-1), 0.0)
                _merge(o_acc, l_acc, rb.out_idx, ob, lb)
                call_aux.append(aux)
            auxes.append(call_aux)
            remotes.append(rb)
            gathered.append(g)
        out = o_acc[:, :, :n].to(query.dtype, memory_format=torch.contiguous_format)
        lse = l_acc[:, :, :n].contiguous()
        ctx.save_for_backward(query, key, value, key_padding_mask, out, lse, *gathered)
        # the graph keeps no reference to a process group (backward reaches them weakly, via remotes)
        ctx.setup = dataclasses.replace(s, group=None)
        ctx.remotes, ctx.auxes, ctx.local_aux = remotes, auxes, local_aux
        ctx.set_materialize_grads(False)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, kpm, out, lse, *gathered = ctx.saved_tensors
        s: _Setup = ctx.setup
        B, H, n, D = query.shape
        Hkv = key.shape[1]
        acc = acc_dtype(query.dtype)
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        if s.local_pattern is not None:
            d_q, d_k, d_v = dilated_attention_backward(
                grad_out, query, key, value, out, lse, s.local_pattern, is_causal=s.is_causal,
                scale=s.scale, key_padding_mask=kpm, backend=s.backend, aux=ctx.local_aux)
            d_q, d_k, d_v = (t.to(acc).contiguous() for t in (d_q, d_k, d_v))
        else:
            d_q = torch.zeros(B, H, n, D, dtype=acc, device=query.device)
            d_k = torch.zeros(B, Hkv, n, D, dtype=acc, device=query.device)
            d_v = torch.zeros_like(d_k)
        # rows with no key at all: lse = +inf makes every probability exactly 0
        lse_b = torch.where(torch.isfinite(lse), lse, torch.full_like(lse, float("inf")))
        heads = torch.arange(H, device=query.device).unsqueeze(1)  # (H, 1)
        for rb, g, call_aux in zip(ctx.remotes, gathered, ctx.auxes):
            qb = rb.queries(query)
            kb, vb = rb.kv(g, D)
            ob = rb.queries(out)
            valid = rb.q_valid.unsqueeze(0)  # (1, H, m)
            dob = rb.queries(grad_out) * valid.unsqueeze(-1).to(grad_out.dtype)
            lb = rb.queries(lse_b).masked_fill(~valid, float("inf"))
            U, m = rb.send_pos.shape
            # per-head key gradients -> per (kv head, residue) pair, padded to every member
            d_rows = torch.zeros(B, U, rb.size * m, 2 * D, dtype=acc, device=query.device)
            for (k0, k1, mask, causal, _), aux in zip(rb.calls(g, kpm is not None, query.dtype),
                                                      call_aux):
                be = get_backend(s.backend, qb, has_mask=mask is not None)
                dqb, dkb, dvb = be.backward(dob, qb, kb[:, :, k0:k1].contiguous(),
                                            vb[:, :, k0:k1].contiguous(), ob, lb, aux, mask,
                                            causal, s.scale)
                _add_rows(d_q, heads, rb.q_pos, dqb.to(acc))
                d_rows[:, :, k0:k1, :D].index_add_(1, rb.head_pair, dkb.to(acc))
                d_rows[:, :, k0:k1, D:].index_add_(1, rb.head_pair, dvb.to(acc))
            d_rows = d_rows.view(B, U, rb.size, m, 2 * D).permute(2, 0, 1, 3, 4)
            mine = comm.reduce_scatter(d_rows, rb.pg, rb.size, tag=rb.tag, phase="backward")
            mine = mine * rb.send_valid.unsqueeze(-1).to(acc)  # (B, U, m, 2D)
            _add_rows(d_k, rb.pair_kv.unsqueeze(1), rb.send_pos, mine[..., :D])
            _add_rows(d_v, rb.pair_kv.unsqueeze(1), rb.send_pos, mine[..., D:])
        return (d_q.to(query.dtype), d_k.to(key.dtype), d_v.to(value.dtype), None, None)


def _check_chunks(query, key, key_padding_mask, is_causal, group, world) -> None:
    """All ranks: same shapes and flags, else the same ``ValueError`` on every rank."""
    B, H, n, D = query.shape
    meta = torch.tensor([B, H, key.shape[1], n, D, int(key_padding_mask is not None),
                         int(is_causal)], dtype=torch.int64, device=query.device)
    allm = comm.all_gather(meta, group, world, tag="check", phase="forward").tolist()
    if any(row != allm[0] for row in allm):
        names = ("batch", "heads", "kv_heads", "chunk length", "head dim", "padding mask",
                 "is_causal")
        diffs = [f"{name}: {[row[i] for row in allm]}" for i, name in enumerate(names)
                 if len({row[i] for row in allm}) > 1]
        raise ValueError("sequence-parallel ranks must pass equal chunks (N = ranks * n) and "
                         "the same arguments; per rank " + "; ".join(diffs))


def dilated_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, segment_lengths,
    dilation_rates=None, is_causal: bool = False, scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None, enable_gqa: bool = False, group=None,
    backend: str = "auto", check_chunks: bool = True,
) -> torch.Tensor:
    """Dilated attention over a sequence split across the ranks of ``group``.

    Same arguments and meaning as :func:`longnet.dilated_attention`, but each rank passes its
    chunk: rank ``i`` of ``group`` holds positions ``[i*n, (i+1)*n)`` of query, key, value
    (B, H or Hkv, n, D) and of ``key_padding_mask`` (B, n); it gets back its chunk (B, H, n, D) of
    the single-device result, with exact gradients for its local query, key and value.

    Args:
        group: the ranks sharing the sequence (default: the world), all calling with equal chunks.
        backend: kernel family as in :func:`longnet.dilated_attention`.
        check_chunks: verify (one all-gather of 7 integers per rank over ``group``) that every
            rank passes the same shapes and flags; a mismatch raises the same ``ValueError`` on
            every rank. Turn off to keep communication strictly constant as the world grows.

    Raises:
        ValueError: a branch whose segment length (``min(w, N)``) and the chunk length ``n``
            do not divide one another (segments must fit in a chunk or span whole chunks),
            unequal chunks, or the checks of :func:`longnet.dilated_attention`.
        RuntimeError: ``torch.distributed`` is not initialized.

    Every rank of ``group`` must make the same calls in the same order, and backpropagate
    through every output it got (a zero gradient is fine): backward runs one reduce-scatter per
    shared branch. Dropout and ``return_lse`` are not supported here.
    """
    pattern = DilatedPattern.coerce(segment_lengths, dilation_rates)
    check_attention_inputs(query, key, value, key_padding_mask, enable_gqa=enable_gqa)
    _check_scalar_args(scale, 0.0, is_causal)
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("longnet.parallel.dilated_attention needs torch.distributed: launch "
                           "with torchrun and call longnet.parallel.init_distributed() first")
    group = dist.group.WORLD if group is None else group
    ranks = tuple(dist.get_process_group_ranks(group))
    world, me = len(ranks), dist.get_rank(group)
    if me < 0:
        raise ValueError("this rank is not a member of group")
    if check_chunks:
        _check_chunks(query, key, key_padding_mask, is_causal, group, world)
    n = query.shape[2]
    placements = place_branches(pattern, n * world, world)
    local = [pl for pl in placements if pl.local]
    local_pattern = (DilatedPattern([pl.segment for pl in local], [pl.dilation for pl in local])
                     if local else None)
    setup = _Setup(group, ranks, me, world, n, placements, local_pattern, is_causal,
                   1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale), backend)
    return _SequenceParallelAttention.apply(query, key, value, key_padding_mask, setup)
