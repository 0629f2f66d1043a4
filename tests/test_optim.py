"""LARS against a hand-written update, parameter groups, and the learning-rate schedule."""

import math

import pytest
import torch
from torch import nn

from simclr_cli.config import PretrainConfig, replace
from simclr_cli.optim import LARS, build_optimizer, warmup_cosine


def test_lars_step_matches_the_formula():
    torch.manual_seed(0)
    weight = nn.Parameter(torch.randn(4, 3))
    bias = nn.Parameter(torch.randn(4))
    optimizer = LARS([{"params": [weight]}, {"params": [bias], "lars": False, "weight_decay": 0.0}],
                     lr=0.5, momentum=0.9, weight_decay=0.01, trust_coefficient=0.001)
    w0, b0 = weight.detach().clone(), bias.detach().clone()
    grads = []
    for step in range(2):
        weight.grad = torch.randn(4, 3)
        bias.grad = torch.randn(4)
        grads.append((weight.grad.clone(), bias.grad.clone()))
        optimizer.step()

    # Reference: update = (g + wd * w) * eta * |w| / |g + wd * w|; v = m * v + update; w -= lr * v.
    w, b = w0.clone(), b0.clone()
    vw, vb = torch.zeros_like(w), torch.zeros_like(b)
    for gw, gb in grads:
        update = gw + 0.01 * w
        update = update * (0.001 * w.norm() / update.norm())
        vw = 0.9 * vw + update
        vb = 0.9 * vb + gb  # biases: plain momentum SGD, no decay, no trust ratio
        w, b = w - 0.5 * vw, b - 0.5 * vb
    torch.testing.assert_close(weight.detach(), w)
    torch.testing.assert_close(bias.detach(), b)


def test_no_decay_or_adaptation_on_biases_and_batchnorm():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    for name in ("lars", "sgd", "adamw"):
        optimizer = build_optimizer(name, model, lr=0.1, weight_decay=0.5)
        weights, others = optimizer.param_groups
        assert all(p.ndim > 1 for p in weights["params"]) and len(weights["params"]) == 2
        assert all(p.ndim == 1 for p in others["params"]) and len(others["params"]) == 4
        assert weights["weight_decay"] == 0.5 and others["weight_decay"] == 0.0
        if name == "lars":
            assert weights["lars"] and not others["lars"]


def test_warmup_then_cosine_to_zero():
    assert warmup_cosine(0.0, 0.1) == 0.0
    assert warmup_cosine(0.05, 0.1) == pytest.approx(0.5)
    assert warmup_cosine(0.1, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(0.55, 0.1) == pytest.approx(0.5)
    assert warmup_cosine(1.0, 0.1) == pytest.approx(0.0, abs=1e-12)
    values = [warmup_cosine(p / 100, 0.1) for p in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:])), "decay must be monotone after warmup"
    assert warmup_cosine(0.5, 0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))


@pytest.mark.parametrize("optimizer,scaling,batch,expected", [
    ("lars", "linear", 256, 0.3), ("lars", "linear", 4096, 4.8), ("sgd", "linear", 512, 0.6),  # 0.3 x batch/256
    ("lars", "sqrt", 256, 1.2), ("lars", "sqrt", 4096, 4.8), ("sgd", "sqrt", 64, 0.6),  # 0.075 x sqrt(batch)
    ("adamw", "linear", 256, 1e-3), ("adamw", "linear", 1024, 4e-3), ("adamw", "sqrt", 1024, 2e-3),
])
def test_default_learning_rate_scales_with_batch(optimizer, scaling, batch, expected):
    config = PretrainConfig(data_dir=".", out_dir="x", batch_size=batch, optimizer=optimizer, lr_scaling=scaling)
    assert config.resolved_lr == pytest.approx(expected)
    assert replace(config, lr=0.5).resolved_lr == 0.5, "--lr wins over the rule"


def test_sqrt_scaling_is_the_default_and_runs_from_before_it_resume_on_linear():
    config = PretrainConfig(data_dir=".", out_dir="x", batch_size=256)
    assert config.lr_scaling == "sqrt" and config.resolved_lr == pytest.approx(1.2)
    older = config.to_json()
    del older["lr_scaling"]
    assert PretrainConfig.from_json(older).resolved_lr == pytest.approx(0.3)
