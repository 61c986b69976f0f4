"""Every method x task on tiny random models: the right weights move, frozen ones
do not, and saved artefacts reload to the same logits."""

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tuneforge import api, catalog

MODELS = {"classification": "tiny-bert", "sft": "tiny-llama"}
# each method's own keys (a key of another method is refused)
METHOD_SETTINGS = {"freeze": {"name": "freeze", "trainable_layers": 1},
                   "lora": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0}}


def _train(tmp_path, task, method, data_file, model=None, **extra):
    recipe = {
        "model": model or MODELS[task], "task": task, "data": {"train": str(data_file)},
        "method": METHOD_SETTINGS.get(method, {"name": method}),
        "train": {"max_steps": 4, "batch_size": 8, "learning_rate": 1e-2, "warmup": 0, "log_every": 1,
                  "eval_every": 2},
        "eval": {"max_new_tokens": 4, "max_generate": 4},
    }
    for key, value in extra.items():
        recipe[key].update(value)
    out = tmp_path / f"{task}-{method}"
    metrics = api.train(recipe, output=str(out), quiet=True)
    return out, metrics


def _base_weights(task) -> dict[str, torch.Tensor]:
    return load_file(str(Path(catalog.resolve(MODELS[task])) / "model.safetensors"))


def _changed(task, final: dict, base: dict) -> dict[str, bool]:
    out = {}
    for key, tensor in final.items():
        base_key = key.removeprefix("bert.") if task == "classification" else key
        if base_key in base:
            out[key] = not torch.equal(tensor, base[base_key])
    return out


@pytest.fixture
def data_for(sentiment_csv, dates_jsonl):
    return {"classification": sentiment_csv, "sft": dates_jsonl}


@pytest.mark.parametrize("task", ["classification", "sft"])
@pytest.mark.parametrize("method", ["full", "freeze", "lora"])
def test_method_moves_exactly_the_trainable_weights(tmp_path, data_for, task, method):
    out, metrics = _train(tmp_path, task, method, data_for[task])
    assert set(metrics) == {"test", "baseline", "validation", "verdict"}
    final = load_file(str(out / "model" / "model.safetensors"))
    changed = _changed(task, final, _base_weights(task))
    assert changed, "no weights matched the base model"
    embeddings = [k for k in changed if "embed" in k]
    if method == "full":
        assert all(changed.values()), [k for k, v in changed.items() if not v]
    elif method == "freeze":
        top = ".layer.2." if task == "classification" else ".layers.2."
        for key, moved in changed.items():
            assert moved == (top in key or "pooler" in key or key.startswith("model.norm")), key
    else:  # lora: merged linear weights move; embeddings and norms stay put
        assert not any(changed[k] for k in embeddings)
        assert not any(v for k, v in changed.items() if "norm" in k.lower())
        assert any(v for k, v in changed.items() if "dense" in k or "proj" in k)
    if task == "classification":
        head = final["classifier.weight"]
        assert head.shape[0] == 2
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len([x for x in lines if '"split": "validation"' in x]) == 2


@pytest.mark.parametrize("task", ["classification", "sft"])
def test_lora_adapter_reloads_with_plain_peft_and_matches_merged(tmp_path, data_for, task):
    from peft import PeftModel
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    out, _ = _train(tmp_path, task, "lora", data_for[task])
    base_path = catalog.resolve(MODELS[task])
    tok = AutoTokenizer.from_pretrained(out / "model")
    batch = tok(["the plot was superb", "Convert to YYYY-MM-DD: 5 May 2001"], return_tensors="pt", padding=True)
    if task == "classification":
        merged = AutoModelForSequenceClassification.from_pretrained(out / "model")
        base = AutoModelForSequenceClassification.from_pretrained(
            base_path, num_labels=2, id2label=merged.config.id2label, label2id=merged.config.label2id)
    else:
        merged = AutoModelForCausalLM.from_pretrained(out / "model")
        base = AutoModelForCausalLM.from_pretrained(base_path)
    untouched = base(**batch).logits.detach().clone()
    adapted = PeftModel.from_pretrained(base, out / "model" / "adapter").eval()
    with torch.no_grad():
        a = adapted(**batch).logits
        m = merged.eval()(**batch).logits
    torch.testing.assert_close(a, m, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(a, untouched, atol=1e-4), "the adapter changed nothing"


def test_sft_loss_masks_prompt_and_trains_eos():
    from tuneforge.data.render import IGNORE, render, to_messages
    from tuneforge.models import load_tokenizer

    tok = load_tokenizer(catalog.resolve("tiny-llama"))
    r = render(tok, to_messages({"prompt": "Convert: 5 May 2001", "response": "2001-05-05"}, "Be brief."), 256)
    supervised = [t for t in r.labels if t != IGNORE]
    assert tok.decode(supervised) == "2001-05-05<|im_end|>"
    assert supervised[-1] == tok.eos_token_id
    # Multi-turn chat: every assistant turn carries loss, user turns do not.
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "date?"}, {"role": "assistant", "content": "2001-05-05"}]
    r = render(tok, to_messages({"messages": chat}, None), 256)
    spans, current = [], []
    for t, lab in zip(r.input_ids, r.labels):
        if lab != IGNORE:
            current.append(t)
        elif current:
            spans.append(tok.decode(current))
            current = []
    assert spans == ["hello<|im_end|>", "2001-05-05<|im_end|>"]
    short = render(tok, to_messages({"prompt": "x " * 300, "response": "y"}, None), 64)
    assert short.truncated and len(short.input_ids) == 64 and short.n_target == 0


