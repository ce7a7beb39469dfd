"""GigaPath positions against its table; loading, refusing and converting checkpoints."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from gigapath_helpers import reference_table
from safetensors import safe_open

from longnet.gigapath import SlideEncoder, SlideEncoderConfig, SlidePositions, convert_checkpoint, load_slide_encoder
from longnet.models.checkpoint import CheckpointError

SMALL = SlideEncoderConfig(in_dim=24, embed_dim=32, depth=2, num_heads=4, ffn_dim=48)


def _gigapath_state(model: SlideEncoder) -> dict[str, torch.Tensor]:
    """A state dict under GigaPath's names, written independently of longnet.gigapath.keys."""
    rename = {"attn_norm": "self_attn_layer_norm", "attn.sub_ln": "self_attn.inner_attn_ln",
              "attn.": "self_attn.", "ffn_norm": "final_layer_norm", "ffn.sub_ln": "ffn.ffn_layernorm"}
    out = {}
    for k, v in model.state_dict().items():
        k = k.replace("patch_embed.", "patch_embed.proj.").replace("encoder.norm.", "encoder.layer_norm.")
        k = k.replace("encoder.blocks.", "encoder.layers.")
        for a, b in rename.items():
            if a in k:
                k = k.replace(a, b)
                break
        out[k] = v.clone()
    return out


