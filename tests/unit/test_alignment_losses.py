"""tuneforge.alignment.losses against TRL 1.16 as the oracle.

Each loss is compared, value and gradients w.r.t. the policy parameters, with the installed TRL trainer that owns
it, driven as directly as offline allows: the trainer is instantiated on a tiny in-memory dataset (a word-level
tokenizer built here, a tiny random Llama, no download) and its own loss method is called on one batch from its
own collator. Where TRL 1.16 has the formula only inside a method that needs no trainer state (CPO's cpo_loss,
ORPO's odds_ratio_loss) that method is called with a stand-in `self`. TRL 1.16 has no PPO trainer any more (no
`trl.trainer.ppo_trainer`, nothing in `trl.experimental`), so GAE, whitening and the PPO losses are checked
against plain-python loops written out here. Every comparison is paired with a deliberately wrong input that
must NOT match, so each check is shown to be sensitive.
"""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, PreTrainedTokenizerFast
from trl import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer, KTOConfig, KTOTrainer, RewardConfig, RewardTrainer
from trl.experimental.cpo import CPOConfig, CPOTrainer
from trl.experimental.orpo import ORPOConfig, ORPOTrainer

from tuneforge.alignment.losses import (
    DPO_LOSSES,
    IGNORE_INDEX,
    dpo_loss,
    gae,
    group_advantages,
    grpo_loss,
    kto_kl_estimate,
    kto_loss,
    ppo_policy_loss,
    ppo_value_loss,
    reward_loss,
    sequence_logps,
    token_logps,
    whiten,
)

TOL = 1e-5
PAIRS = [  # prompts and completions of different lengths, so padding and length normalisation matter
    {"prompt": "w1 w2 w3", "chosen": " w4 w5", "rejected": " w6"},
    {"prompt": "w7 w8", "chosen": " w9", "rejected": " w10 w11 w12"},
    {"prompt": "w13", "chosen": " w14 w15 w16", "rejected": " w17 w18"},
    {"prompt": "w19 w20 w21 w22", "chosen": " w23", "rejected": " w24"},
]


