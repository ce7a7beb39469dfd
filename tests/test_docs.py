"""The documentation is tested like code.

- README.md stays short (at most 12,000 characters).
- Every ```python block of README.md and docs/*.md runs here (a page's blocks in order, in one
  namespace, in a temporary folder), unless the line before it is ``<!-- not-run: REASON -->``.
- ``mkdocs build --strict`` builds the site (skipped when mkdocs or mkdocstrings is missing).
- Every public name (``longnet.__all__`` and each public subpackage's ``__all__``) has a
  docstring, and the API reference page lists every public subpackage.
"""

import importlib
import inspect
import json
import os
import pkgutil
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_LIMIT = 12_000
FENCE = re.compile(r"^(\s*)```(\w*)\s*$")
NOT_RUN = re.compile(r"^\s*<!--\s*not-run:\s*(\S.*?)\s*-->\s*$")


def python_blocks(path: Path) -> list[tuple[int, str, str | None]]:
    """(first line number, code, not-run reason or None) of each ```python block of a page."""
    lines = path.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m or not m.group(2):
            i += 1
            continue
        start, lang = i, m.group(2)
        i += 1
        while i < len(lines) and lines[i].strip() != "```":
            i += 1
        if lang == "python":
            prev = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
            reason = NOT_RUN.match(prev)
            code = textwrap.dedent("\n".join(lines[start + 1:i]))
            blocks.append((start + 1, code, reason.group(1) if reason else None))
        i += 1
    return blocks


def test_readme_is_short():
    n = len((ROOT / "README.md").read_text())
    assert n <= README_LIMIT, f"README.md has {n} characters (at most {README_LIMIT}): move text to docs/"


def test_block_finder():
    page = ROOT / "README.md"
    assert any(reason is None for _, _, reason in python_blocks(page)), "README.md has no runnable example"


def test_every_not_run_marker_gives_a_reason():
    for page in PAGES:
        for line in page.read_text().splitlines():
            if "<!--" in line and "not-run" in line:
                assert NOT_RUN.match(line), f"{page.name}: a not-run marker needs a reason: {line!r}"


# ------------------------------------------------------------------------------ running the pages
def _run_folder(run: Path) -> None:
    """What the generation examples load: a run folder of `longnet train` (tiny, random weights)."""
    from longnet import LongNetConfig, LongNetLM
    from longnet.data import train_tokenizer

    tokenizer = train_tokenizer(["def main(args):\n    return len(args)\n" * 50], 300)
    config = LongNetConfig(vocab_size=tokenizer.vocab_size, embed_dim=32, num_layers=2, num_heads=4,
                           ffn_dim=64, segment_lengths=(8, 16), dilation_rates=(1, 2), max_train_length=16)
    LongNetLM(config).save_pretrained(run)
    tokenizer.save(run)


def _slide_encoder_pth(path: Path) -> None:
    """A small random slide encoder saved as GigaPath saves it: ``{"model": state}`` under its names."""
    from longnet.gigapath import SlideEncoder, SlideEncoderConfig

    model = SlideEncoder(SlideEncoderConfig(embed_dim=64, depth=2, num_heads=16, ffn_dim=128))
    rename = {"attn_norm": "self_attn_layer_norm", "attn.sub_ln": "self_attn.inner_attn_ln",
              "attn.": "self_attn.", "ffn_norm": "final_layer_norm", "ffn.sub_ln": "ffn.ffn_layernorm"}
    state = {}
    for k, v in model.state_dict().items():
        k = k.replace("patch_embed.", "patch_embed.proj.").replace("encoder.norm.", "encoder.layer_norm.")
        k = k.replace("encoder.blocks.", "encoder.layers.")
        for a, b in rename.items():
            if a in k:
                k = k.replace(a, b)
                break
        state[k] = v.clone()
    torch.save({"model": state}, path)


RUNNABLE = [p for p in PAGES if any(reason is None for _, _, reason in python_blocks(p))]


