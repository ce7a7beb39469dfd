"""Every load verifies the weights: manifest hashes when there is a manifest, finite tensors always."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from longnet import CheckpointError, LongNetConfig, LongNetEncoder, LongNetLM
from longnet.models.checkpoint import MANIFEST_FILE, build_manifest, check_finite, verify_weights
from longnet.train.checkpoint import latest_checkpoint, save_trainer_checkpoint, verify_checkpoint


def _config(**kw):
    base = dict(vocab_size=41, embed_dim=32, num_layers=2, num_heads=4, ffn_dim=48,
                segment_lengths=(4, 8), dilation_rates=(1, 2), max_train_length=8)
    return LongNetConfig(**(base | kw))


def overwrite_middle(path, byte: bytes, size: int = 4096) -> None:
    """Overwrite ``size`` bytes in the middle of ``path`` (the safetensors header stays intact)."""
    data = bytearray(path.read_bytes())
    start = len(data) // 2
    data[start:start + size] = byte * size
    path.write_bytes(bytes(data))


def _saved_run(tmp_path):
    """A run folder with one checkpoint (as ``longnet train`` writes it), without training."""
    model = LongNetLM(_config())
    optimizer = torch.optim.AdamW(model.parameters())
    run = tmp_path / "run"
    save_trainer_checkpoint(run, step=3, write_model=model.save_pretrained,
                            write_tokenizer=lambda folder: (folder / "tokenizer.json").write_text("{}"),
                            optimizer_state=optimizer.state_dict(), trainer_state={})
    return run


def test_nan_written_into_the_weights_is_refused_naming_file_and_tensor(tmp_path):
    LongNetLM(_config()).save_pretrained(tmp_path)  # no manifest: the finiteness check still runs
    weights = tmp_path / "model.safetensors"
    overwrite_middle(weights, b"\xff")  # 0xffffffff is a float32 NaN
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor '[\w.]+' holds [\d,]+ non-finite"):
        LongNetLM.from_pretrained(tmp_path)
    loaded = LongNetLM.from_pretrained(tmp_path, verify=False)  # the opt-out loads it as it is
    assert not all(bool(torch.isfinite(p).all()) for p in loaded.parameters())


def test_encoder_loads_are_checked_too(tmp_path):
    LongNetEncoder(_config(vocab_size=None, position="rope"), input_dim=16).save_pretrained(tmp_path)
    overwrite_middle(tmp_path / "model.safetensors", b"\xff")
    with pytest.raises(CheckpointError, match="non-finite"):
        LongNetEncoder.from_pretrained(tmp_path)


def test_first_bad_tensor_is_named():
    state = {"a": torch.ones(3), "ids": torch.tensor([1, 2]), "b": torch.tensor([1.0, float("inf")]),
             "c": torch.tensor([float("nan")])}
    with pytest.raises(CheckpointError, match=r"^f\.safetensors: tensor 'b' holds 1 non-finite"):
        check_finite(state, "f.safetensors")
    check_finite({"a": torch.ones(2, dtype=torch.bfloat16)}, "f")


@pytest.mark.parametrize("where", ["top level", "checkpoint"])
def test_corruption_of_a_run_folder_is_found_by_the_manifest(tmp_path, where):
    run = _saved_run(tmp_path)
    folder = run if where == "top level" else latest_checkpoint(run)
    assert LongNetLM.from_pretrained(folder) is not None
    overwrite_middle(folder / "model.safetensors", b"\x00")  # finite values: only the hash sees it
    with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupted on disk \(SHA-256 differs"):
        LongNetLM.from_pretrained(folder)
    LongNetLM.from_pretrained(folder, verify=False)


def test_an_edited_config_is_found_by_the_manifest(tmp_path):
    run = _saved_run(tmp_path)
    doc = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps(doc, indent=4))  # same model, other bytes
    with pytest.raises(CheckpointError, match=r"config\.json: torn or changed on disk"):
        LongNetLM.from_pretrained(run)


def test_the_top_level_manifest_holds_the_checkpoints_entries(tmp_path):
    run = _saved_run(tmp_path)
    ckpt = latest_checkpoint(run)
    top = json.loads((run / MANIFEST_FILE).read_text())["files"]
    below = json.loads((ckpt / MANIFEST_FILE).read_text())["files"]
    assert sorted(top) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert all(top[name] == below[name] for name in top)
    assert build_manifest(run, sorted(top))["files"] == top
    verify_checkpoint(ckpt)  # the trainer's check and the loaders' share one rule


def test_a_run_folder_published_without_a_manifest_still_loads(tmp_path):
    run = _saved_run(tmp_path)
    (run / MANIFEST_FILE).unlink()  # runs written before top-level manifests
    assert LongNetLM.from_pretrained(run) is not None


def test_a_corrupt_manifest_is_an_error(tmp_path):
    run = _saved_run(tmp_path)
    (run / MANIFEST_FILE).write_text('{"files": ')
    with pytest.raises(CheckpointError, match=r"manifest\.json: checkpoint manifest is corrupt"):
        LongNetLM.from_pretrained(run)


def test_files_the_manifest_does_not_list_are_not_checked(tmp_path):
    run = _saved_run(tmp_path)
    shutil.copy(run / "model.safetensors", run / "other.safetensors")
    overwrite_middle(run / "other.safetensors", b"\x00")
    verify_weights(load_file(str(run / "other.safetensors")), run / "other.safetensors")
