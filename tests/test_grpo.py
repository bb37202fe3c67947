"""grpo.py: advantages and loss against values worked by hand."""
import math

import pytest
import torch

import grpo


def test_advantages_one_correct():
    A = grpo.group_advantages(torch.tensor([1.0, 0, 0, 0]), G=4, noise_std=0)
    # mean .25; unbiased var = (.75^2 + 3 * .25^2) / 3 = .25 -> std .5
    expect = torch.tensor([0.75, -0.25, -0.25, -0.25]) / (0.5 + 1e-4)
    torch.testing.assert_close(A, expect)


def test_advantages_all_equal_and_dr_grpo_and_groups():
    torch.testing.assert_close(grpo.group_advantages(torch.full((8,), 1.5), G=4, noise_std=0), torch.zeros(8))
    A = grpo.group_advantages(torch.tensor([1.0, 0, 0, 0, 2, 2, -2, -2]), G=4, noise_std=0, scale_by_std=False)
    torch.testing.assert_close(A, torch.tensor([0.75, -0.25, -0.25, -0.25, 2, 2, -2, -2]))
    with pytest.raises(ValueError):
        grpo.group_advantages(torch.zeros(6), G=4)


def test_advantage_noise_is_seeded_and_small():
    r = torch.zeros(40000)
    a = grpo.group_advantages(r, G=8, generator=torch.Generator().manual_seed(1))
    b = grpo.group_advantages(r, G=8, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b)
    assert abs(a.std().item() - 0.02) < 0.001 and abs(a.mean().item()) < 0.001  # N(0, 0.02^2) alone


def _example():
    # 2 sequences x 3 tokens; sequence 0 has 2 completion tokens, sequence 1 has 3.
    d = torch.tensor([[0.1, -0.1, 0.5], [0.0, 0.3, -0.3]], dtype=torch.float64)  # logp - old_logp (float64: exact sums)
    old = torch.tensor([[-1.0, -2.0, -0.5], [-1.5, -0.7, -2.2]], dtype=torch.float64)
    logp = (old + d).requires_grad_()
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    A = torch.tensor([1.0, -1.0], dtype=torch.float64)
    return logp, old, mask, A


def test_loss_and_gradient_by_hand_with_clipping():
    logp, old, mask, A = _example()
    loss, m = grpo.grpo_loss(logp, old, None, A, mask, clip_eps=0.2, beta=0.0)
    e = math.exp
    # seq 0 (A=+1): ratios e^.1=1.105, e^-.1=.905 inside [.8, 1.2]; per-token -ratio; mean of 2
    seq0 = -(e(0.1) + e(-0.1)) / 2
    # seq 1 (A=-1): ratio 1 -> +1; e^.3=1.35: min(-1.35, -1.2) = -1.35 -> +1.35 (clip does not bind);
    # e^-.3=.741 < .8: min(-.741, -.8) = -.8 -> +.8 (clip binds, no gradient)
    seq1 = (1 + e(0.3) + 0.8) / 3
    assert loss.item() == pytest.approx((seq0 + seq1) / 2, rel=1e-6)
    loss.backward()
    # d/dlogp of -A*ratio = -A*ratio, times 1/|o_i| and 1/N
    expect = torch.tensor([[-e(0.1) / 4, -e(-0.1) / 4, 0.0], [1 / 6, e(0.3) / 6, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(logp.grad, expect)
    assert m["clip_ratio"] == pytest.approx(1 / 5)


def test_loss_with_kl_by_hand():
    logp, old, mask, A = _example()
    delta = torch.tensor([[0.2, 0.0, 9.0], [-0.1, 0.0, 0.0]], dtype=torch.float64)  # ref - logp (9.0 sits under the mask)
    ref = logp.detach() + delta
    loss, m = grpo.grpo_loss(logp, old, ref, A, mask, beta=0.1)
    base, _ = grpo.grpo_loss(logp, old, None, A, mask, beta=0.0)
    e = math.exp
    k = lambda x: e(x) - x - 1
    kl_term = 0.1 * ((k(0.2) + k(0.0)) / 2 + (k(-0.1) + 0 + 0) / 3) / 2
    assert (loss - base).item() == pytest.approx(kl_term, rel=1e-5)
    assert m["kl"] == pytest.approx((k(0.2) + k(-0.1)) / 5, rel=1e-5)
    loss.backward()
    # extra gradient of beta*k3 wrt logp: beta * (1 - e^delta) / |o_i| / N
    assert logp.grad[0, 0].item() == pytest.approx(-e(0.1) / 4 + 0.1 * (1 - e(0.2)) / 4, rel=1e-5)


def test_kl_zero_when_reference_is_policy_and_ratio_one_still_has_gradient():
    logp, _, mask, A = _example()
    loss, m = grpo.grpo_loss(logp, logp.detach(), logp.detach(), A, mask, beta=0.04)
    assert m["kl"] == 0.0 and m["ratio"] == 1.0 and m["clip_ratio"] == 0.0
    # ratio = 1: loss = -mean_i A_i = -(1 - 1)/2 = 0, but the gradient is -A_i / |o_i| / N
    assert loss.item() == pytest.approx(0.0, abs=1e-7)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-1 / 4, -1 / 4, 0], [1 / 6, 1 / 6, 1 / 6]], dtype=torch.float64))


def test_masked_positions_do_not_matter():
    logp, old, mask, A = _example()
    a, _ = grpo.grpo_loss(logp, old, None, A, mask, beta=0)
    logp2 = logp.detach().clone()
    logp2[0, 2] = 50.0  # padding position
    b, _ = grpo.grpo_loss(logp2, old, None, A, mask, beta=0)
    assert a.item() == b.item()


def test_dr_grpo_normaliser():
    logp, old, mask, A = _example()
    loss, _ = grpo.grpo_loss(logp, logp.detach(), None, A, mask, beta=0, loss_type="dr_grpo", max_len=10)
    # ratio 1: per token -A; sum = -(1 * 2) + (1 * 3) = 1; / (N * max_len) = 1 / 20
    assert loss.item() == pytest.approx(1 / 20)
    with pytest.raises(ValueError):
        grpo.grpo_loss(logp, old, None, A, mask, loss_type="ppo")


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo"])
def test_split_invariance(loss_type):
    g = torch.Generator().manual_seed(0)
    N, L = 8, 7
    old = -torch.rand(N, L, generator=g) * 3
    logp0 = old + 0.3 * torch.randn(N, L, generator=g)
    ref = old + 0.1 * torch.randn(N, L, generator=g)
    lengths = torch.tensor([7, 1, 3, 5, 2, 7, 4, 6])
    mask = torch.arange(L)[None] < lengths[:, None]
    A = grpo.group_advantages(torch.rand(N, generator=g), G=4, noise_std=0)

    def run(splits):
        logp = logp0.clone().requires_grad_()
        total = 0.0
        for lo, hi in splits:
            loss, _ = grpo.grpo_loss(logp[lo:hi], old[lo:hi], ref[lo:hi], A[lo:hi], mask[lo:hi],
                                     beta=0.05, loss_type=loss_type, num_sequences=N, max_len=L)
            total = total + loss
        total.backward()
        return total.detach(), logp.grad

    full_loss, full_grad = run([(0, 8)])
    for splits in ([(0, 2), (2, 4), (4, 6), (6, 8)], [(0, 3), (3, 8)]):
        loss, grad = run(splits)
        torch.testing.assert_close(loss, full_loss)
        torch.testing.assert_close(grad, full_grad)
