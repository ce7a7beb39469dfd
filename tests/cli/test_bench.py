"""``longnet bench attention``: the smoke run, the JSON it writes, where it may write, and the target
arithmetic. Every run here writes under ``tmp_path``: never into the committed ``benchmarks/results``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from longnet.bench.attention import AttentionBenchConfig, comparison_rows, target_checks
from longnet.bench.measure import measure, measure_interleaved
from longnet.bench.report import format_table
from longnet.cli.main import main

EXPECTED_KEYS = {"benchmark", "complete", "date", "device", "torch_version", "config",
                 "timing_method", "memory_method", "flops_method", "comparisons", "targets",
                 "comparisons_cpu_time", "targets_cpu_time", "cases", "files", "git_commit"}
TARGET_KEYS = {"cpu_fp32_causal_fwdbwd_speedup_vs_flop_ratio", "linear_growth_128k_over_32k",
               "gpu_bf16_fwdbwd_tflops_fraction_of_dense", "longest_seq_len"}


def _run_quick(capsys, tmp_path, *extra):
    """(exit status, stdout, the JSON file the run wrote, named by its last stdout line)."""
    rc = main(["bench", "attention", "--quick", "--no-plot", "--no-progress",
               "--out", str(tmp_path), *extra])
    out = capsys.readouterr().out
    summary = json.loads(out.strip().splitlines()[-1])
    return rc, out, json.loads(Path(summary["files"]["json"]).read_text())


def test_quick_run_prints_table_and_last_json_line(capsys, tmp_path):
    rc, out, doc = _run_quick(capsys, tmp_path)
    assert rc == 0
    assert EXPECTED_KEYS <= doc.keys()
    assert doc["complete"] is True and doc["device"]["type"] == "cpu"
    assert doc["torch_version"] == torch.__version__
    assert doc["allocator"].startswith("glibc keeps freed memory") or "unavailable" in doc["allocator"]
    assert out.splitlines()[0] == "wall time (median ms):"
    header = out.splitlines()[1].split()
    assert header[:3] == ["N", "causal", "mode"] and "speedup" in header
    # 2 lengths x 2 causal settings x 2 modes, each with dilated and dense
    assert len(doc["cases"]) == 16
    assert all(c["status"] == "ok" and c["median_ms"] > 0 and c["cpu_median_ms"] >= 0
               for c in doc["cases"])
    assert doc["targets"].keys() == doc["targets_cpu_time"].keys() == TARGET_KEYS
    # the target series (causal fwd+bwd) runs first
    assert [(c["causal"], c["mode"]) for c in doc["cases"][:4]] == [(True, "fwdbwd")] * 4
    assert len(doc["comparisons"]) == 8
    for row in doc["comparisons"]:
        assert row["speedup"] == pytest.approx(row["dense_ms"] / row["dilated_ms"])
        assert row["flop_ratio"] > 1
    files = list(tmp_path.glob("attention_cpu-*.json"))
    assert len(files) == 1 and str(files[0]) == doc["files"]["json"]
    assert not list(tmp_path.glob("*.png"))


def test_quick_run_respects_causal_mode_and_dense_limit(capsys, tmp_path):
    rc, _, doc = _run_quick(capsys, tmp_path, "--causal", "--mode", "fwd",
                            "--dense-max-seq-len", "128")
    assert rc == 0
    cases = {(c["impl"], c["n"]) for c in doc["cases"]}
    assert cases == {("dilated", 128), ("dense", 128), ("dilated", 256)}
    assert all(c["causal"] and c["mode"] == "fwd" for c in doc["cases"])
    row256 = next(r for r in doc["comparisons"] if r["n"] == 256)
    assert row256["dense_ms"] is None and row256["speedup"] is None


def test_quick_run_draws_plot(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    rc = main(["bench", "attention", "--quick", "--no-progress", "--mode", "fwd", "--causal",
               "--out", str(tmp_path)])
    doc = json.loads(capsys.readouterr().out.strip().splitlines()[-1])  # the summary line
    assert rc == 0
    png = tmp_path / doc["files"]["png"].rsplit("/", 1)[-1]
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    png.unlink()
    assert main(["bench", "attention", "--replot", doc["files"]["json"]]) == 0
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_interrupted_run_keeps_what_it_measured(capsys, tmp_path, monkeypatch):
    import longnet.bench.attention as attention

    real, calls = attention.measure_interleaved, []

    def stop_on_second_group(*args, **kwargs):  # a group: the dilated and dense case of one N
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(attention, "measure_interleaved", stop_on_second_group)
    rc, _, doc = _run_quick(capsys, tmp_path)
    assert rc == 130
    assert doc["complete"] is False and doc["note"] == "interrupted after 2 of 16 cases"
    assert len(doc["cases"]) == 2
    saved = json.loads(next(tmp_path.glob("attention_*.json")).read_text())
    assert saved["complete"] is False and len(saved["cases"]) == 2


@pytest.mark.parametrize("argv", [
    ["--seq-lens", "0,128"], ["--seq-lens", "a"], ["--heads", "-1"], ["--mode", "bwd"],
    ["--causal", "--no-causal"], ["--warmup", "0"],
])
def test_bad_arguments_are_rejected(argv, tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "attention", "--quick", "--out", str(tmp_path), *argv])
    assert exc.value.code == 2


def test_max_seq_len_below_every_length_is_an_error(capsys, tmp_path):
    rc = main(["bench", "attention", "--quick", "--no-plot", "--max-seq-len", "64",
               "--out", str(tmp_path)])
    assert rc == 2
    assert "--max-seq-len" in capsys.readouterr().err


def _records(cfg, times):
    """Synthetic ok records: ``times[(impl, n, causal, mode)] = seconds``."""
    recs = []
    for (impl, n, causal, mode), t in times.items():
        flops = cfg.flops(impl, n, causal, mode)
        recs.append({"impl": impl, "n": n, "causal": causal, "mode": mode, "status": "ok",
                     "flops": flops, "median_ms": t * 1e3, "peak_mb": 1.0,
                     "tflops": flops / t / 1e12})
    return recs


def test_target_checks_arithmetic():
    cfg = AttentionBenchConfig(seq_lens=(16384, 32768, 131072), dense_max_seq_len=32768,
                               causal=(True,), modes=("fwdbwd",))
    ratio16 = cfg.flops("dense", 16384, True, "fwdbwd") / cfg.flops("dilated", 16384, True,
                                                                     "fwdbwd")
    assert ratio16 == pytest.approx(3.9, abs=0.05)  # the paper pattern's ratio at 16K
    times = {("dilated", 16384, True, "fwdbwd"): 1.0,
             ("dense", 16384, True, "fwdbwd"): 0.95 * ratio16,  # passes (>= 0.9 x ratio)
             ("dilated", 32768, True, "fwdbwd"): 2.0,
             ("dense", 32768, True, "fwdbwd"): 2.0 * 3.0,  # 3x, far under 0.9 x 7.7
             ("dilated", 131072, True, "fwdbwd"): 2.0 * 4.5}  # 12.5% over linear: fails
    t = target_checks(_records(cfg, times), cfg)
    s16, s32 = t["cpu_fp32_causal_fwdbwd_speedup_vs_flop_ratio"]
    assert s16["pass"] is True and s16["speedup"] == pytest.approx(0.95 * ratio16, rel=1e-3)
    assert s32["pass"] is False and s32["speedup"] == pytest.approx(3.0)
    (g,) = t["linear_growth_128k_over_32k"]
    assert g["flop_growth"] == pytest.approx(4.0)
    assert g["time_growth"] == pytest.approx(4.5) and g["pass"] is False
    assert g["relative_error"] == pytest.approx(0.125)
    assert all(e["pass"] is None for e in t["gpu_bf16_fwdbwd_tflops_fraction_of_dense"])
    assert t["longest_seq_len"]["dilated_fwdbwd"]["longest_n"] == 131072
    assert t["longest_seq_len"]["dense_fwdbwd"]["longest_n"] == 32768
    rows = comparison_rows(_records(cfg, times))
    assert [r["n"] for r in rows] == [16384, 32768, 131072]
    table = format_table(rows).splitlines()
    assert len(table) == 4 and len({len(line) for line in table}) == 1  # aligned


def test_measure_counts_calls_and_rejects_bad_counts():
    calls = []
    m = measure(lambda: calls.append(1), device="cpu", repeats=3, warmup=2)
    assert len(calls) == 5 and len(m.times_s) == 3 and m.median_s >= 0
    with pytest.raises(ValueError, match="repeats"):
        measure(lambda: None, device="cpu", repeats=0, warmup=0)
    with pytest.raises(ValueError, match="warmup"):
        measure(lambda: None, device="cpu", repeats=1, warmup=-1)


def test_measure_interleaved_alternates_the_timed_calls():
    order = []
    ms = measure_interleaved([lambda: order.append("a"), lambda: order.append("b")], device="cpu",
                             repeats=2, warmups=[1, 0])
    assert order == ["a", "a", "b", "a", "b"]  # a's warmup, then a, b, a, b
    assert [len(m.times_s) for m in ms] == [2, 2] and [m.warmup for m in ms] == [1, 0]
    with pytest.raises(ValueError, match="warmup"):
        measure_interleaved([lambda: None], device="cpu", repeats=1, warmups=[0, 0])


def test_measure_sees_cpu_memory_growth():
    def alloc():
        x = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        return x.sum()
    m = measure(alloc, device="cpu", repeats=1, warmup=0)
    if m.peak_bytes is None:
        pytest.skip("no /proc/self/statm on this platform")
    assert m.peak_bytes >= 32 * 2**20


def test_allocator_setting_can_be_turned_off(capsys, tmp_path):
    rc, _, doc = _run_quick(capsys, tmp_path, "--no-keep-freed-memory")
    assert rc == 0 and doc["allocator"] == "default"


def test_an_out_of_memory_case_stops_its_series_only(monkeypatch):
    import longnet.bench.attention as attention

    real = attention._make_call

    def make_call(cfg, case, *tensors):
        if case["impl"] == "dense" and case["n"] >= 64:
            def oom():
                raise torch.OutOfMemoryError("fake: out of memory")
            return oom
        return real(cfg, case, *tensors)

    monkeypatch.setattr(attention, "_make_call", make_call)
    cfg = AttentionBenchConfig(seq_lens=(32, 64, 128), dense_max_seq_len=128, causal=(True,),
                               modes=("fwd",), heads=2, head_dim=4, segment_lengths=(16,),
                               dilation_rates=(1,), repeats=2, warmup=1)
    status = {(r["impl"], r["n"]): r["status"] for r in attention.run_attention_bench(cfg)}
    assert status == {("dilated", 32): "ok", ("dense", 32): "ok", ("dilated", 64): "ok",
                      ("dense", 64): "oom", ("dilated", 128): "ok",
                      ("dense", 128): "skipped: out of memory at N=64"}


def test_step_times_summarise_the_timed_steps_only():
    from longnet.bench.measure import StepTimes

    timer = StepTimes("cpu")
    calls = []
    assert timer.run(lambda: calls.append(1) or "out", record=False) == "out"  # warmup: not timed
    for _ in range(3):
        timer.run(lambda: sum(range(20000)))
    s = timer.summary()
    assert len(calls) == 1 and s["timed_steps"] == 3 and len(timer.wall) == len(timer.cpu) == 3
    assert 0 < s["ms_min"] <= s["ms_per_token"] and s["ms_mean"] > 0 and s["cpu_ms_per_token"] >= 0
    with pytest.raises(RuntimeError, match="no timed steps"):
        StepTimes("cpu").summary()


# ------------------------------------------------------------------ where results go, what is printed
TINY_FULL = ["bench", "attention", "--seq-lens", "128", "--segment-lengths", "64", "--dilation-rates", "1",
             "--heads", "2", "--head-dim", "8", "--causal", "--mode", "fwd", "--no-plot", "--no-progress",
             "--min-rounds", "1", "--max-rounds", "1"]  # one fresh process per case


def _stem() -> str:
    from longnet.bench.report import device_slug

    return f"attention_{device_slug(torch.device('cpu'))}"


def test_quick_never_writes_into_benchmarks_results(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    committed = tmp_path / "benchmarks" / "results"
    committed.mkdir(parents=True)
    earlier = committed / f"{_stem()}.json"
    earlier.write_text('{"a 2K-128K run": true}')
    assert main(["bench", "attention", "--quick", "--no-plot", "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert Path(summary["files"]["json"]).resolve() == (tmp_path / "runs" / "bench-quick" / f"{_stem()}.json")
    assert earlier.read_text() == '{"a 2K-128K run": true}' and sorted(committed.iterdir()) == [earlier]

    assert main(["bench", "attention", "--quick", "--no-plot", "--out", "benchmarks/results"]) == 2
    err = capsys.readouterr().err
    assert "--quick" in err and "benchmarks/results" in err and "--out" in err
    assert earlier.read_text() == '{"a 2K-128K run": true}'


def test_a_full_run_does_not_overwrite_without_overwrite(capsys, tmp_path):
    earlier = tmp_path / f"{_stem()}.json"
    earlier.write_text("earlier results")
    assert main([*TINY_FULL, "--repeats", "1", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert str(earlier) in err and "--overwrite" in err and "--out" in err
    assert earlier.read_text() == "earlier results"

    assert main([*TINY_FULL, "--repeats", "1", "--out", str(tmp_path), "--overwrite"]) == 0
    capsys.readouterr()
    assert json.loads(earlier.read_text())["benchmark"] == "attention"


def test_a_full_run_refuses_when_only_the_png_exists(capsys, tmp_path):
    (tmp_path / f"{_stem()}.png").write_bytes(b"earlier plot")
    assert main([*TINY_FULL, "--out", str(tmp_path)]) == 2
    assert "--overwrite" in capsys.readouterr().err and not (tmp_path / f"{_stem()}.json").exists()


def test_output_is_tables_a_timing_note_and_a_short_last_line(capsys, tmp_path):
    rc, out, doc = _run_quick(capsys, tmp_path)
    lines = out.strip().splitlines()
    assert rc == 0
    assert not any("{" in line for line in lines[:-1]), "raw dicts printed"
    assert len(lines[-1].encode()) < 2048
    summary = json.loads(lines[-1])
    assert summary["files"]["json"] == doc["files"]["json"] and summary["quick"] is True
    assert summary["warmup"] >= 1 and summary["repeats"] >= 3  # quick too: warm-up, then several calls
    assert all(c["warmup"] >= 1 and len(c["times_ms"]) >= 3 for c in doc["cases"])
    (note,) = [line for line in lines if line.startswith("timing:")]
    assert f"median of {summary['repeats']} timed call(s) after {summary['warmup']} warm-up" in note
    assert "spread" in note


def test_the_summary_line_stays_short_for_a_full_run():
    from longnet.cli.bench import summary_line

    rows = [{"n": 2 ** e, "causal": c, "mode": m, "speedup": 1.23456789}
            for e in range(11, 18) for c in (True, False) for m in ("fwd", "fwdbwd")]
    doc = {"benchmark": "attention", "complete": True, "note": None, "device": {"name": "AMD EPYC 7B13"},
           "config": {"dtype": "float32", "repeats": 3, "warmup": 1}, "comparisons": rows,
           "files": {"json": "benchmarks/results/attention_cpu-amd-epyc.json",
                     "png": "benchmarks/results/attention_cpu-amd-epyc.png"}}
    assert len(json.dumps(summary_line(doc), separators=(",", ":"))) < 3000


def test_claim_results_rule(tmp_path):
    from longnet.bench.results import ResultsExistError, claim_results

    out = tmp_path / "new"
    assert claim_results(out, "x", overwrite=False) == out and out.is_dir()
    (out / "x.json").write_text("{}")
    with pytest.raises(ResultsExistError, match="--overwrite"):
        claim_results(out, "x", overwrite=False)
    assert claim_results(out, "x", overwrite=True) == out
    assert claim_results(out, "x", overwrite=False, quick=True) == out  # a smoke run's own folder
    with pytest.raises(ValueError, match="--quick"):
        claim_results(tmp_path / "benchmarks" / "results", "x", overwrite=True, quick=True)
    assert (out / "x.json").read_text() == "{}"
