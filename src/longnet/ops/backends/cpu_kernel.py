"""longnet's own exact attention kernel for CPU float32 (C++, built on first use).

PyTorch's CPU flash kernel splits queries into 256-row blocks and computes each block against
every key up to the end of the block, so a causal call wastes about 128 keys per row: 12% of the
work of a 2048-long segment, the length most branches of the paper's pattern run at. This kernel
(``csrc/cpu_attention.cpp``) uses 96-row query blocks, reads a causal block's diagonal in 32-row
sub-blocks, stops each row's softmax at its own position (no masked score is ever exponentiated),
runs its block GEMMs through the BLAS torch uses (its ``sgemm_`` directly where that BLAS exports
it, as MKL and OpenBLAS builds do, else ``at::mm``) and vectorises the softmax with a branch-free
exponential; it also takes strided views, the merged log-sum-exp in backward and ``+inf`` rows like
the other backends. Key blocks follow the core's L2 size (:func:`key_block`), and a non-causal
backward runs on square tiles sized the same way (:func:`backward_blocks`). Its forward can
merge into the operator's running output and log-sum-exp (:meth:`CpuKernelBackend.forward_into`),
so a branch allocates no output and makes no extra pass. Its (problem, query block) work items
run on torch's intra-op threads (``at::parallel_for``, so it is built with OpenMP where torch uses
it; see :func:`_openmp_flags`).

It is compiled with ``torch.utils.cpp_extension`` the first time it is needed (about a minute;
one line on stderr for every build) into ``$LONGNET_CACHE/kernels`` (default
``~/.cache/longnet/kernels``), in a folder keyed by everything the binary depends on (see
:func:`build_environment`): the source, the compiler flags, the torch build, the C++ compiler and
the Python ABI. Two environments (venvs, checkouts) sharing the cache thus each keep their own
build and never rebuild each other's. When no
compiler works, ``"auto"`` uses ``cpu_flash`` instead (one warning says why); asking for
``backend="cpu_kernel"`` by name then raises. ``LONGNET_CPU_KERNEL=0`` turns it off for ``"auto"``.
"""

from __future__ import annotations

import functools
import hashlib
import os
import subprocess
import sys
import sysconfig
import threading
import warnings
from pathlib import Path

import torch

__all__ = ["CpuKernelBackend", "load_cpu_kernel", "cpu_kernel_error", "build_environment", "build_key", "key_block",
           "backward_blocks", "l2_cache_bytes"]

_SOURCE = Path(__file__).with_name("csrc") / "cpu_attention.cpp"
_FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fopenmp-simd"]
_BLOCK_Q, _BLOCK_DIAG = 96, 32  # query rows per work item; rows per sub-block of a causal block's diagonal
_L2_FALLBACK = 1 << 20  # bytes, where the OS does not say (the 1 MiB per core the block rule was measured on)


def l2_cache_bytes(sysfs: Path = Path("/sys/devices/system/cpu/cpu0/cache")) -> int:
    """One core's level-2 (data or unified) cache in bytes, as Linux's sysfs reports it; else 1 MiB."""
    try:
        for index in sorted(sysfs.glob("index*")):
            if (index / "level").read_text().strip() == "2" and \
                    (index / "type").read_text().strip() in ("Data", "Unified"):
                size = (index / "size").read_text().strip().upper()
                scale = {"K": 1 << 10, "M": 1 << 20}.get(size[-1:], 1)
                return int(size.rstrip("KM")) * scale
    except (OSError, ValueError):
        pass
    return _L2_FALLBACK


def key_block(is_causal: bool, l2_bytes: int, block_q: int = _BLOCK_Q) -> int:
    """Keys per block product: the largest power of two (256 ... 2048) whose ``block_q`` x keys float32
    scores fill at most half of a core's L2; causal calls take twice that (their query blocks read
    half their keys on average), at most 2048.

    On the 1 MiB L2 it was measured on (AMD EPYC, paper pattern, 2 threads) this gives 1024 and 2048:
    non-causal 96 x 2048 scores (786 KB, twice over in backward) outgrew L2, and 1024 keys took 0.91x
    the time of 2048 at 32K fwd+bwd; causal, 2048 was best (16K fwd+bwd: 1024 took 1.08x as long).
    """
    keys = 256
    while keys < 2048 and block_q * keys * 2 * 4 <= l2_bytes // 2:
        keys *= 2
    return min(2 * keys, 2048) if is_causal else keys


