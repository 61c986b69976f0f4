"""A policy (a causal LM tuned on preferences: dpo and its kin) on held-out preference pairs and prompts.

What the DPO family is judged by, for the trainer's test pass and for `tuneforge eval RUN` on preference data:

- implicit-reward accuracy and margin on held-out pairs (beta * policy/reference log-ratio; reference-free losses:
  beta * mean per-token log-prob), with 95% bootstrap intervals and a binomial test against a coin; a tie is
  not a win, so the starting model scores 0 (it is its own reference);
- the policy's own preference (summed log-prob of chosen above rejected) before and after, paired (McNemar);
- chosen/rejected log-probs per pair (a table and histograms) and, from the run's log, their validation curves;
- KL to the reference, estimated on the policy's greedy responses to held-out prompts: the mean over prompts of
  the per-token log-ratio log pi(y|x) - log pi_ref(y|x), each response scored as the final assistant turn;
- mean response length (tokens) of policy and starting model on the same prompts (greedy, eval.max_new_tokens,
  the first eval.max_generate pairs), and the win rate against the starting model judged by a reward model
  (recipe.reward_model; a `Score` callable) with an interval, plus any eval.scorers; a win that comes with
  responses more than LENGTH_TOLERANCE times as long is flagged;
- the forgetting check of SFT runs (perplexity on general text).

Reference log-probabilities are computed once, before training, and kept in the run folder (REFERENCE_FILE,
safetensors, one chosen/rejected tensor pair per split with the sha256 of the split's token ids), so training never
holds a second model; `eval_policy` reuses them when its pairs are a split of the run, and otherwise recomputes
them with the base model.
"""

from __future__ import annotations

import gc
import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from tuneforge.alignment.losses import DPO_LOSSES, DpoOutput, dpo_loss
from tuneforge.console import console
from tuneforge.data.pairs import RenderedPair, render_final_turn, render_kept
from tuneforge.data.render import IGNORE, Rendered, encode_prompt
from tuneforge.evaluate.registry import p_record
from tuneforge.evaluate.scorers import build_scorers
from tuneforge.evaluate.stats import mcnemar, mean_ci, paired_bootstrap
from tuneforge.evaluate.verdict import BETTER, NO_BASELINE, NO_BETTER
from tuneforge.fsio import atomic_write_bytes
from tuneforge.inference import generate, nll_module, supports_packing
from tuneforge.training.batching import attention_mask, eval_batches, pad
from tuneforge.training.loop import autocast

REFERENCE_FILE = "reference_logps.safetensors"
LENGTH_TOLERANCE = 1.2  # a win with responses longer than this many times the starting model's is flagged
TABLE_ROWS = 10

Score = Callable[[list[str], list[str]], list[float]]
"""A judge: (prompts, responses) -> one reward per response (higher is better)."""


# --- held-out pairs -------------------------------------------------------------------------------------------


@dataclass
class HeldOut:
    """Preference pairs of one split as the policy is scored on them, with the rows they came from."""

    pairs: list[RenderedPair]
    rows: list[dict]  # prompt/chosen/rejected of each pair (the judge reads the prompt, scorers the chosen)
    prompts: list[list[int]]  # generation prompts (chat template applied) of the first eval.max_generate pairs

    @property
    def chosen_len(self) -> torch.Tensor:
        return torch.tensor([p.chosen.n_target for p in self.pairs])

    @property
    def rejected_len(self) -> torch.Tensor:
        return torch.tensor([p.rejected.n_target for p in self.pairs])


def render_split(tokenizer, rows: list[dict], max_length: int, system_prompt: Optional[str] = None,
                 name: str = "") -> tuple[list[RenderedPair], list[dict]]:
    """tuneforge.data.pairs.render_pairs keeping each kept pair's row: (pairs, rows)."""
    return render_kept(tokenizer, rows, max_length, system_prompt, console.print, name)


