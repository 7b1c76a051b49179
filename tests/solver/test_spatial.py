import numpy as np
import pytest

from onnx_lowrank.solver.spatial import (
    spatial_flops,
    spatial_max_rank,
    spatial_positions,
    spatial_singular_values,
    spatial_svd,
    split_conv_attributes,
)


def conv2d(x, W, b=None, strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1)):
    """Brute-force ONNX-style Conv (group 1): x (c, H, W), W (d, c, kh, kw); pads [t, l, b, r]."""
    c, h, w = x.shape
    d, c2, kh, kw = W.shape
    assert c == c2
    sh, sw = strides
    top, left, bottom, right = pads
    dh, dw = dilations
    xp = np.zeros((c, h + top + bottom, w + left + right), dtype=np.float64)
    xp[:, top : top + h, left : left + w] = x
    ho = (h + top + bottom - dh * (kh - 1) - 1) // sh + 1
    wo = (w + left + right - dw * (kw - 1) - 1) // sw + 1
    y = np.zeros((d, ho, wo))
    for i in range(ho):
        for j in range(wo):
            for p in range(kh):
                for q in range(kw):
                    patch = xp[:, i * sh + p * dh, j * sw + q * dw]  # (c,)
                    y[:, i, j] += W[:, :, p, q] @ patch
    if b is not None:
        y += b[:, None, None]
    return y


CASES = [
    # d, c, kh, kw, H, W, strides, pads, dilations
    (4, 3, 3, 3, 7, 8, (1, 1), (1, 1, 1, 1), (1, 1)),
    (5, 2, 3, 5, 9, 11, (2, 1), (1, 2, 0, 1), (1, 1)),
    (3, 4, 5, 3, 10, 9, (1, 3), (2, 0, 1, 1), (2, 1)),
    (6, 2, 2, 4, 8, 12, (2, 2), (0, 3, 1, 0), (1, 2)),
    (2, 5, 3, 1, 6, 5, (1, 1), (1, 0, 1, 0), (1, 1)),
    (3, 2, 1, 3, 5, 7, (1, 2), (0, 1, 0, 1), (1, 3)),
]


@pytest.mark.parametrize("d,c,kh,kw,H,W_,strides,pads,dil", CASES)
def test_full_rank_exact(d, c, kh, kw, H, W_, strides, pads, dil):
    rng = np.random.default_rng(d * 100 + c * 10 + kh)
    W = rng.standard_normal((d, c, kh, kw))
    b = rng.standard_normal(d)
    x = rng.standard_normal((c, H, W_))
    rank = spatial_max_rank(W.shape)
    V, Hh = spatial_svd(W, rank)
    assert V.shape == (rank, c, kh, 1)
    assert Hh.shape == (d, rank, 1, kw)
    va, ha = split_conv_attributes(strides, pads, dil)
    z = conv2d(x, V, None, **va)
    y_hat = conv2d(z, Hh, b, **ha)
    y = conv2d(x, W, b, strides, pads, dil)
    assert y_hat.shape == y.shape
    np.testing.assert_allclose(y_hat, y, rtol=1e-9, atol=1e-9)
    # the documented intermediate size: H' x W_in
    assert z.shape == (rank, y.shape[1], W_)
    pv, pos = spatial_positions(H, W_, kh, kw, strides, pads, dil)
    assert pv == z.shape[1] * z.shape[2]
    assert pos == y.shape[1] * y.shape[2]
    # FLOPs by brute count of MACs
    macs = rank * c * kh * pv + d * rank * kw * pos
    assert spatial_flops(c, d, kh, kw, rank, pv, pos) == 2 * macs


def test_truncation_is_optimal_and_monotone():
    rng = np.random.default_rng(0)
    W = rng.standard_normal((8, 4, 3, 3))
    s = spatial_singular_values(W)
    assert s.shape == (12,)
    A = W.transpose(1, 2, 0, 3).reshape(12, 24)
    prev = np.inf
    for r in range(1, 13):
        V, H = spatial_svd(W, r)
        # recombine: W_hat[o, ch, p, q] = sum_k V[k, ch, p] H[o, k, q]
        W_hat = np.einsum("kcp,okq->ocpq", V[..., 0], H[:, :, 0, :])
        err = np.linalg.norm(W_hat - W)
        np.testing.assert_allclose(err**2, np.sum(s[r:] ** 2), rtol=1e-8, atol=1e-10)
        assert err <= prev + 1e-12
        prev = err
    assert prev < 1e-10
    assert np.linalg.matrix_rank(A) == 12


def test_dtype_and_clamp():
    W = np.random.default_rng(1).standard_normal((2, 3, 3, 3)).astype(np.float32)
    V, H = spatial_svd(W, 100)  # clamped to min(9, 6) = 6
    assert V.dtype == np.float32 and H.dtype == np.float32
    assert V.shape == (6, 3, 3, 1) and H.shape == (2, 6, 1, 3)
    with pytest.raises(ValueError):
        spatial_svd(W, 0)
    with pytest.raises(ValueError):
        spatial_svd(W[0], 1)
