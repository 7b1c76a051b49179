"""The per-layer safety net of solve_layer (issue 15 item 3)."""


def test_safety_net_keeps_the_better_fit_on_held_back_rows():
    """Few fitted rows per channel: the asymmetric regression overfits; what is kept is never worse on the
    held-back rows than the symmetric linear fit (computed here independently, by PCA)."""
    import numpy as np

    from onnx_lowrank.solver.activations import Activation
    from onnx_lowrank.solver.layer import solve_layer

    rng = np.random.default_rng(0)
    d, n = 24, 40
    y = rng.standard_normal((n, 6)) @ rng.standard_normal((6, d)) + 0.1 * rng.standard_normal((n, d))
    yh = y + 0.5 * rng.standard_normal((n, d))
    fit = np.arange(n) % 5 != 4
    sol = solve_layer(y, yh, 4, Activation("relu"), fit, ~fit, method="nonlinear", schedule=((3, 0.01), (3, 1.0)))
    mean = y[fit].mean(axis=0)
    _, _, vt = np.linalg.svd(y[fit] - mean, full_matrices=False)
    u = vt[:4].T
    pred = np.maximum((yh[~fit] - mean) @ u @ u.T + mean, 0)
    target = np.maximum(y[~fit], 0)
    sym = float(np.sum((target - pred) ** 2) / np.sum(target ** 2))
    assert sol.rel_error <= sym + 1e-9
    assert sol.rel_error <= sol.rel_error_linear + 1e-9
    if sol.method == "linear":
        assert "kept the" in sol.note
