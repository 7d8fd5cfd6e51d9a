"""Every loss of the library as a pure function of tensors, citing the equation it implements.

Conventions: ``logits`` [B, T, V] predict the token after each position, so the target of position t
is ``input_ids[:, t + 1]``; ``mask`` [B, T] marks the *target* tokens that count (e.g. the completion
mask of a batch). Token-level terms average over every masked token of the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def token_logprobs(logits: Tensor, input_ids: Tensor) -> Tensor:
    """log p(x_{t+1} | x_{<=t}) for every position, shape [B, T-1] (aligned with ``input_ids[:, 1:]``)."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    return logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)


def _mean_over(values: Tensor, mask: Tensor) -> Tensor:
    target = mask[:, 1:].to(values.dtype)
    return (values * target).sum() / target.sum().clamp_min(1)


def toward(logits: Tensor, input_ids: Tensor, mask: Tensor) -> Tensor:
    """Cross-entropy toward the masked tokens: -mean_t log p(y_t) (LAT's "toward" loss, 2407.15549)."""
    return _mean_over(-token_logprobs(logits, input_ids), mask)


def away(logits: Tensor, input_ids: Tensor, mask: Tensor) -> Tensor:
    """Unlikelihood away from the masked tokens: -mean_t log(1 - p(y_t)) (LAT's "away" loss, 2407.15549).

    Bounded gradient as p -> 1, unlike gradient ascent on the log-likelihood.
    """
    logp = token_logprobs(logits, input_ids).clamp(max=-1e-6)
    return _mean_over(-torch.log1p(-logp.exp()), mask)


def kl_divergence(reference_logits: Tensor, logits: Tensor, mask: Tensor, temperature: float = 2.0) -> Tensor:
    """T^2 * KL(softmax(z_ref / T) || softmax(z / T)), averaged over masked positions.

    The distillation term of the triplet defense (2506.11938, Sec. 3: L_KL with T = 2); ``mask``
    marks positions [B, T] whose next-token distributions are compared.
    """
    log_p_ref = torch.log_softmax(reference_logits.float() / temperature, dim=-1)
    log_p = torch.log_softmax(logits.float() / temperature, dim=-1)
    per_position = (log_p_ref.exp() * (log_p_ref - log_p)).sum(-1)
    m = mask.to(per_position.dtype)
    return temperature**2 * (per_position * m).sum() / m.sum().clamp_min(1)


# ----- triplet defense (arXiv 2506.11938) -------------------------------------------------------------
DISTANCES = ("l2", "cosine", "mix")


def distance(x: Tensor, y: Tensor, kind: str, mix_weight: Tensor | float = 1.0) -> Tensor:
    """Per-token distance over the last dimension (broadcasting ``y``), shape ``x.shape[:-1]``.

    - ``l2``: ||x - y||_2
    - ``cosine``: 1 - cos(x, y)
    - ``mix``: ||x - y||_2 + w * (1 - max(cos(x, y), 0)) (the paper's mixed distance, Sec. 3.2)
    """
    x, y = x.float(), y.float()
    if kind == "l2":
        return (x - y).norm(dim=-1)
    cos = F.cosine_similarity(x, y.expand_as(x), dim=-1)
    if kind == "cosine":
        return 1 - cos
    if kind == "mix":
        return (x - y).norm(dim=-1) + mix_weight * (1 - cos.clamp_min(0))
    raise ValueError(f"unknown distance {kind!r}; expected one of {DISTANCES}")


def triplet_loss(
    anchor: Tensor,
    positive: Tensor,
    negative: Tensor,
    mask: Tensor,
    margin: Tensor | float,
    positive_distance: str,
    negative_distance: str,
    mix_weight: Tensor | float = 1.0,
) -> Tensor:
    """mean over masked tokens of ReLU(d_p(anchor, positive) - d_n(anchor, negative) + margin).

    The triplet terms of 2506.11938 (Eq. 2-3): for benign states the positive is the reference and
    the negative the harmful mean; for harmful states the positive is the harmful mean and the
    negative the reference. ``anchor`` [B, T, D]; ``positive``/``negative`` broadcast to it;
    ``mask`` [B, T].
    """
    d_p = distance(anchor, positive, positive_distance, mix_weight)
    d_n = distance(anchor, negative, negative_distance, mix_weight)
    per_token = F.relu(d_p - d_n + margin)
    m = mask.to(per_token.dtype)
    return (per_token * m).sum() / m.sum().clamp_min(1)


# ----- targeted LAT objectives (arXiv 2407.15549) -------------------------------------------------------
def sequence_logprob(logits: Tensor, input_ids: Tensor, mask: Tensor) -> Tensor:
    """Sum of log p(y_t) over the masked target tokens of each sequence, shape [B]."""
    target = mask[:, 1:].to(torch.float32)
    return (token_logprobs(logits, input_ids) * target).sum(-1)


def dpo_loss(
    chosen_logp: Tensor, rejected_logp: Tensor, reference_chosen_logp: Tensor, reference_rejected_logp: Tensor,
    beta: float = 0.3,
) -> Tensor:
    """DPO (Rafailov et al. 2023, Eq. 7): -log sigmoid(beta * [(log pi(y_w) - log pi_ref(y_w)) -
    (log pi(y_l) - log pi_ref(y_l))]), averaged over the batch. LAT's backdoor defense uses beta 0.3."""
    margin = (chosen_logp - reference_chosen_logp) - (rejected_logp - reference_rejected_logp)
    return -F.logsigmoid(beta * margin).mean()


def rmu_forget_loss(states: Tensor, control: Tensor, mask: Tensor) -> Tensor:
    """RMU's forget term (Li et al. 2024, WMDP, Eq. 1): mean over masked tokens of ||h' - c u||^2 / D,
    steering forget-data states toward a fixed random direction ``control`` = c u."""
    per_token = ((states.float() - control) ** 2).mean(-1)
    m = mask.to(per_token.dtype)
    return (per_token * m).sum() / m.sum().clamp_min(1)


def rmu_retain_loss(states: Tensor, reference: Tensor, mask: Tensor) -> Tensor:
    """RMU's retain term (WMDP, Eq. 2): mean over masked tokens of ||h' - h||^2 / D on retain data."""
    return rmu_forget_loss(states, reference.float(), mask)


# ----- circuit breakers / representation rerouting (arXiv 2406.04313) ------------------------------------
def retain_loss(states: Tensor, reference: Tensor, mask: Tensor) -> Tensor:
    """||h' - h||_2 averaged over masked tokens: keep benign states where they were (RR, Alg. 1)."""
    per_token = (states.float() - reference.float()).norm(dim=-1)
    m = mask.to(per_token.dtype)
    return (per_token * m).sum() / m.sum().clamp_min(1)


def reroute_loss(states: Tensor, reference: Tensor, mask: Tensor) -> Tensor:
    """ReLU(cos(h', h)) averaged over masked tokens: make harmful states orthogonal to (or opposite
    of) the reference ones (RR, Alg. 1)."""
    per_token = F.relu(F.cosine_similarity(states.float(), reference.float(), dim=-1))
    m = mask.to(per_token.dtype)
    return (per_token * m).sum() / m.sum().clamp_min(1)
