"""Pure-torch losses for preference alignment, called by the reward, DPO-family, KTO, GRPO and PPO trainers.

The trainers compute log-probabilities however suits them (padding, packing, chunking) and pass tensors in:
summed sequence log-probs (plus token counts, for the length-normalised losses) for the sequence-level losses,
per-token log-probs plus a completion mask for GRPO and PPO. `token_logps` and `sequence_logps` turn a causal
LM's logits into those inputs.

The conventions follow TRL 1.16, and tests/unit/test_alignment_losses.py checks each loss against TRL's own
trainers: DPO's implicit rewards are beta * (policy - reference) summed log-ratios; IPO divides each log-ratio
by its completion's token count; SimPO and ORPO are reference-free and use mean per-token log-probs; label
smoothing is the conservative-DPO form; GRPO's KL is the k3 estimator, weighted by the importance ratio as TRL
does by default. Where TRL has no implementation (PPO's GAE and clipped losses: TRL removed PPOTrainer),
the formulas are those of TRL's former PPO trainer and the test checks them against hand-computed loops.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100
"""Label value of the positions that are not scored (prompt, padding), as in Hugging Face and TRL."""


# --- log-probabilities ----------------------------------------------------------------------------------------


def token_logps(logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX) -> tuple[Tensor, Tensor]:
    """Per-token log-probs of the label tokens under a causal LM, and the mask of the scored tokens.

    `labels` are aligned with `input_ids` (the Hugging Face and TRL convention: a copy of `input_ids` with the
    positions not to score set to `ignore_index`); the shift is done here: the logits at position t score
    label t + 1, log p_t = logits[t, labels[t+1]] - logsumexp(logits[t]). Computed in float32.
    Returns `(logps, mask)`, both of shape (batch, seq_len - 1); `logps` is 0 where `mask` is False.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} do not line up")
    logits = logits[:, :-1].float()
    labels = labels[:, 1:]
    mask = labels != ignore_index
    picked = logits.gather(-1, labels.masked_fill(~mask, 0).unsqueeze(-1)).squeeze(-1)
    logps = (picked - torch.logsumexp(logits, dim=-1)).masked_fill(~mask, 0.0)
    return logps, mask


def sequence_logps(logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX) -> tuple[Tensor, Tensor]:
    """Summed log-prob of each sequence's label tokens, and how many tokens were scored.

    sum_logps[b] = sum_t log p(labels[b, t+1] | tokens <= t) over the positions whose label is not `ignore_index`
    (labels unshifted, aligned with `input_ids`, as in `token_logps`). Returns `(sum_logps, n_tokens)`, both
    of shape (batch,); `n_tokens` is an integer tensor, what the length-normalised losses take as `*_len`.
    """
    logps, mask = token_logps(logits, labels, ignore_index)
    return logps.sum(-1), mask.sum(-1)


# --- the DPO family -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DpoOutput:
    """Per-pair losses and implicit rewards of one batch of preference pairs."""

    losses: Tensor
    """(batch,) per-pair loss, differentiable; the training loss is `loss` (their mean)."""
    chosen_rewards: Tensor
    """(batch,) beta * (policy - reference) log-ratio of the chosen completion (reference-free losses: beta times
    the mean per-token policy log-prob), detached."""
    rejected_rewards: Tensor
    """(batch,) the same for the rejected completion, detached."""

    @property
    def loss(self) -> Tensor:
        return self.losses.mean()

    @property
    def margins(self) -> Tensor:
        """(batch,) chosen_rewards - rejected_rewards."""
        return self.chosen_rewards - self.rejected_rewards

    @property
    def reward_accuracy(self) -> Tensor:
        """Fraction of pairs whose chosen reward is strictly above the rejected one: a tie is not a win."""
        return (self.chosen_rewards > self.rejected_rewards).float().mean()


PairLoss = Callable[[Tensor, Tensor, float, float, float], Tensor]
"""(chosen score, rejected score, beta, label_smoothing, gamma) -> per-pair loss."""


