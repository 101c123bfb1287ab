"""LARS, the optimizer of MAE's linear probe (He et al., CVPR 2022, appendix A.2).

You, Gitman and Ginsburg, "Large Batch Training of Convolutional Networks", 2017: layer-wise
adaptive rate scaling.
"""

from __future__ import annotations

from typing import Any

import torch


class LARS(torch.optim.Optimizer):
    """LARS (You et al., 2017) as used by MAE's linear probe: SGD with momentum whose update of
    each weight matrix is scaled by ``trust_coefficient * ||w|| / ||g + wd * w||``; parameters
    with one dimension (biases, norms) get neither weight decay nor the scaling."""

    def __init__(
        self,
        params: Any,
        lr: float = 0.0,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        trust_coefficient: float = 0.001,
    ) -> None:
        super().__init__(
            params,
            dict(
                lr=lr,
                weight_decay=weight_decay,
                momentum=momentum,
                trust_coefficient=trust_coefficient,
            ),
        )

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if p.ndim > 1:
                    d = d.add(p, alpha=g["weight_decay"])
                    w_norm, d_norm = torch.norm(p), torch.norm(d)
                    one = torch.ones_like(w_norm)
                    q = torch.where(
                        w_norm > 0,
                        torch.where(d_norm > 0, g["trust_coefficient"] * w_norm / d_norm, one),
                        one,
                    )
                    d = d.mul(q)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(g["momentum"]).add_(d)
                p.add_(mu, alpha=-g["lr"])
        return None