def held_out(tokenizer, rows: list[dict], recipe, name: str) -> HeldOut:
    """The pairs of `rows` rendered as in training, and the prompts generation answers (their last
    train.max_length tokens)."""
    pairs, kept = render_split(tokenizer, rows, recipe.train.max_length, recipe.data.system_prompt, name)
    limit = recipe.eval.max_generate
    chosen = pairs if limit is None else pairs[:limit]
    prompts = [encode_prompt(tokenizer, p.prompt_messages)[-recipe.train.max_length:] for p in chosen]
    return HeldOut(pairs, kept, prompts)


# --- log-probabilities ----------------------------------------------------------------------------------------


@dataclass
class SequenceLogps:
    """Summed log-probs of a batch of rendered examples (differentiable)."""

    response: torch.Tensor  # (n,) over each example's labelled tokens (its final assistant turn)
    whole: torch.Tensor  # (n,) over every token after the first (for the `whole` examples; else = response)
    whole_tokens: torch.Tensor  # (n,) how many tokens `whole` sums
    tokens: int  # real tokens in the forward pass


def _targets(example: Rendered, whole: bool) -> tuple[list[int], list[bool]]:
    """What each position predicts (IGNORE: nothing), and whether it belongs to the response."""
    response = example.labels[1:] + [IGNORE]
    targets = example.input_ids[1:] + [IGNORE] if whole else response
    return targets, [t != IGNORE for t in response]


def _packed(examples: list[Rendered], whole: Sequence[bool]):
    """One row, no padding: position ids restart per example (VARLEN attention keeps examples apart)."""
    ids, pos, tgt, flag, owner = [], [], [], [], []
    for i, (e, w) in enumerate(zip(examples, whole)):
        t, f = _targets(e, w)
        ids += e.input_ids
        pos += range(len(e.input_ids))
        tgt += t
        flag += f
        owner += [i] * len(e.input_ids)
    return [torch.tensor([x]) for x in (ids, pos, tgt, flag, owner)]


def sequence_logps(model, examples: list[Rendered], pad_id: int, device: torch.device,
                   whole: Optional[Sequence[bool]] = None) -> SequenceLogps:
    """Summed log-probs of each example's response tokens, padding-free when the model allows it (the output
    head runs on scored positions only, as in SFT); `whole[i]` also sums every token of example i (ORPO's NLL)."""
    whole = list(whole) if whole is not None else [False] * len(examples)
    if len(examples) > 1 and supports_packing(model):
        ids, pos, targets, flags, owner = (t.to(device) for t in _packed(examples, whole))
        nll = nll_module(model)(ids, targets, position_ids=pos, segments=[len(e.input_ids) for e in examples])
        tokens = ids.shape[1]
    else:
        both = [_targets(e, w) for e, w in zip(examples, whole)]
        ids = pad([e.input_ids for e in examples], pad_id).to(device)
        mask = attention_mask([e.input_ids for e in examples]).to(device)
        targets = pad([t for t, _ in both], IGNORE).to(device)
        flags = pad([[int(x) for x in f] for _, f in both], 0).bool().to(device)
        owner = torch.arange(len(examples), device=device)[:, None].expand_as(targets)
        nll = nll_module(model)(ids, targets, attention_mask=mask)
        tokens = int(mask.sum())
    scored = targets != IGNORE
    owner, flags, logp = owner[scored], flags[scored].bool(), -nll
    n = len(examples)
    zeros = torch.zeros(n, device=logp.device, dtype=logp.dtype)
    response = zeros.index_add(0, owner[flags], logp[flags])
    total = zeros.index_add(0, owner, logp)
    counts = torch.zeros(n, device=logp.device, dtype=torch.long).index_add(0, owner, torch.ones_like(owner))
    return SequenceLogps(response, total, counts, tokens)