def backward_blocks(is_causal: bool, l2_bytes: int) -> tuple[int, int]:
    """``(query rows, keys)`` per block product of the backward.

    Causal calls take the forward's blocks (``_BLOCK_Q`` rows, :func:`key_block` keys): a query
    block reads keys up to its diagonal only, so tall blocks would waste work there. Non-causal
    calls take square tiles, the largest power-of-two side (64 ... 512) at which the backward's two
    score tiles (P and dP, float32) fill at most half of a core's L2: taller query blocks spread
    each key block's dK/dV update over more rows. On the 1 MiB L2 it was measured on (AMD EPYC,
    2 threads and 1) 256 x 256 took 0.81-0.97 of the time of 96 x 1024 on the paper pattern's
    non-causal calls (2048-4096 keys).
    """
    if is_causal:
        return _BLOCK_Q, key_block(True, l2_bytes)
    side = 64
    while side < 512 and 2 * (2 * side) ** 2 * 4 <= l2_bytes // 2:
        side *= 2
    return side, side


@functools.cache
def _keys(is_causal: bool) -> int:
    """This machine's :func:`key_block` (sysfs is read on the first kernel call, not at import)."""
    return key_block(bool(is_causal), l2_cache_bytes())


@functools.cache
def _backward_blocks(is_causal: bool) -> tuple[int, int]:
    """This machine's :func:`backward_blocks`."""
    return backward_blocks(bool(is_causal), l2_cache_bytes())

_lock = threading.Lock()
_state: dict[str, object] = {}  # "module" or "error", once tried


def _openmp_flags() -> list[str]:
    """``-fopenmp`` where torch itself runs on OpenMP (Linux builds): ``at::parallel_for`` is inline,
    and without ``_OPENMP`` defined in *this* translation unit it runs its whole range on the calling
    thread, so the kernel would use one core whatever ``torch.set_num_threads`` says. The binary
    then needs ``libgomp.so.1``, which torch has already loaded: both share one thread pool. Apple's
    clang has no ``-fopenmp``; there the kernel stays on one thread (``cpu_flash`` is threaded)."""
    if sys.platform == "darwin" or not torch.backends.openmp.is_available():
        return []
    return ["-fopenmp"]


def _build_dir(name: str) -> Path:
    root = os.environ.get("LONGNET_CACHE") or Path.home() / ".cache" / "longnet"
    return Path(root) / "kernels" / name


def _compiler_version() -> str:
    """``<compiler>: <first line of its --version>`` for the C++ compiler ``cpp_extension`` builds with
    (``$CXX``, else ``c++``); ``<compiler>: unavailable`` when it cannot be run."""
    from torch.utils.cpp_extension import get_cxx_compiler

    cxx = get_cxx_compiler()
    try:
        out = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return f"{cxx}: unavailable"
    lines = (out.stdout or out.stderr).strip().splitlines()
    return f"{cxx}: {lines[0] if lines else 'unknown version'}"


def build_environment() -> dict[str, str]:
    """What the compiled kernel depends on besides its source: the torch build (version, git
    commit, CUDA tag), the C++ compiler, the Python ABI and the compiler flags."""
    return {
        "torch": torch.__version__,
        "torch_git": str(getattr(torch.version, "git_version", None)),
        "torch_cuda": str(torch.version.cuda),
        "compiler": _compiler_version(),
        "python_abi": f"{sys.implementation.cache_tag} {sysconfig.get_config_var('SOABI')}",
        "flags": " ".join(_FLAGS + _openmp_flags()),
    }


def build_key(source: bytes, environment: dict[str, str]) -> str:
    """12 hex digits naming the build folder: equal exactly when the source and every entry of
    ``environment`` (see :func:`build_environment`) are equal."""
    h = hashlib.sha256(source)
    for field in sorted(environment):
        h.update(f"\0{field}={environment[field]}".encode())
    return h.hexdigest()[:12]


def _source_in(build: Path, source: bytes) -> Path:
    """The kernel's source, copied into ``build`` (rewritten only when it differs).

    Compiling this copy rather than the package's file makes the build independent of where the
    package lives: torch's build files record the source's path, so two checkouts (or venvs) with
    the same source and environment, which share one build folder, would otherwise make it rebuild
    each other's kernel on every alternation.
    """
    from longnet.utils.atomic import atomic_write_bytes

    copy = build / _SOURCE.name
    if not copy.is_file() or copy.read_bytes() != source:
        atomic_write_bytes(copy, source)
    return copy