# --- tiny offline models and helpers --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over 128 ids (no download): '<pad>'=0, '</s>'=1, '<unk>'=2, 'w0'..'w124'."""
    vocab = {w: i for i, w in enumerate(["<pad>", "</s>", "<unk>"] + [f"w{i}" for i in range(125)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def tiny_config(**extra) -> LlamaConfig:
    return LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                       attention_dropout=0.0, pad_token_id=0, eos_token_id=1, bos_token_id=1, **extra)


def tiny_lm(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_config()).float()


def perturbed_copy(model: torch.nn.Module, seed: int = 1, scale: float = 0.05) -> torch.nn.Module:
    """A reference model near the policy but not equal to it, so the log-ratios are not all zero."""
    ref = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return ref


def trl_args(cls, tmp_path, **kwargs):
    """A TRL config for CPU and float32: TRL 1.16 configs default to bf16=True, which GRPOTrainer's forward honours
    through accelerator.autocast() even on CPU (~1e-3 off); the comparisons here are float32."""
    return cls(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, bf16=False,
               per_device_train_batch_size=4, save_strategy="no", **kwargs)


def grads_of(model: torch.nn.Module, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def max_grad_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys() and len(a) > 0
    return max((a[k] - b[k]).abs().max().item() for k in a)


def assert_matches(ours: torch.Tensor, theirs: torch.Tensor, our_grads, their_grads, what: str) -> None:
    loss_diff = (ours.detach() - theirs.detach()).abs().max().item()
    grad_diff = max_grad_diff(our_grads, their_grads)
    print(f"[maxdiff] {what}: loss {loss_diff:.2e} grad {grad_diff:.2e}")
    assert loss_diff <= TOL, f"{what}: loss {ours.item()} vs TRL {theirs.item()}"
    assert grad_diff <= TOL, f"{what}: gradients differ by {grad_diff}"


def first_batch(trainer):
    return trainer.data_collator([trainer.train_dataset[i] for i in range(len(trainer.train_dataset))])


def completion_labels(input_ids: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    return input_ids.masked_fill(completion_mask == 0, IGNORE_INDEX)


def seq_logps(model, input_ids, attention_mask, labels):
    return sequence_logps(model(input_ids=input_ids, attention_mask=attention_mask).logits, labels)


# --- log-probs ------------------------------------------------------------------------------------------------


def test_sequence_logps_matches_trl_get_batch_logps():
    """Labels aligned with input_ids (shifted inside), as TRL's get_batch_logps and fused LM head take them."""
    torch.manual_seed(3)
    logits = torch.randn(3, 7, 128)
    labels = torch.randint(3, 128, (3, 7))
    labels[0, :3] = labels[1, :5] = labels[2, :2] = IGNORE_INDEX
    labels[2, 6] = IGNORE_INDEX  # right padding
    total, count = sequence_logps(logits, labels)
    trl_sum = CPOTrainer.get_batch_logps(logits, labels.clone(), average_log_prob=False)
    trl_mean = CPOTrainer.get_batch_logps(logits, labels.clone(), average_log_prob=True)
    assert count.tolist() == [4, 2, 4]
    assert torch.allclose(total, trl_sum, atol=TOL) and torch.allclose(total / count, trl_mean, atol=TOL)
    per_token, mask = token_logps(logits, labels)
    assert per_token.shape == (3, 6) and torch.equal(per_token[~mask], torch.zeros(int((~mask).sum())))
    # broken: scoring labels without the shift gives other numbers
    unshifted = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    assert not torch.allclose((unshifted * (labels != IGNORE_INDEX)).sum(-1), trl_sum, atol=1e-3)


# --- DPO family -----------------------------------------------------------------------------------------------


def test_dpo_at_step_zero_is_ln2_and_ties_are_not_wins(tokenizer):
    """Policy == reference: every log-ratio is 0, so the sigmoid loss is ln 2 and no pair is won."""
    model = tiny_lm()
    ids = torch.tensor([[4, 5, 6, 7, 8, 1], [10, 11, 12, 1, 0, 0]])
    attn = (ids != 0).long()
    chosen_labels = ids.masked_fill(torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 1, 1]]).bool(), IGNORE_INDEX)
    rejected_labels = ids.masked_fill(torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 1, 1]]).bool(), IGNORE_INDEX)
    with torch.no_grad():
        pc, _ = seq_logps(model, ids, attn, chosen_labels)
        pr, _ = seq_logps(model, ids, attn, rejected_labels)
    out = dpo_loss(pc, pr, pc.clone(), pr.clone(), loss_type="sigmoid", beta=0.1)
    assert abs(out.loss.item() - math.log(2)) <= 1e-6
    assert out.reward_accuracy.item() == 0.0 and torch.equal(out.margins, torch.zeros(2))
    # broken: a policy that moved gives another loss, and a strict win counts
    moved = dpo_loss(pc + 1.0, pr, pc, pr, loss_type="sigmoid", beta=0.1)
    assert abs(moved.loss.item() - math.log(2)) > 1e-3 and moved.reward_accuracy.item() == 1.0