@dataclass(frozen=True)
class DpoLoss:
    """One entry of `DPO_LOSSES`: the per-pair loss and what its scores are made of."""

    fn: PairLoss
    length_normalised: bool
    """The scores are divided by the completions' token counts (`chosen_len`, `rejected_len` are required)."""
    reference_free: bool
    """The scores are the policy's log-probs alone; the reference log-probs are ignored."""
    smoothing: bool
    """Whether the loss accepts `label_smoothing` > 0."""


def _smoothed_logistic(z: Tensor, label_smoothing: float) -> Tensor:
    """Conservative DPO (Mitchell 2023): -(1 - eps) log sigmoid(z) - eps log sigmoid(-z)."""
    return -(1.0 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


def _sigmoid(chosen: Tensor, rejected: Tensor, beta: float, label_smoothing: float, gamma: float) -> Tensor:
    """DPO (Rafailov 2023) with conservative smoothing: z = beta * (chosen log-ratio - rejected log-ratio)."""
    return _smoothed_logistic(beta * (chosen - rejected), label_smoothing)


def _hinge(chosen: Tensor, rejected: Tensor, beta: float, label_smoothing: float, gamma: float) -> Tensor:
    """SLiC hinge as TRL: relu(1 - beta * delta) = beta * relu(1/beta - delta), a margin of 1/beta on the log-ratios."""
    return torch.relu(1.0 - beta * (chosen - rejected))


def _ipo(chosen: Tensor, rejected: Tensor, beta: float, label_smoothing: float, gamma: float) -> Tensor:
    """IPO (Azar 2023, eq. 17, tau = beta): (delta - 1 / (2 beta))^2 on per-token-averaged log-ratios."""
    return (chosen - rejected - 1.0 / (2.0 * beta)) ** 2


def _simpo(chosen: Tensor, rejected: Tensor, beta: float, label_smoothing: float, gamma: float) -> Tensor:
    """SimPO (Meng 2024): -log sigmoid(beta * (mean logp_c - mean logp_r) - gamma), conservatively smoothed."""
    return _smoothed_logistic(beta * (chosen - rejected) - gamma, label_smoothing)


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, stable on both sides of -ln 2 (Maechler 2012)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_odds_ratio(policy_chosen_mean: Tensor, policy_rejected_mean: Tensor) -> Tensor:
    """ORPO's log odds ratio (Hong 2024, eq. 4 and 7) of mean per-token log-probs l_c, l_r:

    log odds(y_c) - log odds(y_r) = (l_c - l_r) - (log(1 - e^l_c) - log(1 - e^l_r)).
    """
    return (policy_chosen_mean - policy_rejected_mean) - (log1mexp(policy_chosen_mean) - log1mexp(policy_rejected_mean))


def _orpo(chosen: Tensor, rejected: Tensor, beta: float, label_smoothing: float, gamma: float) -> Tensor:
    """ORPO's odds-ratio term, -beta * log sigmoid(log odds ratio) (beta is the paper's lambda)."""
    return -beta * F.logsigmoid(orpo_odds_ratio(chosen, rejected))


DPO_LOSSES: dict[str, DpoLoss] = {
    "sigmoid": DpoLoss(_sigmoid, length_normalised=False, reference_free=False, smoothing=True),
    "ipo": DpoLoss(_ipo, length_normalised=True, reference_free=False, smoothing=False),
    "hinge": DpoLoss(_hinge, length_normalised=False, reference_free=False, smoothing=False),
    "simpo": DpoLoss(_simpo, length_normalised=True, reference_free=True, smoothing=True),
    "orpo": DpoLoss(_orpo, length_normalised=True, reference_free=True, smoothing=False),
}
"""The pairwise preference losses `dpo_loss` knows, by `loss_type`."""


def _check_dpo_args(spec: DpoLoss, loss_type: str, label_smoothing: float, lens: tuple, refs: tuple) -> None:
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5), got {label_smoothing}")
    if label_smoothing and not spec.smoothing:
        raise ValueError(f"loss_type {loss_type!r} does not take label_smoothing")
    if spec.length_normalised and any(n is None for n in lens):
        raise ValueError(f"loss_type {loss_type!r} needs chosen_len and rejected_len (completion token counts)")
    if not spec.reference_free and any(r is None for r in refs):
        raise ValueError(f"loss_type {loss_type!r} needs ref_chosen and ref_rejected")


