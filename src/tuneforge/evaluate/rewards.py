"""Reward models: load one, score (prompt, response) pairs with it, and evaluate it on preference pairs.

A reward model is a sequence classifier with one output (tuneforge.kinds REWARD). A (prompt, response)
pair is rendered as training rendered it (tuneforge.data.pairs: the prompt as a conversation, the response
as its final assistant turn, the model's chat template, the start of a long prompt cut first) and its
score is the head's scalar: read at the last non-pad token by decoders, at the first token ([CLS],
prepended here for encoders) by BERT-style models.

`RewardScorer` loads a reward run, an exported reward folder or a model folder once and scores lists of
pairs in batches: the trainer's validation and test passes, `tuneforge eval`, the server's /v1/rewards
and the preference objectives that use a reward run as a judge (recipe.reward_model) all score through
it. `evaluate_pairs` is the held-out evaluation: pairwise accuracy (chosen strictly above rejected: a tie
is wrong) with its 95% interval and exact binomial test against chance, the score margin, the "longer
response wins" heuristic next to it (with a McNemar test of model vs heuristic), accuracy by length
difference (the length bias), the margin histogram and the most confidently wrong pairs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from tuneforge import catalog, kinds, safeyaml
from tuneforge.console import console
from tuneforge.data.pairs import log_pair_losses, prompt_messages, render_final_turn, render_pair
from tuneforge.data.render import Rendered
from tuneforge.evaluate.registry import format_p, p_record
from tuneforge.evaluate.stats import mcnemar, mean_ci
from tuneforge.evaluate.verdict import judge
from tuneforge.inference import class_logits
from tuneforge.training.batching import eval_batches

REWARD_LABEL = "reward"  # the one label (id2label) of a reward model's head
# Encoders ship no chat template and no EOS: role-tagged turns closed by the separator token.
ENCODER_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] + ': ' + message['content'] + ' ' + sep_token + ' ' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)
WORST = 10
LENGTH_BUCKETS = ((None, -20, "rejected longer by 20+ words"), (-19, -1, "rejected longer by 1-19 words"),
                  (0, 0, "same length"), (1, 19, "chosen longer by 1-19 words"),
                  (20, None, "chosen longer by 20+ words"))


# ------------------------------------------------------------------ loading


def ensure_template(tokenizer) -> None:
    """Give a tokenizer without a chat template the one reward training uses: ChatML closed by EOS
    (as causal LMs get, models.DEFAULT_CHAT_TEMPLATE), or the encoder template when it has no EOS.
    Saved with the model (tokenizer.save_pretrained), so serving renders as training did."""
    from tuneforge.models import DEFAULT_CHAT_TEMPLATE

    if not tokenizer.chat_template:
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE if tokenizer.eos_token else ENCODER_CHAT_TEMPLATE


def reward_config_options() -> dict:
    """The config keywords that make a sequence classifier a reward model (one scalar output)."""
    return {"num_labels": 1, "id2label": {0: REWARD_LABEL}, "label2id": {REWARD_LABEL: 0},
            "problem_type": "regression"}


def load_reward_model(ref: str, dropout: Optional[float] = None, quantize_4bit: bool = False,
                      attn_implementation: str = "auto"):
    """(model, tokenizer, path): `ref` (catalogue name, folder or hub id) as a sequence classifier with one
    output, pad token set, the reward chat template on the tokenizer; mirrors models.load_classifier."""
    from transformers import AutoModelForSequenceClassification

    from tuneforge.models import (
        load_config,
        load_pretrained,
        load_tokenizer,
        pretrained_options,
        quiet_transformers,
        set_dropout,
    )

    if quantize_4bit:  # the recipe refuses qlora for task reward; this is for library callers
        raise ValueError("4-bit loading (qlora) is for causal LMs; train a reward model with lora instead")
    quiet_transformers()
    options = pretrained_options(False, attn_implementation)
    path = catalog.resolve(ref)
    config = load_config(path, **reward_config_options())
    if dropout is not None:
        set_dropout(config, dropout)
    model = load_pretrained(AutoModelForSequenceClassification, path, options, config=config)
    tokenizer = load_tokenizer(path)
    ensure_template(tokenizer)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer, path


@dataclass(frozen=True)
class RewardSettings:
    """How a reward model's training rendered its inputs (None: not known, use the model's context)."""

    system_prompt: Optional[str] = None
    max_length: Optional[int] = None


def reward_settings(folder: Path) -> RewardSettings:
    """The rendering settings of a reward run (its recipe.yaml) or an export (the recipe in its manifest)."""
    folder = Path(folder)
    recipe = None
    if (folder / "recipe.yaml").is_file():
        recipe = safeyaml.load_file(folder / "recipe.yaml")
    elif (folder / "manifest.json").is_file():
        recipe = (json.loads((folder / "manifest.json").read_text()).get("lineage") or {}).get("recipe")
    if not isinstance(recipe, dict):
        return RewardSettings()
    data, train = recipe.get("data") or {}, recipe.get("train") or {}
    return RewardSettings(data.get("system_prompt"), train.get("max_length"))


def model_folder(ref: str) -> Path:
    """The weights folder of a reward run (RUN/model), an exported folder or a model folder."""
    path = Path(ref)
    if (path / "recipe.yaml").is_file() and (path / "model").is_dir():
        return path / "model"
    if path.is_dir():
        return path
    raise FileNotFoundError(f"reward model {ref}: no such run or model folder")


def check_reward_folder(folder: Path, ref: str) -> None:
    """ValueError unless `folder` holds a reward model (an export is verified against its manifest first)."""
    from tuneforge.models import model_kind

    manifest = folder / "manifest.json"
    if manifest.is_file() and "files" in json.loads(manifest.read_text()):
        from tuneforge.export import verify_export

        problem = verify_export(folder)
        if problem:
            raise ValueError(f"reward model {ref}: {problem}; re-export the run")
    kind = model_kind(str(folder)).name
    if kind != kinds.REWARD:
        raise ValueError(f"{ref} is a {kind} model, not a reward model (a sequence classifier with one output); "
                         "train one with task: reward")


# ------------------------------------------------------------------ encoding and scoring


@dataclass
class EncodedPair:
    """A preference pair as the reward model reads it: each side's token ids and response length."""

    row: int  # index of the pair in the rows it was encoded from
    chosen: list[int]
    rejected: list[int]
    chosen_tokens: int  # response tokens kept (the final assistant turn)
    rejected_tokens: int
    truncated: bool