def ours_dpo_from_trl_batch(policy, ref, batch, **kwargs):
    """Our side of a DPOTrainer batch: [chosen; rejected] rows, completion tokens scored."""
    labels = completion_labels(batch["input_ids"], batch["completion_mask"])
    logps, lens = seq_logps(policy, batch["input_ids"], batch["attention_mask"], labels)
    with torch.no_grad():
        ref_logps, _ = seq_logps(ref, batch["input_ids"], batch["attention_mask"], labels)
    (pc, pr), (rc, rr), (nc, nr) = logps.chunk(2), ref_logps.chunk(2), lens.chunk(2)
    return dpo_loss(pc, pr, rc, rr, chosen_len=nc, rejected_len=nr, **kwargs)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_dpo_losses_match_trl_dpo_trainer(loss_type, tokenizer, tmp_path):
    """DPOTrainer._compute_loss (via compute_loss) on one collated batch; the reference is a perturbed copy."""
    policy = tiny_lm()
    ref = perturbed_copy(policy)
    beta = 0.1
    args = trl_args(DPOConfig, tmp_path, beta=beta, loss_type=[loss_type])
    trainer = DPOTrainer(model=policy, ref_model=ref, args=args, train_dataset=Dataset.from_list(PAIRS),
                         processing_class=tokenizer)
    batch = first_batch(trainer)
    trl_loss = trainer.compute_loss(trainer.model, batch)
    trl_grads = grads_of(trainer.model, trl_loss)

    out = ours_dpo_from_trl_batch(trainer.model, ref, batch, loss_type=loss_type, beta=beta)
    assert_matches(out.loss, trl_loss, grads_of(trainer.model, out.loss), trl_grads, f"dpo {loss_type}")
    logged = trainer._metrics["train"]
    assert abs(out.reward_accuracy.item() - logged["rewards/accuracies"][-1]) <= TOL
    assert abs(out.margins.mean().item() - logged["rewards/margins"][-1]) <= TOL
    assert abs(out.chosen_rewards.mean().item() - logged["rewards/chosen"][-1]) <= TOL
    with torch.no_grad():  # broken: another beta is another loss
        wrong = ours_dpo_from_trl_batch(trainer.model, ref, batch, loss_type=loss_type, beta=2 * beta)
    assert abs(wrong.loss.item() - trl_loss.item()) > 1e-4


def cpo_side(model, batch, side: str):
    return seq_logps(model, batch[f"{side}_input_ids"], batch[f"{side}_attention_mask"], batch[f"{side}_labels"])


def test_simpo_matches_trl_cpo_trainer(tokenizer, tmp_path):
    """SimPO lives in TRL 1.16's experimental CPOTrainer (loss_type='simpo', cpo_alpha=0): get_batch_loss_metrics."""
    policy = tiny_lm()
    beta, gamma = 2.0, 0.5
    args = trl_args(CPOConfig, tmp_path, beta=beta, simpo_gamma=gamma, loss_type="simpo", cpo_alpha=0.0,
                    max_length=64)
    trainer = CPOTrainer(model=policy, args=args, train_dataset=Dataset.from_list(PAIRS), processing_class=tokenizer)
    batch = first_batch(trainer)
    trl_loss, metrics = trainer.get_batch_loss_metrics(trainer.model, batch)
    trl_grads = grads_of(trainer.model, trl_loss)

    (pc, nc), (pr, nr) = cpo_side(trainer.model, batch, "chosen"), cpo_side(trainer.model, batch, "rejected")
    out = dpo_loss(pc, pr, loss_type="simpo", beta=beta, gamma=gamma, chosen_len=nc, rejected_len=nr)
    assert_matches(out.loss, trl_loss, grads_of(trainer.model, out.loss), trl_grads, "simpo")
    assert abs(out.chosen_rewards.mean().item() - metrics["rewards/chosen"]) <= TOL
    assert abs(out.reward_accuracy.item() - metrics["rewards/accuracies"]) <= TOL
    wrong = dpo_loss(pc, pr, loss_type="simpo", beta=beta, gamma=0.0, chosen_len=nc, rejected_len=nr)
    assert abs(wrong.loss.item() - trl_loss.item()) > 1e-4  # broken: no target margin
    summed = dpo_loss(pc, pr, loss_type="simpo", beta=beta, gamma=gamma, chosen_len=nc * 0 + 1, rejected_len=nr * 0 + 1)
    assert abs(summed.loss.item() - trl_loss.item()) > 1e-4  # broken: not length-normalised