@pytest.mark.parametrize("page", RUNNABLE, ids=[p.name for p in RUNNABLE])
def test_page_examples_run(page, tmp_path, monkeypatch):
    blocks = [(line, code) for line, code, reason in python_blocks(page) if reason is None]
    text = "\n".join(code for _, code in blocks)
    if "transformers" in text:
        pytest.importorskip("transformers", reason="the page's examples need transformers: pip install -e '.[hf]'")
    monkeypatch.chdir(tmp_path)
    if "runs/tiny" in text:
        _run_folder(tmp_path / "runs" / "tiny")
    if "slide_encoder.pth" in text:
        _slide_encoder_pth(tmp_path / "slide_encoder.pth")
    scope: dict = {"__name__": f"docs:{page.name}"}
    for line, code in blocks:
        exec(compile(code, f"{page.relative_to(ROOT)}, block at line {line}", "exec"), scope)


# ---------------------------------------------------------------------------------- the site build
def test_mkdocs_build_strict(tmp_path):
    for module in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python"):
        pytest.importorskip(module, reason=f"{module} is not installed: pip install -e '.[docs]'")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1",
               PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    site = tmp_path / "site"
    out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
                          str(ROOT / "mkdocs.yml"), "--site-dir", str(site)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    missing = set(re.findall(r"Doc file '([^']+)' contains a link '([^']+)', but there is no such anchor", log))
    assert not missing, f"links to missing anchors: {sorted(missing)}"
    # the hook serves benchmarks/results/ with the site, plots included
    assert (site / "results" / "decode-cpu.png").is_file()
    assert "results/decode-cpu.png" in (site / "generation" / "index.html").read_text()
    assert "longnet.dilated_attention" in (site / "api" / "index.html").read_text()


# ------------------------------------------------------------------------------------ docstrings
def public_modules() -> list[str]:
    """``longnet`` and each public subpackage or module of it that declares ``__all__``."""
    import longnet

    names = ["longnet"]
    for info in pkgutil.iter_modules(longnet.__path__):
        if info.name.startswith("_"):
            continue
        name = f"longnet.{info.name}"
        try:
            module = importlib.import_module(name)
        except ImportError:  # longnet.hf without transformers (CI installs it)
            continue
        if hasattr(module, "__all__"):
            names.append(name)
    return names


def _documented(obj) -> bool:
    doc = obj.__dict__.get("__doc__") if inspect.isclass(obj) else getattr(obj, "__doc__", None)
    if not doc or not doc.strip():
        return False
    # @dataclass writes "Name(field: type, ...)" when a class has no docstring of its own
    return not (inspect.isclass(obj) and doc.startswith(f"{obj.__name__}("))


def test_public_names_have_docstrings():
    undocumented = []
    for name in public_modules():
        module = importlib.import_module(name)
        assert _documented(module), f"{name} has no module docstring"
        for attr in module.__all__:
            obj = getattr(module, attr)
            if (inspect.isclass(obj) or inspect.isroutine(obj)) and not _documented(obj):
                undocumented.append(f"{name}.{attr}")
    assert not undocumented, f"public names without a docstring: {undocumented}"


def test_docstring_check_catches_a_bare_dataclass():
    from dataclasses import dataclass

    @dataclass
    class Bare:
        x: int

    def bare():
        pass

    assert not _documented(Bare) and not _documented(bare) and _documented(python_blocks)


def test_api_reference_lists_every_public_module():
    api = (ROOT / "docs" / "api.md").read_text()
    listed = set(re.findall(r"^::: ([\w.]+)\s*$", api, flags=re.M))
    assert set(public_modules()) <= listed, sorted(set(public_modules()) - listed)


def test_linked_results_exist():
    """Links to benchmarks/results/ from README.md and the pages name files that exist."""
    for page in PAGES:
        for target in re.findall(r"\]\((?:\.\./|)(benchmarks/results/[^)#\s]+)", page.read_text()):
            path = ROOT / target
            assert path.is_file(), f"{page.name} links to {target}, which does not exist"
            if path.suffix == ".json":
                json.loads(path.read_text())


def test_every_plot_is_shown():
    """Each PNG directly under benchmarks/results/ is shown on a page (``![...](../benchmarks/results/X.png)``)."""
    shown = set()
    for page in PAGES[1:]:
        shown |= set(re.findall(r"!\[[^\]]*\]\(\.\./benchmarks/results/([^)\s]+\.png)\)", page.read_text()))
    plots = {p.name for p in (ROOT / "benchmarks" / "results").glob("*.png")}
    assert plots <= shown, f"plots no page shows: {sorted(plots - shown)}"