def test_optimizers_and_schedulers_run(tmp_path, data_for):
    import json

    # lr logged after each of the 4 steps (warm-up 2, base 1e-3), by hand: cosine ramps to 1e-3
    # at step 2, then 0.5 * (1 + cos(pi * (s - 2) / 2)); constant_with_warmup stays at 1e-3.
    cases = (("sgd", "cosine", [5e-4, 1e-3, 5e-4, 0.0], "momentum_buffer"),
             ("rmsprop", "constant_with_warmup", [5e-4, 1e-3, 1e-3, 1e-3], "square_avg"))
    for optimizer, scheduler, expected, state_key in cases:
        out, _ = _train(tmp_path / optimizer, "classification", "full", data_for["classification"],
                        train={"optimizer": optimizer, "scheduler": scheduler, "warmup": 2, "learning_rate": 1e-3})
        lrs = [json.loads(line)["lr"] for line in (out / "metrics.jsonl").read_text().splitlines() if '"lr"' in line]
        assert lrs == pytest.approx(expected, abs=1e-12), (optimizer, lrs)
        # The optimizer that ran, read back from its checkpoint: SGD keeps momentum buffers
        # (momentum 0.9), RMSprop squared averages (alpha 0.99); neither has AdamW's exp_avg.
        last = sorted((out / "checkpoints").glob("step-*"))[-1]
        state = json.loads((last / "state.json").read_text())["optimizer"]
        group = state["param_groups"][0]
        assert (group.get("momentum"), group.get("alpha")) == ((0.9, None) if optimizer == "sgd" else (0, 0.99))
        assert all(set(v) == {state_key} | ({"step"} if optimizer == "rmsprop" else set())
                   for v in state["state"].values())


def test_early_stopping_keeps_the_best_checkpoint(tmp_path, data_for):
    import json

    # lr 0: the validation metric can never improve, so patience 1 stops at the second evaluation.
    out, _ = _train(tmp_path, "classification", "full", data_for["classification"],
                    train={"max_steps": 20, "eval_every": 1, "early_stopping_patience": 1, "learning_rate": 1e-12,
                           "scheduler": "constant"})
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [x["step"] for x in lines if x.get("split") == "validation"]
    assert evals == [1, 2]
    assert json.loads((out / "checkpoints" / "best" / "info.json").read_text())["step"] == 1


def test_sft_on_chat_messages(tmp_path):
    from conftest import write_jsonl

    rows = [{"messages": [{"role": "user", "content": f"Say {i}"}, {"role": "assistant", "content": str(i)},
                          {"role": "user", "content": "again"}, {"role": "assistant", "content": f"{i} again"}]}
            for i in range(40)]
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    out, metrics = _train(tmp_path, "sft", "lora", data, data={"messages_column": "messages"})
    test, base = metrics["test"], metrics["baseline"]
    assert test["n_generated"] == 4
    # Four LoRA steps at lr 1e-2 on 28 near-identical chats lower the held-out loss of the
    # random base model, and the perplexity is exp(loss) of the same tokens.
    assert test["loss"] < base["loss"] - 0.05, (test["loss"], base["loss"])
    assert test["perplexity"] == pytest.approx(np.exp(test["loss"]), rel=1e-9)


@pytest.mark.gpu
def test_cuda_training_runs(tmp_path, data_for):
    out, metrics = _train(tmp_path, "sft", "lora", data_for["sft"])
    import json

    assert json.loads((out / "manifest.json").read_text())["device"].startswith("cuda")