def reward_input(tokenizer, rendered: Rendered) -> list[int]:
    """The ids the head reads: the rendering, after [CLS] for tokenizers that have one (BERT-style
    poolers read the first token)."""
    cls = tokenizer.cls_token_id
    ids = list(rendered.input_ids)
    return [cls, *ids] if cls is not None and (not ids or ids[0] != cls) else ids


def room(tokenizer, max_length: int) -> int:
    """The rendering's token budget: max_length less the [CLS] that reward_input puts in front."""
    return max_length - (1 if tokenizer.cls_token_id is not None else 0)


def encode_response(tokenizer, prompt: str, response: str, max_length: int,
                    system_prompt: Optional[str] = None) -> list[int]:
    """The ids of one (prompt, response) pair, rendered as a preference pair's side is in training."""
    messages = prompt_messages(prompt, system_prompt) + [{"role": "assistant", "content": response}]
    return reward_input(tokenizer, render_final_turn(tokenizer, messages, room(tokenizer, max_length)))


@torch.no_grad()
def score_ids(model, ids: Sequence[list[int]], pad_id: int, batch_size: int, device) -> np.ndarray:
    """The head's scalar for each id list, in length-sorted batches (BERT-style models run packed)."""
    model.eval()
    out = np.zeros(len(ids), dtype=np.float64)
    for batch in eval_batches([len(x) for x in ids], batch_size):
        logits = class_logits(model, [ids[i] for i in batch], pad_id, device)
        out[batch] = logits[:, 0].float().cpu().numpy()
    return out