def test_orpo_matches_trl_orpo_trainer(tokenizer, tmp_path):
    """ORPOTrainer.get_batch_loss_metrics: chosen NLL (token mean, prompt + completion) - beta log sigmoid(OR)."""
    policy = tiny_lm()
    beta = 0.5
    args = trl_args(ORPOConfig, tmp_path, beta=beta, max_length=64)
    trainer = ORPOTrainer(model=policy, args=args, train_dataset=Dataset.from_list(PAIRS), processing_class=tokenizer)
    batch = first_batch(trainer)
    trl_loss, _ = trainer.get_batch_loss_metrics(trainer.model, batch)
    trl_grads = grads_of(trainer.model, trl_loss)

    def ours(beta_: float) -> torch.Tensor:
        (pc, nc), (pr, nr) = cpo_side(trainer.model, batch, "chosen"), cpo_side(trainer.model, batch, "rejected")
        ids, attn = batch["chosen_input_ids"], batch["chosen_attention_mask"]
        full, count = seq_logps(trainer.model, ids, attn, ids.masked_fill(attn == 0, IGNORE_INDEX))
        nll = -full.sum() / count.sum()
        return nll + dpo_loss(pc, pr, loss_type="orpo", beta=beta_, chosen_len=nc, rejected_len=nr).loss

    loss = ours(beta)
    assert_matches(loss, trl_loss, grads_of(trainer.model, loss), trl_grads, "orpo")
    with torch.no_grad():
        assert abs(ours(2 * beta).item() - trl_loss.item()) > 1e-4  # broken: another lambda


@pytest.mark.parametrize("loss_type", ["sigmoid", "simpo"])
def test_label_smoothing_matches_trl_conservative_form(loss_type):
    """TRL 1.16's DPOTrainer 'sigmoid' ignores label_smoothing; its conservative-DPO form is CPOTrainer.cpo_loss
    (reference-free, i.e. DPO with zero reference log-probs), called here with a stand-in trainer."""
    torch.manual_seed(4)
    pc, pr = -torch.rand(6) * 20, -torch.rand(6) * 20
    n = torch.tensor([3, 5, 2, 7, 4, 1])
    beta, eps, gamma = 0.3, 0.15, 0.4
    stand_in = SimpleNamespace(alpha=0.0, beta=beta, label_smoothing=eps, loss_type=loss_type, simpo_gamma=gamma,
                               accelerator=SimpleNamespace(device=torch.device("cpu")))
    if loss_type == "simpo":  # CPO feeds simpo mean log-probs
        theirs, chosen_r, _ = CPOTrainer.cpo_loss(stand_in, pc / n, pr / n)
        out = dpo_loss(pc, pr, loss_type="simpo", beta=beta, label_smoothing=eps, gamma=gamma, chosen_len=n,
                       rejected_len=n)
    else:
        theirs, chosen_r, _ = CPOTrainer.cpo_loss(stand_in, pc, pr)
        out = dpo_loss(pc, pr, torch.zeros(6), torch.zeros(6), loss_type="sigmoid", beta=beta, label_smoothing=eps)
    print(f"[maxdiff] label smoothing {loss_type}: {(out.losses - theirs).abs().max().item():.2e}")
    assert torch.allclose(out.losses, theirs, atol=TOL) and torch.allclose(out.chosen_rewards, chosen_r, atol=TOL)
    unsmoothed = dpo_loss(pc, pr, torch.zeros(6), torch.zeros(6), loss_type="sigmoid", beta=beta)
    assert not torch.allclose(unsmoothed.losses, theirs, atol=1e-3)


def test_dpo_loss_refuses_what_it_cannot_compute():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="unknown loss_type"):
        dpo_loss(x, x, x, x, loss_type="nope", beta=0.1)
    with pytest.raises(ValueError, match="chosen_len"):
        dpo_loss(x, x, x, x, loss_type="ipo", beta=0.1)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(x, x, x, x, loss_type="hinge", beta=0.1, label_smoothing=0.1)
    with pytest.raises(ValueError, match="ref_chosen"):
        dpo_loss(x, x, loss_type="sigmoid", beta=0.1)
    assert set(DPO_LOSSES) == {"sigmoid", "ipo", "hinge", "simpo", "orpo"}


