from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from pytorch_fid import inception as pf_inception
from pytorch_fid.fid_score import compute_statistics_of_path, get_activations

from biasprune import fid
from biasprune.data import save_png, to_unit_range
from fairface_standins import inception_state_dict

from biasprune.fid import (
    FID_FEATURE_DIM,
    cached_reference_statistics,
    extract_features,
    feature_statistics,
    fid_from_features,
    frechet_distance,
    inception_available,
    load_inception,
    load_statistics,
    save_statistics,
)


@pytest.fixture(scope="module")
def standin_weights(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("fid_weights") / "standin_inception.pth"
    torch.save(inception_state_dict(), path)
    return path


@pytest.fixture(scope="module")
def inception(standin_weights) -> torch.nn.Module:
    return load_inception(standin_weights)


@pytest.fixture(scope="module")
def four_images() -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8, generator=generator)


@pytest.fixture(scope="module")
def four_features(inception, four_images) -> np.ndarray:
    return extract_features(four_images, inception, batch_size=2)


class _MustNotRun(torch.nn.Module):
    """Extractor whose forward pass fails the test, so validation must come before it."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise AssertionError("forward ran before the input was validated")


def test_standin_weights_match_architecture(standin_weights, monkeypatch):
    state_dict = torch.load(standin_weights, weights_only=True)
    monkeypatch.setattr(pf_inception, "load_state_dict_from_url", lambda *a, **k: state_dict)
    reference = pf_inception.fid_inception_v3().state_dict()  # strict load of the stand-in
    assert list(state_dict) == list(reference)
    assert all(state_dict[k].shape == reference[k].shape for k in reference)
    assert len(state_dict) == 566
    assert sum(t.numel() for t in state_dict.values()) == 23_885_486


def test_load_inception_standin_weights(inception, standin_weights):
    state_dict = torch.load(standin_weights, weights_only=True)
    first_conv, last_block = inception.blocks[0][0], inception.blocks[3][2]
    assert torch.equal(first_conv.conv.weight, state_dict["Conv2d_1a_3x3.conv.weight"])
    assert torch.equal(
        last_block.branch_pool.conv.weight, state_dict["Mixed_7c.branch_pool.conv.weight"]
    )
    assert isinstance(inception, pf_inception.InceptionV3)
    assert inception.resize_input and inception.normalize_input
    assert inception.output_blocks == [3]
    assert not inception.training
    assert pf_inception.load_state_dict_from_url.__module__ != fid.__name__  # patch undone


def test_load_inception_default_uses_pytorch_fid_download(standin_weights, monkeypatch):
    state_dict = torch.load(standin_weights, weights_only=True)
    requested_urls = []

    def fake_download(url, *args, **kwargs):
        requested_urls.append(url)
        return state_dict

    monkeypatch.setattr(pf_inception, "load_state_dict_from_url", fake_download)
    model = load_inception()
    assert requested_urls == [pf_inception.FID_WEIGHTS_URL]
    assert torch.equal(model.blocks[0][0].conv.weight, state_dict["Conv2d_1a_3x3.conv.weight"])

def test_load_inception_missing_file_invalid(tmp_path):
    missing = tmp_path / "pt_inception.pth"
    with pytest.raises(FileNotFoundError) as info:
        load_inception(missing)
    message = str(info.value)
    assert str(missing) in message
    assert "fid_weights" in message
    assert pf_inception.FID_WEIGHTS_URL in message


@pytest.mark.parametrize(
    ("content", "pattern"),
    [
        ({"Conv2d_1a_3x3.conv.weight": torch.zeros(32, 3, 3, 3)}, "does not fit"),
        ([torch.zeros(1)], "not a state dict"),
        (None, "could not be read"),
    ],
)
def test_load_inception_wrong_file_invalid(tmp_path, content, pattern):
    path = tmp_path / "weights.pth"
    if content is None:
        path.write_bytes(b"not a torch file")
    else:
        torch.save(content, path)
    with pytest.raises(ValueError, match=pattern):
        load_inception(path)
    assert pf_inception.load_state_dict_from_url.__module__ != fid.__name__


def test_inception_available_never_downloads(tmp_path, monkeypatch, standin_weights):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    assert inception_available(standin_weights) is True
    assert inception_available(tmp_path / "missing.pth") is False
    assert inception_available() is False
    cached = tmp_path / "hub" / "checkpoints" / "pt_inception-2015-12-05-6726825d.pth"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"")
    assert inception_available() is True


def test_extract_features_matches_pytorch_fid(
    inception, four_images, four_features, tmp_path
):
    files = save_png(four_images, tmp_path)
    expected = get_activations(files, inception, batch_size=4, dims=2048, num_workers=0)
    assert four_features.shape == (4, FID_FEATURE_DIM)
    assert four_features.dtype == np.float64
    assert four_features.std(axis=0).max() > 1e-4  # the stand-in separates the images
    np.testing.assert_allclose(four_features, expected, rtol=1e-4, atol=1e-6)


def test_extract_features_float_input_matches_uint8(inception, four_images, four_features):
    from_float = extract_features(to_unit_range(four_images), inception, batch_size=2)
    np.testing.assert_allclose(from_float, four_features, rtol=0, atol=0)


def test_extract_features_iterable_batches(
    inception, four_images, four_features
):
    batches = (four_images[i : i + 2] for i in (0, 2))
    from_batches = extract_features(batches, inception, batch_size=1)
    np.testing.assert_allclose(from_batches, four_features, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("images", "kwargs", "pattern"),
    [
        (torch.full((2, 3, 8, 8), 1.5), {}, r"\[0, 1\], got values in \[1.5, 1.5\]"),
        (torch.full((2, 3, 8, 8), -0.5), {}, r"from_model_range"),
        (torch.zeros(2, 1, 8, 8), {}, r"\(N, 3, H, W\), got \(2, 1, 8, 8\)"),
        (torch.zeros(3, 8, 8), {}, r"\(N, 3, H, W\), got \(3, 8, 8\)"),
        (torch.zeros(2, 3, 8, 8, dtype=torch.int64), {}, "uint8 or float"),
        (torch.zeros(0, 3, 8, 8), {}, "N = 0"),
        (torch.zeros(2, 3, 8, 8), {"batch_size": 0}, "batch_size must be a positive integer"),
    ],
)
def test_extract_features_invalid(images, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        extract_features(images, _MustNotRun(), **kwargs)


def test_feature_statistics_hand_computed():
    features = np.array([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 2.0]])
    mu, sigma = feature_statistics(features)
    np.testing.assert_allclose(mu, [1.0, 1.0], atol=1e-12)
    np.testing.assert_allclose(sigma, np.diag([4 / 3, 4 / 3]), atol=1e-12)


@pytest.mark.parametrize("features", [np.zeros((1, 4)), np.zeros(4), np.zeros((2, 2, 2))])
def test_feature_statistics_invalid(features):
    with pytest.raises(ValueError, match=r"N >= 2 rows"):
        feature_statistics(features)


@pytest.mark.parametrize(
    ("mu1", "var1", "mu2", "var2", "expected"),
    [
        # ||mu1 - mu2||^2 + tr(S1 + S2 - 2 sqrt(S1 S2)) with diagonal S: sum (sqrt(a) - sqrt(b))^2
        ([0.0, 0.0], [1.0, 4.0], [1.0, 1.0], [9.0, 16.0], 2.0 + 4.0 + 4.0),
        ([1.0, 2.0], [1.0, 4.0], [4.0, 6.0], [4.0, 9.0], 25.0 + 1.0 + 1.0),
    ],
)
def test_frechet_distance_hand_computed(mu1, var1, mu2, var2, expected):
    value = frechet_distance(np.array(mu1), np.diag(var1), np.array(mu2), np.diag(var2))
    assert isinstance(value, float)
    assert value == pytest.approx(expected, abs=1e-9)


def test_frechet_distance_identical_statistics_zero():
    rng = np.random.default_rng(0)
    mu, sigma = feature_statistics(rng.normal(size=(64, 16)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # SciPy's deprecation of `disp` must not leak
        assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6


@pytest.mark.parametrize(
    ("mu1", "sigma1", "mu2", "sigma2", "pattern"),
    [
        (np.zeros(2), np.eye(2), np.zeros(3), np.eye(3), "same dimension"),
        (np.zeros(2), np.eye(3), np.zeros(2), np.eye(2), r"sigma1 shape \(D, D\)"),
        (np.zeros((2, 1)), np.eye(2), np.zeros(2), np.eye(2), r"mu1 must have shape \(D,\)"),
        (np.zeros(1), np.eye(1), np.zeros(1), np.eye(1), r"at least 2 feature dimensions"),
    ],
)
def test_frechet_distance_invalid(mu1, sigma1, mu2, sigma2, pattern):
    with pytest.raises(ValueError, match=pattern):
        frechet_distance(mu1, sigma1, mu2, sigma2)


def test_save_statistics_read_by_pytorch_fid(tmp_path):
    mu, sigma = np.arange(3.0), np.arange(9.0).reshape(3, 3)
    path = save_statistics(tmp_path / "sub" / "ref.npz", mu, sigma)
    with np.load(path) as stats:
        assert sorted(stats.files) == ["mu", "sigma"]
    loaded_mu, loaded_sigma = compute_statistics_of_path(str(path), None, 1, 3, "cpu")
    np.testing.assert_array_equal(loaded_mu, mu)
    np.testing.assert_array_equal(loaded_sigma, sigma)
    assert [p.name for p in path.parent.iterdir()] == ["ref.npz"]  # no temporary left over


def test_load_statistics_reads_pytorch_fid_file(tmp_path):
    path = tmp_path / "ref.npz"
    mu, sigma = np.array([0.5, -1.0]), np.array([[2.0, 0.1], [0.1, 3.0]])
    np.savez_compressed(path, mu=mu, sigma=sigma)  # what `pytorch_fid --save-stats` writes
    loaded_mu, loaded_sigma = load_statistics(path)
    np.testing.assert_array_equal(loaded_mu, mu)
    np.testing.assert_array_equal(loaded_sigma, sigma)


@pytest.mark.parametrize(
    ("arrays", "pattern"),
    [
        ({"mu": np.zeros(2)}, r"is missing the key\(s\) \['sigma'\]; found \['mu'\]"),
        ({"m": np.zeros(2), "s": np.eye(2)}, r"is missing the key\(s\) \['mu', 'sigma'\]"),
        ({"mu": np.zeros(2), "sigma": np.eye(3)}, r"mu must have shape \(D,\)"),
    ],
)
def test_load_statistics_invalid(tmp_path, arrays, pattern):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match=pattern) as info:
        load_statistics(path)
    assert "bad.npz" in str(info.value)


def test_load_statistics_missing_file_invalid(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.npz"):
        load_statistics(tmp_path / "nothing.npz")


def test_save_statistics_shapes_invalid(tmp_path):
    with pytest.raises(ValueError, match=r"got \(2,\) and \(3, 3\)"):
        save_statistics(tmp_path / "x.npz", np.zeros(2), np.eye(3))
    assert not (tmp_path / "x.npz").exists()


def test_cached_reference_statistics_computes_once(tmp_path):
    calls = []
    features = np.array([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 2.0]])

    def compute(images):
        calls.append(images)
        return features

    first = cached_reference_statistics("imgs", "toyfaces", compute, tmp_path, "celeba-ab12")
    second = cached_reference_statistics("imgs", "toyfaces", compute, tmp_path, "celeba-ab12")
    assert calls == ["imgs"]
    assert first[2] == second[2] == tmp_path / "fid_stats" / "celeba-ab12-toyfaces.npz"
    np.testing.assert_allclose(second[0], [1.0, 1.0], atol=1e-12)
    np.testing.assert_allclose(second[1], np.diag([4 / 3, 4 / 3]), atol=1e-12)
    np.testing.assert_array_equal(first[1], second[1])
    cached_reference_statistics("imgs", "inception", compute, tmp_path, "celeba-ab12")
    assert len(calls) == 2  # another extractor is another entry


@pytest.mark.parametrize(
    ("extractor_name", "dataset_key"),
    [("", "key"), ("a/b", "key"), ("toyfaces", "../up"), ("toyfaces", None)],
)
def test_cached_reference_statistics_names_invalid(tmp_path, extractor_name, dataset_key):
    with pytest.raises(ValueError, match="letters, digits"):
        cached_reference_statistics(None, extractor_name, np.asarray, tmp_path, dataset_key)


def test_fid_from_features_fd_hand_computed(caplog):
    features = np.array([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 2.0]])
    with caplog.at_level(logging.WARNING, logger="biasprune.fid"):
        result = fid_from_features(
            features, np.array([4.0, 5.0]), np.diag([3.0, 3.0]), name="fd_toyfaces"
        )
    # 3^2 + 4^2 + 2 * (4/3 + 3 - 2 * sqrt(4/3 * 3)) = 25 + 2/3
    expected = {"fd_toyfaces": pytest.approx(25 + 2 / 3, abs=1e-9), "fd_toyfaces_num_samples": 4}
    assert result == expected
    assert caplog.records == []


def test_fid_from_features_warns_below_feature_dim(caplog):
    features = np.random.default_rng(0).normal(size=(3, 4))
    with caplog.at_level(logging.WARNING, logger="biasprune.fid"):
        result = fid_from_features(features, np.zeros(4), np.eye(4), name="fd_toyfaces")
    assert result["fd_toyfaces_num_samples"] == 3
    assert result["fd_toyfaces"] > 0
    (record,) = caplog.records
    assert record.levelno == logging.WARNING
    assert "fd_toyfaces on 3 samples of 4-d features" in record.getMessage()
    assert "rank-deficient" in record.getMessage()


def test_fid_from_features_fid_warns(caplog, monkeypatch):
    # The 2048-d matrix square root takes tens of seconds on two cores; the distance is stubbed.
    monkeypatch.setattr(fid, "frechet_distance", lambda *args: 12.5)
    features = np.random.default_rng(0).normal(size=(4, FID_FEATURE_DIM))
    with caplog.at_level(logging.WARNING, logger="biasprune.fid"):
        result = fid_from_features(features, np.zeros(2048), np.eye(2048))
    assert result == {"fid": 12.5, "fid_num_samples": 4}
    assert "fid on 4 samples of 2048-d features" in caplog.records[0].getMessage()


@pytest.mark.parametrize(
    ("features", "ref_dim", "name", "pattern"),
    [
        (np.zeros((4, 8)), 8, "fid", "name='fid' is reserved for 2048-d"),
        (np.ones((4, 2)) * np.arange(4)[:, None], 3, "fd_toyfaces", "same dimension"),
    ],
)
def test_fid_from_features_invalid(features, ref_dim, name, pattern):
    with pytest.raises(ValueError, match=pattern):
        fid_from_features(features, np.zeros(ref_dim), np.eye(ref_dim), name=name)



def test_frechet_distance_of_rank_deficient_covariances_is_silent():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(10, 16))  # 10 samples of 16 dimensions: rank 9 at most
    mu, sigma = feature_statistics(features)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        value = frechet_distance(mu, sigma, mu + 0.5, sigma)
    assert value == pytest.approx(16 * 0.25, rel=0.05)