def test_generative_validation_drives_best_checkpoint_and_forgetting_is_reported(tmp_path, data_for):
    import json

    out, metrics = _train(tmp_path, "sft", "lora", data_for["sft"],
                          eval={"validation_generate": 4, "max_new_tokens": 4, "max_generate": 4},
                          train={"metric_for_best": "exact_match"})
    evals = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"split"' in x]
    assert evals and all("exact_match" in e and "rouge_l" in e for e in evals)
    best = json.loads((out / "checkpoints" / "best" / "info.json").read_text())
    assert best["metric"] == "exact_match"
    # exact_match is higher-is-better: the best checkpoint holds the highest validation score.
    assert best["value"] == max(e["exact_match"] for e in evals)
    # The base model's forgetting-check perplexity, recomputed with plain forward passes over
    # the reference text in train.max_length windows (token-weighted mean NLL).
    from importlib import resources

    from tuneforge.models import load_causal_lm

    model, tok, _ = load_causal_lm("tiny-llama")
    ids = tok(resources.files("tuneforge.templates").joinpath("reference.txt").read_text(encoding="utf-8"),
              add_special_tokens=False)["input_ids"]
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(ids), 256):
            window = torch.tensor([ids[i:i + 256]])
            if window.shape[1] < 2:
                continue
            logits = model(input_ids=window).logits[0, :-1].float()
            total += torch.nn.functional.cross_entropy(logits, window[0, 1:], reduction="sum").item()
            count += window.shape[1] - 1
    assert metrics["baseline"]["reference_perplexity"] == pytest.approx(np.exp(total / count), rel=1e-4)
    assert metrics["test"]["reference_perplexity"] != metrics["baseline"]["reference_perplexity"]


def test_decoder_classifier_trains(tmp_path, data_for):
    out, metrics = _train(tmp_path, "classification", "lora", data_for["classification"], model="tiny-llama")
    assert metrics["test"]["n"] == 24
    assert (out / "model" / "adapter" / "adapter_model.safetensors").is_file()
    # The saved decoder classifier, reloaded by `tuneforge eval`, scores the test split as training did.
    import json

    from tuneforge.evaluate.target import evaluate_target

    again = json.loads((evaluate_target(str(out), output=str(tmp_path / "ev")) / "eval.json").read_text())["metrics"]
    for key in ("accuracy", "f1_macro", "roc_auc", "ece"):
        assert again[key] == pytest.approx(metrics["test"][key], abs=1e-6), key