class RewardScorer:
    """A reward model, loaded once, that scores (prompt, response) pairs in batches.

    Build it from a loaded model (`RewardScorer(model, tokenizer, ...)`) or from a reward run, exported
    folder or model folder (`RewardScorer.load(ref)`), which renders as that run's training did."""

    def __init__(self, model, tokenizer, max_length: int, system_prompt: Optional[str] = None,
                 device=None, batch_size: int = 16):
        ensure_template(tokenizer)
        self.model, self.tokenizer = model, tokenizer
        self.max_length, self.system_prompt = max_length, system_prompt
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.batch_size = batch_size

    @classmethod
    def load(cls, ref: str, device=None, batch_size: int = 16, max_length: Optional[int] = None) -> "RewardScorer":
        from transformers import AutoModelForSequenceClassification

        from tuneforge.models import load_pretrained, load_tokenizer, pick_device, quiet_transformers

        quiet_transformers()
        folder = model_folder(ref)
        check_reward_folder(folder, ref)
        settings = reward_settings(Path(ref))
        dev = device if isinstance(device, torch.device) else pick_device(device or "auto")
        model = load_pretrained(AutoModelForSequenceClassification, str(folder)).to(dev).eval()
        tokenizer = load_tokenizer(str(folder))
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        limit = min(max_length or settings.max_length or 10**9, context_length(model, tokenizer))
        return cls(model, tokenizer, limit, settings.system_prompt, dev, batch_size)

    def encode(self, prompt: str, response: str) -> list[int]:
        """The ids of one (prompt, response) pair, rendered as in training."""
        return encode_response(self.tokenizer, prompt, response, self.max_length, self.system_prompt)

    def encode_pairs(self, rows: list[dict], log: Optional[Callable[[str], None]] = None,
                     name: str = "") -> list[EncodedPair]:
        """Every preference row whose two sides keep a response token, encoded (data.pairs.render_pair,
        as render_pairs does, keeping each pair's row index); says how many were truncated or dropped."""
        out = []
        budget = room(self.tokenizer, self.max_length)
        for i, row in enumerate(rows):
            pair = render_pair(self.tokenizer, row, budget, self.system_prompt)
            if pair.chosen.n_target > 0 and pair.rejected.n_target > 0:
                out.append(EncodedPair(i, reward_input(self.tokenizer, pair.chosen),
                                       reward_input(self.tokenizer, pair.rejected), pair.chosen.n_target,
                                       pair.rejected.n_target, pair.chosen.truncated or pair.rejected.truncated))
        log_pair_losses(log, name, len(rows), sum(p.truncated for p in out), len(out), self.max_length)
        return out

    def score_ids(self, ids: Sequence[list[int]]) -> np.ndarray:
        return score_ids(self.model, ids, self.tokenizer.pad_token_id, self.batch_size, self.device)

    def score(self, prompts, responses: Sequence[str]) -> list[float]:
        """Scores of `responses`, each after its prompt (`prompts` a list as long, or one prompt for all)."""
        prompts = [prompts] * len(responses) if isinstance(prompts, str) else list(prompts)
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts for {len(responses)} responses")
        return self.score_ids([self.encode(p, r) for p, r in zip(prompts, responses)]).tolist()

    def score_encoded(self, pairs: Sequence[EncodedPair]) -> tuple[np.ndarray, np.ndarray]:
        """(chosen scores, rejected scores) of encoded pairs, both sides in the same batches."""
        scores = self.score_ids([p.chosen for p in pairs] + [p.rejected for p in pairs])
        return scores[:len(pairs)], scores[len(pairs):]


def context_length(model, tokenizer) -> int:
    """The longest input the model takes: its position table, or the tokenizer's limit when smaller."""
    n = getattr(model.config, "max_position_embeddings", None) or 2048
    limit = getattr(tokenizer, "model_max_length", None)
    return min(n, limit) if isinstance(limit, int) and 0 < limit < 10**7 else n


# ------------------------------------------------------------------ evaluation


def pair_summary(r_chosen: np.ndarray, r_rejected: np.ndarray) -> dict:
    """Pairwise accuracy (a tie is wrong), mean margin and the Bradley-Terry loss of scored pairs."""
    margin = np.asarray(r_chosen, dtype=np.float64) - np.asarray(r_rejected, dtype=np.float64)
    if not len(margin):
        return {}
    loss = float(np.mean(np.logaddexp(0.0, -margin)))  # -log sigmoid(margin), stably
    return {"pairwise_accuracy": float(np.mean(margin > 0)), "reward_margin": float(margin.mean()), "loss": loss}


