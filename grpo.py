"""
GRPO (paper s3.2, eqs. 1-2), with the ablations of paper s4.3.3: no KL (beta = 0) and Dr. GRPO.

Two functions:
    group_advantages(rewards, G)  eq. (2) + the paper's N(0, 0.02^2) noise      (B*G,) -> (B*G,)
    grpo_loss(logp, old_logp, ref_logp, advantages, mask, ...)  eq. (1), negated for minimisation

Splitting a batch (micro-batches, ranks) does not change the result, if train.py does this:
- advantages are computed once per rollout, over whole groups (a group never straddles two pieces);
- every piece calls grpo_loss with `num_sequences` = the number of sequences in the whole batch ON
  THIS RANK, and the pieces' losses are SUMMED (gradient accumulation without dividing again);
- every rank holds the same number of sequences, so DDP's gradient mean over ranks is the mean over
  all sequences. Then the summed gradient equals the gradient of one big batch, up to float order.

Departures from the reference code: none by default (one update per rollout, so the ratio is 1 with a
live gradient and the clip never binds; `num_iterations` > 1 in train.py makes it bind).
"""
import torch


def group_advantages(rewards, G, scale_by_std=True, noise_std=0.02, eps=1e-4, generator=None):
    """Group-relative advantages, eq. (2), plus the paper's Gaussian noise (s3.2).

    A_i = (r_i - mean(r_group)) / (std(r_group) + eps) + N(0, noise_std^2)
    std is the unbiased one (as in the reference); eps = 1e-4 keeps an all-equal group finite.
    Dr. GRPO: scale_by_std=False drops the division (A_i = r_i - mean).

    Args:
        rewards: float tensor (B*G,), the G completions of each prompt contiguous.
        G: group size (>= 2).
        noise_std: std of the added noise; 0 turns it off. The noise is what keeps an all-correct
            group from contributing exactly nothing (paper s3.2, like DAPO's observation).
        generator: torch.Generator for the noise (seeded runs are reproducible).
    Returns: float tensor (B*G,).
    Raises: ValueError if G < 2 or the length is not a multiple of G.
    Example: rewards [1, 0, 0, 0], G = 4: mean .25, std sqrt(.25) = .5 (unbiased: sum of squares .75 / 3),
    A = [.75, -.25, -.25, -.25] / .5001 = [1.4997, -.4999, -.4999, -.4999].
    """
    if G < 2 or rewards.numel() % G:
        raise ValueError(f"need G >= 2 and a multiple of G rewards, got G={G}, {rewards.numel()} rewards")
    r = rewards.float().view(-1, G)                                # (B, G)
    A = r - r.mean(dim=1, keepdim=True)                            # r_i - mean
    if scale_by_std:
        A = A / (r.std(dim=1, unbiased=True, keepdim=True) + eps)  # / (std + eps)
    A = A.view(-1)
    if noise_std > 0:
        A = A + noise_std * torch.randn(A.shape, generator=generator, device="cpu").to(A.device)
    return A


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, clip_eps=0.2, beta=0.01,
              loss_type="grpo", num_sequences=None, max_len=None):
    """The GRPO loss: minus the objective of eq. (1).

    Per completion token t of sequence i:
        ratio    = exp(logp - old_logp)                          pi_theta / pi_theta_old
        surr     = min(ratio * A_i, clip(ratio, 1-eps, 1+eps) * A_i)
        kl       = exp(ref_logp - logp) - (ref_logp - logp) - 1  the k3 estimator, clamped to [-100, 100]
        per_tok  = -(surr - beta * kl)
    Aggregation:
        "grpo":    sum_i (1/|o_i|) sum_t per_tok / N                 (1/G, 1/|o_i| of eq. 1)
        "dr_grpo": sum_i sum_t per_tok / (N * max_len)               (no 1/|o_i|: Dr. GRPO)
    with N = num_sequences (default: the rows given here) and max_len the constant of Dr. GRPO
    (default: L, the padded completion length).

    Args:
        logp: (N', L) float, log-probs of the completion tokens under the policy being trained
            (with gradient). N' rows may be a slice of the N sequences of the batch.
        old_logp: (N', L) log-probs under the policy that sampled; pass logp.detach() for the
            single-update case (ratio = 1, gradient still flows).
        ref_logp: (N', L) log-probs under the reference model, or None when beta = 0.
        advantages: (N',) float.  mask: (N', L) bool/float, 1 on completion tokens (up to and
            including the first eos), 0 on padding.
    Returns: (loss, metrics): loss a scalar tensor; metrics a dict of floats: "kl" (mean per token),
        "clip_ratio" (fraction of tokens where the clip binds), "ratio" (mean per token).
    Raises: ValueError on an unknown loss_type, or beta > 0 without ref_logp.
    """
    if loss_type not in ("grpo", "dr_grpo"):
        raise ValueError(f"unknown loss_type {loss_type!r}; expected 'grpo' or 'dr_grpo'")
    if beta > 0 and ref_logp is None:
        raise ValueError("beta > 0 needs ref_logp (the reference model's log-probs)")
    mask = mask.to(logp.dtype)
    A = advantages.to(logp.dtype).unsqueeze(1)                     # (N', 1)
    ratio = torch.exp(logp - old_logp)                             # (N', L)
    clipped = torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps)
    surr = torch.minimum(ratio * A, clipped * A)                   # (N', L)
    per_tok = -surr
    kl = torch.zeros_like(logp)
    if beta > 0:
        delta = ref_logp - logp
        kl = (torch.exp(delta) - delta - 1).clamp(-100, 100)       # k3 estimator
        per_tok = per_tok + beta * kl
    N = num_sequences or logp.shape[0]
    if loss_type == "grpo":
        per_seq = (per_tok * mask).sum(1) / mask.sum(1).clamp(min=1)  # (1/|o_i|) sum_t
        loss = per_seq.sum() / N
    else:
        loss = (per_tok * mask).sum() / (N * (max_len or logp.shape[1]))
    with torch.no_grad():
        n_tok = mask.sum().clamp(min=1)
        binds = ((ratio < 1 - clip_eps) & (A < 0)) | ((ratio > 1 + clip_eps) & (A > 0))
        metrics = {"kl": float((kl * mask).sum() / n_tok),
                   "clip_ratio": float((binds.to(mask.dtype) * mask).sum() / n_tok),
                   "ratio": float((ratio * mask).sum() / n_tok)}
    return loss, metrics
