"""The slide encoder against Prov-GigaPath's own code (float64, random weights in its format).

The released shape (12 layers) runs at 1, 300, 700 and 1025 tiles (segment padding, a second
segment of the first branch, unmasked zero keys in every branch); 6000 tiles run with the first
layer of a random GigaPath model to keep the float64 reference short, and with all 12 layers under
``--runslow`` (about 4 minutes on 2 cores).
"""

from __future__ import annotations

import pytest
import torch
from gigapath_helpers import reference_model, reference_outputs, slide_inputs

from longnet.gigapath import load_slide_encoder, pad_slides

TOL = dict(rtol=1e-10, atol=1e-10)


def _saved(ref, directory):
    path = directory / "slide_encoder.pth"
    torch.save({"model": ref.state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def released(gigapath_ref, tmp_path_factory):
    """All 12 layers at the released shape, saved as slide_encoder.pth ({"model": ...})."""
    ref = reference_model(gigapath_ref, depth=12)
    return ref, _saved(ref, tmp_path_factory.mktemp("released"))


@pytest.fixture(scope="module")
def shallow(gigapath_ref, tmp_path_factory):
    ref = reference_model(gigapath_ref, depth=3, seed=1, keep_layers=1)
    return ref, _saved(ref, tmp_path_factory.mktemp("shallow"))


def _check(ref, path, n, seed=0):
    feats, coords = slide_inputs(n, seed=seed)
    want = reference_outputs(ref, feats, coords)
    model = load_slide_encoder(path, dtype=torch.float64)
    depth = len(ref.encoder.layers)
    with torch.no_grad():
        layers, layer_tiles = model(feats, coords, all_layers=True, return_tiles=True)
        last, tiles = model(feats, coords, return_tiles=True)
    assert layers.shape == (depth + 1, 1, 768) and layer_tiles.shape == (depth + 1, 1, n, 768)
    assert last.shape == (1, 768) and tiles.shape == (1, n, 768)
    torch.testing.assert_close(layers, want["layers"], **TOL)
    torch.testing.assert_close(layer_tiles, want["layer_tiles"], **TOL)
    torch.testing.assert_close(last, want["last"], **TOL)
    torch.testing.assert_close(tiles, want["tiles"], **TOL)


@pytest.mark.parametrize("n", [1, 300, 700, 1025, pytest.param(6000, marks=pytest.mark.slow)])
def test_released_shape_matches_gigapath(released, n):
    _check(*released, n)


@pytest.mark.parametrize("n", [700, 1025, 6000])
def test_long_slides_match_gigapath(shallow, n):
    _check(*shallow, n, seed=n)


def test_padded_batch_gives_each_slide_its_batch1_output(shallow):
    model = load_slide_encoder(shallow[1], dtype=torch.float64)
    slides = [slide_inputs(n, seed=n) for n in (700, 1, 1025)]
    feats, coords, mask = pad_slides([(f[0], c[0]) for f, c in slides])
    feats[~mask] = float("nan")  # padding never reaches a real output
    with torch.no_grad():
        batch, tiles = model(feats, coords, mask, all_layers=True, return_tiles=True)
        pooled = model(feats, coords, mask, global_pool=True)
        for i, (f, c) in enumerate(slides):
            alone, alone_tiles = model(f, c, all_layers=True, return_tiles=True)
            n = f.shape[1]
            torch.testing.assert_close(batch[:, i:i + 1], alone, rtol=0, atol=1e-12)
            torch.testing.assert_close(tiles[:, i:i + 1, :n], alone_tiles, rtol=0, atol=1e-12)
            assert bool((tiles[:, i, n:] == 0).all())
            torch.testing.assert_close(pooled[i:i + 1], model(f, c, global_pool=True), rtol=0, atol=1e-12)


def test_global_pool_matches_gigapath(gigapath_ref, shallow):
    ref, path = shallow
    ref.global_pool = True
    try:
        feats, coords = slide_inputs(50)
        with torch.no_grad():
            want = torch.stack(ref(feats, coords, all_layer_embed=True))
            got = load_slide_encoder(path, dtype=torch.float64, global_pool=True)(feats, coords, all_layers=True)
    finally:
        ref.global_pool = False
    torch.testing.assert_close(got, want, **TOL)
