"""libra_tok.metrics against independent implementations (scikit-image, SciPy, pytorch-fid, lpips)."""

import math
import re
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from libra_tok.metrics import (
    FID_WEIGHTS_FILE,
    FeatureStatistics,
    FIDInception,
    IdUsage,
    MissingWeightsError,
    ReconstructionMetrics,
    bits_per_pixel,
    build_lpips,
    check_metric_weights,
    frechet_distance,
    load_fid_inception,
    psnr,
    ssim,
    ssim_uniform7,
)


@pytest.fixture(scope="module")
def image_pairs(asset_images):
    """(original, distorted) uint8 arrays from every asset: blur, JPEG-like noise, a shift."""
    rng = np.random.default_rng(0)
    pairs = []
    for i, path in enumerate(asset_images):
        with Image.open(path) as im:
            original = im.convert("RGB").resize((96, 80), Image.Resampling.BICUBIC)
        if i % 3 == 0:
            distorted = np.asarray(original.filter(ImageFilter.GaussianBlur(1.2)))
        elif i % 3 == 1:
            noise = rng.normal(0, 12, (80, 96, 3))
            distorted = np.clip(np.asarray(original, dtype=np.float64) + noise, 0, 255).round().astype(np.uint8)
        else:
            distorted = np.roll(np.asarray(original), 1, axis=1)
        pairs.append((np.asarray(original), distorted))
    return pairs


def _batch(arrays):
    return torch.from_numpy(np.stack(arrays).astype(np.float32) / 255.0).permute(0, 3, 1, 2)


def test_psnr_and_ssim_match_scikit_image(image_pairs):
    x = _batch([a for a, _ in image_pairs])
    y = _batch([b for _, b in image_pairs])
    ours_psnr, ours_ssim, ours_u7 = psnr(y, x), ssim(y, x), ssim_uniform7(y, x)
    assert ours_psnr.dtype == torch.float64 and ours_ssim.shape == (len(image_pairs),)
    for i in range(len(image_pairs)):
        a, b = x[i].permute(1, 2, 0).double().numpy(), y[i].permute(1, 2, 0).double().numpy()
        assert ours_psnr[i].item() == pytest.approx(peak_signal_noise_ratio(a, b, data_range=1), rel=1e-10)
        ref = structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                    data_range=1, channel_axis=-1)
        assert ours_ssim[i].item() == pytest.approx(ref, abs=1e-10)
        ref7 = structural_similarity(a, b, data_range=1, channel_axis=-1)  # scikit-image defaults
        assert ours_u7[i].item() == pytest.approx(ref7, abs=1e-10)
    # The two windows are different metrics: they must not coincide.
    assert not torch.allclose(ours_ssim, ours_u7, atol=1e-3)