def chance_test(correct: np.ndarray) -> dict:
    """Exact two-sided binomial test of the correct pairs against chance (p = 0.5)."""
    from scipy.stats import binomtest

    k, n = int(np.sum(correct)), len(correct)
    p = 1.0 if n == 0 else float(binomtest(k, n, 0.5, alternative="two-sided").pvalue)
    return {"test": "binomial_exact", "correct": k, "pairs": n, "null_accuracy": 0.5, **p_record(p)}


def words(text: str) -> int:
    return len(text.split())


def length_bucket(diff: int) -> str:
    for lo, hi, name in LENGTH_BUCKETS:
        if (lo is None or diff >= lo) and (hi is None or diff <= hi):
            return name
    raise AssertionError(diff)


def length_table(diff: np.ndarray, correct: np.ndarray, longer: np.ndarray, margin: np.ndarray) -> dict:
    """Accuracy of the model and of the longer-wins heuristic by length difference (chosen - rejected)."""
    names = [length_bucket(int(d)) for d in diff]
    rows = []
    for _, _, bucket in LENGTH_BUCKETS:
        mask = np.array([n == bucket for n in names], dtype=bool)
        if mask.any():
            rows.append([bucket, int(mask.sum()), f"{correct[mask].mean():.4f}", f"{longer[mask].mean():.4f}",
                         f"{margin[mask].mean():+.4f}"])
    unequal = diff != 0
    prefers_longer = float(np.mean((margin[unequal] > 0) == (diff[unequal] > 0))) if unequal.any() else float("nan")
    chosen_longer = float(np.mean(diff[unequal] > 0)) if unequal.any() else float("nan")
    note = (f"length in words. Of the {int(unequal.sum())} pairs of unequal length the chosen response is the "
            f"longer one in {chosen_longer:.1%}, and the reward model scores the longer one higher in "
            f"{prefers_longer:.1%}: a length-biased model is right where its preference and the label agree "
            "and wrong where they do not.")
    return {"title": "Accuracy by response length (length bias, test)",
            "header": ["chosen - rejected length", "pairs", "reward model accuracy", "longer-wins accuracy",
                       "mean margin"], "rows": rows, "note": note,
            "summary": {"prefers_longer": prefers_longer, "chosen_longer": chosen_longer}}


def baseline_table(metrics: dict, length: dict, n: int) -> dict:
    ci = metrics.get("ci") or {}

    def interval(values) -> str:
        return f"[{values[0]:.4f}, {values[1]:.4f}]" if values else "-"

    chance, versus = metrics["vs_baseline"]["pairwise_accuracy"], length["vs_model"]
    return {"title": "Pairwise accuracy against baselines (test)",
            "header": ["scorer", "pairwise accuracy", "95% CI", "pairs"],
            "rows": [["reward model", f"{metrics['pairwise_accuracy']:.4f}", interval(ci.get("pairwise_accuracy")), n],
                     ["chance", "0.5000", "-", n],
                     ["longer response wins (words)", f"{length['pairwise_accuracy']:.4f}",
                      interval(length.get("ci")), n]],
            "note": f"a tie counts as wrong. Reward model vs chance: {chance['test']} {format_p(chance)}; "
                    f"vs longer-wins: {versus['test']} {format_p(versus)} (the model right and the heuristic "
                    f"wrong on {versus['b_only_correct']} pairs, the reverse on {versus['a_only_correct']})."}


def worst_table(rows: list[dict], r_c: np.ndarray, r_r: np.ndarray) -> dict:
    margin = r_c - r_r
    worst = [int(i) for i in np.argsort(margin, kind="stable")[:WORST] if margin[i] <= 0]
    return {"title": "Most confidently wrong pairs (test)",
            "header": ["prompt (end)", "chosen", "rejected", "r_chosen", "r_rejected", "margin"],
            "rows": [[rows[i]["prompt"].strip()[-200:], rows[i]["chosen"][:200], rows[i]["rejected"][:200],
                      f"{r_c[i]:.3f}", f"{r_r[i]:.3f}", f"{margin[i]:+.3f}"] for i in worst],
            "note": "the pairs whose rejected response the reward model scores furthest above the chosen one"}


