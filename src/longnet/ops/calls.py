"""How one branch of dilated attention becomes a few dense-kernel calls on strided views.

Branch ``(w, r)`` at length ``N`` keeps, for head ``h``, the positions at residue ``c = h % r``
of every segment (:meth:`DilatedPattern.residue`). Query heads ``h0, h0 + s, h0 + 2s, ...`` with
``s = lcm(r, g)`` (``g = H / Hkv``, the GQA group) share one residue and read the key/value heads
``h0 // g + t * s / g``: both are a strided selection of the head dimension. So for such a head
set the rows of the full segments are one strided view (B, heads, segments, slots, D) of the
input, and the short tail segment a second one. Nothing is gathered or copied.

Dense kernels take 4-D inputs (batch, heads, rows, D) with any strides but the last, so the three
leading dimensions (batch, heads, segments) must fold into two. A fold of two dimensions is a
view when their strides compose; :func:`plan_branch` picks a fold that is a view for every tensor
the call touches (inputs, accumulators, gradients), or splits the head set into single heads when
none is. On CUDA a branch is thus ``min(lcm(r, g), H)`` calls for the full segments plus as many
for a tail, with heads batched inside each call; on CPU the full segments are further cut into
calls of at most :data:`CPU_CALL_BYTES` of output rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from longnet.ops.merge import NEG_INF, acc_dtype, merge_partials
from longnet.ops.pattern import DilatedPattern

__all__ = ["KernelCall", "plan_branch", "alloc_like", "CPU_CALL_BYTES"]

# On CPU a call covers at most this many bytes of output rows: buffers below glibc's 32 MiB mmap
# threshold are reused from the heap from one call to the next, while larger ones are fresh pages
# every time, and first-touching them (~1.4 GB/s on the 2-core test machine) made N = 128K 17%
# slower per FLOP than N = 32K. Splitting the full segments over several calls is exact.
CPU_CALL_BYTES = 8 << 20


def alloc_like(ref: torch.Tensor, shape, dtype, fill=None) -> torch.Tensor:
    """A new tensor of ``shape`` (``ref``'s leading dims, maybe fewer trailing) whose leading
    dimensions are laid out in ``ref``'s stride order, so that views that fold ``ref``'s
    dimensions fold this tensor's too."""
    lead = 3
    order = sorted(range(lead), key=lambda d: (-ref.stride(d), d))
    phys = [shape[d] for d in order] + list(shape[lead:])
    t = torch.empty(phys, dtype=dtype, device=ref.device)
    if fill is not None:
        t.fill_(fill)
    inv = [order.index(d) for d in range(lead)] + list(range(lead, len(shape)))
    return t.permute(inv)


def _foldable(t: torch.Tensor, outer: int, inner: int) -> bool:
    return t.size(outer) == 1 or t.size(inner) == 1 or t.stride(outer) == t.size(inner) * t.stride(inner)


def _fold(views: list[torch.Tensor]) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """Two groups of the dims (0 batch, 1 heads, 2 segments) that fold into views for all ``views``
    (5-D, or 4-D for per-row tensors); ``None`` when no fold works."""
    sizes = views[0].shape[:3]
    big = [d for d in range(3) if sizes[d] > 1]
    if len(big) <= 2:
        rest = [d for d in range(3) if d not in big]
        groups = [(d,) for d in big] + [(d,) for d in rest]
        return groups[0], tuple(d for g in groups[1:] for d in g)
    for outer, inner in ((0, 2), (0, 1), (1, 2), (2, 0), (1, 0), (2, 1)):
        if all(_foldable(v, outer, inner) for v in views):
            other = 3 - outer - inner
            return (outer, inner), (other,)
    return None


@dataclass(frozen=True)
class _Spec:
    """Query heads ``h0 + t * step`` (t < count) reading key/value heads ``kh0 + t * kstep``;
    positions ``start + s * seg + c + j * r`` of the segments ``s < S``."""

    h0: int
    kh0: int
    step: int
    kstep: int
    count: int
    c: int
    start: int
    S: int
    seg: int
    r: int


class KernelCall:
    """One dense-kernel call: row views of every per-query and per-key tensor, and its mask."""

    def __init__(self, spec: _Spec, fold, B: int, is_causal: bool, key_padding_mask, dtype,
                 rows: slice | None = None):
        self.spec, self.fold, self.rows = spec, fold, rows
        if rows is not None:  # this call covers only these batch rows
            B = 1
        self.mask = self.empty = None
        if key_padding_mask is not None:
            ok5 = self._five(key_padding_mask.unsqueeze(1), 0, 1, 1)  # (B, 1, S, m)
            ok5 = ok5.expand(B, spec.count, *ok5.shape[2:])
            ok = self._to4(ok5, copy=True)  # (X, Y, m)
            self.mask = torch.zeros(ok.shape, dtype=dtype, device=ok.device)
            self.mask.masked_fill_(~ok, NEG_INF)
            self.mask = self.mask.unsqueeze(-2)  # (X, Y, 1, m)
            self.empty = (ok.cumsum(-1) == 0) if is_causal else ~ok.any(-1, keepdim=True).expand_as(ok)

    # ---------------------------------------------------------------------------- views
    def _five(self, x, h0, step, count):
        """x (B, Hx, >= N, ...) -> (B, count, S, m, ...) view."""
        sp = self.spec
        if getattr(self, "rows", None) is not None:
            x = x[self.rows]
        heads = x[:, h0:h0 + (count - 1) * step + 1:step]
        span = heads[:, :, sp.start:sp.start + sp.S * sp.seg]
        return span.unflatten(2, (sp.S, sp.seg))[:, :, :, sp.c::sp.r]

    def _to4(self, v, copy=False):
        a, b = self.fold
        perm = list(a) + list(b) + list(range(3, v.dim()))
        v = v.permute(perm)
        shape = (math.prod(v.shape[:len(a)]), math.prod(v.shape[len(a):3]), *v.shape[3:])
        return v.reshape(shape) if copy else v.view(shape)

    def q5(self, x):
        return self._five(x, self.spec.h0, self.spec.step, self.spec.count)

    def kv5(self, x):
        return self._five(x, self.spec.kh0, self.spec.kstep, self.spec.count)

    def q_rows(self, x):
        """Rows (X, Y, m, ...) of a per-query-head tensor (B, H, N, ...)."""
        return self._to4(self.q5(x))

    def kv_rows(self, x):
        """Rows (X, Y, m, ...) of a per-key/value-head tensor (B, Hkv, N, ...)."""
        return self._to4(self.kv5(x))

    # ---------------------------------------------------------------------- accumulation
    def merge_(self, o_acc, l_acc, ob, lb, first):
        ov, lv = self.q_rows(o_acc), self.q_rows(l_acc)
        if first:
            ov.copy_(ob)
            lv.copy_(lb)
        else:
            o_new, l_new = merge_partials(ov, lv, ob, lb)
            ov.copy_(o_new)
            lv.copy_(l_new)

    def add_q_(self, buf, g):
        self.q_rows(buf).add_(g)

    def add_kv_(self, buf, g):
        self.kv_rows(buf).add_(g)


def head_sets(num_heads: int, num_kv_heads: int, dilation: int) -> list[tuple[int, int, int, int, int]]:
    """``(h0, kh0, step, kstep, count)`` of each batched head set of a branch of rate ``dilation``."""
    g = num_heads // num_kv_heads
    step = math.lcm(dilation, g)
    return [(h0, h0 // g, step, step // g, len(range(h0, num_heads, step)))
            for h0 in range(min(step, num_heads))]


def plan_branch(pattern: DilatedPattern, b: int, query, key, *, is_causal: bool,
                key_padding_mask=None, tensors=(), device_type: str | None = None,
                heads=None, residue=None) -> list[KernelCall]:
    """The kernel calls of branch ``b`` for ``query`` (B, H, N, D) and ``key`` (B, Hkv, N, D).

    ``tensors``: further (per-query or per-key, per-head) tensors the calls will take views of
    (accumulators, gradients); the fold chosen is a view for all of them. ``device_type``
    overrides ``query.device.type`` for planning (the call count test plans CUDA calls on CPU).
    ``heads`` (head sets as :func:`head_sets` gives them) and ``residue`` (head -> kept offset)
    replace the paper's rule for another one (torchscale's, in :mod:`longnet.interop`).
    """
    B, H, N, D = query.shape
    Hkv = key.shape[1]
    r = pattern.dilation_rates[b]
    w = pattern.effective_segment(b, N)
    on_cpu = (device_type or query.device.type) == "cpu"
    calls = []
    sets = head_sets(H, Hkv, r) if heads is None else heads
    for h0, kh0, step, kstep, count in sets:
        kept = pattern.residue(h0, b) if residue is None else residue(h0)
        rows = B * count * -(-w // r) * D * acc_dtype(query.dtype).itemsize  # one segment, all heads
        chunk = max(1, CPU_CALL_BYTES // rows) if on_cpu else None
        for start, n_seg, seg, first in pattern.segment_pieces(b, N):
            c = pattern.next_kept_offset(b, first, kept)  # first kept position of the piece
            if seg <= c:  # the heads keep no position of these segments
                continue
            per_call = n_seg if chunk is None else chunk
            for s0 in range(0, n_seg, per_call):
                spec = _Spec(h0, kh0, step, kstep, count, c, start + s0 * seg, min(per_call, n_seg - s0),
                             seg, r)
                calls.extend(_fold_or_split(spec, B, query, key, tensors, is_causal, key_padding_mask))
    return calls


def _views(spec, query, key, tensors):
    probe = KernelCall.__new__(KernelCall)
    probe.spec = spec
    H = query.shape[1]
    kv = [t for t in (key, *tensors) if t.shape[1] != H]
    q = [t for t in (query, key, *tensors) if t.shape[1] == H]
    return [probe.q5(t) for t in q] + [probe.kv5(t) for t in kv]


def _narrow(spec: _Spec, dim: int, i: int) -> tuple[_Spec, slice | None]:
    """Piece ``i`` of ``spec`` along ``dim`` (0 batch: a batch slice, 1 a head, 2 a segment)."""
    if dim == 1:
        return _Spec(spec.h0 + i * spec.step, spec.kh0 + i * spec.kstep, 1, 1, 1, spec.c, spec.start,
                     spec.S, spec.seg, spec.r), None
    if dim == 2:
        return _Spec(spec.h0, spec.kh0, spec.step, spec.kstep, spec.count, spec.c,
                     spec.start + i * spec.seg, 1, spec.seg, spec.r), None
    return spec, slice(i, i + 1)


def _fold_or_split(spec, B, query, key, tensors, is_causal, key_padding_mask):
    acc = acc_dtype(query.dtype)
    fold = _fold(_views(spec, query, key, tensors))
    if fold is not None:
        return [KernelCall(spec, fold, B, is_causal, key_padding_mask, acc)]
    # no fold of all three: split along the smallest dimension (the other two always fold)
    sizes = {0: B, 1: spec.count, 2: spec.S}
    dim = min(sizes, key=lambda d: (sizes[d], -d))
    out = []
    for i in range(sizes[dim]):
        piece, rows = _narrow(spec, dim, i)
        if rows is None:
            views = _views(piece, query, key, tensors)
            out.append(KernelCall(piece, _fold(views), B, is_causal, key_padding_mask, acc))
        else:
            views = [v[rows] for v in _views(piece, query, key, tensors)]
            out.append(KernelCall(piece, _fold(views), B, is_causal, key_padding_mask, acc, rows=rows))
    return out
