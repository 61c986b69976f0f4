"""Group relative policy optimisation (GRPO): online RL for a causal LM, no critic.

For each prompt of a batch, sample `alignment.group_size` completions with the
project's own decode loop (serve/engine.py: KV cache, a seeded generator per
completion, so a resumed run samples exactly what the killed one would have),
score each with the reward functions (`alignment.rewards`: exact match, partial
credit, eval.scorers entries, a reward run), normalise rewards within the group
into advantages and take one step on PPO's clipped surrogate
(alignment.losses.grpo_loss), with an optional k3 KL penalty to the starting model
(an adapter method's base, the adapter switched off).

setup (data, model, baseline, method) -> train (shared loop) -> save -> test vs the untouched base model.
"""

from __future__ import annotations

import difflib
from types import SimpleNamespace
from typing import Callable, Optional

import torch

from tuneforge.alignment.losses import IGNORE_INDEX, group_advantages, grpo_loss, token_logps
from tuneforge.console import console
from tuneforge.data.render import encode_prompt, prompt_and_reference
from tuneforge.evaluate import registry
from tuneforge.evaluate.scorers import build_scorers
from tuneforge.inference import collate
from tuneforge.methods import METHODS
from tuneforge.models import load_causal_lm, load_options
from tuneforge.recipe import Recipe
from tuneforge.serve import engine
from tuneforge.trainers import sft, shared
from tuneforge.training import distributed
from tuneforge.training.batching import plan_epoch
from tuneforge.training.loop import Objective, fit

# (completions, reference answers, prompt texts) -> one score per completion
Reward = Callable[[list[str], list[str], list[str]], list[float]]


def normalised(text: str) -> str:
    return " ".join(text.split())


def exact_match_reward(completion: str, reference: str) -> float:
    return float(normalised(completion) == normalised(reference))


def format_reward(completion: str, reference: str) -> float:
    """Partial credit: 1 - the normalised edit distance (difflib's ratio) to the reference."""
    return difflib.SequenceMatcher(None, normalised(completion), normalised(reference)).ratio()


def per_completion(fn: Callable[[str, str], float]) -> Reward:
    return lambda completions, references, prompts: [float(fn(c, r)) for c, r in zip(completions, references)]


def build_rewards(recipe: Recipe, device: torch.device) -> list[tuple[str, Reward]]:
    """The recipe's reward functions by name (alignment.rewards), each checked to exist."""
    scorers = {s.name: s for s in build_scorers(recipe.eval.scorers)}
    out = []
    for name in recipe.alignment.rewards:
        if name == "exact_match":
            out.append((name, per_completion(exact_match_reward)))
        elif name == "format":
            out.append((name, per_completion(format_reward)))
        elif name in scorers:
            out.append((name, per_completion(scorers[name])))
        elif name == "reward_model":
            out.append((name, reward_model_reward(recipe, device)))
        else:
            raise ValueError(f"alignment.rewards: unknown reward '{name}'; use exact_match, format, reward_model or "
                             f"the name of an eval.scorers entry ({', '.join(scorers) or 'none defined'})")
    return out


def reward_model_reward(recipe: Recipe, device: torch.device) -> Reward:
    """The reward run named by recipe.reward_model, scoring prompt + completion."""
    if not recipe.reward_model:
        raise ValueError("alignment.rewards names 'reward_model' but recipe.reward_model is not set: point it at a "
                         "reward run (tuneforge train with task: reward)")
    from tuneforge.evaluate.rewards import RewardScorer

    scorer = RewardScorer.load(recipe.reward_model, device)
    return lambda completions, references, prompts: [float(x) for x in scorer.score(prompts, completions)]


def total_reward(rewards: list[tuple[str, Reward]], completions: list[str], references: list[str],
                 prompts: list[str]) -> list[float]:
    per_fn = [fn(completions, references, prompts) for _, fn in rewards]
    return [sum(scores) for scores in zip(*per_fn)]


def sample_groups(model, tokenizer, prompts: list[list[int]], keys: list[tuple[int, int]], recipe: Recipe,
                  context: int, device: torch.device) -> list[list[int]]:
    """`group_size` completions (token ids, ending with EOS when the model stopped) per prompt;
    completion j of the prompt with key (epoch, index) samples from seed (train.seed, epoch, index, j)."""
    cfg, seed = recipe.alignment, recipe.train.seed
    rows = []
    for prompt, (epoch, index) in zip(prompts, keys):
        for j in range(cfg.group_size):
            generator = torch.Generator().manual_seed(hash((seed, epoch, index, j)) % (2**63))
            rows.append(engine.GenRow(prompt=prompt, max_new=min(cfg.max_completion_tokens, context - len(prompt)),
                                      temperature=cfg.temperature, top_p=1.0, stops=[], emit=lambda text, why: None,
                                      cancelled=lambda: False, generator=generator))
    was_training = model.training
    model.eval()
    engine.generate(SimpleNamespace(model=model, tokenizer=tokenizer, context=context), rows, device)
    model.train(was_training)
    eos = tokenizer.eos_token_id
    return [row.tokens + ([eos] if row.finish == "stop" and eos is not None else []) for row in rows]


