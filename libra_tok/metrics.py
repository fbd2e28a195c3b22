"""Reconstruction metrics with a stated protocol: PSNR, SSIM, LPIPS, rFID, id usage, bits per pixel.

Images are float tensors (B, 3, H, W) in [0, 1]; every per-image metric is computed per image
and then averaged (the mean of per-image values, as LlamaGen and Open-MAGVIT2 report).

- PSNR: 10 log10(1 / MSE) with data_range 1, MSE over all channels and pixels.
- SSIM (Wang et al. 2004): 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03, population
  covariance, data_range 1, per channel and averaged; the mean is taken over the "valid" region
  (no padding), which equals scikit-image's
  `structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)`.
- `ssim_uniform7`: scikit-image's default (7x7 uniform window, sample covariance), the variant
  behind the LlamaGen / Open-MAGVIT2 tables.
- LPIPS: the `lpips` package (v0.1 linear heads shipped with it) on AlexNet or VGG16 features.
- rFID: 2048-d pool features of the FID Inception-v3 (pytorch-fid's port of TF
  "inception-2015-12-05"), Frechet distance in float64 with an eigendecomposition square root.

Everything streams: accumulators hold sums, never images or feature matrices.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{FID_WEIGHTS_FILE}"
LPIPS_NETS = ("alex", "vgg")
# torchvision ImageNet weights that `lpips` builds its trunk from (its linear heads ship with it).
LPIPS_BACKBONE_URLS = {
    "alex": "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
    "vgg": "https://download.pytorch.org/models/vgg16-397923af.pth",
}


class MissingWeightsError(FileNotFoundError):
    """Metric network weights are not on disk (nothing is ever downloaded)."""


def default_weights_dir() -> Path:
    """Where torch.hub (and so pytorch-fid and torchvision) caches weights: $TORCH_HOME/hub/checkpoints."""
    return Path(torch.hub.get_dir()) / "checkpoints"


# ---- PSNR and SSIM ------------------------------------------------------------------------


def _check_pair(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"expected two image batches of the same shape (B, C, H, W), got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")
    return x.double(), y.double()


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-image PSNR in dB of (B, C, H, W) batches; identical images give +inf."""
    x, y = _check_pair(x, y)
    mse = (x - y).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(data_range**2 / mse)