@torch.no_grad()
def pair_logps(model, pairs: list[RenderedPair], pad_id: int, batch_size: int,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) summed response log-probs of every pair, float32 on the CPU, in pair order."""
    model.eval()
    chosen, rejected = torch.zeros(len(pairs)), torch.zeros(len(pairs))
    for batch in eval_batches([len(p.chosen.input_ids) + len(p.rejected.input_ids) for p in pairs], batch_size):
        examples = [pairs[i].chosen for i in batch] + [pairs[i].rejected for i in batch]
        with autocast(device):
            out = sequence_logps(model, examples, pad_id, device).response.float().cpu()
        chosen[batch], rejected[batch] = out[:len(batch)], out[len(batch):]
    return chosen, rejected


@torch.no_grad()
def response_logps(model, tokenizer, held: HeldOut, texts: list[str], recipe,
                   device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """Summed log-prob and token count of each generated response, rendered as the final assistant turn after its
    held-out prompt (the first len(texts) pairs)."""
    model.eval()
    rendered = [render_final_turn(tokenizer, pair.prompt_messages + [{"role": "assistant", "content": text}],
                                  recipe.train.max_length) for pair, text in zip(held.pairs, texts)]
    sums = np.zeros(len(rendered))
    bs = recipe.train.eval_batch_size or 2 * recipe.train.batch_size
    for batch in eval_batches([len(r.input_ids) for r in rendered], bs):
        with autocast(device):
            out = sequence_logps(model, [rendered[i] for i in batch], tokenizer.pad_token_id, device)
        sums[batch] = out.response.double().cpu().numpy()
    return sums, np.array([r.n_target for r in rendered], dtype=np.float64)


# --- the reference file ---------------------------------------------------------------------------------------


def pairs_digest(pairs: list[RenderedPair]) -> str:
    """sha256 of the token ids and labels of every pair, in order: what the stored log-probs belong to."""
    digest = hashlib.sha256()
    for p in pairs:
        digest.update(json.dumps([p.chosen.input_ids, p.chosen.labels, p.rejected.input_ids,
                                  p.rejected.labels]).encode())
    return digest.hexdigest()


def write_reference(path: Path, logps: dict[str, tuple[torch.Tensor, torch.Tensor]], digests: dict[str, str],
                    model_ref: str) -> None:
    """Write the reference log-probs of every split atomically (safetensors, digests in its metadata)."""
    from safetensors.torch import save

    tensors, meta = {}, {"model": model_ref}
    for split, (chosen, rejected) in logps.items():
        tensors[f"{split}.chosen"], tensors[f"{split}.rejected"] = chosen.contiguous(), rejected.contiguous()
        meta[f"{split}.sha256"] = digests[split]
    atomic_write_bytes(Path(path), save(tensors, metadata=meta))


def read_reference(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a reference file; empty when it is missing or does not read back whole."""
    from safetensors import SafetensorError, safe_open

    if not Path(path).is_file():
        return {}, {}
    try:
        with safe_open(str(path), framework="pt") as fh:
            return {k: fh.get_tensor(k) for k in fh.keys()}, dict(fh.metadata() or {})
    except (SafetensorError, OSError, ValueError):
        return {}, {}


def stored_logps(stored: tuple[dict, dict], digest: str, model_ref: Optional[str] = None,
                 split: Optional[str] = None) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """The stored (chosen, rejected) of the split whose pairs hash to `digest` (of `split` when given, from
    `model_ref` when given), or None."""
    tensors, meta = stored
    if model_ref is not None and meta.get("model") != model_ref:
        return None
    for key, value in meta.items():
        name = key[: -len(".sha256")]
        if key.endswith(".sha256") and value == digest and (split is None or name == split):
            chosen, rejected = tensors.get(f"{name}.chosen"), tensors.get(f"{name}.rejected")
            if chosen is not None and rejected is not None:
                return chosen, rejected
    return None


# --- one model's measurements ---------------------------------------------------------------------------------


