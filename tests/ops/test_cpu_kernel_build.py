"""The CPU kernel's build folder and build notice, without compiling anything.

The folder is keyed by everything the binary depends on, so two environments sharing
``~/.cache/longnet/kernels`` (another venv, another torch, another compiler, another Python) each
keep their own build; and every build says so in exactly one line on stderr.
"""

from __future__ import annotations

import sys

import pytest
import torch

from longnet.ops.backends import cpu_kernel as ck

SOURCE = b"// kernel source"
ENV = {"torch": "2.13.0+cpu", "torch_git": "cf30153", "torch_cuda": "None",
       "compiler": "c++: c++ (GCC) 13.2.0", "python_abi": "cpython-311 cpython-311-x86_64-linux-gnu",
       "flags": "-O3 -march=native"}


def test_same_source_and_environment_give_the_same_folder():
    assert ck.build_key(SOURCE, ENV) == ck.build_key(SOURCE, dict(reversed(list(ENV.items()))))


@pytest.mark.parametrize("field, other", [
    ("torch", "2.12.1+cpu"), ("torch_git", "0123abc"), ("torch_cuda", "12.4"),
    ("compiler", "c++: clang version 18.1.3"), ("python_abi", "cpython-312 cpython-312-x86_64-linux-gnu"),
    ("flags", "-O2"),
])
def test_a_different_torch_compiler_abi_or_flags_give_another_folder(field, other):
    assert ck.build_key(SOURCE, {**ENV, field: other}) != ck.build_key(SOURCE, ENV)


def test_a_different_source_gives_another_folder():
    assert ck.build_key(SOURCE + b" ", ENV) != ck.build_key(SOURCE, ENV)


def test_build_environment_names_torch_compiler_and_python_abi():
    import sys
    import sysconfig

    import torch

    env = ck.build_environment()
    assert env["torch"] == torch.__version__ and env["torch_cuda"] == str(torch.version.cuda)
    assert sys.implementation.cache_tag in env["python_abi"]
    assert str(sysconfig.get_config_var("SOABI")) in env["python_abi"]
    assert env["compiler"].split(":")[0].strip()  # the compiler's name, then its version line


class _Builds(list):
    """Names built, with ``sources``: the source paths each build was given."""

    sources: list


@pytest.fixture
def fake_build(monkeypatch, tmp_path):
    """``load_cpu_kernel`` with an empty cache under ``tmp_path`` and a builder that writes the binary."""
    import torch.utils.cpp_extension as cpp

    builds = _Builds()

    def load(name, sources, extra_cflags, build_directory, verbose, extra_ldflags=()):
        builds.append(name)
        load.sources.append(sources)
        (tmp_path / "kernels" / name / f"{name}.so").write_bytes(b"binary %d" % len(builds))
        return f"module {name}"

    load.sources = []
    builds.sources = load.sources
    monkeypatch.setenv("LONGNET_CACHE", str(tmp_path))
    monkeypatch.setattr(cpp, "load", load)
    monkeypatch.setattr(ck, "_state", {})
    return builds


def test_a_build_prints_exactly_one_line_and_a_cached_load_none(fake_build, capsys, monkeypatch):
    import torch.utils.cpp_extension as cpp

    module = ck.load_cpu_kernel()
    err = capsys.readouterr().err
    assert len(fake_build) == 1 and module == f"module {fake_build[0]}"
    assert len(err.splitlines()) == 1 and "compiling the CPU attention kernel" in err

    monkeypatch.setattr(ck, "_state", {})  # a new process: the binary is in the cache
    monkeypatch.setattr(cpp, "load", lambda name, *a, **k: f"module {name}")  # up to date: no compile
    assert ck.load_cpu_kernel() == module
    assert capsys.readouterr().err == ""


def test_a_rebuild_of_an_existing_binary_prints_exactly_one_line(fake_build, capsys, monkeypatch, tmp_path):
    import os

    ck.load_cpu_kernel()
    capsys.readouterr()
    (binary,) = (tmp_path / "kernels").glob("*/*.so")
    os.utime(binary, ns=(0, 0))  # so that the rewrite below changes its mtime
    monkeypatch.setattr(ck, "_state", {})
    ck.load_cpu_kernel()  # the fake builder rewrites the binary, as torch does when it is stale
    err = capsys.readouterr().err
    assert len(fake_build) == 2 and len(err.splitlines()) == 1 and "recompiled" in err


