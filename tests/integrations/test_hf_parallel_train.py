"""``longnet train --hf-model`` on several processes (gloo): DDP, FSDP2, sequence parallel and their
mix equal one process, a sharded run resumes in another layout, and ``longnet eval`` /
``longnet generate`` read the run folder. The parity table itself is ``benchmarks/hf_parity.py``."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("transformers", minversion="5")

from longnet.cli.main import main  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "hf_parity.py"


def _parity():
    spec = importlib.util.spec_from_file_location("hf_parity", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    return {r["layout"]: r for r in _parity().table(tmp_path_factory.mktemp("hf_parity"))}


def test_every_layout_and_resharded_resume_equals_one_process(rows):
    parity = _parity()
    assert set(rows) == set(parity.LAYOUTS) | set(parity.RESUMES)
    for name, r in rows.items():
        # float32 sums in another order: losses to ~1e-7, weights to ~1e-6, while training moved them ~1e-2
        assert r["max_abs_loss"] < 1e-5 and r["max_abs_val_loss"] < 1e-5, (name, r)
        assert r["max_abs_weight"] < 1e-4 and r["max_weight_change"] > 1e-3, (name, r)


def test_eval_and_generate_read_an_hf_run_folder(rows, tmp_path_factory, capsys):
    root = next(Path(p) for p in tmp_path_factory.getbasetemp().glob("hf_parity*"))
    run = root / "fsdp2_(dp_2)"  # written by FSDP2: full weights gathered into a transformers folder
    assert json.loads((run / "config.json").read_text())["model_type"] == "llama"
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(run), "--seq-len", "16", "32", "--max-tokens", "128",
                 "--no-progress"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    val = [r["val_loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
           if r["kind"] == "eval"][-1]
    assert result["perplexity@32"] == pytest.approx(2.718281828 ** val, rel=1e-4)  # the trainer's last eval
    assert main(["generate", "--checkpoint", str(run), "--prompt", "alpha beta", "--max-new-tokens", "5",
                 "--greedy"]) == 0
    io = capsys.readouterr()
    assert "5 new" in io.err or "new in" in io.err
    assert main(["generate", "--checkpoint", str(run), "--prompt", "alpha", "--max-new-tokens", "2",
                 "--prefill-chunk-size", "4"]) == 2
    assert "prefill" in capsys.readouterr().err