def completion_logps(model, prompts: list[list[int]], completions: list[list[int]], pad_id: int,
                     device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs of each completion after its prompt: ([n, T], mask [n, T]) over completion tokens."""
    seqs = [p + c for p, c in zip(prompts, completions)]
    labels = [[IGNORE_INDEX] * len(p) + c for p, c in zip(prompts, completions)]
    width = max(len(s) for s in seqs)
    label_tensor = torch.tensor([x + [IGNORE_INDEX] * (width - len(x)) for x in labels], device=device)
    logits = model(**collate(seqs, pad_id, device)).logits.float()
    return token_logps(logits, label_tensor)


def grpo_step_loss(model, tokenizer, batch_prompts, completions, rewards: torch.Tensor, recipe: Recipe,
                   device: torch.device) -> torch.Tensor:
    """The GRPO loss of one batch of sampled groups (one policy update per sample, so old = current)."""
    cfg = recipe.alignment
    prompts = [p for p in batch_prompts for _ in range(cfg.group_size)]
    advantages = group_advantages(rewards, cfg.group_size, scale=cfg.scale_rewards).to(device)
    logps, mask = completion_logps(model, prompts, completions, tokenizer.pad_token_id, device)
    ref = None
    if cfg.kl_coefficient > 0:
        with torch.no_grad(), model.disable_adapter():
            ref, _ = completion_logps(model, prompts, completions, tokenizer.pad_token_id, device)
    return grpo_loss(logps, logps.detach(), ref, advantages, mask.float(), epsilon_low=cfg.clip_epsilon,
                     epsilon_high=cfg.clip_epsilon, beta=cfg.kl_coefficient, loss_type=cfg.grpo_loss_type,
                     max_completion_length=cfg.max_completion_tokens)


def check_recipe(recipe: Recipe) -> None:
    if recipe.alignment.kl_coefficient > 0 and not METHODS[recipe.method.name].ADAPTER:
        raise ValueError(f"alignment.kl_coefficient > 0 needs the reference model, which method {recipe.method.name} "
                         "would have to keep as a second copy; use an adapter method (lora, dora, ia3) or "
                         "kl_coefficient 0")


def train(recipe: Recipe, output: Optional[str] = None, resume: bool = False, device: Optional[str] = None,
          quiet: bool = False) -> dict:
    # ---- setup
    best = registry.metric_for_best(recipe.metric_for_best, recipe.task)  # before any run folder exists
    check_recipe(recipe)
    run, dev = shared.open_run(recipe, output, resume, device)
    splits = shared.load_splits(recipe, run)
    shared.seed_everything(recipe.train.seed)
    model, tokenizer, _ = load_causal_lm(recipe.model, recipe.train.dropout, **load_options(recipe))
    model.to(dev)
    rewards = build_rewards(recipe, dev)
    context = min(getattr(model.config, "max_position_embeddings", 2048), recipe.train.max_length)
    prompts, references, prompt_texts = train_prompts(tokenizer, splits.train, recipe, context)
    test_set = sft.render_split(tokenizer, splits.test, recipe, "test")
    limit = recipe.eval.max_generate
    test_gen = splits.test[:limit] if limit is not None else splits.test
    # validation: greedy generations scored by the rewards (eval.validation_generate rows, else up to 32)
    val_gen = splits.validation[: recipe.eval.validation_generate or 32]
    baseline = scored_baseline(model, tokenizer, test_set, test_gen, rewards, recipe, run, dev)
    model = shared.apply_method(model, recipe).to(dev)
    n = len(prompts)

    def loss_sum(batch: list[int]) -> tuple[torch.Tensor, int]:
        keys = [(i // n, i % n) for i in batch]
        batch_prompts = [prompts[i] for _, i in keys]
        completions = sample_groups(model, tokenizer, batch_prompts, keys, recipe, context, dev)
        texts = [t.strip() for t in tokenizer.batch_decode(completions, skip_special_tokens=True)]
        group = recipe.alignment.group_size
        owners = [keys[k // group][1] for k in range(len(texts))]
        scores = torch.tensor(total_reward(rewards, texts, [references[i] for i in owners],
                                           [prompt_texts[i] for i in owners]), dtype=torch.float32)
        loss = grpo_step_loss(model, tokenizer, batch_prompts, completions, scores, recipe, dev)
        return loss * len(batch), len(batch)

    def evaluate() -> dict:
        return policy_scores(model, tokenizer, val_gen, rewards, recipe, dev)

    objective = Objective(
        # each index carries its epoch (epoch * n + i), so sampling seeds differ between epochs
        plan=lambda epoch: [[[epoch * n + i for i in micro] for micro in step] for step in plan_epoch(
            [len(p) for p in prompts], recipe.train.batch_size, recipe.train.gradient_accumulation,
            recipe.train.seed, epoch, recipe.train.group_by_length)],
        units=len, loss_sum=loss_sum, evaluate=evaluate if val_gen else None,
        metric=best.name, higher_is_better=best.higher_is_better,
    )

    # ---- train
    fit(model, objective, recipe.train, recipe.learning_rate, run, dev, resume=resume, quiet=quiet)
    if not distributed.is_main():
        return {}
    # ---- save
    model = shared.save_final_model(model, tokenizer, recipe, run)

    # ---- evaluate the saved (merged) model next to the base model
    validation = policy_scores(model, tokenizer, val_gen, rewards, recipe, dev) if val_gen else None
    if not test_set:
        console.print("[yellow]no test rows: test metrics are empty")
        return shared.report(run, recipe, {"metrics": {}}, validation, "base model")
    result = sft.score(model, tokenizer, test_set, test_gen, recipe, dev, baseline=baseline, final=True)
    result["metrics"]["mean_reward"] = policy_scores(model, tokenizer, test_gen, rewards, recipe, dev)["mean_reward"]
    result["metrics"]["reference_perplexity"] = sft.reference_perplexity(model, tokenizer, recipe, dev)
    return shared.report(run, recipe, result, validation, "base model")


def train_prompts(tokenizer, rows: list[dict], recipe: Recipe, context: int):
    """(prompt token ids, reference answers, prompt texts) of the training rows whose prompt leaves room to sample."""
    prompts, references, texts, dropped = [], [], [], 0
    for row in rows:
        messages, reference = prompt_and_reference(row, recipe.data.system_prompt)
        ids = encode_prompt(tokenizer, messages)
        if len(ids) >= context:
            dropped += 1
            continue
        prompts.append(ids)
        references.append(reference)
        texts.append(messages[-1]["content"])
    if dropped:
        console.print(f"[yellow]train: {dropped} prompts dropped: no room to sample within train.max_length={context}")
    if not prompts:
        raise ValueError("no training prompt fits train.max_length with room to sample; raise train.max_length")
    return prompts, references, texts


def scored_baseline(model, tokenizer, test_set, test_gen, rewards, recipe: Recipe, run, dev) -> Optional[dict]:
    """The untouched model on the test split, measured before any weight moves (kept for a resumed run)."""
    baseline = shared.baseline_cached(run)
    if baseline is None and recipe.eval.baseline and test_set:
        console.print("scoring the base model on the test split ...")
        result = sft.score(model, tokenizer, test_set, test_gen, recipe, dev)
        result["metrics"]["mean_reward"] = policy_scores(model, tokenizer, test_gen, rewards, recipe, dev)[
            "mean_reward"]
        result["metrics"]["reference_perplexity"] = sft.reference_perplexity(model, tokenizer, recipe, dev)
        baseline = {"metrics": result["metrics"], "predictions": result["predictions"]}
        run.write_json("baseline.json", baseline)
    return baseline


@torch.no_grad()
def policy_scores(model, tokenizer, rows: list[dict], rewards, recipe: Recipe, dev) -> dict:
    """Greedy generations on `rows`: their mean total reward and exact match."""
    from tuneforge.inference import generate

    pairs = [prompt_and_reference(r, recipe.data.system_prompt) for r in rows]
    prompts = [encode_prompt(tokenizer, messages) for messages, _ in pairs]
    bs = recipe.train.eval_batch_size or 2 * recipe.train.batch_size
    texts = generate(model, tokenizer, prompts, recipe.alignment.max_completion_tokens, bs, dev)
    references = [ref for _, ref in pairs]
    total = total_reward(rewards, texts, references, [m[-1]["content"] for m, _ in pairs])
    exact = [exact_match_reward(t, ref) for t, ref in zip(texts, references)]
    return {"mean_reward": sum(total) / max(len(total), 1), "exact_match": sum(exact) / max(len(exact), 1)}