# --- KTO ------------------------------------------------------------------------------------------------------


def test_kto_matches_trl_kto_trainer(tokenizer, tmp_path):
    """KTOTrainer._compute_loss (via compute_loss), KL term from its own mismatched-completion batch."""
    policy = tiny_lm()
    ref = perturbed_copy(policy)
    rows = [{"prompt": p["prompt"], "completion": p["chosen"] if i % 2 == 0 else p["rejected"], "label": i % 2 == 0}
            for i, p in enumerate(PAIRS)]
    beta, w_d, w_u = 0.1, 1.0, 1.3
    args = trl_args(KTOConfig, tmp_path, beta=beta, desirable_weight=w_d, undesirable_weight=w_u)
    trainer = KTOTrainer(model=policy, ref_model=ref, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=tokenizer)
    batch = first_batch(trainer)
    trl_loss = trainer.compute_loss(trainer.model, batch)
    trl_grads = grads_of(trainer.model, trl_loss)

    model = trainer.model
    labels = completion_labels(batch["input_ids"], batch["completion_mask"])
    kl_labels = completion_labels(batch["KL_input_ids"], batch["KL_completion_mask"])
    logps, _ = seq_logps(model, batch["input_ids"], batch["attention_mask"], labels)
    with torch.no_grad():
        ref_logps, _ = seq_logps(ref, batch["input_ids"], batch["attention_mask"], labels)
        kl_policy, _ = seq_logps(model, batch["KL_input_ids"], batch["KL_attention_mask"], kl_labels)
        kl_ref, _ = seq_logps(ref, batch["KL_input_ids"], batch["KL_attention_mask"], kl_labels)
    kl = kto_kl_estimate(kl_policy, kl_ref)
    assert kl.item() > 1e-3 and abs(kl.item() - trainer._metrics["train"]["kl"][-1]) <= TOL
    assert kto_kl_estimate(kl_ref, kl_policy).item() == 0.0  # a negative estimate is clamped to 0, as TRL does
    out = kto_loss(logps, ref_logps, batch["label"], kl, beta, desirable_weight=w_d, undesirable_weight=w_u)
    assert_matches(out.loss, trl_loss, grads_of(model, out.loss), trl_grads, "kto")
    wrong = kto_loss(logps.detach(), ref_logps, batch["label"], 0.0, beta, desirable_weight=w_d,
                     undesirable_weight=w_u)
    assert abs(wrong.loss.item() - trl_loss.item()) > 1e-5  # broken: no reference point


# --- reward model ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_margin, center", [(False, None), (True, None), (False, 0.05), (True, 0.05)])
def test_reward_loss_matches_trl_reward_trainer(with_margin, center, tokenizer, tmp_path):
    """RewardTrainer.compute_loss on a tiny LlamaForSequenceClassification (num_labels=1)."""
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(tiny_config(num_labels=1)).float()
    rows = [{"chosen": p["prompt"] + p["chosen"], "rejected": p["prompt"] + p["rejected"]} for p in PAIRS]
    if with_margin:
        rows = [{**r, "margin": m} for r, m in zip(rows, [0.5, 1.0, 0.0, 2.0])]
    args = trl_args(RewardConfig, tmp_path, center_rewards_coefficient=center)
    trainer = RewardTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    batch = first_batch(trainer)
    trl_loss = trainer.compute_loss(trainer.model, dict(batch))
    trl_grads = grads_of(trainer.model, trl_loss)

    def ours(margin, coefficient):
        scores = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        r_chosen, r_rejected = scores.squeeze(-1).chunk(2)
        return reward_loss(r_chosen, r_rejected, margin=margin, center_coefficient=coefficient)

    loss = ours(batch.get("margin"), center or 0.0)
    what = f"reward margin={with_margin} center={center}"
    assert_matches(loss, trl_loss, grads_of(trainer.model, loss), trl_grads, what)
    with torch.no_grad():  # broken: dropping the margin / the centring term changes the number
        if with_margin:
            assert abs(ours(None, center or 0.0).item() - trl_loss.item()) > 1e-4
        if center:
            assert abs(ours(batch.get("margin"), 0.0).item() - trl_loss.item()) > 1e-5


