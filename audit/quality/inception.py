"""FID, KID and Inception Score -- only ever with Inception-v3 weights from a local file.

The weights file is a state dict (``.pth``/``.pt`` via ``torch.load(weights_only=True)``,
or ``.safetensors``) for one of two networks, told apart by the classifier's
size:

* 1008 outputs: the TensorFlow FID Inception (``pt_inception-2015-12-05``,
  the weights pytorch-fid ports).  Its pooling differs from torchvision's in
  four block types, and those differences are reproduced here, so FIDs are
  comparable with published ones (which use these weights);
* 1000 outputs: torchvision's ImageNet ``inception_v3`` weights.  FIDs from
  it are internally consistent but *not* comparable with published values;
  the result says so.

Images are brought to three channels (gray replicated), resized to 299 x 299
(bilinear) and scaled to [-1, 1], as both weight sets expect.  No other
network is ever used under these names: without weights the metrics are
absent from the report, with the reason.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from synthgate.errors import InputError

from audit.quality.classifier import read_state_dict

FID_TF_CLASSES = 1008
TORCHVISION_CLASSES = 1000


def _fid_blocks():
    """torchvision's Inception blocks with the TensorFlow FID network's pooling.

    TensorFlow's average pooling ignores padded zeros (``count_include_pad=False``);
    the last block of the FID network max-pools in its pooling branch.
    """
    import torch.nn.functional as F
    from torchvision.models import inception as tv

    def avg(x):
        return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)

    class BlockA(tv.InceptionA):
        def _forward(self, x):
            b5 = self.branch5x5_2(self.branch5x5_1(x))
            b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
            return [self.branch1x1(x), b5, b3, self.branch_pool(avg(x))]

    class BlockC(tv.InceptionC):
        def _forward(self, x):
            b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
            d = x
            for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                          self.branch7x7dbl_5):
                d = layer(d)
            return [self.branch1x1(x), b7, d, self.branch_pool(avg(x))]

    class BlockE(tv.InceptionE):
        max_pool = False

        def _forward(self, x):
            import torch

            b3 = self.branch3x3_1(x)
            b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
            d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
            d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
            pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else avg(x)
            return [self.branch1x1(x), b3, d, self.branch_pool(pooled)]

    class BlockEMax(BlockE):
        max_pool = True

    return BlockA, BlockC, BlockE, BlockEMax


def fid_inception_v3():
    """The TensorFlow FID Inception-v3 architecture (1008 classes), randomly initialised."""
    import torchvision

    a, c, e, e_max = _fid_blocks()
    net = torchvision.models.inception_v3(weights=None, num_classes=FID_TF_CLASSES, aux_logits=False,
                                          init_weights=False, transform_input=False)
    net.Mixed_5b, net.Mixed_5c, net.Mixed_5d = a(192, 32), a(256, 64), a(288, 64)
    net.Mixed_6b, net.Mixed_6c, net.Mixed_6d, net.Mixed_6e = c(768, 128), c(768, 160), c(768, 160), c(768, 192)
    net.Mixed_7b, net.Mixed_7c = e(1280), e_max(2048)
    return net


@dataclass
class InceptionNet:
    """A loaded Inception-v3 and what its numbers may be compared with."""

    model: object
    kind: str  # "tf_fid" or "torchvision"
    path: str
    device: object

    @property
    def comparable(self) -> str:
        if self.kind == "tf_fid":
            return "TensorFlow FID Inception weights: comparable with published FID/KID/IS values"
        return ("torchvision ImageNet Inception-v3 weights: consistent within synthgate, NOT comparable with "
                "published FID/KID/IS values (those use the TensorFlow FID weights)")

    def outputs(self, x, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
        """Pool-3 features ``(N, 2048)`` and class logits of ``(N, C, H, W)`` images in [0, 1]."""
        import torch
        import torch.nn.functional as F

        feats, logits = [], []
        captured = {}
        hook = self.model.avgpool.register_forward_hook(lambda m, i, o: captured.__setitem__("pool", o))
        try:
            with torch.no_grad():
                for s in range(0, len(x), batch_size):
                    xb = x[s:s + batch_size].to(self.device).float()
                    if xb.shape[1] == 1:
                        xb = xb.expand(-1, 3, -1, -1)
                    xb = F.interpolate(xb, size=(299, 299), mode="bilinear", align_corners=False)
                    out = self.model(2.0 * xb - 1.0)
                    logits.append(out.double().cpu())
                    feats.append(captured["pool"].flatten(1).double().cpu())
        finally:
            hook.remove()
        return torch.cat(feats).numpy(), torch.cat(logits).numpy()


def load_inception(path: str | Path, device=None) -> InceptionNet:
    """Build the Inception-v3 that ``path``'s state dict fits and load it (errors name the file)."""
    import torch
    import torchvision

    device = device or torch.device("cpu")
    state = read_state_dict(path)
    fc = state.get("fc.weight")
    if fc is None or fc.ndim != 2 or fc.shape[1] != 2048:
        raise InputError("is not an Inception-v3 state dict (no 2048-input fc.weight)", path)
    if fc.shape[0] == FID_TF_CLASSES:
        model, kind = fid_inception_v3(), "tf_fid"
    elif fc.shape[0] == TORCHVISION_CLASSES:
        aux = any(k.startswith("AuxLogits.") for k in state)
        model = torchvision.models.inception_v3(weights=None, aux_logits=aux, init_weights=False,
                                                transform_input=False)
        kind = "torchvision"
    else:
        raise InputError(f"has an fc layer with {fc.shape[0]} classes; expected {FID_TF_CLASSES} (TensorFlow FID "
                         f"Inception) or {TORCHVISION_CLASSES} (torchvision inception_v3)", path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = " ".join(str(exc).split())[:200]
        raise InputError(f"weights do not fit the Inception-v3 architecture ({first})", path) from exc
    return InceptionNet(model.to(device).eval(), kind, str(path), device)


# ------------------------------------------------------------------- metrics


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))`` of two feature samples.

    The trace of the matrix square root is computed exactly without forming
    it: with ``A`` and ``B`` the centred samples, ``S_a S_b`` has the same
    non-zero eigenvalues as ``(A B^T)(A B^T)^T / ((n_a - 1)(n_b - 1))``, so
    ``tr (S_a S_b)^(1/2)`` is the nuclear norm of ``A B^T`` over
    ``sqrt((n_a - 1)(n_b - 1))`` -- a small matrix when there are fewer
    images than feature dimensions (the usual case in an audit, where a
    2048 x 2048 ``sqrtm`` of a singular product is slow and needs an ad-hoc
    diagonal offset).  With more images than dimensions it uses the
    symmetric form ``tr (S_a^(1/2) S_b S_a^(1/2))^(1/2)`` (eigenvalues only).

    Kept rather than torchmetrics' ``FrechetInceptionDistance``: the two agree
    (``tests/test_fidelity.py``; 1.5e-7 relative at d = 2048, where its
    eigenvalues of the singular product ``S_a S_b`` carry rounding), but it
    takes the general eigenvalues of the 2048 x 2048 product on every call,
    measured 14-17x slower at 1,000 images and 230-600x at 200 (7-9 s
    against 0.01-0.6 s on one CPU thread, over two runs;
    ``bench/field_libraries.py --only inception``), and an audit computes two
    FIDs.

    Notes
    -----
    Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule
    Converge to a Local Nash Equilibrium" (NeurIPS).
    """
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if len(a) < 2 or len(b) < 2:
        raise ValueError("FID needs at least 2 images in each set")
    ca, cb = a - a.mean(0), b - b.mean(0)
    na, nb = len(a) - 1, len(b) - 1
    diff = a.mean(0) - b.mean(0)
    trace_a, trace_b = (ca * ca).sum() / na, (cb * cb).sum() / nb
    if min(len(a), len(b)) <= a.shape[1]:
        cross = np.linalg.svd(ca @ cb.T, compute_uv=False).sum() / np.sqrt(na * nb)
    else:
        w, v = np.linalg.eigh(ca.T @ ca / na)
        root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
        inner = np.linalg.eigvalsh(root @ (cb.T @ cb / nb) @ root)
        cross = np.sqrt(np.clip(inner, 0, None)).sum()
    return float(diff @ diff + trace_a + trace_b - 2.0 * cross)


def kernel_inception_distance(a: np.ndarray, b: np.ndarray, subsets: int = 100, subset_size: int = 1000,
                              rng: np.random.Generator | None = None) -> tuple[float, float, int]:
    """Unbiased MMD^2 with the cubic polynomial kernel ``(x.y / d + 1)^3``, averaged over random subsets.

    Returns the mean, the standard deviation over subsets and the subset size
    used (the smaller set's size when it is below ``subset_size``).

    Each subset's MMD^2 is torchmetrics' ``poly_mmd`` (the function behind
    its ``KernelInceptionDistance``, same kernel defaults).  The subsets are
    drawn here, with the audit's seeded ``rng``: the metric class draws them
    with torch's global generator and refuses a ``subset_size`` above either
    set's size, where an audit uses the smaller size.  Same numbers as the
    NumPy form it replaced (4e-16 apart), at 1.5x its cost per subset (0.7
    against 0.45 s at 1,000 x 2,048 on one CPU thread;
    ``bench/field_libraries.py --only inception``): some 25 s more for 100
    subsets, against about 0.6 s per image for the Inception forward passes
    that produced the features.

    Notes
    -----
    Binkowski, Sutherland, Arbel & Gretton 2018, "Demystifying MMD GANs"
    (ICLR).  Subsets of 1,000 drawn 100 times, as common implementations do.
    """
    import torch
    from torchmetrics.image.kid import poly_mmd

    rng = rng or np.random.default_rng(0)
    a = torch.as_tensor(np.asarray(a, np.float64))
    b = torch.as_tensor(np.asarray(b, np.float64))
    m = min(len(a), len(b), subset_size)
    if m < 2:
        raise ValueError("KID needs at least 2 images in each set")
    values = []
    for _ in range(subsets):
        x = a[rng.choice(len(a), m, replace=False)]
        y = b[rng.choice(len(b), m, replace=False)]
        values.append(float(poly_mmd(x, y)))
    return float(np.mean(values)), float(np.std(values)), m


def inception_score(logits: np.ndarray, splits: int = 10) -> tuple[float, float, int]:
    """``exp(E_x KL(p(y|x) || p(y)))`` per split; mean and standard deviation over splits.

    Kept rather than torchmetrics' ``InceptionScore``: that one shuffles the
    images with torch's global generator before splitting and reports the
    sample standard deviation (ddof 1); on the same splits the two agree
    (``tests/test_fidelity.py``).  Here the splits are contiguous and the
    standard deviation is ddof 0, as in Salimans et al.'s code, and nothing
    depends on a global generator.

    Notes
    -----
    Salimans et al. 2016, "Improved Techniques for Training GANs" (NeurIPS):
    10 splits.  With fewer images than splits, one split per image pair at
    least (the number used is returned).
    """
    from scipy.special import log_softmax

    logp = log_softmax(np.asarray(logits, np.float64), axis=1)
    n = len(logp)
    splits = max(1, min(splits, n // 2))
    scores = []
    for part in np.array_split(np.arange(n), splits):
        lp = logp[part]
        p = np.exp(lp)
        log_marginal = np.log(p.mean(0) + 1e-300)
        scores.append(np.exp((p * (lp - log_marginal)).sum(1).mean()))
    return float(np.mean(scores)), float(np.std(scores)), splits