def test_identical_images_and_symmetry(image_pairs):
    x = _batch([a for a, _ in image_pairs[:3]])
    y = _batch([b for _, b in image_pairs[:3]])
    assert torch.isinf(psnr(x, x)).all()
    torch.testing.assert_close(ssim(x, x), torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(ssim_uniform7(x, x), torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(ssim(x, y), ssim(y, x))
    assert (ssim(x, y) < 1).all()


def test_metric_input_errors():
    with pytest.raises(ValueError, match="same shape"):
        psnr(torch.zeros(1, 3, 16, 16), torch.zeros(1, 3, 16, 17))
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(torch.zeros(1, 3, 8, 32), torch.zeros(1, 3, 8, 32))


def _scipy_frechet(x1, x2):
    """The textbook formula with scipy.linalg.sqrtm (pytorch-fid's way) on full feature matrices."""
    from scipy import linalg

    mu1, mu2 = x1.mean(0), x2.mean(0)
    s1, s2 = np.cov(x1, rowvar=False), np.cov(x2, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_frechet_distance_matches_scipy_on_random_features():
    rng = np.random.default_rng(0)
    d = 48
    mix = rng.normal(size=(d, d)) / np.sqrt(d)
    x1 = rng.normal(size=(400, d)) @ mix + 0.3
    x2 = rng.normal(size=(300, d)) @ (mix + 0.2 * rng.normal(size=(d, d)) / np.sqrt(d)) + 0.1
    ref = _scipy_frechet(x1, x2)
    ours = frechet_distance(x1.mean(0), np.cov(x1, rowvar=False), x2.mean(0), np.cov(x2, rowvar=False))
    assert ours == pytest.approx(ref, rel=1e-9)
    assert ref > 1.0


def test_frechet_distance_is_stable_on_singular_covariances():
    # Fewer samples than dimensions (the rFID of a few images): covariances are rank deficient.
    rng = np.random.default_rng(1)
    x = rng.random((5, 64))
    s = np.cov(x, rowvar=False)
    assert np.linalg.matrix_rank(s) < 64
    same = frechet_distance(x.mean(0), s, x.mean(0), s)
    assert abs(same) < 1e-6 * np.trace(s)  # sqrt of rounding-level eigenvalues, nothing more
    y = rng.random((5, 64))
    d = frechet_distance(x.mean(0), s, y.mean(0), np.cov(y, rowvar=False))
    assert math.isfinite(d) and d > 0


def test_feature_statistics_streaming_equals_numpy():
    rng = np.random.default_rng(2)
    x = rng.normal(loc=5.0, scale=0.1, size=(103, 16))  # large mean, small spread
    stats = FeatureStatistics(16)
    for chunk in np.split(x, [1, 8, 40, 41]):  # uneven batches, one of size 1
        stats.update(torch.from_numpy(chunk).float())
    xf = x.astype(np.float32).astype(np.float64)
    assert stats.count == 103
    np.testing.assert_allclose(stats.mean.numpy(), xf.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.covariance().numpy(), np.cov(xf, rowvar=False), rtol=1e-8, atol=1e-14)
    with pytest.raises(ValueError, match="at least 2"):
        FeatureStatistics(4).covariance()


def test_id_usage_on_constructed_ids():
    usage = IdUsage(num_codebooks=2, codebook_size=512)
    # codebook 0: ids 0..255, each exactly 4 times; codebook 1: always id 7.
    ids0 = torch.arange(256).repeat(4).reshape(4, 256)
    ids = torch.stack([ids0, torch.full_like(ids0, 7)], dim=-1)
    usage.update(ids[:1])
    usage.update(ids[1:])  # streaming equals one update
    s = usage.summary()
    cb0, cb1 = s["codebooks"]
    assert (cb0["used"], cb0["usage"]) == (256, 0.5)
    assert cb0["perplexity"] == pytest.approx(256.0) and cb0["entropy_bits"] == pytest.approx(8.0)
    assert (cb1["used"], cb1["usage"], cb1["perplexity"], cb1["entropy_bits"]) == (1, 1 / 512, 1.0, 0.0)
    assert s["joint"]["used"] == 256 and s["joint"]["perplexity"] == pytest.approx(256.0)
    assert int(usage.joint_counts[3 * 512 + 7]) == 4  # joint id = id1 * 512 + id2


def test_id_usage_skewed_distribution_and_errors():
    usage = IdUsage(num_codebooks=1, codebook_size=4)
    usage.update(torch.tensor([[[0], [0], [0], [1]]]))  # p = (3/4, 1/4)
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert usage.summary()["codebooks"][0]["perplexity"] == pytest.approx(math.exp(h))
    with pytest.raises(ValueError, match=r"in \[0, 4\)"):
        usage.update(torch.tensor([[[4]]]))
    with pytest.raises(ValueError, match=r"shape \(B, tokens, 1\)"):
        usage.update(torch.zeros(2, 3, dtype=torch.long))


def test_bits_per_pixel():
    assert bits_per_pixel(576, 18, 336) == pytest.approx(576 * 18 / 336**2)
    assert bits_per_pixel(576, 18, 336) == pytest.approx(0.09184, abs=1e-5)


@pytest.fixture(scope="module")
def random_inception():
    torch.manual_seed(0)
    return FIDInception()


def test_fid_inception_equals_pytorch_fid(random_inception):
    """Same weights -> the same 2048-d features as pytorch-fid's InceptionV3([3])."""
    import pytorch_fid.inception as pfi

    state = random_inception.net.state_dict()
    with mock.patch.object(pfi, "load_state_dict_from_url", lambda *a, **k: state):
        reference = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
    x = torch.rand(1, 3, 72, 90, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(x)[0].flatten(1)
    ours = random_inception(x)
    assert ours.shape == (1, 2048)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)
    assert ours.std() > 1e-3  # He init keeps the features alive (rFID is not trivially 0)


class _Recording(torch.nn.Module):
    """Wraps a network and keeps its outputs, so the test needs no second forward pass."""

    def __init__(self, net):
        super().__init__()
        self.net, self.outputs = net, []

    def forward(self, x):
        self.outputs.append(self.net(x))
        return self.outputs[-1]


@pytest.mark.slow
def test_reconstruction_metrics_rfid_end_to_end(random_inception, image_pairs):
    """rFID with the random-weight FID Inception: streamed statistics of the real network's
    2048-d features, the Frechet distance of the directly computed statistics."""
    originals = _batch([a for a, _ in image_pairs[:3]])
    distorted = _batch([b for _, b in image_pairs[:3]])
    inception = _Recording(random_inception)
    metrics = ReconstructionMetrics(inception=inception)
    per_image = [metrics.update(originals[:2], distorted[:2]), metrics.update(originals[2:], distorted[2:])]
    summary = metrics.summary()
    o = inception.outputs  # update() feeds originals, then reconstructions, per batch
    feats_a = torch.cat([o[0], o[2]]).double().numpy()
    feats_b = torch.cat([o[1], o[3]]).double().numpy()
    assert feats_a.shape == (3, 2048)
    np.testing.assert_allclose(metrics.real_stats.covariance().numpy(), np.cov(feats_a, rowvar=False), atol=1e-12)
    np.testing.assert_allclose(metrics.fake_stats.mean.numpy(), feats_b.mean(0), rtol=1e-12)
    # Independent route through the n x n Gram matrix: with centred features Ca, Cb (n rows),
    # tr sqrt(S1 S2) = ||Ca Cb^T||_* / (n - 1) (nuclear norm), tr S = ||C||_F^2 / (n - 1).
    n = 3
    ca, cb = feats_a - feats_a.mean(0), feats_b - feats_b.mean(0)
    tr_covmean = np.linalg.svd(ca @ cb.T, compute_uv=False).sum() / (n - 1)
    diff = feats_a.mean(0) - feats_b.mean(0)
    expected = diff @ diff + ((ca**2).sum() + (cb**2).sum()) / (n - 1) - 2 * tr_covmean
    assert summary["rfid"] == pytest.approx(expected, rel=1e-6)
    assert summary["rfid"] > 0
    all_psnr = torch.cat([p["psnr"] for p in per_image])
    assert summary["psnr"] == pytest.approx(float(all_psnr.mean()))
    assert set(summary) == {"psnr", "ssim", "ssim_uniform7", "rfid"}


def test_rfid_with_any_feature_network_matches_direct_computation(image_pairs):
    """The streaming pipeline (batches, two statistics) on a small feature net, against SciPy."""
    torch.manual_seed(0)
    # 6-d features from 10 images: full-rank covariances, where scipy.linalg.sqrtm is reliable.
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 5, stride=4), torch.nn.Tanh(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten())
    originals = _batch([a for a, _ in image_pairs])
    distorted = _batch([b for _, b in image_pairs])
    metrics = ReconstructionMetrics(inception=net)
    for start in range(0, len(image_pairs), 4):
        metrics.update(originals[start:start + 4], distorted[start:start + 4])
    with torch.no_grad():
        expected = _scipy_frechet(net(originals).double().numpy(), net(distorted).double().numpy())
    assert metrics.summary()["rfid"] == pytest.approx(expected, rel=1e-9)
    assert expected > 1e-6  # distortions are seen by the features


def test_rfid_needs_two_images(image_pairs):
    metrics = ReconstructionMetrics(inception=torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()))
    x = _batch([image_pairs[0][0]])
    metrics.update(x, x)
    assert metrics.summary()["rfid"] is None


def _reference_lpips(x, y, trunk, relu_indices, lin_weights):
    """LPIPS v0.1 written out: scale, trunk ReLU outputs, channel-normalise, squared diff,
    1x1 linear weights, spatial mean, summed over layers."""
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)

    def feats(t):
        out, h = [], (t - shift) / scale
        for i, layer in enumerate(trunk):
            h = layer(h)
            if i in relu_indices:
                out.append(h / (h.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))
        return out

    total = 0
    for fx, fy, w in zip(feats(x), feats(y), lin_weights, strict=True):
        total = total + ((fx - fy) ** 2 * w.view(1, -1, 1, 1)).sum(1).mean((1, 2))
    return total


