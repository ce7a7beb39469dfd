"""save_pretrained / from_pretrained: bit-exact round trips; bad checkpoints raise CheckpointError."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from longnet import CheckpointError, LongNetConfig, LongNetEncoder, LongNetLM


def _config(**kw):
    base = dict(vocab_size=41, embed_dim=32, num_layers=2, num_heads=4, ffn_dim=48,
                segment_lengths=(4, 8), dilation_rates=(1, 2), max_train_length=8)
    base.update(kw)
    return LongNetConfig(**base)


@pytest.fixture
def saved(tmp_path):
    model = LongNetLM(_config()).eval()
    model.save_pretrained(tmp_path)
    return model, tmp_path


def test_lm_round_trip_is_bit_exact_and_stays_tied(saved):
    model, path = saved
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]
    assert "lm_head.weight" not in load_file(str(path / "model.safetensors"))
    loaded = LongNetLM.from_pretrained(path).eval()
    assert loaded.config == model.config
    assert loaded.lm_head.weight is loaded.embed.weight
    ids = torch.randint(0, 41, (2, 19))
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k


def test_untied_and_bf16_round_trip(tmp_path):
    model = LongNetLM(_config(tie_embeddings=False, num_kv_heads=2)).to(torch.bfloat16).eval()
    model.save_pretrained(tmp_path)
    loaded = LongNetLM.from_pretrained(tmp_path, map_location="cpu").eval()
    assert loaded.embed.weight.dtype == torch.bfloat16
    assert loaded.lm_head.weight is not loaded.embed.weight
    ids = torch.randint(0, 41, (1, 13))
    assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_encoder_round_trip(tmp_path):
    enc = LongNetEncoder(_config(position="rope", vocab_size=None), input_dim=12).eval()
    enc.save_pretrained(tmp_path)
    loaded = LongNetEncoder.from_pretrained(tmp_path).eval()
    assert loaded.input_dim == 12
    x = torch.randn(2, 11, 12)
    assert torch.equal(loaded(x), enc(x))
    with pytest.raises(CheckpointError, match="LongNetEncoder"):
        LongNetLM.from_pretrained(tmp_path)


def test_overwriting_leaves_no_temporary_files(saved):
    model, path = saved
    model.save_pretrained(path)
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]


def test_corrupt_weights(saved):
    _, path = saved
    (path / "model.safetensors").write_bytes(b"\x00garbage" * 100)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        LongNetLM.from_pretrained(path)


def test_truncated_weights(saved):
    _, path = saved
    f = path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        LongNetLM.from_pretrained(path)


def test_missing_files(saved):
    _, path = saved
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors: file not found"):
        LongNetLM.from_pretrained(path)
    (path / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json: file not found"):
        LongNetLM.from_pretrained(path)


def test_corrupt_or_invalid_config(saved):
    _, path = saved
    cfg = path / "config.json"
    doc = json.loads(cfg.read_text())
    cfg.write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json: not valid JSON"):
        LongNetLM.from_pretrained(path)
    bad = dict(doc, config=dict(doc["config"], num_heads=5))
    cfg.write_text(json.dumps(bad))
    with pytest.raises(CheckpointError, match="num_heads"):
        LongNetLM.from_pretrained(path)
    bad = dict(doc, config=dict(doc["config"], extra_knob=1))
    cfg.write_text(json.dumps(bad))
    with pytest.raises(CheckpointError, match="extra_knob"):
        LongNetLM.from_pretrained(path)


def test_config_of_another_model(saved):
    _, path = saved
    cfg = path / "config.json"
    doc = json.loads(cfg.read_text())
    doc["config"]["ffn_dim"] = 64
    cfg.write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match="shapes do not match.*fc1"):
        LongNetLM.from_pretrained(path)
    doc["config"]["ffn_dim"] = 48
    doc["config"]["num_layers"] = 3
    cfg.write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match="missing keys.*blocks.2"):
        LongNetLM.from_pretrained(path)


def test_missing_and_extra_tensors(saved):
    _, path = saved
    f = path / "model.safetensors"
    state = load_file(str(f))
    save_file({k: v for k, v in state.items() if k != "norm.weight"}, str(f))
    with pytest.raises(CheckpointError, match="missing keys \\['norm.weight'\\]"):
        LongNetLM.from_pretrained(path)
    save_file(dict(state, stray=torch.zeros(2)), str(f))
    with pytest.raises(CheckpointError, match="unexpected keys \\['stray'\\]"):
        LongNetLM.from_pretrained(path)


def test_checkpoint_error_is_a_value_error():
    assert issubclass(CheckpointError, ValueError)
