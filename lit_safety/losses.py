"""Every loss of the library as a pure function of tensors, citing the equation it implements.

The mask convention of the whole library, stated once: a mask [B, T] marks tokens of ``input_ids``.
- A *prediction* loss scores the model's prediction *of* each marked token. ``logits`` [B, T, V]
  predict the token after each position, so token t is scored with ``logits[:, t - 1]`` and the first
  token is never scored. Pass the completion mask to score a completion.
- A *state* loss uses the residual state *at* each marked token (``states[:, t]``).
Every term averages over all marked tokens of the batch (``masked_mean``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def masked_mean(x: Tensor, mask: Tensor, dim: int | tuple[int, ...] | None = None) -> Tensor:
    """Mean of ``x`` over the positions ``mask`` marks (mask broadcast from the left).

    With ``dim=None`` averages over every marked element of the mask's dimensions, keeping trailing
    feature dimensions. Returns zeros where nothing is marked, instead of NaN.
    """
    m = mask.to(x.dtype)
    while m.dim() < x.dim():
        m = m.unsqueeze(-1)
    if dim is None:
        dim = tuple(range(mask.dim()))
    return (x * m).sum(dim=dim) / m.sum(dim=dim).clamp_min(1)


def wide_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half precision (reductions and Adam's small steps would round away), else ``dtype``:
    a float64 run stays float64, exact to the order of its sums."""
    return torch.promote_types(dtype, torch.float32)


def wide(x: Tensor) -> Tensor:
    """``x`` in ``wide_dtype``: the precision of a loss's reductions and of an adversary's parameters."""
    return x.to(wide_dtype(x.dtype))


def token_logprobs(logits: Tensor, input_ids: Tensor) -> Tensor:
    """log p(x_{t+1} | x_{<=t}) for every position, shape [B, T-1] (aligned with ``input_ids[:, 1:]``)."""
    logp = torch.log_softmax(wide(logits[:, :-1]), dim=-1)
    return logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)


def toward(logits: Tensor, input_ids: Tensor, mask: Tensor) -> Tensor:
    """Cross-entropy toward the masked tokens: -mean_t log p(y_t) (LAT's "toward" loss, 2407.15549)."""
    return masked_mean(-token_logprobs(logits, input_ids), mask[:, 1:])


def away(logits: Tensor, input_ids: Tensor, mask: Tensor) -> Tensor:
    """Unlikelihood away from the masked tokens: -mean_t log(1 - p(y_t)) (LAT's "away" loss, 2407.15549).

    Bounded gradient as p -> 1, unlike gradient ascent on the log-likelihood.
    """
    logp = token_logprobs(logits, input_ids).clamp(max=-1e-6)
    return masked_mean(-torch.log1p(-logp.exp()), mask[:, 1:])


def kl_divergence(reference_logits: Tensor, logits: Tensor, mask: Tensor, temperature: float = 2.0) -> Tensor:
    """T^2 * KL(softmax(z_ref / T) || softmax(z / T)) of the predictions of the masked tokens.

    The distillation term of the triplet defense (2506.11938, Sec. 3: L_KL with T = 2), a prediction
    loss: token t is compared through the distributions at position t - 1.
    """
    log_p_ref = torch.log_softmax(wide(reference_logits[:, :-1]) / temperature, dim=-1)
    log_p = torch.log_softmax(wide(logits[:, :-1]) / temperature, dim=-1)
    per_position = (log_p_ref.exp() * (log_p_ref - log_p)).sum(-1)
    return temperature**2 * masked_mean(per_position, mask[:, 1:])


# ----- triplet defense (arXiv 2506.11938) -------------------------------------------------------------
DISTANCES = ("l2", "cosine", "mix")


def distance(x: Tensor, y: Tensor, kind: str, mix_weight: Tensor | float = 1.0) -> Tensor:
    """Per-token distance over the last dimension (broadcasting ``y``), shape ``x.shape[:-1]``.

    - ``l2``: ||x - y||_2
    - ``cosine``: 1 - cos(x, y)
    - ``mix``: ||x - y||_2 + w * (1 - max(cos(x, y), 0)) (the paper's mixed distance, Sec. 3.2)
    """
    x, y = wide(x), wide(y)
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
    return masked_mean(F.relu(d_p - d_n + margin), mask)


# ----- targeted LAT objectives (arXiv 2407.15549) -------------------------------------------------------
def sequence_logprob(logits: Tensor, input_ids: Tensor, mask: Tensor) -> Tensor:
    """Sum of log p(y_t) over the masked target tokens of each sequence, shape [B]."""
    return (token_logprobs(logits, input_ids) * mask[:, 1:]).sum(-1)


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
    return masked_mean(((wide(states) - control) ** 2).mean(-1), mask)


def rmu_retain_loss(states: Tensor, reference: Tensor, mask: Tensor) -> Tensor:
    """RMU's retain term (WMDP, Eq. 2): mean over masked tokens of ||h' - h||^2 / D on retain data."""
    return rmu_forget_loss(states, wide(reference), mask)


# ----- circuit breakers / representation rerouting (arXiv 2406.04313) ------------------------------------
def retain_loss(states: Tensor, reference: Tensor, mask: Tensor) -> Tensor:
    """||h' - h||_2 averaged over masked tokens: keep benign states where they were (RR, Alg. 1)."""
    return masked_mean((wide(states) - wide(reference)).norm(dim=-1), mask)


def reroute_loss(states: Tensor, reference: Tensor, mask: Tensor) -> Tensor:
    """ReLU(cos(h', h)) averaged over masked tokens: make harmful states orthogonal to (or opposite
    of) the reference ones (RR, Alg. 1)."""
    return masked_mean(F.relu(F.cosine_similarity(wide(states), wide(reference), dim=-1)), mask)