def test_lpips_alex_loads_trunk_from_weights_dir(tmp_path, image_pairs):
    import lpips
    import torchvision

    torch.manual_seed(0)
    trunk = torchvision.models.alexnet(weights=None).features.eval()
    # The file name torchvision caches; only `features.*` is read.
    torch.save({f"features.{k}": v for k, v in trunk.state_dict().items()}, tmp_path / "alexnet-owt-7be5be79.pth")
    model = build_lpips("alex", weights_dir=tmp_path)
    x = _batch([a for a, _ in image_pairs[:3]]) * 2 - 1
    y = _batch([b for _, b in image_pairs[:3]]) * 2 - 1
    lin = torch.load(Path(lpips.__file__).parent / "weights" / "v0.1" / "alex.pth", map_location="cpu",
                     weights_only=True)
    lin_weights = [lin[f"lin{i}.model.1.weight"].flatten() for i in range(5)]
    with torch.no_grad():
        expected = _reference_lpips(x, y, trunk, {1, 4, 7, 9, 11}, lin_weights)
        ours = model(x, y).flatten()
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-6)
    assert (ours > 0).all() and float(model(x, x).abs().max()) < 1e-6


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning")  # the reference lpips.LPIPS passes torchvision `pretrained=`
def test_lpips_vgg_random_trunk_equals_lpips_package(image_pairs):
    import lpips

    torch.manual_seed(0)
    ours = build_lpips("vgg", random_backbone=True)
    torch.manual_seed(0)
    reference = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False).eval()
    x = _batch([a for a, _ in image_pairs[:2]]) * 2 - 1
    y = _batch([b for _, b in image_pairs[:2]]) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(ours(x, y), reference(x, y))
    metrics = ReconstructionMetrics(lpips_models={"vgg": ours})
    values = metrics.update((x[:1] + 1) / 2, (y[:1] + 1) / 2)
    with torch.no_grad():
        assert values["lpips_vgg"].item() == pytest.approx(float(reference(x[:1], y[:1])), rel=1e-5)


