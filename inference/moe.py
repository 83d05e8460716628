"""Mixture-of-Experts feed-forward: a top-k router and SwiGLU experts, as separate, swappable pieces.

Routing: softmax over expert scores; each token goes to the ``top_k`` experts with the highest ``score +
balance_bias`` and mixes them with its (renormalised) softmax scores. Nothing is ever dropped: there is no
capacity limit, every token is computed by all of its ``top_k`` experts, in training and at inference alike.

Balance is kept two ways, both of which work unchanged at inference:
- the auxiliary-loss-free bias (DeepSeek-V3): a per-expert ``balance_bias`` that only affects which experts
  are picked, nudged after each training step towards under-used experts (:meth:`Router.update_bias`); it is a
  buffer, saved with the checkpoint, so inference routes exactly as the trained model did;
- the Switch-Transformer balance loss ``E · Σ_e f_e · P_e`` (fraction of assignments × mean router
  probability), returned for training. """

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Routing:
    """Where each token goes: ``experts`` and ``weights`` (N, k); ``load``: assignments per expert (E,)."""

    experts: torch.Tensor
    weights: torch.Tensor
    load: torch.Tensor
    balance_loss: torch.Tensor


class Router(nn.Module):
    """Top-k softmax router with a selection-only balance bias."""

    def __init__(self, d_model: int, n_experts: int, top_k: int) -> None:
        super().__init__()
        self.top_k = top_k
        self.gate = nn.Linear(d_model, n_experts, bias=False)
        self.register_buffer("balance_bias", torch.zeros(n_experts))
        self.balance_bias: torch.Tensor

    def forward(self, x: torch.Tensor) -> Routing:
        probs = F.softmax(self.gate(x).float(), dim=-1)  # (N, E)
        experts = torch.topk(probs + self.balance_bias, self.top_k, dim=-1).indices  # (N, k)
        weights = probs.gather(1, experts)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        n_experts = probs.shape[1]
        load = torch.bincount(experts.reshape(-1), minlength=n_experts)
        frac = load.float() / max(1, experts.numel())
        balance_loss = n_experts * (frac * probs.mean(dim=0)).sum()
        return Routing(experts, weights.to(x.dtype), load, balance_loss)

    @torch.no_grad()
    def update_bias(self, load: torch.Tensor, rate: float) -> None:
        """Move the bias ``rate`` towards balance: up for experts below the mean load, down for those above
        (training uses :data:`inference.train.BIAS_RATE`)."""
        self.balance_bias += rate * torch.sign(load.float().mean() - load.float())


class SwiGLUExperts(nn.Module):
    """``n`` SwiGLU MLPs with stacked weights; each expert runs once per forward on the tokens routed to it,
    so only the experts in use are read (what matters for small decode batches) and nothing is padded."""

    def __init__(self, n: int, d_model: int, d_hidden: int) -> None:
        super().__init__()
        scale = d_model ** -0.5
        self.w_gate = nn.Parameter(torch.randn(n, d_model, d_hidden) * scale)  # (E, d, h)
        self.w_up = nn.Parameter(torch.randn(n, d_model, d_hidden) * scale)  # (E, d, h)
        self.w_down = nn.Parameter(torch.randn(n, d_hidden, d_model) * d_hidden ** -0.5)  # (E, h, d)

    def forward(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        k = routing.experts.shape[1]
        flat = routing.experts.reshape(-1)  # (N·k,)
        order = torch.argsort(flat, stable=True)
        token = order // k  # the token of each assignment, grouped by expert
        xs = x[token]  # (N·k, d)
        w = routing.weights.reshape(-1)[order, None]  # (N·k, 1)
        out = torch.zeros_like(x)
        start = 0
        for e, count in enumerate(routing.load.tolist()):
            if count == 0:
                continue
            rows = slice(start, start + count)
            h = F.silu(xs[rows] @ self.w_gate[e]) * (xs[rows] @ self.w_up[e])  # (n_e, h)
            out = out.index_add(0, token[rows], (h @ self.w_down[e]) * w[rows])
            start += count
        return out


class SwiGLU(nn.Module):
    """A dense SwiGLU MLP (the shared expert)."""

    def __init__(self, d_model: int, d_hidden: int) -> None:
        super().__init__()
        self.gate = nn.Linear(d_model, d_hidden, bias=False)
        self.up = nn.Linear(d_model, d_hidden, bias=False)
        self.down = nn.Linear(d_hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class MoE(nn.Module):
    """Routed experts plus an optional always-on shared expert: (N, d) → (N, d), and the routing used."""

    def __init__(self, d_model: int, n_experts: int, top_k: int, d_expert: int, d_shared: int) -> None:
        super().__init__()
        self.router = Router(d_model, n_experts, top_k)
        self.experts = SwiGLUExperts(n_experts, d_model, d_expert)
        self.shared = SwiGLU(d_model, d_shared) if d_shared > 0 else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Routing]:
        routing = self.router(x)
        y = self.experts(x, routing)
        if self.shared is not None:
            y = y + self.shared(x)
        return y, routing