def test_two_checkouts_with_the_same_source_compile_the_same_path(fake_build, monkeypatch, tmp_path):
    """The source compiled lives in the build folder, so a second checkout (another path to the
    same source) gives torch the same build description and does not rebuild the first's kernel."""
    original = ck._SOURCE
    other = tmp_path / "checkout-b" / original.name
    other.parent.mkdir()
    other.write_bytes(original.read_bytes())
    ck.load_cpu_kernel()
    monkeypatch.setattr(ck, "_state", {})
    monkeypatch.setattr(ck, "_SOURCE", other)
    ck.load_cpu_kernel()
    first, second = fake_build.sources
    assert first == second and first[0].startswith(str(tmp_path / "kernels"))
    assert open(first[0], "rb").read() == original.read_bytes()


def test_the_kernel_is_built_with_torchs_openmp_so_it_uses_torchs_threads(monkeypatch):
    """``at::parallel_for`` is inline: without ``-fopenmp`` it runs the whole range on one thread."""
    import torch

    if sys.platform == "darwin" or not torch.backends.openmp.is_available():
        assert ck._openmp_flags() == []
    else:
        assert ck._openmp_flags() == ["-fopenmp"] and "-fopenmp" in ck.build_environment()["flags"].split()
    monkeypatch.setattr(ck.sys, "platform", "darwin")
    assert ck._openmp_flags() == []


@pytest.mark.parametrize("l2_kib, causal, non_causal", [
    (128, 512, 256),     # the smallest blocks, whatever the cache
    (512, 1024, 512),
    (1024, 2048, 1024),  # the 1 MiB L2 the rule was measured on
    (1280, 2048, 1024),
    (2048, 2048, 2048),
    (32768, 2048, 2048),  # never more than 2048 keys
])
def test_key_blocks_follow_the_l2_size(l2_kib, causal, non_causal):
    assert ck.key_block(True, l2_kib << 10) == causal
    assert ck.key_block(False, l2_kib << 10) == non_causal
    # a non-causal block's scores fill at most half of L2 (above the 256-key floor)
    assert non_causal == 256 or ck._BLOCK_Q * non_causal * 4 <= (l2_kib << 10) // 2


@pytest.mark.parametrize("l2_kib, side", [
    (128, 64),    # the smallest tiles, whatever the cache
    (256, 128),
    (512, 128),
    (1024, 256),  # the 1 MiB L2 the rule was measured on
    (2048, 256),
    (4096, 512),
    (32768, 512),  # never more than 512
])
def test_backward_blocks_follow_the_l2_size(l2_kib, side):
    l2 = l2_kib << 10
    assert ck.backward_blocks(False, l2) == (side, side)
    # P and dP fill at most half of L2 (above the 64 floor), and the next side up would not fit
    assert side == 64 or 2 * side * side * 4 <= l2 // 2
    assert side == 512 or 2 * (2 * side) ** 2 * 4 > l2 // 2
    # causal calls keep the forward's blocks
    assert ck.backward_blocks(True, l2) == (ck._BLOCK_Q, ck.key_block(True, l2))


def test_the_backend_passes_the_backward_blocks_to_the_kernel(monkeypatch):
    seen = []

    class Fake:
        def attention_backward(self, *args):
            seen.append(args[-2:])
            return (args[1], args[2], args[3])

    monkeypatch.setattr(ck, "load_cpu_kernel", lambda: Fake())
    monkeypatch.setattr(ck, "_backward_blocks", lambda causal: (7, 11) if causal else (13, 17))
    t = torch.zeros(1, 1, 4, 2)
    for causal, blocks in ((True, (7, 11)), (False, (13, 17))):
        ck.CpuKernelBackend().backward(t, t, t, t, t, torch.zeros(1, 1, 4), None, None, causal, 1.0)
        assert seen[-1] == blocks


def _cache_index(root, name, level, kind, size):
    d = root / name
    d.mkdir(parents=True)
    (d / "level").write_text(f"{level}\n")
    (d / "type").write_text(f"{kind}\n")
    (d / "size").write_text(f"{size}\n")


def test_l2_size_is_read_from_sysfs_and_falls_back_to_1_mib(tmp_path):
    _cache_index(tmp_path, "index0", 1, "Data", "32K")
    _cache_index(tmp_path, "index1", 1, "Instruction", "32K")
    _cache_index(tmp_path, "index2", 2, "Unified", "2048K")
    assert ck.l2_cache_bytes(tmp_path) == 2 << 20
    (tmp_path / "index2" / "size").write_text("2M\n")
    assert ck.l2_cache_bytes(tmp_path) == 2 << 20
    (tmp_path / "index2" / "size").write_text("garbage\n")
    assert ck.l2_cache_bytes(tmp_path) == 1 << 20
    assert ck.l2_cache_bytes(tmp_path / "missing") == 1 << 20
    only_l1 = tmp_path / "l1"
    _cache_index(only_l1, "index0", 1, "Data", "48K")
    assert ck.l2_cache_bytes(only_l1) == 1 << 20