# --- GRPO -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def grpo_model_dir(tmp_path_factory, tokenizer):
    """GRPOTrainer with beta > 0 loads its reference model from the policy's path: save the tiny LM locally."""
    path = tmp_path_factory.mktemp("tiny-grpo")
    tiny_lm().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def grpo_trainer(model_dir, tokenizer, tmp_path, reward_func=None, **kwargs) -> GRPOTrainer:
    args = trl_args(GRPOConfig, tmp_path, num_generations=4, max_completion_length=6, **kwargs)
    rows = Dataset.from_list([{"prompt": "w1 w2 w3"}, {"prompt": "w7 w8"}])
    return GRPOTrainer(model=model_dir, reward_funcs=reward_func or (lambda completions, **_: [0.0] * len(completions)),
                       args=args, train_dataset=rows, processing_class=tokenizer)


@pytest.mark.parametrize("scale_rewards", ["group", "none"])
def test_group_advantages_match_trl_grpo_scoring(scale_rewards, grpo_model_dir, tokenizer, tmp_path):
    """GRPOTrainer._generate_and_score_completions: generate 2 prompts x 4 completions, score, normalise per group."""
    seen: list[list[float]] = []

    def reward(completions, **_):
        seen.append([float(len(c)) + 0.37 * (i % 3) for i, c in enumerate(completions)])
        return seen[-1]

    trainer = grpo_trainer(grpo_model_dir, tokenizer, tmp_path, reward, scale_rewards=scale_rewards)
    torch.manual_seed(0)
    out = trainer._generate_and_score_completions([{"prompt": "w1 w2 w3"}] * 4 + [{"prompt": "w7 w8"}] * 4)
    rewards = torch.tensor(seen[-1])
    ours = group_advantages(rewards, group_size=4, scale=scale_rewards == "group")
    print(f"[maxdiff] group advantages {scale_rewards}: {(ours - out['advantages']).abs().max().item():.2e}")
    assert torch.allclose(ours, out["advantages"], atol=TOL)
    assert not torch.allclose(group_advantages(rewards, group_size=2, scale=scale_rewards == "group"),
                              out["advantages"], atol=1e-3)  # broken: wrong groups
    if scale_rewards == "group":  # broken: population std instead of TRL's n - 1
        grouped = rewards.view(2, 4)
        population = ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, unbiased=False, keepdim=True) + 1e-4))
        assert not torch.allclose(population.reshape(-1), out["advantages"], atol=1e-3)


def grpo_inputs(model) -> tuple[dict, torch.Tensor]:
    """A fixed GRPO batch: left-padded prompts, right-padded completions, off-policy old log-probs (so some tokens
    clip), a reference away from the policy. Returns the inputs dict GRPOTrainer reads and our per-token logps."""
    prompt_ids = torch.tensor([[0, 4, 5, 6], [7, 8, 9, 10]] * 2)
    completion_ids = torch.tensor([[11, 12, 13, 1], [14, 15, 1, 0], [16, 1, 0, 0], [17, 18, 19, 20]])
    prompt_mask, completion_mask = (prompt_ids != 0).long(), (completion_ids != 0).long()
    ids, attn = torch.cat([prompt_ids, completion_ids], 1), torch.cat([prompt_mask, completion_mask], 1)
    logps, _ = token_logps(model(input_ids=ids, attention_mask=attn).logits, ids.masked_fill(attn == 0, IGNORE_INDEX))
    logps = logps[:, -completion_ids.size(1):]
    gen = torch.Generator().manual_seed(5)
    offsets = 0.3 * torch.randn(logps.shape, generator=gen)
    inputs = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
              "completion_mask": completion_mask, "advantages": torch.tensor([1.2, -0.7, 0.4, -0.9]),
              "old_per_token_logps": (logps.detach() + offsets) * completion_mask,
              "ref_per_token_logps": (logps.detach() - 0.5 * offsets.flip(0)) * completion_mask,
              "num_items_in_batch": completion_mask.sum()}
    return inputs, logps