def psnr_signed(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """PSNR of images in [-1, 1] (decoder outputs, `ImageTokenizer.target`) measured on [0, 1]."""
    return psnr((x + 1) / 2, (y + 1) / 2)


def gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Normalised 2-D Gaussian (size x size), float64; 11 taps at sigma 1.5 is scipy's
    gaussian_filter with its default truncate=3.5, as scikit-image uses."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g)


def _ssim(x: torch.Tensor, y: torch.Tensor, window: torch.Tensor, cov_norm: float, data_range: float,
          k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    x, y = _check_pair(x, y)
    size = window.shape[-1]
    if min(x.shape[-2:]) < size:
        raise ValueError(f"SSIM needs images of at least {size}x{size} pixels, got {tuple(x.shape[-2:])}")
    channels = x.shape[1]
    w = window.to(x.device).expand(channels, 1, size, size)

    def filt(t: torch.Tensor) -> torch.Tensor:  # "valid" filtering: no padding enters the mean
        return F.conv2d(t, w, groups=channels)

    ux, uy = filt(x), filt(y)
    vx = cov_norm * (filt(x * x) - ux * ux)
    vy = cov_norm * (filt(y * y) - uy * uy)
    vxy = cov_norm * (filt(x * y) - ux * uy)
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return s.mean(dim=(2, 3)).mean(dim=1)  # per channel, then averaged over channels


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004): 11x11 Gaussian window, sigma 1.5, population covariance."""
    return _ssim(x, y, gaussian_window(11, 1.5), 1.0, data_range)


def ssim_uniform7(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-image SSIM with scikit-image's defaults: 7x7 uniform window, sample covariance (N/(N-1))."""
    n = 7 * 7
    return _ssim(x, y, torch.full((7, 7), 1.0 / n, dtype=torch.float64), n / (n - 1), data_range)


# ---- Frechet distance ---------------------------------------------------------------------


def _clip_rounding(eigenvalues: np.ndarray) -> np.ndarray:
    """Zero the eigenvalues that are rounding noise (below n * eps * largest, the numerical-rank
    tolerance of numpy.linalg.matrix_rank): with fewer samples than dimensions most eigenvalues
    are exactly 0, and the square roots of their ~1e-16 noise would otherwise add up."""
    top = float(np.max(np.abs(eigenvalues), initial=0.0))
    tol = top * eigenvalues.shape[0] * np.finfo(np.float64).eps
    return np.where(eigenvalues > tol, eigenvalues, 0.0)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix."""
    w, v = np.linalg.eigh((matrix + matrix.T) / 2)
    return (v * np.sqrt(_clip_rounding(w))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)), in float64.

    tr((S1 S2)^(1/2)) is the sum of square roots of the eigenvalues of sqrt(S1) S2 sqrt(S1), which
    has the same eigenvalues as S1 S2 but is symmetric PSD: `eigh` is exact to rounding, needs no
    diagonal offset and never returns complex values, unlike `scipy.linalg.sqrtm(S1 @ S2)` on
    the singular covariances of fewer samples than dimensions.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"mismatched statistics: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs "
                         f"{sigma2.shape}")
    root1 = _psd_sqrt(sigma1)
    inner = root1 @ sigma2 @ root1
    eig = np.linalg.eigvalsh((inner + inner.T) / 2)
    tr_covmean = np.sqrt(_clip_rounding(eig)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


class FeatureStatistics:
    """Running mean and covariance of feature vectors in float64 (Chan et al. pairwise merge of
    per-batch statistics: stable, and no feature matrix is kept)."""

    def __init__(self, dim: int):
        self.dim = dim
        self.count = 0
        self.mean = torch.zeros(dim, dtype=torch.float64)
        self._m2 = torch.zeros(dim, dim, dtype=torch.float64)  # sum of centred outer products

    def update(self, features: torch.Tensor) -> None:
        x = features.detach().to("cpu", torch.float64).reshape(-1, self.dim)
        nb = x.shape[0]
        if nb == 0:
            return
        mean_b = x.mean(0)
        centred = x - mean_b
        total = self.count + nb
        delta = mean_b - self.mean
        self._m2 += centred.T @ centred + torch.outer(delta, delta) * (self.count * nb / total)
        self.mean += delta * (nb / total)
        self.count = total

    def covariance(self) -> torch.Tensor:
        """Unbiased covariance (divides by N - 1, as numpy.cov in pytorch-fid)."""
        if self.count < 2:
            raise ValueError(f"a covariance needs at least 2 feature vectors, got {self.count}")
        return self._m2 / (self.count - 1)

    def frechet_distance(self, other: "FeatureStatistics") -> float:
        return frechet_distance(self.mean.numpy(), self.covariance().numpy(), other.mean.numpy(),
                                other.covariance().numpy())


# ---- FID Inception -----------------------------------------------------------------------


class FIDInception(nn.Module):
    """The FID Inception-v3 up to its 2048-d average pool, as pytorch-fid's `InceptionV3([3])`:
    the architecture is pytorch-fid's (torchvision Inception3 with its FID blocks), inputs in
    [0, 1] are resized bilinearly to 299x299 and scaled to [-1, 1].

    `state_dict=None` gives random He-initialised weights (features keep their scale, so tests and
    offline demos get a non-degenerate rFID); real runs use `load_fid_inception`.
    """

    LAYERS = ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
              "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
              "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c")

    def __init__(self, state_dict: dict | None = None):
        super().__init__()
        import torchvision
        from pytorch_fid.inception import FIDInceptionA, FIDInceptionC, FIDInceptionE_1, FIDInceptionE_2

        # pytorch_fid.inception.fid_inception_v3 without its URL download.
        net = torchvision.models.inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=False)
        net.Mixed_5b = FIDInceptionA(192, pool_features=32)
        net.Mixed_5c = FIDInceptionA(256, pool_features=64)
        net.Mixed_5d = FIDInceptionA(288, pool_features=64)
        net.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
        net.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
        net.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
        net.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
        net.Mixed_7b = FIDInceptionE_1(1280)
        net.Mixed_7c = FIDInceptionE_2(2048)
        if state_dict is not None:
            net.load_state_dict(state_dict)
        else:  # PyTorch's default conv init shrinks activations ~1e-8 after 90 layers
            for module in net.modules():
                if isinstance(module, nn.Conv2d):
                    nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        self.net = net  # keys as in the pytorch-fid weights file
        self.requires_grad_(False)
        self.eval()

    @torch.no_grad()
    def forward(self, images01: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, 2048) pool features."""
        x = F.interpolate(images01.float(), size=(299, 299), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        for name in self.LAYERS:  # pytorch-fid blocks 0-3; torchvision's max pools are (3, stride 2) too
            x = getattr(self.net, name)(x)
        return x.mean(dim=(2, 3))


def _load_state_dict(path: Path, what: str) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt, truncated, or not a torch file
        raise ValueError(f"cannot read {path} as {what}: {exc}") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, expected {what} (a state dict)")
    return state


def fid_weights_path(path: str | Path | None = None, weights_dir: str | Path | None = None) -> Path:
    """`path`, else FID_WEIGHTS_FILE in `weights_dir`, else in the torch hub cache."""
    if path is not None:
        return Path(path).expanduser()
    folder = Path(weights_dir).expanduser() if weights_dir is not None else default_weights_dir()
    return folder / FID_WEIGHTS_FILE


def _missing_fid_message(path: Path) -> str:
    return (f"FID Inception weights {path} not found: download {FID_WEIGHTS_URL} to {default_weights_dir()} "
            f"(the torch hub cache, $TORCH_HOME/hub/checkpoints) or pass the file's path as inception_weights "
            f"(CLI: --inception-weights FILE)")


def load_fid_inception(path: str | Path | None = None, device: str | torch.device = "cpu",
                       weights_dir: str | Path | None = None) -> FIDInception:
    """The FID Inception with the pytorch-fid weights file at `path` (default: FID_WEIGHTS_FILE in
    `weights_dir`, else in the torch hub cache, where pytorch-fid itself keeps it). Never downloads."""
    path = fid_weights_path(path, weights_dir)
    if not path.is_file():
        raise MissingWeightsError(_missing_fid_message(path))
    state = _load_state_dict(path, f"the FID Inception weights ({FID_WEIGHTS_FILE})")
    try:
        model = FIDInception(state)
    except RuntimeError as exc:
        raise ValueError(f"{path} is not the FID Inception state dict ({FID_WEIGHTS_FILE}): "
                         f"{str(exc).splitlines()[0]}") from None
    return model.to(device)


# ---- LPIPS ------------------------------------------------------------------------------


def lpips_weights_path(net: str, weights_dir: str | Path | None = None) -> Path:
    if net not in LPIPS_BACKBONE_URLS:
        raise ValueError(f"LPIPS net must be one of {LPIPS_NETS}, got {net!r}")
    folder = Path(weights_dir).expanduser() if weights_dir is not None else default_weights_dir()
    return folder / LPIPS_BACKBONE_URLS[net].rsplit("/", 1)[1]


def _missing_lpips_message(net: str, path: Path) -> str:
    return (f"LPIPS {net} needs torchvision's ImageNet weights {path.name}, not in {path.parent}: download "
            f"{LPIPS_BACKBONE_URLS[net]} to {default_weights_dir()} (the torch hub cache, $TORCH_HOME/hub/checkpoints) "
            f"or into the folder given as weights_dir (CLI: --weights-dir DIR)")


def build_lpips(net: str = "alex", weights_dir: str | Path | None = None, random_backbone: bool = False,
                device: str | torch.device = "cpu") -> nn.Module:
    """`lpips.LPIPS(net)` (v0.1 linear heads from the package) whose trunk weights are read from
    the torchvision file in `weights_dir` (default: the torch hub cache). Never downloads:
    the trunk is built random (`pnet_rand=True`) and then loaded from disk, unless `random_backbone`."""
    path = lpips_weights_path(net, weights_dir)
    if not random_backbone and not path.is_file():
        raise MissingWeightsError(_missing_lpips_message(net, path))
    import lpips

    with warnings.catch_warnings():  # lpips calls torchvision with the deprecated `pretrained=`
        warnings.simplefilter("ignore")
        model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
    if not random_backbone:
        state = _load_state_dict(path, f"torchvision's {net} weights")
        # lpips slices torchvision's `features` keeping the module indices: sliceK.I.* = features.I.*
        trunk = {}
        for key in model.net.state_dict():
            source = "features." + key.split(".", 1)[1]
            if source not in state:
                raise ValueError(f"{path} is not the torchvision {net} state dict: no {source!r}")
            trunk[key] = state[source]
        model.net.load_state_dict(trunk)
    return model.requires_grad_(False).eval().to(device)


def check_metric_weights(lpips_nets: tuple[str, ...] = LPIPS_NETS, fid: bool = True,
                         inception_weights: str | Path | None = None, weights_dir: str | Path | None = None) -> None:
    """Raise one MissingWeightsError naming every missing file, before any work starts."""
    problems = []
    fid_path = fid_weights_path(inception_weights, weights_dir)
    if fid and not fid_path.is_file():
        problems.append(_missing_fid_message(fid_path))
    for net in lpips_nets:
        path = lpips_weights_path(net, weights_dir)
        if not path.is_file():
            problems.append(_missing_lpips_message(net, path))
    if problems:
        raise MissingWeightsError("; ".join(problems) + ". Or skip these metrics (CLI: --no-fid, --no-lpips)")


# ---- streaming accumulators ----------------------------------------------------------------


class Mean:
    """Mean of per-image values (float64 sum and count)."""

    def __init__(self) -> None:
        self.total = 0.0
        self.count = 0

    def update(self, values: torch.Tensor) -> None:
        self.total += float(values.double().sum())
        self.count += values.numel()

    @property
    def value(self) -> float | None:
        return self.total / self.count if self.count else None


class ReconstructionMetrics:
    """Streaming PSNR, SSIM, SSIM-uniform7, LPIPS and rFID for pairs of [0, 1] image batches at
    one resolution. `update` returns the per-image values; `summary` the means and rFID."""

    def __init__(self, lpips_models: dict[str, nn.Module] | None = None, inception: nn.Module | None = None):
        self.lpips_models = dict(lpips_models or {})
        self.inception = inception
        names = ["psnr", "ssim", "ssim_uniform7"] + [f"lpips_{n}" for n in self.lpips_models]
        self.means = {name: Mean() for name in names}
        # Sized on the first batch: 2048 for the FID Inception, any width for another feature net.
        self.real_stats: FeatureStatistics | None = None
        self.fake_stats: FeatureStatistics | None = None

    @property
    def per_image_names(self) -> list[str]:
        return list(self.means)

    @torch.no_grad()
    def update(self, originals: torch.Tensor, reconstructions: torch.Tensor) -> dict[str, torch.Tensor]:
        values = {
            "psnr": psnr(reconstructions, originals),
            "ssim": ssim(reconstructions, originals),
            "ssim_uniform7": ssim_uniform7(reconstructions, originals),
        }
        for name, model in self.lpips_models.items():  # lpips takes [-1, 1]
            distance = model(2 * originals.float() - 1, 2 * reconstructions.float() - 1)
            values[f"lpips_{name}"] = distance.flatten().double()
        for name, v in values.items():
            self.means[name].update(v)
        if self.inception is not None:
            real, fake = self.inception(originals), self.inception(reconstructions)
            if self.real_stats is None:
                self.real_stats, self.fake_stats = FeatureStatistics(real.shape[1]), FeatureStatistics(fake.shape[1])
            self.real_stats.update(real)
            self.fake_stats.update(fake)
        return {k: v.cpu() for k, v in values.items()}

    def summary(self) -> dict[str, float | None]:
        out = {name: mean.value for name, mean in self.means.items()}
        if self.inception is not None:
            # A covariance needs two images; fewer leave rFID undefined (None), not an error.
            enough = self.real_stats is not None and self.real_stats.count >= 2
            out["rfid"] = self.real_stats.frechet_distance(self.fake_stats) if enough else None
        return out


class IdUsage:
    """Histogram of token ids (B, tokens, num_codebooks): usage (fraction of the ids used) and
    perplexity exp(H) per codebook, and of the joint id (id1 * codebook_size + id2) when it has
    at most 2^20 values."""

    def __init__(self, num_codebooks: int = 2, codebook_size: int = 512):
        self.num_codebooks = num_codebooks
        self.codebook_size = codebook_size
        self.counts = torch.zeros(num_codebooks, codebook_size, dtype=torch.int64)
        joint = codebook_size**num_codebooks
        self.joint_counts = torch.zeros(joint, dtype=torch.int64) if joint <= 1 << 20 else None

    def update(self, ids: torch.Tensor) -> None:
        c, k = self.num_codebooks, self.codebook_size
        if ids.ndim != 3 or ids.shape[-1] != c:
            raise ValueError(f"expected ids of shape (B, tokens, {c}), got {tuple(ids.shape)}")
        ids = ids.detach().to("cpu", torch.int64)
        if int(ids.min()) < 0 or int(ids.max()) >= k:
            raise ValueError(f"ids must lie in [0, {k}), found [{int(ids.min())}, {int(ids.max())}]")
        for j in range(c):
            self.counts[j] += torch.bincount(ids[..., j].flatten(), minlength=k)
        if self.joint_counts is not None:
            joint = torch.zeros_like(ids[..., 0])
            for j in range(c):  # codebook 0 most significant, as the id1 bits come first
                joint = joint * k + ids[..., j]
            self.joint_counts += torch.bincount(joint.flatten(), minlength=self.joint_counts.numel())

    @staticmethod
    def _stats(counts: torch.Tensor) -> dict[str, float | int]:
        total = int(counts.sum())
        used = int((counts > 0).sum())
        if total == 0:
            return {"used": 0, "usage": 0.0, "perplexity": 0.0, "entropy_bits": 0.0}
        p = counts[counts > 0].double() / total
        entropy = float(-(p * p.log()).sum())  # nats
        return {"used": used, "usage": used / counts.numel(), "perplexity": math.exp(entropy),
                "entropy_bits": entropy / math.log(2)}

    def summary(self) -> dict:
        out = {"codebooks": [self._stats(self.counts[j]) for j in range(self.num_codebooks)]}
        if self.joint_counts is not None:
            out["joint"] = self._stats(self.joint_counts)
        return out


def bits_per_pixel(num_tokens: int, bits_per_token: float, resolution: int) -> float:
    """Bits of the token sequence per image pixel (576 x 18 bits at 336 px: 0.0918 bpp)."""
    return num_tokens * bits_per_token / (resolution * resolution)


__all__ = [
    "FID_WEIGHTS_FILE",
    "FID_WEIGHTS_URL",
    "LPIPS_NETS",
    "MissingWeightsError",
    "psnr",
    "ssim",
    "ssim_uniform7",
    "gaussian_window",
    "frechet_distance",
    "FeatureStatistics",
    "FIDInception",
    "load_fid_inception",
    "build_lpips",
    "check_metric_weights",
    "default_weights_dir",
    "Mean",
    "ReconstructionMetrics",
    "IdUsage",
    "bits_per_pixel",
]