def _build(name: str, build: Path, source: bytes):
    """``cpp_extension.load`` in ``build``, with exactly one line on stderr when it compiles: before
    a first build, or after torch rebuilt an existing binary it judged out of date."""
    from torch.utils.cpp_extension import load

    binary = build / f"{name}.so"
    before = binary.stat().st_mtime_ns if binary.exists() else None
    if before is None:
        print(f"longnet: compiling the CPU attention kernel into {build} (once per torch, compiler and "
              "Python; about a minute)...", file=sys.stderr, flush=True)
    openmp = _openmp_flags()
    module = load(name, [str(_source_in(build, source))], extra_cflags=_FLAGS + openmp, extra_ldflags=openmp,
                  build_directory=str(build), verbose=False)
    if before is not None and binary.exists() and binary.stat().st_mtime_ns != before:
        print(f"longnet: recompiled the CPU attention kernel in {build}: torch found its build out of "
              "date", file=sys.stderr, flush=True)
    return module


def load_cpu_kernel():
    """The compiled extension module (built on the first call), or ``RuntimeError`` saying why not."""
    with _lock:
        if "module" in _state:
            return _state["module"]
        if "error" in _state:
            raise RuntimeError(_state["error"])
        source = _SOURCE.read_bytes()
        name = f"longnet_cpu_attention_{build_key(source, build_environment())}"
        build = _build_dir(name)
        try:
            build.mkdir(parents=True, exist_ok=True)
            module = _build(name, build, source)
        except Exception as err:  # no compiler, no headers, unsupported flags...
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            _state["error"] = (f"the CPU attention kernel could not be built ({first}); "
                               "install a C++ compiler (g++ or clang++) or use backend='cpu_flash'")
            raise RuntimeError(_state["error"]) from err
        _state["module"] = module
        return module


def cpu_kernel_error() -> str | None:
    """Why the kernel cannot be used (building it if it was never tried), or None when it can."""
    try:
        load_cpu_kernel()
    except RuntimeError as err:
        return str(err)
    return None


def enabled_for_auto() -> bool:
    """False when ``LONGNET_CPU_KERNEL=0`` (``auto`` then never builds or uses the kernel)."""
    return os.environ.get("LONGNET_CPU_KERNEL", "1").strip().lower() not in ("0", "false", "no", "off")


_warned = False


def warn_unavailable_once(reason: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(f"{reason}; falling back to PyTorch's CPU flash kernel (set LONGNET_CPU_KERNEL=0 to "
                      "silence this)", RuntimeWarning, stacklevel=3)


class CpuKernelBackend:
    name = "cpu_kernel"
    needs_forward_state = False

    def unsupported_reason(self, query, *, has_mask):
        if query.device.type != "cpu":
            return f"cpu_kernel runs on CPU tensors, got device {query.device}"
        if query.dtype != torch.float32:
            return f"cpu_kernel supports float32 only, got {query.dtype}"
        if has_mask:
            return "cpu_kernel does not take a key padding mask"
        return cpu_kernel_error()

    @staticmethod
    def _last_dim_contiguous(*ts):
        return [t if t.stride(-1) == 1 else t.contiguous() for t in ts]

    def forward(self, query, key, value, mask, is_causal, scale):
        if mask is not None:
            raise ValueError("cpu_kernel does not take a key padding mask")
        q, k, v = self._last_dim_contiguous(query, key, value)
        out, lse = load_cpu_kernel().attention_forward(q, k, v, bool(is_causal), float(scale), _BLOCK_Q,
                                                        _keys(is_causal), _BLOCK_DIAG)
        return out, lse, None

    def forward_into(self, query, key, value, out, lse, *, merge, is_causal, scale) -> bool:
        """The forward written into ``out`` (B, G, L, D) and ``lse`` (B, G, L), float32 views of the
        operator's accumulators, or with ``merge`` combined with what they hold by the log-sum-exp
        rule of :func:`longnet.ops.merge.merge_partials`, in the kernel's epilogue (no per-call output
        is allocated). False, touching nothing, when ``out``'s last dimension is not contiguous."""
        if out.stride(-1) != 1 or out.dtype != torch.float32 or lse.dtype != torch.float32:
            return False
        q, k, v = self._last_dim_contiguous(query, key, value)
        load_cpu_kernel().attention_forward_into(q, k, v, out, lse, bool(merge), bool(is_causal), float(scale),
                                                 _BLOCK_Q, _keys(is_causal), _BLOCK_DIAG)
        return True

    def backward(self, grad_out, query, key, value, out, lse, aux, mask, is_causal, scale):
        if mask is not None:
            raise ValueError("cpu_kernel does not take a key padding mask")
        do, q, k, v, o = self._last_dim_contiguous(grad_out, query, key, value, out)
        lse = lse.to(torch.float32)
        bq, bk = _backward_blocks(is_causal)
        return tuple(load_cpu_kernel().attention_backward(do, q, k, v, o, lse, bool(is_causal), float(scale),
                                                          bq, bk))
