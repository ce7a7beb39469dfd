import pytest
import ref_snapshots as reference


@pytest.fixture(scope="session")
def reference_roots(tmp_path_factory):
    if not reference.available():
        pytest.skip(f"reference snapshots not found in {reference.REFERENCE_DIR}")
    return reference.unpack(tmp_path_factory.mktemp("reference"))


@pytest.fixture(scope="session")
def torchscale_ref(reference_roots):
    return reference.load_torchscale(reference_roots[0])


@pytest.fixture(scope="session")
def gigapath_ref(reference_roots):
    return reference.load_gigapath(reference_roots[1])