def dpo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor | None = None,
    ref_rejected: Tensor | None = None,
    *,
    loss_type: str,
    beta: float,
    label_smoothing: float = 0.0,
    chosen_len: Tensor | None = None,
    rejected_len: Tensor | None = None,
    gamma: float = 0.5,
) -> DpoOutput:
    """Pairwise preference loss of summed completion log-probs, per `DPO_LOSSES[loss_type]`.

    With log-ratios h_c = policy_chosen - ref_chosen, h_r = policy_rejected - ref_rejected and eps = label_smoothing:
      sigmoid: -(1 - eps) log sigmoid(beta (h_c - h_r)) - eps log sigmoid(-beta (h_c - h_r))   (DPO / cDPO)
      hinge:   relu(1 - beta (h_c - h_r))
      ipo:     (h_c / n_c - h_r / n_r - 1 / (2 beta))^2   (n = chosen_len / rejected_len, clamped to >= 1)
      simpo:   the sigmoid form on beta (l_c - l_r) - gamma, with l = policy / n (reference-free)
      orpo:    -beta log sigmoid(log odds ratio of l_c, l_r) (reference-free; see `orpo_odds_ratio`)
    ORPO's full objective adds the chosen completions' NLL, which the caller computes: TRL 1.16 takes the token
    mean cross-entropy over the chosen prompt + completion, i.e. `nll + dpo_loss(..., loss_type="orpo").loss`.
    Rewards: beta * h (summed, also for IPO); reference-free losses: beta * l.
    """
    if loss_type not in DPO_LOSSES:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {sorted(DPO_LOSSES)}")
    spec = DPO_LOSSES[loss_type]
    _check_dpo_args(spec, loss_type, label_smoothing, (chosen_len, rejected_len), (ref_chosen, ref_rejected))
    if spec.reference_free:
        chosen = policy_chosen / chosen_len.clamp(min=1)
        rejected = policy_rejected / rejected_len.clamp(min=1)
        chosen_rewards, rejected_rewards = beta * chosen.detach(), beta * rejected.detach()
    else:
        chosen, rejected = policy_chosen - ref_chosen, policy_rejected - ref_rejected
        chosen_rewards, rejected_rewards = beta * chosen.detach(), beta * rejected.detach()
        if spec.length_normalised:
            chosen, rejected = chosen / chosen_len.clamp(min=1), rejected / rejected_len.clamp(min=1)
    losses = spec.fn(chosen, rejected, beta, label_smoothing, gamma)
    return DpoOutput(losses, chosen_rewards, rejected_rewards)


# --- KTO ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KtoOutput:
    """Per-example KTO losses (weighted, in input order) and implicit rewards."""

    losses: Tensor
    """(batch,) weighted per-example loss, differentiable; the training loss is `loss` (their mean)."""
    rewards: Tensor
    """(batch,) beta * (policy - reference), detached."""

    @property
    def loss(self) -> Tensor:
        return self.losses.mean()


def kto_kl_estimate(policy_kl_logps: Tensor, ref_kl_logps: Tensor) -> Tensor:
    """KTO's reference point z_ref = max(0, mean(log pi(y'|x) - log pi_ref(y'|x))), detached.

    The inputs are summed log-probs of mismatched (prompt, completion) pairs, e.g. each prompt with the batch's
    previous completion, as TRL builds them. Under data parallelism average across processes before the clamp.
    """
    return (policy_kl_logps - ref_kl_logps).mean().detach().clamp(min=0)


def kto_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    desirable: Tensor,
    kl_estimate: Tensor | float,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> KtoOutput:
    """KTO (Ethayarajh 2024, eq. 7) on unpaired completions, with r = policy_logps - ref_logps, z = kl_estimate:

    desirable:   desirable_weight   * (1 - sigmoid(beta (r - z)))
    undesirable: undesirable_weight * (1 - sigmoid(beta (z - r)))
    `desirable` is a bool tensor (batch,); z is treated as a constant (see `kto_kl_estimate`).
    """
    logratios = policy_logps - ref_logps
    z = torch.as_tensor(kl_estimate, dtype=logratios.dtype, device=logratios.device).detach()
    wanted = desirable.to(device=logratios.device, dtype=torch.bool)
    desirable_losses = desirable_weight * (1 - torch.sigmoid(beta * (logratios - z)))
    undesirable_losses = undesirable_weight * (1 - torch.sigmoid(beta * (z - logratios)))
    losses = torch.where(wanted, desirable_losses, undesirable_losses)
    return KtoOutput(losses, beta * logratios.detach())


