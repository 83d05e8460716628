"""Mixture of experts: every token goes to its top-k experts (no drops), per-expert load is reported, the
balance bias steers selection only, and the grouped computation equals a per-token one."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from inference.moe import MoE, Router


def test_every_token_goes_to_its_top_k_experts() -> None:
    torch.manual_seed(0)
    moe = MoE(d_model=32, n_experts=6, top_k=2, d_expert=16, d_shared=16)
    x = torch.randn(50, 32)
    y, routing = moe(x)
    probs = F.softmax(moe.router.gate(x), dim=-1)
    expected = torch.topk(probs, 2, dim=-1).indices
    assert torch.equal(routing.experts.sort(dim=1).values, expected.sort(dim=1).values)
    assert routing.load.sum() == 50 * 2  # nothing dropped
    assert torch.equal(routing.load, torch.bincount(expected.reshape(-1), minlength=6))
    torch.testing.assert_close(routing.weights.sum(dim=1), torch.ones(50))
    # per-token reference computation
    ex = moe.experts
    ref = torch.zeros_like(x)
    for i in range(50):
        for e, w in zip(routing.experts[i].tolist(), routing.weights[i], strict=True):
            h = F.silu(x[i] @ ex.w_gate[e]) * (x[i] @ ex.w_up[e])
            ref[i] += w * (h @ ex.w_down[e])
    assert moe.shared is not None
    torch.testing.assert_close(y, ref + moe.shared(x), atol=1e-5, rtol=1e-5)


def test_balance_bias_changes_selection_not_weights() -> None:
    torch.manual_seed(1)
    router = Router(16, 4, 1)
    x = torch.randn(200, 16)
    before = router(x)
    router.balance_bias[int(before.load.argmin())] = 10.0
    after = router(x)
    assert int(after.load.argmax()) == int(before.load.argmin()) and after.load.max() == 200
    torch.testing.assert_close(after.weights, torch.ones(200, 1))  # renormalised top-1 weight


def test_update_bias_moves_towards_balance_and_loss_is_one_when_uniform() -> None:
    router = Router(8, 4, 2)
    router.update_bias(torch.tensor([10, 0, 5, 5]), rate=0.1)
    torch.testing.assert_close(router.balance_bias, torch.tensor([-0.1, 0.1, 0.0, 0.0]))
    torch.nn.init.zeros_(router.gate.weight)
    router.balance_bias.zero_()
    x = torch.randn(40, 8)
    routing = router(x)
    torch.testing.assert_close(routing.balance_loss, torch.tensor(1.0))
