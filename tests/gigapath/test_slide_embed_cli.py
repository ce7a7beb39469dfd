"""``longnet slide-embed``: outputs, batching, resuming, bad files reported and skipped."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from longnet.cli.main import main
from longnet.gigapath import SlideEncoder, SlideEncoderConfig, load_slide_encoder
from longnet.gigapath.checkpoint import FORMAT

SMALL = SlideEncoderConfig(in_dim=24, embed_dim=32, depth=2, num_heads=4, ffn_dim=48,
                           segment_lengths=(8, 32), dilation_rates=(1, 4))


def _slide(n, seed):
    g = torch.Generator().manual_seed(seed)
    return {"features": torch.randn(n, 24, generator=g), "coords": torch.rand(n, 2, generator=g) * 20000}


@pytest.fixture
def setup(tmp_path):
    torch.manual_seed(0)
    model = SlideEncoder(SMALL)
    ckpt = tmp_path / "encoder.safetensors"  # a converted file: longnet names + config metadata
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt),
              metadata={"format": FORMAT, "config": json.dumps(SMALL.to_dict())})
    feats = tmp_path / "feats"
    feats.mkdir()
    slides = {"a": _slide(5, 1), "b": _slide(40, 2), "c": _slide(1, 3)}
    for name, s in slides.items():
        torch.save(s, feats / f"{name}.pt")
    return tmp_path, ckpt, feats, slides


def _run(capsys, *argv):
    code = main(["slide-embed", *map(str, argv), "--no-progress"])
    out, err = capsys.readouterr()
    return code, json.loads(out.strip().splitlines()[-1]), err


def test_embeds_every_slide_as_alone_and_resumes(setup, capsys):
    tmp, ckpt, feats, slides = setup
    code, summary, _ = _run(capsys, "--checkpoint", ckpt, "--features", feats, "--out", tmp / "out",
                            "--tiles", "--all-layers", "--table", "--batch-tiles", 100)
    assert code == 0 and summary["embedded"] == 3 and summary["failed"] == {}
    model = load_slide_encoder(ckpt)
    for name, s in slides.items():
        got = load_file(str(tmp / "out" / f"{name}.safetensors"))
        with torch.no_grad():
            slide, tiles = model(s["features"][None], s["coords"][None], return_tiles=True)
            layers = model(s["features"][None], s["coords"][None], all_layers=True)
        torch.testing.assert_close(got["slide"], slide[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got["tiles"], tiles[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got["layers"], layers[:, 0], rtol=1e-5, atol=1e-5)
    table = load_file(str(tmp / "out" / "embeddings.safetensors"))["embeddings"]
    assert table.shape == (3, 32)
    assert (tmp / "out" / "embeddings.csv").read_text().splitlines()[1].startswith("a,")
    code, summary, _ = _run(capsys, "--checkpoint", ckpt, "--features", feats, "--out", tmp / "out")
    assert code == 0 and summary["embedded"] == 0 and summary["already_done"] == 3


def test_bad_files_are_reported_and_skipped(setup, capsys):
    tmp, ckpt, feats, _ = setup
    (feats / "junk.pt").write_bytes(b"garbage")
    torch.save({"features": torch.randn(4, 24)}, feats / "nocoords.pt")
    torch.save({"features": torch.randn(4, 23), "coords": torch.zeros(4, 2)}, feats / "width.pt")
    torch.save({"features": torch.randn(3, 24), "coords": torch.tensor([[0.0, 0], [-5, 0], [1, 1]])},
               feats / "negative.pt")
    code, summary, err = _run(capsys, "--checkpoint", ckpt, "--features", feats, "--out", tmp / "out")
    assert code == 1 and summary["embedded"] == 3
    assert set(summary["failed"]) == {"junk", "nocoords", "width", "negative"}
    assert "width 23, the model takes 24" in summary["failed"]["width"]
    assert "[0, 256000)" in summary["failed"]["negative"]
    assert "skipped" in err and "junk.pt" in err
    assert sorted(p.stem for p in (tmp / "out").glob("*.safetensors")) == ["a", "b", "c"]


def test_h5_input(setup, capsys):
    h5py = pytest.importorskip("h5py")
    tmp, ckpt, _, slides = setup
    with h5py.File(tmp / "slide.h5", "w") as f:
        f["features"] = slides["b"]["features"].numpy()[None]  # extractor layout (1, N, D)
        f["coords"] = slides["b"]["coords"].numpy()[None]
    with h5py.File(tmp / "empty.h5", "w") as f:
        f["features"] = slides["b"]["features"].numpy()
    code, summary, _ = _run(capsys, "--checkpoint", ckpt, "--features", tmp / "slide.h5", tmp / "empty.h5",
                            "--out", tmp / "out")
    assert code == 1 and summary["embedded"] == 1 and "missing datasets ['coords']" in summary["failed"]["empty"]
    with torch.no_grad():
        want = load_slide_encoder(ckpt)(slides["b"]["features"][None], slides["b"]["coords"][None])
    torch.testing.assert_close(load_file(str(tmp / "out" / "slide.safetensors"))["slide"], want[0],
                               rtol=1e-5, atol=1e-5)


def test_bad_options_exit_2(setup, capsys):
    tmp, ckpt, feats, _ = setup
    assert main(["slide-embed", "--checkpoint", str(tmp / "nope.pth"), "--features", str(feats),
                 "--out", str(tmp / "o")]) == 2
    assert "file not found" in capsys.readouterr().err
    assert main(["slide-embed", "--checkpoint", str(ckpt), "--features", str(tmp / "none"),
                 "--out", str(tmp / "o")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_malformed_h5_files_are_reported_and_skipped(setup, capsys):
    # a group where a dataset belongs, a scalar, strings, bytes that are not HDF5: each is that
    # file's failure (named in the summary); the good files are still embedded
    h5py = pytest.importorskip("h5py")
    import numpy as np

    tmp, ckpt, feats, _ = setup
    with h5py.File(feats / "group.h5", "w") as f:
        f.create_group("features")
        f["coords"] = np.zeros((3, 2))
    with h5py.File(feats / "scalar.h5", "w") as f:
        f["features"] = 3.0
        f["coords"] = 1.0
    with h5py.File(feats / "strings.h5", "w") as f:
        f["features"] = np.array([b"a", b"b"])
        f["coords"] = np.zeros((2, 2))
    (feats / "garbage.h5").write_bytes(b"not hdf5")
    code, summary, err = _run(capsys, "--checkpoint", ckpt, "--features", feats, "--out", tmp / "out")
    assert code == 1 and summary["embedded"] == 3
    assert set(summary["failed"]) == {"group", "scalar", "strings", "garbage"}
    assert "'features' is an HDF5 group, not a dataset" in summary["failed"]["group"]
    assert "must be an array of numbers" in summary["failed"]["scalar"]
    assert "must be an array of numbers" in summary["failed"]["strings"]
    assert "not a readable HDF5 file" in summary["failed"]["garbage"]
    assert sorted(p.stem for p in (tmp / "out").glob("*.safetensors")) == ["a", "b", "c"]


def test_an_unexpected_error_in_one_file_does_not_stop_the_run(setup, capsys, monkeypatch):
    import longnet.gigapath.slides as slides

    tmp, ckpt, feats, _ = setup
    real = slides.read_slide

    def flaky(path, dim=None):
        if path.stem == "b":
            raise KeyError("a reader bug")
        return real(path, dim)

    monkeypatch.setattr(slides, "read_slide", flaky)
    code, summary, _ = _run(capsys, "--checkpoint", ckpt, "--features", feats, "--out", tmp / "out")
    assert code == 1 and summary["embedded"] == 2
    assert "KeyError" in summary["failed"]["b"] and "b.pt" in summary["failed"]["b"]


def test_a_checkpoint_changed_since_its_manifest_is_refused(setup, capsys):
    from longnet.models.checkpoint import MANIFEST_FILE, build_manifest

    tmp, ckpt, feats, _ = setup
    (tmp / MANIFEST_FILE).write_text(json.dumps(build_manifest(tmp, [ckpt.name])))
    data = bytearray(ckpt.read_bytes())
    data[len(data) // 2:len(data) // 2 + 4096] = bytes(4096)  # finite zeros: only the hash sees them
    ckpt.write_bytes(bytes(data))
    assert main(["slide-embed", "--checkpoint", str(ckpt), "--features", str(feats),
                 "--out", str(tmp / "o"), "--no-progress"]) == 2
    assert "encoder.safetensors: corrupted on disk (SHA-256 differs" in capsys.readouterr().err