# --- reward models --------------------------------------------------------------------------------------------


def reward_loss(
    r_chosen: Tensor, r_rejected: Tensor, margin: Tensor | None = None, center_coefficient: float = 0.0
) -> Tensor:
    """Bradley-Terry reward-model loss, as TRL's RewardTrainer:

    -mean(log sigmoid(r_c - r_r - margin)) + center_coefficient * mean((r_c + r_r)^2)
    `margin` (batch,) is optional (0 without it); the centring term (Eisenstein 2023) keeps rewards near zero.
    """
    delta = r_chosen - r_rejected
    if margin is not None:
        delta = delta - margin
    loss = -F.logsigmoid(delta).mean()
    if center_coefficient:
        loss = loss + center_coefficient * torch.mean((r_chosen + r_rejected) ** 2)
    return loss


# --- GRPO -----------------------------------------------------------------------------------------------------

GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
"""How `grpo_loss` aggregates its per-token losses (see `aggregate_token_loss`)."""


def group_advantages(rewards: Tensor, group_size: int, scale: bool = True, eps: float = 1e-4) -> Tensor:
    """GRPO advantages: A_i = (r_i - mean_g) / (std_g + eps) within each group of `group_size` consecutive rewards.

    std_g is the Bessel-corrected (n - 1) standard deviation, as TRL's `scale_rewards="group"`; `scale=False` only
    centres (Dr. GRPO). NaN rewards (unscorable completions) are left out of the group statistics and get
    advantage 0. A group of one has advantage 0.
    """
    if rewards.dim() != 1 or group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards of shape {tuple(rewards.shape)} do not split into groups of {group_size}")
    if group_size == 1:
        return torch.zeros_like(rewards)
    grouped = rewards.view(-1, group_size)
    mean = torch.nanmean(grouped, dim=1, keepdim=True)
    advantages = grouped - mean
    if scale:
        count = (~torch.isnan(grouped)).sum(dim=1, keepdim=True)
        variance = torch.nanmean((grouped - mean) ** 2, dim=1, keepdim=True) * count / (count - 1)
        advantages = advantages / (variance.sqrt() + eps)
    return torch.nan_to_num(advantages.reshape(-1), nan=0.0)


def k3_kl(logps: Tensor, ref_logps: Tensor) -> Tensor:
    """Per-token k3 estimator of KL(pi || pi_ref) (Schulman 2020): exp(ref - logp) - (ref - logp) - 1 >= 0."""
    delta = ref_logps - logps
    return torch.exp(delta) - delta - 1


def aggregate_token_loss(
    per_token: Tensor,
    mask: Tensor,
    loss_type: str,
    num_items: Tensor | float | None = None,
    max_completion_length: int | None = None,
) -> Tensor:
    """Reduce a (batch, T) per-token loss over its mask, as TRL's GRPOTrainer does per `loss_type`:

    grpo:    mean over sequences of (sum_t loss * mask) / (sum_t mask)
    bnpo:    (sum loss * mask) / (sum mask)                        (tokens of this micro-batch)
    dr_grpo: (sum loss * mask) / (batch * max_completion_length)  (default: T)
    dapo:    (sum loss * mask) / num_items                          (default: sum mask)
    For dapo under gradient accumulation or data parallelism, pass num_items = the active tokens of the whole
    accumulated batch divided by the number of processes (TRL's normalizer).
    """
    mask = mask.to(per_token.dtype)
    total = (per_token * mask).sum()
    if loss_type == "grpo":
        return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "bnpo":
        return total / mask.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        return total / (per_token.size(0) * (max_completion_length or per_token.size(1)))
    if loss_type == "dapo":
        items = mask.sum() if num_items is None else torch.as_tensor(num_items, dtype=per_token.dtype)
        return total / items.clamp(min=1.0)
    raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {GRPO_LOSS_TYPES}")


