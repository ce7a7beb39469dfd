"""The README's commands are the ones CI runs; the generation example runs on a run folder."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    quick = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)\n```", quick, flags=re.S)


def test_readme_has_exactly_two_commands():
    cmds = _readme_commands()
    assert len(cmds) == 2, cmds
    assert all("\n" not in c for c in cmds)


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    test_cmd = _readme_commands()[1]
    assert ci[-1] == test_cmd
    assert "pytest" in test_cmd and "pip install" in test_cmd


def _page_python(page: str, section: str) -> list[str]:
    text = (ROOT / page).read_text()
    body = text.split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)\n```", body, flags=re.S)


def test_generation_snippet_runs_on_a_run_folder(tmp_path, monkeypatch, capsys):
    import torch

    from longnet import LongNetConfig, LongNetLM
    from longnet.data import train_tokenizer

    # what the snippet loads: runs/tiny with model.safetensors, config.json, tokenizer.json
    run = tmp_path / "runs" / "tiny"
    tokenizer = train_tokenizer(["def main(args):\n    return len(args)\n" * 50], 300)
    config = LongNetConfig(vocab_size=tokenizer.vocab_size, embed_dim=32, num_layers=2, num_heads=4,
                           ffn_dim=64, segment_lengths=(8, 16), dilation_rates=(1, 2), max_train_length=16)
    torch.manual_seed(0)
    LongNetLM(config).save_pretrained(run)
    tokenizer.save(run)
    (snippet,) = _page_python("docs/generation.md", "A bounded cache")
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(snippet, "docs/generation.md (A bounded cache)", "exec"), scope)
    assert scope["out"].shape[0] == 1 and scope["out"].shape[1] <= scope["ids"].shape[1] + 200
    assert scope["cache"].nbytes > 0 and isinstance(capsys.readouterr().out, str)
