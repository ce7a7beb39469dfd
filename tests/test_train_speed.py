"""benchmarks/train_speed.py: figures follow from the measured times, failures are kept per mode."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "train_speed.py"
_spec = importlib.util.spec_from_file_location("_train_speed", _PATH)
ts = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ts)

TINY = ["--presets", "tiny", "--seq-len", "64", "--steps", "2", "--warmup", "0", "--device", "cpu",
        "--no-plot", "--no-progress"]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _run(capsys, tmp_path, *extra):
    rc = ts.main([*TINY, "--out", str(tmp_path), *extra])
    out = capsys.readouterr().out.strip().splitlines()
    files = list(tmp_path.glob("train_speed_*.json"))
    assert len(files) == 1
    return rc, json.loads(out[-1]), json.loads(files[0].read_text()), out


def test_eager_and_compiled_figures_follow_from_the_times(capsys, tmp_path):
    rc, last, doc, out = _run(capsys, tmp_path, "--compile-backend", "eager", "--peak-tflops", "0.5",
                              "--tag", "t64")
    assert rc == 0 and doc["complete"]
    from longnet.bench.report import device_slug
    assert (tmp_path / f"train_speed_{device_slug(torch.device('cpu'))}_t64.json").exists()
    (r,) = doc["results"]
    e, c = r["modes"]["eager"], r["modes"]["compiled"]
    assert e["status"] == c["status"] == "ok"
    assert r["tokens_per_step"] == 64
    for m in (e, c):
        assert len(m["times_s"]) == 2 and len(m["cpu_times_s"]) == 2
        assert m["tokens_per_s"] == pytest.approx(64 / m["median_s"])
        assert m["mfu"] == pytest.approx(r["flops_per_token"] * m["tokens_per_s"] / 0.5e12)
    assert r["compiled_over_eager"] == pytest.approx(c["tokens_per_s"] / e["tokens_per_s"])
    assert r["compile_s"] == pytest.approx(max(r["first_step_s"] - c["median_s"], 0.0))
    from longnet import LongNetConfig, LongNetLM
    assert r["flops_per_token"] == LongNetLM(LongNetConfig.from_preset("tiny")).flops_per_token(64)
    assert last["presets"]["tiny"]["compiled_over_eager"] == pytest.approx(r["compiled_over_eager"])
    assert any("compiled/eager" in line for line in out)  # the table


def test_no_compile_measures_eager_only(capsys, tmp_path):
    rc, last, doc, out = _run(capsys, tmp_path, "--no-compile")
    assert rc == 0
    (r,) = doc["results"]
    assert set(r["modes"]) == {"eager"} and "compiled_over_eager" not in r
    assert r["modes"]["eager"]["mfu"] is None  # CPU without --peak-tflops
    assert any("MFU: not given" in line for line in out)


def test_a_failing_compile_keeps_the_eager_figures(capsys, tmp_path):
    rc, last, doc, _ = _run(capsys, tmp_path, "--compile-backend", "no-such-backend")
    assert rc == 1
    (r,) = doc["results"]
    assert r["modes"]["eager"]["status"] == "ok" and r["modes"]["eager"]["tokens_per_s"] > 0
    assert r["modes"]["compiled"]["status"].startswith("error:")
    assert last["presets"]["tiny"]["status"]["compiled"].startswith("error:")


@pytest.mark.parametrize("name,dtype,expected", [
    ("NVIDIA H100 80GB HBM3", torch.bfloat16, 989.0),
    ("NVIDIA H200", torch.bfloat16, 989.0),
    ("NVIDIA H100 PCIe", torch.bfloat16, 756.0),
    ("NVIDIA H100 NVL", torch.bfloat16, 835.0),
])
def test_known_cuda_peaks(monkeypatch, name, dtype, expected):
    import longnet.bench.report as report

    monkeypatch.setattr(report, "device_name", lambda device: name)
    peak, source = ts.peak_tflops(torch.device("cuda"), dtype, None)
    assert peak == expected and "bf16" in source


@pytest.mark.parametrize("name,dtype", [("NVIDIA A100-SXM4-80GB", torch.bfloat16),
                                        ("NVIDIA H100 80GB HBM3", torch.float32)])
def test_unknown_cuda_peak_requires_the_flag(monkeypatch, name, dtype):
    import longnet.bench.report as report

    monkeypatch.setattr(report, "device_name", lambda device: name)
    with pytest.raises(ValueError, match="--peak-tflops"):
        ts.peak_tflops(torch.device("cuda"), dtype, None)
    assert ts.peak_tflops(torch.device("cuda"), dtype, 312.0) == (312.0, "--peak-tflops")


def test_cpu_peak_only_from_the_flag():
    assert ts.peak_tflops(torch.device("cpu"), torch.float32, None)[0] is None
    assert ts.peak_tflops(torch.device("cpu"), torch.float32, 1.5)[0] == 1.5


@pytest.mark.parametrize("argv", [["--presets", "nope"], ["--presets", ""], ["--steps", "0"],
                                  ["--warmup", "-1"], ["--seq-len", "x"], ["--peak-tflops", "0"],
                                  ["--tag", "a/b"], ["--dtype", "float16"]])
def test_bad_arguments_are_rejected(argv, capsys):
    with pytest.raises(SystemExit) as info:
        ts.parse_args(argv)
    assert info.value.code == 2
    assert "error" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_without_cuda_is_a_clear_error(capsys, tmp_path):
    assert ts.main(["--device", "cuda", "--out", str(tmp_path)]) == 2
    assert "CUDA is not available" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