def test_missing_weights_name_the_file_and_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    with pytest.raises(MissingWeightsError) as err:
        check_metric_weights(("alex", "vgg"), fid=True)
    message = str(err.value)
    for expected in (FID_WEIGHTS_FILE, "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/",
                     "--inception-weights", "alexnet-owt-7be5be79.pth", "vgg16-397923af.pth", str(cache),
                     "TORCH_HOME", "--weights-dir", "--no-fid"):
        assert expected in message
    with pytest.raises(MissingWeightsError, match="nowhere.pth not found"):
        load_fid_inception(tmp_path / "nowhere.pth")
    with pytest.raises(MissingWeightsError, match=re.escape(str(tmp_path / "w" / FID_WEIGHTS_FILE))):
        load_fid_inception(weights_dir=tmp_path / "w")
    with pytest.raises(MissingWeightsError, match="alexnet-owt-7be5be79.pth"):
        build_lpips("alex")
    assert isinstance(MissingWeightsError("x"), FileNotFoundError)  # the CLI turns it into one line
    check_metric_weights((), fid=False)  # nothing asked, nothing missing


def test_wrong_weights_file_is_explained(tmp_path):
    torch.save({"fc.weight": torch.zeros(3)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="is not the FID Inception state dict"):
        load_fid_inception(tmp_path / "bad.pth")
    (tmp_path / "truncated.pth").write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(ValueError, match="cannot read .*truncated.pth as the FID Inception weights"):
        load_fid_inception(tmp_path / "truncated.pth")
    torch.save({"fc.weight": torch.zeros(3)}, tmp_path / "alexnet-owt-7be5be79.pth")
    with pytest.raises(ValueError, match="is not the torchvision alex state dict"):
        build_lpips("alex", weights_dir=tmp_path)