@dataclass
class Side:
    """One model (the policy, or the starting model) on the held-out pairs and prompts."""

    chosen: list[float]  # summed log-probs of the chosen responses, per pair
    rejected: list[float]
    texts: list[str] = field(default_factory=list)  # greedy responses to the held-out prompts
    lengths: list[int] = field(default_factory=list)  # their token counts
    reference_perplexity: Optional[float] = None

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "Side":
        return cls(**{k: data[k] for k in ("chosen", "rejected", "texts", "lengths", "reference_perplexity")})


def measure(model, tokenizer, held: HeldOut, recipe, device: torch.device,
            logps: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> Side:
    """Pair log-probs (or the given ones), greedy responses and the forgetting check of `model`."""
    from tuneforge.trainers.sft import reference_perplexity

    bs = recipe.train.eval_batch_size or 2 * recipe.train.batch_size
    chosen, rejected = logps if logps is not None else pair_logps(model, held.pairs, tokenizer.pad_token_id, bs,
                                                                  device)
    texts = generate(model, tokenizer, held.prompts, recipe.eval.max_new_tokens, bs, device) if held.prompts else []
    lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    return Side(chosen.tolist(), rejected.tolist(), texts, lengths,
                reference_perplexity(model, tokenizer, recipe, device))


# --- judging --------------------------------------------------------------------------------------------------


def implicit_rewards(side: Side, reference: Optional[tuple], held: HeldOut, alignment) -> DpoOutput:
    """The DPO-family loss and implicit rewards of `side` against `reference` (ignored by reference-free losses)."""
    ref_c, ref_r = (None, None) if DPO_LOSSES[alignment.loss_type].reference_free or reference is None else (
        torch.as_tensor(reference[0], dtype=torch.float64), torch.as_tensor(reference[1], dtype=torch.float64))
    return dpo_loss(torch.tensor(side.chosen, dtype=torch.float64), torch.tensor(side.rejected, dtype=torch.float64),
                    ref_c, ref_r, loss_type=alignment.loss_type, beta=alignment.beta,
                    label_smoothing=alignment.label_smoothing, chosen_len=held.chosen_len,
                    rejected_len=held.rejected_len, gamma=alignment.gamma)


def pair_metrics(out: DpoOutput, side: Side) -> dict:
    """Point estimates on the held-out pairs."""
    return {"reward_accuracy": float(out.reward_accuracy), "reward_margin": float(out.margins.mean()),
            "chosen_rewards": float(out.chosen_rewards.mean()), "rejected_rewards": float(out.rejected_rewards.mean()),
            "preference_loss": float(out.loss), "chosen_logps": float(np.mean(side.chosen)),
            "rejected_logps": float(np.mean(side.rejected)), "preference_accuracy": float(np.mean(prefers(side)))}


def prefers(side: Side) -> np.ndarray:
    """Per pair: does the model give the chosen response a higher log-prob than the rejected one?"""
    return np.asarray(side.chosen) > np.asarray(side.rejected)


def chance_test(correct: np.ndarray) -> dict:
    """One-sided binomial test: are more than half the pairs right (ties count as wrong)?"""
    from scipy.stats import binomtest

    k, n = int(np.sum(correct)), len(correct)
    p = float(binomtest(k, n, 0.5, alternative="greater").pvalue) if n else 1.0
    return {"test": "binomial_vs_chance", "correct": k, "n": n, **p_record(p)}


def win_rate(prompts: list[str], policy_texts: list[str], base_texts: list[str], score: Score,
             intervals: bool = True) -> dict:
    """Share of prompts whose policy response the judge scores above the starting model's (a tie counts a half),
    with a bootstrap interval and a one-sided sign test over the decided prompts."""
    from scipy.stats import binomtest

    a, b = np.asarray(score(prompts, policy_texts), float), np.asarray(score(prompts, base_texts), float)
    if a.shape != (len(prompts),) or b.shape != (len(prompts),):
        raise ValueError(f"the judge returned {a.shape} and {b.shape} scores for {len(prompts)} prompts")
    outcome = np.where(a > b, 1.0, np.where(a < b, 0.0, 0.5))
    wins, losses = int(np.sum(a > b)), int(np.sum(a < b))
    p = float(binomtest(wins, wins + losses, 0.5, alternative="greater").pvalue) if wins + losses else 1.0
    result = {"win_rate": float(outcome.mean()) if len(outcome) else float("nan"), "wins": wins, "losses": losses,
              "ties": len(outcome) - wins - losses, "n": len(outcome), "policy_reward": float(a.mean()),
              "base_reward": float(b.mean()), "test": {"test": "sign_test", "wins": wins, "losses": losses,
                                                       **p_record(p)}}
    if intervals:
        result["ci"] = list(mean_ci(outcome))
    return result


def length_check(policy_lengths: list[int], base_lengths: list[int]) -> dict:
    """Mean response tokens of both, their ratio, and whether the policy's are over LENGTH_TOLERANCE times longer."""
    policy, base = float(np.mean(policy_lengths)), float(np.mean(base_lengths))
    ratio = policy / base if base > 0 else (1.0 if policy == 0 else float("inf"))
    return {"policy": policy, "base": base, "ratio": ratio, "longer": ratio > LENGTH_TOLERANCE}


def kl_estimate(policy_logps: np.ndarray, reference_logps: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """Per response: the mean per-token log-ratio log pi(y|x) - log pi_ref(y|x) of the policy's own response."""
    return (np.asarray(policy_logps) - np.asarray(reference_logps)) / np.maximum(np.asarray(tokens), 1)


def load_judge(recipe, device: torch.device) -> Optional[Score]:
    """The reward model of recipe.reward_model as a `Score`, or None when there is none to use."""
    if recipe.reward_model is None:
        return None
    try:
        from tuneforge.evaluate.rewards import RewardScorer
    except ImportError:
        console.print("[yellow]reward_model is set, but this build has no reward scorer "
                      "(tuneforge.evaluate.rewards.RewardScorer): the win rate is not judged")
        return None
    scorer = RewardScorer.load(recipe.reward_model, device)
    return scorer.score


def policy_verdict(metrics: dict, win: Optional[dict], length: Optional[dict]) -> dict:
    """No better than the starting model when the held-out implicit-reward accuracy is not above 0.5, or when a
    judged win rate is not significantly above 0.5 (its interval, without intervals its point estimate)."""
    if "reward_accuracy" not in metrics:
        return {"status": NO_BASELINE, "reasons": []}
    reasons, flags = [], []
    acc = metrics["reward_accuracy"]
    if not acc > 0.5:
        reasons.append(f"held-out implicit reward accuracy {acc:.4f} is not above 0.5 (a coin would do as well)")
    if win is not None:
        low = win["ci"][0] if "ci" in win else win["win_rate"]
        if not low > 0.5:
            shown = f"95% CI [{win['ci'][0]:.4f}, {win['ci'][1]:.4f}]" if "ci" in win else "no interval"
            reasons.append(f"win rate {win['win_rate']:.4f} against the starting model ({shown}, judged by the "
                           "reward model) is not significantly above 0.5")
        if win["win_rate"] > 0.5 and length is not None and length["longer"]:
            flags.append(f"the win comes with responses {length['ratio']:.2f}x as long as the starting model's "
                         f"(over {LENGTH_TOLERANCE:.1f}x): the judge may be rewarding length")
    return {"status": NO_BETTER if reasons else BETTER, "reasons": reasons, "flags": flags}


# --- the result -----------------------------------------------------------------------------------------------


def _clip(text: str, n: int, tail: bool = False) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else ("…" + text[-n:] if tail else text[:n] + "…")


def _pair_part(recipe, held: HeldOut, policy: Side, base: Optional[Side], reference) -> tuple[dict, dict, dict]:
    """(metrics, baseline metrics, report material) of the held-out pairs."""
    out = implicit_rewards(policy, reference, held, recipe.alignment)
    metrics = pair_metrics(out, policy)
    metrics["n_pairs"] = len(held.pairs)
    correct = (out.chosen_rewards > out.rejected_rewards).numpy()
    baseline = pair_metrics(implicit_rewards(base, reference, held, recipe.alignment), base) if base else None
    if recipe.eval.bootstrap:
        metrics["ci"] = {"reward_accuracy": list(mean_ci(correct.astype(float))),
                         "reward_margin": list(mean_ci(out.margins.numpy())),
                         "preference_accuracy": list(mean_ci(prefers(policy).astype(float)))}
        metrics["vs_baseline"] = {"reward_accuracy": chance_test(correct)}
        if base is not None:
            metrics["vs_baseline"]["preference_accuracy"] = mcnemar(prefers(base), prefers(policy))
    summary = [[key, f"{baseline[key]:.4f}" if baseline else "-", f"{metrics[key]:.4f}",
                "[{:.4f}, {:.4f}]".format(*metrics["ci"][key]) if key in metrics.get("ci", {}) else "-"]
               for key in ("reward_accuracy", "reward_margin", "preference_accuracy", "chosen_logps", "rejected_logps")]
    rows = [[_clip(r["prompt"], 80, tail=True), _clip(r["chosen"], 60), _clip(r["rejected"], 60),
             f"{c:.2f}", f"{j:.2f}", f"{m:.3f}", "yes" if ok else "no"]
            for r, c, j, m, ok in zip(held.rows, policy.chosen, policy.rejected, out.margins.tolist(), correct)]
    material = {
        "tables": [{"title": "Held-out preference pairs: starting model vs policy",
                    "header": ["metric", "starting model", "policy", "95% CI (policy)"], "rows": summary,
                    "note": "reward_accuracy: share of pairs whose implicit reward is higher for the chosen response "
                            "(the starting model is its own reference, so all its pairs tie); preference_accuracy: "
                            "share whose chosen response has the higher log-prob; log-probs summed per response."},
                   {"title": "Held-out pairs: policy log-probs and implicit rewards (first rows)",
                    "header": ["prompt (end)", "chosen", "rejected", "log p chosen", "log p rejected",
                               "reward margin", "chosen wins"], "rows": rows[:TABLE_ROWS],
                    "note": f"loss_type {recipe.alignment.loss_type}, beta {recipe.alignment.beta}: the implicit "
                            "reward is beta * (policy - reference) log-prob (reference-free losses: beta * mean "
                            "per-token log-prob); a tie is not a win."}],
        "plots": [{"title": "Implicit reward margin per held-out pair", "type": "hist", "xlabel": "margin",
                   "ylabel": "pairs", "series": {"margin": out.margins.tolist()}},
                  {"title": "Held-out log-probs of the responses (policy)", "type": "hist",
                   "xlabel": "summed log-prob", "ylabel": "pairs",
                   "series": {"chosen": policy.chosen, "rejected": policy.rejected}}],
    }
    return metrics, baseline, material


def _generation_part(recipe, held: HeldOut, policy: Side, base: Optional[Side], kl: Optional[tuple],
                     judge: Optional[Score]) -> tuple[dict, dict, dict, Optional[dict], Optional[dict]]:
    """(metrics, baseline metrics, report material, win, length) of the greedy responses."""
    metrics, baseline, rows = {"n_generated": len(policy.texts)}, {}, []
    win = length = None
    if policy.lengths:
        metrics["mean_response_tokens"] = float(np.mean(policy.lengths))
    if kl is not None:
        per = kl_estimate(*kl)
        metrics["kl_to_reference"], baseline["kl_to_reference"] = float(per.mean()), 0.0
        if recipe.eval.bootstrap:
            metrics.setdefault("ci", {})["kl_to_reference"] = list(mean_ci(per))
        rows.append(["KL to the reference (per token)", "0", f"{per.mean():.4f}",
                     "mean log pi(y|x) - log pi_ref(y|x) over the policy's greedy responses"])
    if base is not None and base.texts and policy.texts:
        length = length_check(policy.lengths, base.lengths)
        baseline["mean_response_tokens"] = length["base"]
        rows.append(["mean response tokens", f"{length['base']:.1f}", f"{length['policy']:.1f}",
                     f"ratio {length['ratio']:.2f}" + (" (over the tolerance)" if length["longer"] else "")])
        prompts = [r["prompt"] for r in held.rows[:len(policy.texts)]]
        if judge is not None:
            win = win_rate(prompts, policy.texts, base.texts, judge, recipe.eval.bootstrap)
            metrics["win_rate"], baseline["win_rate"] = win["win_rate"], 0.5
            if "ci" in win:
                metrics.setdefault("ci", {})["win_rate"] = win["ci"]
                metrics.setdefault("vs_baseline", {})["win_rate"] = win["test"]
            rows.append(["win rate vs the starting model (reward model)", "0.5", f"{win['win_rate']:.4f}",
                         f"{win['wins']} wins, {win['ties']} ties, {win['losses']} losses"])
        references = [r["chosen"] for r in held.rows[:len(policy.texts)]]
        for scorer in build_scorers(recipe.eval.scorers):
            ours = [scorer(t, ref) for t, ref in zip(policy.texts, references)]
            theirs = [scorer(t, ref) for t, ref in zip(base.texts, references)]
            metrics[scorer.name], baseline[scorer.name] = float(np.mean(ours)), float(np.mean(theirs))
            test = paired_bootstrap(theirs, ours)
            rows.append([f"scorer {scorer.name}", f"{np.mean(theirs):.4f}", f"{np.mean(ours):.4f}",
                         f"paired bootstrap p = {test['p_value']:.3g}"])
    material = {"tables": [{"title": "Generations on held-out prompts: policy vs starting model",
                            "header": ["measure", "starting model", "policy", "note"], "rows": rows,
                            "note": f"greedy, at most {recipe.eval.max_new_tokens} new tokens, "
                                    f"{len(policy.texts)} prompts"}] if rows else [],
                "samples": [{"reference": ref["chosen"], "base": b, "tuned": t} for ref, b, t in
                            zip(held.rows, base.texts if base else [""] * len(policy.texts), policy.texts)][:5]}
    return metrics, baseline, material, win, length


def log_curves(log: list[dict]) -> list[dict]:
    """Validation chosen/rejected log-prob and reward curves from a run's metrics.jsonl records."""
    val = [r for r in log if r.get("split") == "validation" and "chosen_logps" in r]
    if not val:
        return []
    steps = [r["step"] for r in val]
    return [{"title": "Validation log-probs of chosen and rejected responses", "type": "line", "x": steps,
             "xlabel": "optimizer step", "ylabel": "mean summed log-prob",
             "series": {"chosen": [r["chosen_logps"] for r in val], "rejected": [r["rejected_logps"] for r in val]}},
            {"title": "Validation implicit-reward accuracy and margin", "type": "line", "x": steps,
             "xlabel": "optimizer step", "ylabel": "value",
             "series": {"reward_accuracy": [r["reward_accuracy"] for r in val],
                        "reward_margin": [r["reward_margin"] for r in val]}}]


def policy_result(recipe, held: HeldOut, policy: Side, base: Optional[Side], reference: Optional[tuple],
                  kl: Optional[tuple] = None, judge: Optional[Score] = None, log: Sequence[dict] = ()) -> dict:
    """The result dict of a policy's test pass ({"metrics", "baseline", "verdict", "tables", "plots", ...}).

    `reference`: the reference (chosen, rejected) log-probs of the pairs (None for reference-free losses);
    `base`: the starting model's Side (None: no baseline); `kl`: (policy, reference, tokens) of the policy's
    responses; `judge`: the reward model; `log`: the run's metrics.jsonl records (validation curves)."""
    metrics, baseline, material = _pair_part(recipe, held, policy, base, reference)
    more, base_more, generated, win, length = _generation_part(recipe, held, policy, base, kl, judge)
    for key in ("ci", "vs_baseline"):
        metrics.setdefault(key, {}).update(more.pop(key, {}))
        if not metrics[key]:
            del metrics[key]
    metrics.update(more)
    if policy.reference_perplexity is not None:
        metrics["reference_perplexity"] = policy.reference_perplexity
    if baseline is not None:
        baseline.update(base_more)
        if base.reference_perplexity is not None:
            baseline["reference_perplexity"] = base.reference_perplexity
    verdict = policy_verdict(metrics, win, length)
    for flag in verdict["flags"]:
        console.print(f"[bold yellow]{flag}")
        for table in generated["tables"]:  # the report shows the flag beside the lengths
            table["note"] += f". Flagged: {flag}"
    return {"metrics": metrics, "baseline": baseline, "verdict": verdict,
            "tables": material["tables"] + generated["tables"], "plots": material["plots"] + log_curves(list(log)),
            "samples": generated["samples"], "win_rate": win, "response_length": length,
            "kl_estimate": "mean per-token log-ratio on the policy's greedy responses to held-out prompts"}


# --- tuneforge eval -------------------------------------------------------------------------------------------


def _load_policy(model_path: str, adapter: Optional[str], device: torch.device):
    from transformers import AutoModelForCausalLM

    from tuneforge.models import load_adapter, load_pretrained

    model = load_pretrained(AutoModelForCausalLM, model_path)
    return (load_adapter(model, adapter, merge=True) if adapter is not None else model).to(device)


def _tokenizer(model_path: str):
    from tuneforge.models import DEFAULT_CHAT_TEMPLATE, load_tokenizer

    tokenizer = load_tokenizer(model_path)
    if not tokenizer.chat_template:
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    return tokenizer


def eval_policy(recipe, model_path: str, adapter: Optional[str], base_ref: Optional[str], rows: list[dict],
                device: torch.device) -> dict:
    """`tuneforge eval` of a policy on preference rows: the test pass of the dpo trainer, one model in memory at
    a time. The reference log-probs come from the run folder when `rows` are one of its splits, else from the base
    model `base_ref` (which also gives the starting model's responses, the KL reference and the baseline)."""
    from tuneforge.models import load_causal_lm, load_options

    reference_free = DPO_LOSSES[recipe.alignment.loss_type].reference_free
    if base_ref is None and not reference_free:
        raise ValueError(f"loss_type {recipe.alignment.loss_type}: the implicit rewards need the reference model; "
                         "pass --base MODEL (the model the policy was trained from)")
    tokenizer = _tokenizer(model_path)
    held = held_out(tokenizer, rows, recipe, "eval")
    if not held.pairs:
        raise ValueError("no pair keeps a response token at train.max_length; raise it (train.max_length=...)")
    model = _load_policy(model_path, adapter, device)
    side = measure(model, tokenizer, held, recipe, device)
    own = response_logps(model, tokenizer, held, side.texts, recipe, device) if side.texts else None
    del model
    gc.collect()
    stored = read_reference(Path(model_path).parent / REFERENCE_FILE)
    reference = None if reference_free else stored_logps(stored, pairs_digest(held.pairs))
    base = kl = None
    if base_ref is not None:
        options = load_options(recipe) if base_ref == recipe.model else {}
        base_model = load_causal_lm(base_ref, **options)[0].to(device)
        base = measure(base_model, tokenizer, held, recipe, device, logps=reference)
        if not reference_free and reference is None:
            reference = (torch.tensor(base.chosen), torch.tensor(base.rejected))
        if own is not None:
            kl = (own[0], response_logps(base_model, tokenizer, held, side.texts, recipe, device)[0], own[1])
        del base_model
        gc.collect()
    return policy_result(recipe, held, side, base, reference, kl, load_judge(recipe, device))