def evaluate_pairs(scorer: RewardScorer, rows: list[dict], bootstrap: bool = True,
                   log: Optional[Callable[[str], None]] = None, name: str = "test") -> dict:
    """The held-out evaluation of a reward model on preference rows: {"metrics", "baseline", "verdict",
    "tables", "plots", "scores"} (see the module docstring)."""
    encoded = scorer.encode_pairs(rows, log, name)
    if not encoded:
        return {"metrics": {}, "baseline": None, "verdict": None}
    kept = [rows[p.row] for p in encoded]
    r_c, r_r = scorer.score_encoded(encoded)
    margin = r_c - r_r
    correct = margin > 0
    metrics = {k: v for k, v in pair_summary(r_c, r_r).items() if k != "loss"}
    metrics.update(pairs=len(kept), ties=int(np.sum(margin == 0)), dropped=len(rows) - len(kept),
                   mean_chosen_score=float(r_c.mean()), mean_rejected_score=float(r_r.mean()))
    if bootstrap:
        metrics["ci"] = {"pairwise_accuracy": list(mean_ci(correct)), "reward_margin": list(mean_ci(margin))}
    metrics["vs_baseline"] = {"pairwise_accuracy": chance_test(correct)}  # exact: kept without bootstrap too
    diff = np.array([words(r["chosen"]) - words(r["rejected"]) for r in kept])
    longer = diff > 0  # "the longer response wins"; equal lengths are a tie, so wrong
    length = {"pairwise_accuracy": float(longer.mean()), "vs_model": mcnemar(longer, correct)}
    if bootstrap:
        length["ci"] = list(mean_ci(longer))
    by_length = length_table(diff, correct, longer, margin)
    metrics["length_baseline"] = length
    metrics["length_bias"] = by_length.pop("summary")
    baseline = {"pairwise_accuracy": 0.5}
    return {"metrics": metrics, "baseline": baseline, "verdict": judge(kinds.REWARD, metrics, baseline),
            "tables": [baseline_table(metrics, length, len(kept)), by_length, worst_table(kept, r_c, r_r)],
            "plots": [{"title": "Reward margin, chosen - rejected (test)", "type": "hist",
                       "xlabel": "r_chosen - r_rejected", "ylabel": "pairs", "series": {"margin": margin.tolist()}},
                      {"title": "Reward scores (test)", "type": "hist", "xlabel": "score", "ylabel": "responses",
                       "series": {"chosen": r_c.tolist(), "rejected": r_r.tolist()}}],
            "scores": {"chosen": r_c.tolist(), "rejected": r_r.tolist()}}


def eval_reward_model(recipe, model_path: str, adapter: Optional[str], rows: list[dict], dev) -> dict:
    """`tuneforge eval` of a reward model (a run's model/, or a base + `adapter`) on preference `rows`,
    rendered with the recipe's settings, as the run's own test pass was."""
    from transformers import AutoModelForSequenceClassification

    from tuneforge.models import load_adapter, load_pretrained, load_tokenizer

    if adapter is not None:
        model = load_adapter(load_reward_model(model_path)[0], adapter, merge=True)
    else:
        check_reward_folder(Path(model_path), model_path)
        model = load_pretrained(AutoModelForSequenceClassification, model_path)
    tokenizer = load_tokenizer(model_path)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model = model.to(dev).eval()
    # an exported folder keeps its training's rendering settings (the recipe in its manifest): they win
    # over the defaults of the recipe `tuneforge eval DIR --data FILE` makes up for it
    exported = reward_settings(Path(model_path))
    max_length = min(exported.max_length or recipe.train.max_length, context_length(model, tokenizer))
    batch = recipe.train.eval_batch_size or 2 * recipe.train.batch_size
    system_prompt = recipe.data.system_prompt or exported.system_prompt
    scorer = RewardScorer(model, tokenizer, max_length, system_prompt, dev, batch)
    return evaluate_pairs(scorer, rows, bootstrap=recipe.eval.bootstrap, log=console.print, name="eval")
