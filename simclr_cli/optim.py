"""LARS, the optimiser choice, and the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn


class LARS(torch.optim.Optimizer):
    """SGD with momentum and a layer-wise trust ratio (You et al., arXiv 1708.03888).

    SimCLR (arXiv 2002.05709, section 2) trains with LARS because plain SGD is unstable at batch
    sizes of thousands. Parameter groups with `lars=False` (biases and BatchNorm, as in the
    paper) get neither the trust ratio nor weight decay.
    """

    def __init__(self, params: Iterable, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 0.001):
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                        trust_coefficient=trust_coefficient, lars=True)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                update = param.grad
                if group["lars"]:
                    if group["weight_decay"]:
                        update = update.add(param, alpha=group["weight_decay"])
                    param_norm = torch.linalg.vector_norm(param)
                    update_norm = torch.linalg.vector_norm(update)
                    trust = torch.where(
                        (param_norm > 0) & (update_norm > 0),
                        group["trust_coefficient"] * param_norm / update_norm,
                        torch.ones_like(param_norm),
                    )
                    update = update.mul(trust)
                state = self.state[param]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.clone(update).detach()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(update)
                param.add_(state["momentum_buffer"], alpha=-group["lr"])
        return loss


def split_decay(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(weights, biases and normalisation parameters): the second group gets no decay or adaptation."""
    weights, others = [], []
    for param in model.parameters():
        if param.requires_grad:
            (weights if param.ndim > 1 else others).append(param)
    return weights, others


def build_optimizer(name: str, model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """LARS, SGD (momentum 0.9, Nesterov) or AdamW, with no decay on biases and BatchNorm."""
    weights, others = split_decay(model)
    if name == "lars":
        return LARS([{"params": weights}, {"params": others, "lars": False, "weight_decay": 0.0}],
                    lr=lr, weight_decay=weight_decay)
    groups = [{"params": weights, "weight_decay": weight_decay}, {"params": others, "weight_decay": 0.0}]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    raise ValueError(f"unknown optimizer {name!r}")


def warmup_cosine(progress: float, warmup: float) -> float:
    """The learning-rate multiplier at `progress` in [0, 1]: linear warmup over the first `warmup`
    fraction, then cosine decay to zero at 1 (SimCLR section B.1)."""
    progress = min(max(progress, 0.0), 1.0)
    if warmup > 0 and progress < warmup:
        return progress / warmup
    span = max(1e-12, 1.0 - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * (progress - warmup) / span))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
