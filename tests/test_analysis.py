"""The analysis tools: feature rank of matrices with known spectra, the momentum/gradient cosine
against a hand computation, the loss along a direction of a quadratic, and the CLI's plots."""

import json
import math
import os

import pytest
import torch
from torch import nn

import msam_fused
from msam_fused import analysis

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")


def matrix_with_component_variances(variances, samples=300, dims=40, seed=0):
    """Centered data whose principal components have exactly the given variances."""
    gen = torch.Generator().manual_seed(seed)
    k = len(variances)
    # orthonormal sample-space directions orthogonal to the all-ones vector (zero column means)
    basis = torch.cat([torch.ones(samples, 1), torch.randn(samples, k, generator=gen, dtype=torch.float64)], 1)
    u = torch.linalg.qr(basis)[0][:, 1:]
    v = torch.linalg.qr(torch.randn(dims, k, generator=gen, dtype=torch.float64))[0]
    return u @ torch.diag(torch.tensor(variances, dtype=torch.float64).sqrt()) @ v.T


@pytest.mark.parametrize("rank", [1, 7, 25])
def test_feature_rank_of_equal_components_is_their_number(rank):
    x = matrix_with_component_variances([1.0] * rank) + 3.0  # a constant offset is centered away
    assert analysis.feature_rank(x) == rank
    assert analysis.feature_rank(x.float()) == rank


def test_feature_rank_counts_components_up_to_the_threshold():
    x = matrix_with_component_variances([0.6, 0.3, 0.085, 0.01, 0.005])
    ratio = analysis.explained_variance_ratio(x)
    torch.testing.assert_close(ratio[:5], torch.tensor([0.6, 0.3, 0.085, 0.01, 0.005], dtype=torch.float64))
    assert [analysis.feature_rank(x, t) for t in (0.5, 0.9, 0.98, 0.99, 0.996, 1.0)] == [1, 2, 3, 4, 5, 5]
    assert analysis.feature_rank(torch.ones(10, 4)) == 0
    with pytest.raises(ValueError, match="threshold"):
        analysis.feature_rank(x, 0.0)


def test_penultimate_features_are_the_input_of_the_last_linear():
    model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 2))
    model.train()
    x = torch.randn(9, 5)
    features = analysis.penultimate_features(model, x, batch_size=4)
    torch.testing.assert_close(features, torch.relu(model[0](x)).detach())
    assert model.training


def test_cosine_between_momentum_and_next_gradient_matches_a_hand_computation():
    p = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    q = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    opt = torch.optim.SGD([p, q], lr=0.1, momentum=0.9)
    tracker = analysis.MomentumGradientCosine(opt)
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(5, generator=gen, dtype=torch.float64) for _ in range(4)]
    momentum, expected = None, []
    for g in grads:
        p.grad, q.grad = g[:3].clone(), g[3:].clone()
        if momentum is not None:
            expected.append(float(momentum @ g / (momentum.norm() * g.norm())))
        momentum = g.clone() if momentum is None else 0.9 * momentum + g
        opt.step()
    tracker.remove()
    opt.step()
    assert tracker.history() == pytest.approx(expected, rel=1e-12)


def test_cosine_tracker_follows_the_base_optimizer_of_sam():
    model = nn.Linear(3, 1)
    sam = msam_fused.SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, backend="reference")
    tracker = analysis.MomentumGradientCosine(sam)
    assert tracker.optimizer is sam.base_optimizer


def test_loss_along_a_direction_of_a_quadratic_and_params_come_back():
    w = nn.Parameter(torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64))
    hessian = torch.diag(torch.tensor([1.0, 4.0, 9.0], dtype=torch.float64))

    def loss():
        return 0.5 * w @ hessian @ w

    before = w.detach().clone()
    grad = analysis.gradient_direction([w], loss)[0]
    torch.testing.assert_close(grad, hessian @ before)
    d = torch.tensor([0.0, 3.0, 4.0], dtype=torch.float64)
    radii = [-1.0, 0.0, 0.5, 2.0]
    losses = analysis.loss_along([w], [d], radii, loss)
    unit = d / 5
    assert losses == pytest.approx([float(0.5 * (before + r * unit) @ hessian @ (before + r * unit))
                                    for r in radii], rel=1e-12)
    assert torch.equal(w.detach(), before)
    # the random direction is reproducible and the momentum direction reads the optimizer
    assert torch.equal(analysis.random_direction([w], 3)[0], analysis.random_direction([w], 3)[0])
    opt = torch.optim.SGD([w], lr=0.1, momentum=0.9)
    assert torch.equal(analysis.momentum_direction(opt, [w])[0], torch.zeros(3, dtype=torch.float64))


def test_the_cli_writes_the_three_plots_and_the_json(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(BENCH)
    import analyze

    out = tmp_path / "analysis"
    runs = analyze.main(["--optimizers", "sgd,msam", "--epochs", "2", "--train-samples", "192",
                         "--points", "5", "--probe-samples", "64", "--device", "cpu", "--out", str(out)])
    for name in ("momentum_gradient_cosine.png", "sharpness.png", "feature_rank.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name
    saved = json.loads((out / "analysis.json").read_text())
    assert set(saved["runs"]) == {"sgd", "msam"}
    for run in runs.values():
        assert len(run["cosine"]) == 2 * 3 - 1  # 3 steps an epoch, none recorded on the first
        assert all(-1 <= c <= 1 for c in run["cosine"])
        assert set(run["loss_along"]) == {"momentum", "gradient", "random"}
        assert all(len(v) == 5 and all(map(math.isfinite, v)) for v in run["loss_along"].values())
        assert run["feature_dims"] == 128 and run["feature_rank"] in range(1, 129)
        assert run["loss_along"]["gradient"][2] == pytest.approx(run["loss_along"]["random"][2])