@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "bnpo", "dr_grpo"])
def test_grpo_loss_matches_trl_grpo_trainer(loss_type, beta, grpo_model_dir, tokenizer, tmp_path):
    """GRPOTrainer._compute_loss (via compute_loss) on an inputs dict built here. The model is loaded in eval mode,
    so TRL applies no gradient-accumulation scaling."""
    trainer = grpo_trainer(grpo_model_dir, tokenizer, tmp_path, beta=beta, loss_type=loss_type, epsilon=0.2,
                           epsilon_high=0.28)
    model = trainer.model
    inputs, logps = grpo_inputs(model)
    trl_loss = trainer.compute_loss(model, inputs)
    trl_grads = grads_of(model, trl_loss)
    ratio = torch.exp(logps.detach() - inputs["old_per_token_logps"])[inputs["completion_mask"].bool()]
    assert ((ratio < 0.8) | (ratio > 1.28)).any() and ((ratio > 0.8) & (ratio < 1.28)).any()  # both branches used

    def ours(logps_, **overrides):
        kwargs = dict(epsilon_low=0.2, epsilon_high=0.28, beta=beta, loss_type=loss_type,
                      num_items=inputs["num_items_in_batch"], max_completion_length=6) | overrides
        return grpo_loss(logps_, inputs["old_per_token_logps"], inputs["ref_per_token_logps"], inputs["advantages"],
                         inputs["completion_mask"], **kwargs)

    loss = ours(logps)
    assert_matches(loss, trl_loss, grads_of(model, loss), trl_grads, f"grpo {loss_type} beta={beta}")
    broken = {"epsilon_low": 0.05, "epsilon_high": 0.05} if beta == 0.0 else {"beta": 4 * beta}
    assert abs(ours(logps.detach(), **broken).item() - trl_loss.item()) > 1e-5


# --- PPO (TRL 1.16 has no PPO trainer: hand-computed loops as the oracle) -------------------------------------

PPO_MASK = [[1, 1, 1, 1], [1, 1, 0, 0]]
PPO_REWARDS = [[0.1, -0.2, 0.0, 1.0], [0.3, 0.5, 9.0, 9.0]]  # the 9s sit in padding and must be ignored
PPO_VALUES = [[0.5, 0.4, 0.2, 0.6], [0.1, -0.3, 7.0, 7.0]]


def loop_gae(gamma: float, lam: float) -> tuple[list[list[float]], list[list[float]]]:
    advantages, returns = [], []
    for rewards, values, mask in zip(PPO_REWARDS, PPO_VALUES, PPO_MASK):
        n = sum(mask)
        row, running = [0.0] * len(mask), 0.0
        for t in reversed(range(n)):
            next_value = values[t + 1] if t + 1 < n else 0.0
            running = rewards[t] + gamma * next_value - values[t] + gamma * lam * running
            row[t] = running
        advantages.append(row)
        returns.append([row[t] + values[t] if t < n else 0.0 for t in range(len(mask))])
    return advantages, returns


