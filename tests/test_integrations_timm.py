"""msam_fused.integrations.timm (the optimizer factory) with timm's scheduler, NativeScaler and
EMA, and EMA/SWA of the true weights through ``true_weights``, against plain loops."""

import copy

import pytest
import torch
import torch.nn.functional as F

timm = pytest.importorskip("timm", reason="needs timm (pip install msam-fused[timm])")
import timm.optim  # noqa: E402
import timm.scheduler  # noqa: E402
import timm.utils  # noqa: E402

import msam_fused  # noqa: E402
import msam_fused.integrations.timm  # noqa: E402,F401  (registers the names)
from msam_fused.integrations import true_weights  # noqa: E402


def tiny_resnet(seed=0):
    torch.manual_seed(seed)
    return timm.create_model("test_resnet", num_classes=3)


def batches(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 3, (4,), generator=g)) for _ in range(n)]


@pytest.mark.parametrize("name, cls, extra", [
    ("msam", msam_fused.MSAM, dict(momentum=0.8, rho=1.5)),
    ("adamwmsam", msam_fused.AdamWMSAM, dict(betas=(0.8, 0.99), rho=0.5)),
    ("sam", msam_fused.SAM, dict(momentum=0.8, rho=0.1)),
])
def test_the_factory_builds_ours_with_timms_param_groups(name, cls, extra):
    model = tiny_resnet()
    opt = timm.optim.create_optimizer_v2(model, name, lr=0.05, weight_decay=1e-3, **extra)
    assert type(opt) is cls
    no_decay, decay = sorted(opt.param_groups, key=lambda g: g["weight_decay"])
    # timm: no weight decay on biases and norm layers
    assert decay["weight_decay"] == 1e-3 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim <= 1 for p in no_decay["params"])
    for key, value in {"lr": 0.05, **extra}.items():
        assert decay[key] == value
    if cls is msam_fused.SAM:
        assert type(opt.base_optimizer) is torch.optim.SGD


def test_timm_loop_with_scheduler_native_scaler_and_clipping_matches_a_plain_loop():
    data = batches(6)
    model = tiny_resnet()
    reference = copy.deepcopy(model)
    opt = timm.optim.create_optimizer_v2(model, "msam", lr=0.1, weight_decay=1e-3, rho=1.0)
    scheduler, _ = timm.scheduler.create_scheduler_v2(opt, "cosine", num_epochs=6, warmup_epochs=2,
                                                      warmup_lr=0.01, step_on_epochs=False, updates_per_epoch=1)
    scaler = timm.utils.NativeScaler(device="cpu")  # GradScaler: MSAM unscales inside step()
    lrs = []
    for step, (x, y) in enumerate(data):
        lrs.append(opt.param_groups[0]["lr"])
        scaler(F.cross_entropy(model(x), y), opt, clip_grad=1.0, parameters=model.parameters())
        opt.zero_grad()
        scheduler.step_update(step + 1)
    assert len(set(lrs)) > 2, "the schedule should move the learning rate"

    plain = msam_fused.MSAM(timm.optim.param_groups_weight_decay(reference, 1e-3), lr=0.1, rho=1.0)
    for lr, (x, y) in zip(lrs, data):
        for group in plain.param_groups:
            group["lr"] = lr
        F.cross_entropy(reference(x), y).backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
        plain.step()
        plain.zero_grad()
    # The scale is a power of two, so unscaling is exact; the norms are summed in another order.
    torch.testing.assert_close(opt.unperturbed_state_dict(model), plain.unperturbed_state_dict(reference),
                               rtol=1e-5, atol=1e-6)


def true_parameters(opt, model):
    true = opt.unperturbed_state_dict(model)
    return [true[name] for name, _ in model.named_parameters()]


def test_ema_and_swa_average_the_true_weights():
    model = tiny_resnet()
    opt = msam_fused.MSAM(model.parameters(), lr=0.1, rho=2.0)
    ema = timm.utils.ModelEmaV3(model, decay=0.5)
    swa = torch.optim.swa_utils.AveragedModel(model)
    expected_ema = [p.detach().clone() for p in model.parameters()]
    history = []  # AveragedModel's first update copies the model, later ones average
    for x, y in batches(4):
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        with true_weights(opt):
            ema.update(model)
            swa.update_parameters(model)
        true = true_parameters(opt, model)
        expected_ema = [0.5 * e + 0.5 * w for e, w in zip(expected_ema, true)]
        history.append(true)
    perturbed = [p.detach() for p in model.parameters()]
    assert max((w - p).abs().max() for w, p in zip(history[-1], perturbed)) > 1e-3
    for got, want in zip(ema.module.parameters(), expected_ema):
        torch.testing.assert_close(got, want)
    for got, *steps in zip(swa.module.parameters(), *history):
        torch.testing.assert_close(got, torch.stack(steps).mean(0))