# ------------------------------------------------------------------------------------- positions
def test_rows_equal_gigapath_table(gigapath_ref):
    # every cell index on both axes, against GigaPath's own function
    i = torch.arange(1000)
    j = (i * 7 + 3) % 1000
    coords = torch.stack([i * 256 + 255.5, j * 256.0], -1)[None]  # x, y in pixels
    ours = SlidePositions()(coords)[0]
    m = (i * 1000 + j).numpy()
    grid = np.stack([m % 1000, m // 1000]).astype(np.float32).reshape(2, 1, -1)
    want = torch.from_numpy(gigapath_ref.pos_embed.get_2d_sincos_pos_embed_from_grid(768, grid)).float()
    assert ours.dtype == torch.float32
    assert torch.equal(ours, want)


def test_rows_equal_the_full_table_layout(gigapath_ref):
    # get_2d_sincos_pos_embed itself (small grid): row i * grid + j + 1 for tile (x, y) in cell (i, j)
    grid = 37
    table = torch.from_numpy(gigapath_ref.pos_embed.get_2d_sincos_pos_embed(768, grid, cls_token=True)).float()
    ij = torch.cartesian_prod(torch.arange(grid), torch.arange(grid))
    ours = SlidePositions(grid=grid)(ij[None].double() * 256 + 17)[0]
    assert torch.equal(ours, table[1 + ij[:, 0] * grid + ij[:, 1]])
    assert torch.equal(table[0], torch.zeros(768))
    assert torch.equal(reference_table(gigapath_ref, 2001)[0, 1:], table.new_tensor(
        gigapath_ref.pos_embed.get_2d_sincos_pos_embed_from_grid(
            768, np.stack([np.arange(2000) % 1000, np.arange(2000) // 1000]).astype(np.float32).reshape(2, 1, -1))))


@pytest.mark.parametrize("bad, match", [
    ([[-1.0, 5.0]], r"\[0, 256000\)"), ([[256000.0, 0.0]], r"\[0, 256000\)"),
    ([[0.0, 300000.0]], r"tile 0 has"), ([[float("nan"), 0.0]], "finite"), ([[0.0, float("inf")]], "finite")])
def test_bad_coords_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        SlidePositions()(torch.tensor([bad]))


def test_padding_coords_are_not_checked_and_tile_indices_warn():
    pos = SlidePositions()
    mask = torch.tensor([[True, False]])
    out = pos(torch.tensor([[[10.0, 20.0], [float("nan"), -5.0]]]), mask)
    assert bool((out[0, 1] == 0).all())
    with pytest.warns(UserWarning, match="one 256-px grid cell"):
        pos(torch.tensor([[[0, 0], [0, 1], [1, 1]]]))  # tile indices, not pixels
    with pytest.raises(ValueError, match="coords must be a"):
        pos(torch.zeros(1, 3))


# ------------------------------------------------------------------------------------ checkpoints
def test_load_and_convert_round_trip(tmp_path):
    torch.manual_seed(0)
    src = SlideEncoder(SMALL)
    torch.save({"model": _gigapath_state(src)}, tmp_path / "slide_encoder.pth")
    model = load_slide_encoder(tmp_path / "slide_encoder.pth", num_heads=4)
    assert model.config.depth == 2 and model.config.in_dim == 24 and not model.training
    feats, coords = torch.randn(1, 9, 24), torch.rand(1, 9, 2) * 5000
    with torch.no_grad():
        want = src.eval()(feats, coords)
        torch.testing.assert_close(model(feats, coords), want, rtol=0, atol=0)
        dest = convert_checkpoint(tmp_path / "slide_encoder.pth", tmp_path / "out" / "gigapath.safetensors",
                                  num_heads=4)
        with safe_open(str(dest), "pt") as f:
            assert json.loads(f.metadata()["config"])["num_heads"] == 4
        again = load_slide_encoder(dest)
        torch.testing.assert_close(again(feats, coords), want, rtol=0, atol=0)
        paper = load_slide_encoder(dest, compat=None)
        assert paper.encoder.config.semantics == "paper"
        assert paper(feats, coords).shape == want.shape
    assert [p.name for p in dest.parent.iterdir()] == ["gigapath.safetensors"]  # no temporary left


def test_bare_state_dict_and_mapping_load(tmp_path):
    state = _gigapath_state(SlideEncoder(SMALL))
    torch.save(state, tmp_path / "bare.pth")
    load_slide_encoder(tmp_path / "bare.pth", num_heads=4)
    load_slide_encoder(state, num_heads=4)


def test_weights_with_nan_are_refused_unless_verify_is_false(tmp_path):
    state = _gigapath_state(SlideEncoder(SMALL))
    state["encoder.layers.1.ffn.fc2.weight"][3, 5] = float("nan")
    torch.save({"model": state}, tmp_path / "slide_encoder.pth")
    with pytest.raises(CheckpointError, match=r"slide_encoder\.pth: tensor 'encoder\.layers\.1\.ffn\.fc2\.weight' "
                                              r"holds 1 non-finite"):
        load_slide_encoder(tmp_path / "slide_encoder.pth", num_heads=4)
    load_slide_encoder(tmp_path / "slide_encoder.pth", num_heads=4, verify=False)


@pytest.mark.parametrize("edit, match", [
    (lambda s: s.pop("encoder.layers.1.ffn.fc2.bias"), r"missing keys: encoder\.blocks\.1\.ffn\.fc2\.bias"),
    (lambda s: s.update({"pos_embed": torch.zeros(3)}), "unexpected keys: pos_embed"),
    (lambda s: s.update({"encoder.layers.0.self_attn.relative.weight": torch.zeros(3)}),
     r"unexpected keys: encoder\.layers\.0\.self_attn\.relative\.weight"),
    (lambda s: s.update({"encoder.layers.0.final_layer_norm.weight": torch.ones(31)}),
     r"encoder\.blocks\.0\.ffn_norm\.weight: checkpoint \(31,\) vs model \(32,\)"),
    (lambda s: s.pop("cls_token"), "not a Prov-GigaPath slide encoder"),
])
def test_bad_checkpoints_are_refused(tmp_path, edit, match):
    state = _gigapath_state(SlideEncoder(SMALL))
    edit(state)
    torch.save({"model": state}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=match):
        load_slide_encoder(tmp_path / "bad.pth", num_heads=4)


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_pickle_with_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": {"cls_token": torch.zeros(1, 1, 32)}, "x": _Payload()}, path)
    with pytest.raises(CheckpointError, match="refused to unpickle .*system"):
        load_slide_encoder(path)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pth: (refused|not a readable)"):
        load_slide_encoder(tmp_path / "junk.pth")
    with pytest.raises(CheckpointError, match="file not found"):
        load_slide_encoder(tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="compat"):
        load_slide_encoder(_gigapath_state(SlideEncoder(SMALL)), num_heads=4, compat="paper")


def test_forward_input_errors():
    model = SlideEncoder(SMALL).eval()
    with pytest.raises(ValueError, match=r"features must be a \(batch, tiles, 24\)"):
        model(torch.randn(1, 3, 23), torch.zeros(1, 3, 2))
    with pytest.raises(ValueError, match="no tiles"):
        model(torch.randn(1, 0, 24), torch.zeros(1, 0, 2))
    with pytest.raises(ValueError, match="coords must be"):
        model(torch.randn(1, 3, 24), torch.zeros(1, 4, 2))
    with pytest.raises(ValueError, match="no real tile"):
        model(torch.randn(2, 3, 24), torch.zeros(2, 3, 2), torch.tensor([[True] * 3, [False] * 3]))
    with pytest.raises(ValueError, match="real tokens first"):
        model(torch.randn(1, 3, 24), torch.zeros(1, 3, 2), torch.tensor([[True, False, True]]))


def test_convert_command(tmp_path, capsys):
    from longnet.gigapath.convert import main as convert_main

    torch.manual_seed(0)
    src = SlideEncoder(SMALL).eval()
    torch.save({"model": _gigapath_state(src)}, tmp_path / "slide_encoder.pth")
    dest = tmp_path / "gigapath.safetensors"
    assert convert_main([str(tmp_path / "slide_encoder.pth"), str(dest), "--num-heads", "4"]) == 0
    assert f"wrote {dest}" in capsys.readouterr().out
    feats, coords = torch.randn(1, 9, 24), torch.rand(1, 9, 2) * 5000
    with torch.no_grad():
        torch.testing.assert_close(load_slide_encoder(dest)(feats, coords), src(feats, coords), rtol=0, atol=0)
    assert convert_main([str(tmp_path / "missing.pth"), str(tmp_path / "x.safetensors")]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    assert not (tmp_path / "x.safetensors").exists()


def test_only_the_states_asked_for_are_kept():
    # the slide embedding needs the last layer only: hidden_states keeps one (B, 1 + N, E) state
    # instead of depth + 1 of them, and the outputs are the same
    torch.manual_seed(0)
    model = SlideEncoder(SMALL).eval()
    feats, coords = torch.randn(2, 9, 24), torch.rand(2, 9, 2) * 5000
    mask = torch.tensor([[True] * 9, [True] * 5 + [False] * 4])
    with torch.no_grad():
        every = model.hidden_states(feats, coords, mask)
        last = model.hidden_states(feats, coords, mask, all_states=False)
        assert len(every) == SMALL.depth + 1 and len(last) == 1
        assert torch.equal(last[0], every[-1])
        for kw in (dict(), dict(return_tiles=True), dict(global_pool=True)):
            a, b = model.readout(last, mask, **kw), model.readout(every, mask, **kw)
            for x, y in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
                assert torch.equal(x, y)
        with pytest.raises(ValueError, match="all_states=True"):
            model.readout(last, mask, all_layers=True)
        assert model(feats, coords, mask, all_layers=True).shape == (SMALL.depth + 1, 2, 32)