def test_gradient_checkpointing_gives_the_same_training(tmp_path, data_for):
    runs = [_train(tmp_path / str(flag), "sft", "lora", data_for["sft"], train={"gradient_checkpointing": flag})[0]
            for flag in (False, True)]
    a, b = (load_file(str(r / "model" / "adapter" / "adapter_model.safetensors")) for r in runs)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_loss_equals_padded_loss_and_keeps_examples_apart(attention):
    """Padding-free packing gives the padded per-example losses exactly, and
    changing one example leaves its row-mates' losses untouched: SDPA models run
    tuneforge's per-example attention (VARLEN), others transformers' block-diagonal
    mask from the restarting position ids."""
    import random

    from tuneforge import inference
    from tuneforge.data.render import IGNORE, Rendered
    from tuneforge.models import load_causal_lm

    model, tok, _ = load_causal_lm("tiny-llama")
    model.set_attn_implementation(attention)
    rng = random.Random(0)
    examples = []
    for n in [5, 40, 12, 7, 33, 20, 9]:
        ids = [rng.randrange(3, 200) for _ in range(n)]
        examples.append(Rendered(ids, [IGNORE] * (n // 2) + ids[n // 2:], False))
    cpu = torch.device("cpu")
    assert inference.supports_packing(model)
    assert model.config._attn_implementation == {"sdpa": inference.VARLEN, "eager": "eager"}[attention]
    packed, tokens = inference.sequence_nll(model, examples, tok.pad_token_id, cpu)
    model._tuneforge_packing = False
    padded, tokens_padded = inference.sequence_nll(model, examples, tok.pad_token_id, cpu)
    assert tokens == tokens_padded == 126
    assert torch.allclose(packed, padded, atol=1e-4)
    model._tuneforge_packing = True
    changed = list(examples)
    changed[3] = Rendered([9] * 7, [9] * 7, False)  # between examples 2 and 4 in the packed row
    again, _ = inference.sequence_nll(model, changed, tok.pad_token_id, cpu)
    keep = [0, 1, 2, 4, 5, 6]
    assert torch.allclose(again[keep], packed[keep], atol=1e-5) and not torch.allclose(again[3], packed[3])


def test_fused_lora_forward_matches_peft_exactly():
    """The fused LoRA forward (scaling and addition inside one addmm) gives peft's
    outputs and gradients, and steps aside for what it does not handle."""
    from peft import LoraConfig, get_peft_model

    from tuneforge.methods.lora import fuse_lora_forward
    from tuneforge.models import load_causal_lm

    torch.manual_seed(0)
    model, _, _ = load_causal_lm("tiny-llama")
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)  # B starts at zero; make the adapter count
    ids = torch.randint(3, 200, (2, 17))

    def run():
        peft_model.zero_grad()
        logits = peft_model(input_ids=ids).logits
        logits.square().mean().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.grad is not None}

    reference, ref_grads = run()
    assert fuse_lora_forward(peft_model) > 0
    fused, grads = run()
    assert torch.allclose(fused, reference, atol=1e-6)
    assert grads.keys() == ref_grads.keys() and all(torch.allclose(grads[n], ref_grads[n], atol=1e-6) for n in grads)
    with peft_model.disable_adapter():  # peft's own path: the base model alone
        base = peft_model(input_ids=ids).logits.detach()
    assert not torch.allclose(base, fused, atol=1e-4)


def test_packed_classification_equals_padded_and_falls_back_for_other_heads():
    """BERT-style classifiers (LoRA-wrapped too) score a batch padding-free in one
    row with the padded model's probabilities; a head without a pooler (a decoder
    classifier reads its last token) keeps the padded path and plain SDPA."""
    from tuneforge import inference
    from tuneforge.kinds import MODEL_KINDS
    from tuneforge.methods import lora
    from tuneforge.models import load_classifier

    cpu = torch.device("cpu")
    torch.manual_seed(0)
    model, tok, _ = load_classifier("minilm-l6", ["neg", "pos", "mixed"])
    model = lora.prepare(model, lora.Config(r=4), MODEL_KINDS["classifier"])
    texts = ["a fine film", "dull, long and far too loud", "ok", "the cast was great but the plot was not"]
    ids = inference.encode(tok, texts, 64)
    assert inference.supports_packed_classification(model)
    packed = inference.predict_proba(model, ids, tok.pad_token_id, 8, cpu)
    model.__dict__["_tuneforge_packed_cls"] = False
    padded = inference.predict_proba(model, ids, tok.pad_token_id, 8, cpu)
    np.testing.assert_allclose(packed, padded, atol=1e-6)
    assert np.abs(padded[0] - padded[1]).max() > 1e-3  # the texts do get different answers

    decoder, dtok, _ = load_classifier("tiny-llama", ["neg", "pos"])
    assert not inference.supports_packed_classification(decoder)
    assert decoder.config._attn_implementation == "sdpa"

    # ALBERT's pooler is a bare Linear (its tanh lives elsewhere): not BERT-style
    from transformers import AlbertConfig, AlbertForSequenceClassification

    albert = AlbertForSequenceClassification(AlbertConfig(
        vocab_size=200, embedding_size=16, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, num_labels=3))
    assert not inference.supports_packed_classification(albert)


def test_varlen_builds_no_mask_for_packed_rows_and_sdpa_masks_otherwise():
    from tuneforge.inference import _varlen_mask

    assert _varlen_mask(batch_size=1, q_length=4096, kv_length=4096, attention_mask=None) is None
    padded = torch.tensor([[1, 1, 1, 0]], dtype=torch.bool)
    mask = _varlen_mask(batch_size=1, q_length=4, kv_length=4, attention_mask=padded, allow_is_causal_skip=False)
    assert mask.shape == (1, 1, 4, 4) and not mask[0, 0, :, 3].any() and mask[0, 0, 3, 0]


def test_sliding_window_models_keep_transformers_attention_for_packing():
    """Per-span SDPA would drop a sliding window: such models keep SDPA, and
    transformers' block-diagonal, windowed mask packs them (same losses as padded)."""
    import random

    from transformers import MistralConfig, MistralForCausalLM

    from tuneforge import inference
    from tuneforge.data.render import Rendered

    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=4))
    rng = random.Random(1)
    examples = [Rendered(ids, ids, False) for ids in ([rng.randrange(1, 64) for _ in range(n)] for n in (9, 5, 12))]
    assert inference.supports_packing(model) and model.config._attn_implementation == "sdpa"
    packed, _ = inference.sequence_nll(model, examples, 0, torch.device("cpu"))
    model._tuneforge_packing = False
    padded, _ = inference.sequence_nll(model, examples, 0, torch.device("cpu"))
    assert torch.allclose(packed, padded, atol=1e-4)


def test_adamw_uses_the_fused_kernel_on_plain_parameters():
    from tuneforge.recipe import TrainConfig
    from tuneforge.training.optim import build_optimizer

    plain = [torch.nn.Parameter(torch.randn(4, 4)), torch.nn.Parameter(torch.randn(4))]
    assert build_optimizer(plain, TrainConfig(), 1e-3).param_groups[0]["fused"] is True
    # parameters on two devices (here cpu and meta): the default implementation
    mixed = plain + [torch.nn.Parameter(torch.empty(2, device="meta"))]
    assert not build_optimizer(mixed, TrainConfig(), 1e-3).param_groups[0]["fused"]