def test_gae_and_whiten_match_hand_loops():
    mask = torch.tensor(PPO_MASK)
    advantages, returns = gae(torch.tensor(PPO_REWARDS), torch.tensor(PPO_VALUES), mask, gamma=0.9, lam=0.8)
    want_adv, want_ret = loop_gae(0.9, 0.8)
    assert torch.allclose(advantages, torch.tensor(want_adv), atol=1e-6)
    assert torch.allclose(returns, torch.tensor(want_ret), atol=1e-6)
    assert abs(want_adv[1][1] - (0.5 - (-0.3))) < 1e-9  # the last real token bootstraps from 0, not the padding
    wrong, _ = gae(torch.tensor(PPO_REWARDS), torch.tensor(PPO_VALUES), mask, gamma=0.9, lam=1.0)
    assert not torch.allclose(wrong, torch.tensor(want_adv), atol=1e-3)  # broken: another lambda

    flat = [a for row, m in zip(want_adv, PPO_MASK) for a, k in zip(row, m) if k]
    mean = sum(flat) / len(flat)
    var = sum((a - mean) ** 2 for a in flat) / (len(flat) - 1)  # Bessel, as TRL's former masked_whiten
    want = [[(a - mean) / math.sqrt(var + 1e-8) if k else 0.0 for a, k in zip(row, m)] for row, m in
            zip(want_adv, PPO_MASK)]
    assert torch.allclose(whiten(advantages, mask), torch.tensor(want), atol=1e-5)
    shifted = [[(w + mean) if k else 0.0 for w, k in zip(row, m)] for row, m in zip(want, PPO_MASK)]
    assert torch.allclose(whiten(advantages, mask, shift_mean=False), torch.tensor(shifted), atol=1e-5)
    biased = [[(a - mean) / math.sqrt(var * (len(flat) - 1) / len(flat)) if k else 0.0 for a, k in zip(row, m)]
              for row, m in zip(want_adv, PPO_MASK)]
    assert not torch.allclose(whiten(advantages, mask), torch.tensor(biased), atol=1e-3)  # broken: n, not n - 1


def test_ppo_policy_and_value_losses_match_hand_loops():
    mask = [[1, 1, 1, 0], [1, 1, 1, 1]]
    logps = [[-1.0, -0.5, -2.0, -3.0], [-0.2, -1.5, -0.9, -0.4]]
    old = [[-1.3, -0.5, -1.6, -3.0], [-0.2, -1.1, -1.2, -0.1]]
    adv = [[1.0, -0.5, 2.0, 5.0], [-1.0, 0.7, -0.3, 1.5]]
    values = [[0.5, 0.9, -0.2, 4.0], [0.3, 0.0, 1.1, 0.6]]
    old_values = [[0.2, 1.0, 0.1, 0.0], [0.3, 0.5, 0.7, 0.2]]
    returns = [[1.0, 0.4, 0.3, 9.0], [0.0, 0.6, 1.5, 0.5]]
    clip, clip_value = 0.2, 0.25
    pg, vf, n = 0.0, 0.0, 0
    for b in range(2):
        for t in range(4):
            if not mask[b][t]:
                continue
            ratio = math.exp(logps[b][t] - old[b][t])
            pg += max(-adv[b][t] * ratio, -adv[b][t] * min(max(ratio, 1 - clip), 1 + clip))
            v_clip = min(max(values[b][t], old_values[b][t] - clip_value), old_values[b][t] + clip_value)
            vf += max((values[b][t] - returns[b][t]) ** 2, (v_clip - returns[b][t]) ** 2)
            n += 1
    T = torch.tensor
    policy = ppo_policy_loss(T(logps), T(old), T(adv), T(mask), clip=clip)
    value = ppo_value_loss(T(values), T(old_values), T(returns), T(mask), clip_value=clip_value)
    assert abs(policy.item() - pg / n) < 1e-6 and abs(value.item() - 0.5 * vf / n) < 1e-6
    assert abs(ppo_policy_loss(T(logps), T(old), T(adv), T(mask), clip=10.0).item() - pg / n) > 1e-3  # no clipping
    assert abs(ppo_value_loss(T(values), T(old_values), T(returns), T(mask), clip_value=100.0).item()
               - 0.5 * vf / n) > 1e-3