def grpo_loss(
    logps: Tensor,
    old_logps: Tensor | None,
    ref_logps: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    *,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    beta: float = 0.0,
    loss_type: str = "dapo",
    kl_ratio_correction: bool = True,
    num_items: Tensor | float | None = None,
    max_completion_length: int | None = None,
) -> Tensor:
    """GRPO's clipped surrogate with a k3 KL penalty, per token, aggregated per `loss_type` (TRL 1.16 default dapo).

    With rho = exp(logps - old_logps) (old_logps None: logps detached, i.e. on-policy, rho = 1 with gradient):
      loss_t = -min(rho A, clip(rho, 1 - epsilon_low, 1 + epsilon_high) A) + beta * w * k3_kl(logps, ref_logps)
    where w = rho when `kl_ratio_correction` (TRL's default `use_bias_correction_kl`, the unbiased reverse-KL
    gradient) else 1. `advantages` are (batch,) or (batch, T); all per-token tensors are (batch, T) over the
    completion tokens, `mask` marking the real ones. See `aggregate_token_loss` for the reductions.
    """
    old_logps = logps.detach() if old_logps is None else old_logps
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    per_token = -torch.min(ratio * advantages, clipped * advantages)
    if beta != 0.0:
        if ref_logps is None:
            raise ValueError("grpo_loss with beta != 0 needs ref_logps")
        kl = k3_kl(logps, ref_logps)
        per_token = per_token + beta * (kl * ratio if kl_ratio_correction else kl)
    return aggregate_token_loss(per_token, mask, loss_type, num_items, max_completion_length)


# --- PPO ------------------------------------------------------------------------------------------------------


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """sum(x * mask) / sum(mask), over all elements."""
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """(x - mean) / sqrt(var + eps) over the masked elements, var with Bessel's correction (n - 1), as TRL's former
    `masked_whiten`; `shift_mean=False` adds the mean back (rescale only). Masked-out positions come back as 0.
    """
    mask = mask.to(x.dtype)
    count = mask.sum()
    if count < 2:
        raise ValueError("whiten needs at least two unmasked elements")
    mean = (x * mask).sum() / count
    variance = (((x - mean) ** 2) * mask).sum() / (count - 1)
    out = (x - mean) * torch.rsqrt(variance + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


@torch.no_grad()
def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman 2016) over right-padded token sequences (batch, T):

    delta_t = r_t + gamma * V_{t+1} - V_t (V after a sequence's last real token is 0, the episode ends there),
    A_t = delta_t + gamma * lam * A_{t+1}, returns_t = A_t + V_t. Rewards and values at padding count as 0 and
    padding positions come back as 0. Returns `(advantages, returns)`, no gradient; PPO usually `whiten`s the
    advantages next.
    """
    mask = mask.to(values.dtype)
    values, rewards = values * mask, rewards * mask
    length = rewards.size(1)
    running = torch.zeros_like(values[:, 0])
    reversed_advantages = []
    for t in reversed(range(length)):
        next_values = values[:, t + 1] if t + 1 < length else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        running = delta + gamma * lam * running
        reversed_advantages.append(running)
    advantages = torch.stack(reversed_advantages[::-1], dim=1) * mask
    return advantages, (advantages + values) * mask


def ppo_policy_loss(logps: Tensor, old_logps: Tensor, advantages: Tensor, mask: Tensor, clip: float = 0.2) -> Tensor:
    """PPO's clipped surrogate (Schulman 2017), token mean: masked_mean(max(-A rho, -A clip(rho, 1 - c, 1 + c))),
    rho = exp(logps - old_logps); all tensors (batch, T).
    """
    ratio = torch.exp(logps - old_logps)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    return masked_mean(torch.max(unclipped, clipped), mask)


def ppo_value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip_value: float = 0.2
) -> Tensor:
    """PPO's clipped value loss: 0.5 * masked_mean(max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2))."""
    clipped = torch.clamp(values, old_values - clip_value, old_values + clip_value)
    losses = torch.max((values - returns) ** 2, (clipped - returns) ** 2)
    return 0.5 * masked_mean(losses, mask)
