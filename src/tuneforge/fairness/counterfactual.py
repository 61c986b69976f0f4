"""Counterfactual probes: change only who a text is about and see what moves.

- Classifiers: swap the demographic terms of each test text (he <-> she,
  names across groups) and measure how often the predicted label flips and
  how far the positive-class probability moves.
- Causal LMs, CrowS-Pairs style: for minimally different sentence pairs, the
  share of pairs where the model gives the stereotypical sentence the higher
  log-likelihood (0.5 = no preference), overall and by bias type.
- Causal LMs, generations: generate for a prompt and its swapped twin, score
  both generations with a sentiment classifier, and report the gap.

CrowS-Pairs is an evaluation set (its authors ask that it never be used for
training); tuneforge only reads it here.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from tuneforge.evaluate.stats import mean_ci

EXAMPLES = 10


def swapped_pairs(texts: Sequence[str], lexicon) -> list[tuple[int, str, str, str]]:
    """(row index, original, swapped, direction) for every text with a swappable term.
    direction is 'male->female' style when the text mentions one group, else 'mixed'."""
    from tuneforge.fairness.terms import detect_group, swap_terms

    a, b = lexicon.groups
    out = []
    for i, text in enumerate(texts):
        new, n = swap_terms(text, lexicon)
        if n and new != text:
            group = detect_group(text, lexicon)
            direction = f"{a}->{b}" if group == a else f"{b}->{a}" if group == b else "mixed"
            out.append((i, text, new, direction))
    return out


def flip_probe(predict: Callable[[list[str]], np.ndarray], texts: Sequence[str], lexicons: Sequence,
               labels: Sequence[str], positive: int, n_boot: int = 1000, seed: int = 0) -> dict:
    """Prediction flip rate and positive-probability change under term swaps, per lexicon."""
    out = {}
    for lexicon in lexicons:
        pairs = swapped_pairs(texts, lexicon)
        res: dict = {"texts": len(texts), "swappable": len(pairs)}
        if pairs:
            before = predict([p[1] for p in pairs])
            after = predict([p[2] for p in pairs])
            flips = before.argmax(1) != after.argmax(1)
            delta = after[:, positive] - before[:, positive]
            res.update(flip_rate=float(flips.mean()),
                       flip_rate_ci=list(mean_ci(flips, n_boot=n_boot, seed=seed)) if n_boot else None,
                       mean_abs_delta=float(np.abs(delta).mean()),
                       mean_abs_delta_ci=list(mean_ci(np.abs(delta), n_boot=n_boot, seed=seed)) if n_boot else None,
                       by_direction={d: {"pairs": int(sum(p[3] == d for p in pairs)),
                                         "mean_delta": float(np.mean([x for x, p in zip(delta, pairs) if p[3] == d]))}
                                     for d in sorted({p[3] for p in pairs})})
            order = np.argsort(-np.abs(delta))[:EXAMPLES]
            res["examples"] = [{"text": pairs[k][1], "swapped": pairs[k][2],
                                "predicted": labels[int(before[k].argmax())],
                                "predicted_swapped": labels[int(after[k].argmax())],
                                "p_positive": float(before[k, positive]),
                                "p_positive_swapped": float(after[k, positive]),
                                "flipped": bool(flips[k])} for k in order]
        out[lexicon.name] = res
    return out


# ------------------------------------------------------------ CrowS-Pairs


def read_crows_pairs(path, bias_types: Optional[Sequence[str]] = None, limit: Optional[int] = None) -> list[dict]:
    """Rows of crows_pairs_anonymized.csv: sent_more, sent_less, stereo_antistereo, bias_type."""
    path = Path(path)
    rows = []
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        need = {"sent_more", "sent_less", "stereo_antistereo", "bias_type"}
        missing = need - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path}:1: not a CrowS-Pairs file: no column(s) {', '.join(sorted(missing))}")
        for line, row in enumerate(reader, start=2):
            if row["stereo_antistereo"] not in ("stereo", "antistereo") or not row["sent_more"] or not row["sent_less"]:
                raise ValueError(f"{path}:{line}: stereo_antistereo must be stereo/antistereo and both "
                                 "sentences non-empty")
            if bias_types and row["bias_type"] not in bias_types:
                continue
            rows.append({k: row[k] for k in need})
            if limit and len(rows) >= limit:
                break
    return rows


def sentence_loglik(model, tokenizer, sentences: Sequence[str], batch_size: int, device) -> np.ndarray:
    """Total log-likelihood of each sentence under a causal LM, every token
    scored (a BOS, or EOS when the tokenizer has none, is put in front)."""
    from tuneforge.data.render import Rendered
    from tuneforge.inference import per_example_nll

    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    examples = []
    for s in sentences:
        ids = [start] + tokenizer(s, add_special_tokens=False)["input_ids"]
        examples.append(Rendered(ids, list(ids), False))
    sums, _ = per_example_nll(model, examples, tokenizer.pad_token_id, batch_size, device)
    return -sums


def crows_pairs_score(loglik: Callable[[list[str]], np.ndarray], pairs: Sequence[dict], n_boot: int = 1000,
                      seed: int = 0) -> dict:
    """Share of pairs where the stereotypical sentence is more likely.

    As in the CrowS-Pairs paper, the stereotypical sentence is sent_more for
    'stereo' pairs and sent_less for 'antistereo' ones. 0.5 is an unbiased
    model; above it, the model prefers stereotypes. Log-likelihoods are of the
    whole sentence (causal LMs have no masked pseudo-likelihood).
    """
    stereo = [p["sent_more"] if p["stereo_antistereo"] == "stereo" else p["sent_less"] for p in pairs]
    anti = [p["sent_less"] if p["stereo_antistereo"] == "stereo" else p["sent_more"] for p in pairs]
    ll = loglik(stereo + anti)
    diff = ll[:len(pairs)] - ll[len(pairs):]
    prefers = diff > 0
    out = {"pairs": len(pairs), "stereotype_preference": float(prefers.mean()),
           "ci": list(mean_ci(prefers, n_boot=n_boot, seed=seed)), "mean_loglik_difference": float(diff.mean()),
           "by_bias_type": {}}
    for kind in sorted({p["bias_type"] for p in pairs}):
        idx = np.array([p["bias_type"] == kind for p in pairs])
        out["by_bias_type"][kind] = {"pairs": int(idx.sum()), "stereotype_preference": float(prefers[idx].mean()),
                                     "ci": list(mean_ci(prefers[idx], n_boot=n_boot, seed=seed))}
    order = np.argsort(-diff)[:EXAMPLES]
    out["examples"] = [{"stereotypical": stereo[k], "other": anti[k], "loglik_difference": float(diff[k]),
                        "bias_type": pairs[k]["bias_type"]} for k in order]
    return out


# --------------------------------------------------- generation sentiment


def generation_sentiment_gap(generate: Callable[[list[str]], list[str]],
                             sentiment: Callable[[list[str]], np.ndarray], prompts: Sequence[str], lexicon,
                             positive: int, n_boot: int = 1000, seed: int = 0) -> dict:
    """Generate for each prompt and its swapped twin; the mean positive-sentiment
    probability of generations about each group, and the paired gap
    (first group minus second; 0 = no difference)."""
    a, b = lexicon.groups
    pairs = [p for p in swapped_pairs(prompts, lexicon) if p[3] != "mixed"]
    out: dict = {"prompts": len(prompts), "pairs": len(pairs), "groups": [a, b]}
    if not pairs:
        return out
    # Order each pair as (prompt about a, prompt about b).
    about_a = [p[1] if p[3].startswith(f"{a}->") else p[2] for p in pairs]
    about_b = [p[2] if p[3].startswith(f"{a}->") else p[1] for p in pairs]
    gen = generate(about_a + about_b)
    scores = sentiment(gen)[:, positive]
    sa, sb = scores[:len(pairs)], scores[len(pairs):]
    gap = sa - sb
    out.update(mean_sentiment={a: float(sa.mean()), b: float(sb.mean())}, gap=float(gap.mean()),
               gap_ci=list(mean_ci(gap, n_boot=n_boot, seed=seed)))
    order = np.argsort(-np.abs(gap))[:EXAMPLES]
    out["examples"] = [{f"prompt_{a}": about_a[k], f"prompt_{b}": about_b[k],
                        f"generation_{a}": gen[k], f"generation_{b}": gen[len(pairs) + k],
                        "gap": float(gap[k])} for k in order]
    return out

