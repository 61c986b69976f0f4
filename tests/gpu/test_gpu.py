"""The GPU path: qlora (4-bit bitsandbytes base), Liger kernels, attention choice,
bf16 autocast, and the GPU benchmark script.

Tests marked `gpu` need CUDA (conftest skips them without it) and, where they
use one, the `tuneforge[gpu]` packages (skipped when those are missing). The
unmarked tests run everywhere: the recipe fields, the clear errors on machines
without a GPU, and `bench/bench_gpu.py --dry-run` end to end on CPU.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tuneforge import api, gpu
from tuneforge.data.render import IGNORE, Rendered
from tuneforge.recipe import RecipeError, load_recipe

ROOT = Path(__file__).resolve().parents[2]
CUDA = torch.cuda.is_available()
no_cuda_only = pytest.mark.skipif(CUDA, reason="checks the error raised on machines without a CUDA GPU")


def _recipe(data: Path, **sections) -> dict:
    recipe = {"model": "tiny-llama", "task": "sft", "data": {"train": str(data)},
              "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
              "train": {"max_steps": 3, "batch_size": 8, "learning_rate": 1e-2, "warmup": 0, "log_every": 1,
                        "eval_every": 3},
              "eval": {"max_new_tokens": 4, "max_generate": 4, "bootstrap": False}}
    for key, value in sections.items():
        recipe[key].update(value)
    return recipe


def _examples(n: int = 6) -> list[Rendered]:
    rows = []
    for i in range(n):
        ids = [5 + (i * 7 + j * 3) % 90 for j in range(10 + i)]
        rows.append(Rendered(ids, [IGNORE] * 4 + ids[4:], False))
    return rows


# ------------------------------------------------------------- everywhere


def test_recipe_accepts_the_gpu_fields(tmp_path):
    base = {"model": "tiny-llama", "task": "sft", "data": {"train": "x.jsonl"}}
    plain = load_recipe(base, check_files=False)
    assert (plain.train.liger, plain.train.attn_implementation) == (False, "auto")
    recipe = load_recipe({**base, "method": {"name": "qlora"},
                          "train": {"liger": True, "attn_implementation": "flash_attention_2"}}, check_files=False)
    assert (recipe.method.name, recipe.train.liger, recipe.train.attn_implementation) == ("qlora", True,
                                                                                          "flash_attention_2")
    assert recipe.learning_rate == 2e-4  # the LoRA default
    from tuneforge.models import load_options

    assert load_options(recipe) == {"quantize_4bit": True, "attn_implementation": "flash_attention_2"}
    assert load_options(plain) == {"quantize_4bit": False, "attn_implementation": "auto"}

    with pytest.raises(RecipeError) as err:
        load_recipe({**base, "task": "classification", "method": {"name": "qlora"},
                     "train": {"attn_implementation": "flash"}}, check_files=False)
    assert err.value.problems == [
        ("method", "method qlora trains a causal_lm, and task classification trains a classifier; use one of: "
                   "full, freeze, lora, dora, ia3."),
        ("train.attn_implementation",
         "Input should be 'auto', 'sdpa', 'flash_attention_2' or 'eager' (got 'flash')."),
    ]


@no_cuda_only
def test_qlora_without_cuda_fails_before_anything_loads(tmp_path, dates_jsonl, monkeypatch):
    from tuneforge import catalog
    from tuneforge.models import load_causal_lm

    def never(ref):
        raise AssertionError("the model was resolved before the GPU check")

    monkeypatch.setattr(catalog, "resolve", never)
    with pytest.raises(gpu.GpuUnavailable) as err:
        load_causal_lm("tiny-llama", quantize_4bit=True)
    assert "method qlora (a 4-bit bitsandbytes base model) needs a CUDA GPU, and torch sees none" in str(err.value)

    out = tmp_path / "run"
    with pytest.raises(gpu.GpuUnavailable) as err:
        api.train(_recipe(dates_jsonl, method={"name": "qlora"}), output=str(out), quiet=True)
    message = str(err.value)
    assert message.startswith("this recipe cannot train here:\n  - method qlora")
    assert "needs a CUDA GPU" in message
    if not gpu._has_module("bitsandbytes"):
        assert "needs the 'bitsandbytes' package, which is not installed. Install it with: " \
               "pip install 'tuneforge[gpu]'" in message
    assert not out.exists()  # stopped before the run folder


def test_gpu_features_on_a_cpu_device_are_refused(tmp_path):
    recipe = load_recipe({"model": "tiny-llama", "task": "sft", "data": {"train": "x.jsonl"},
                          "method": {"name": "qlora"}, "train": {"liger": True}}, check_files=False)
    found = gpu.problems(recipe, torch.device("cpu"))
    cuda = [p for p in found if "CUDA" in p]
    assert len(cuda) == 2
    assert all(p.endswith("this run trains on 'cpu'. Set device: cuda (or auto)") or "torch sees none" in p
               for p in cuda)


@no_cuda_only
def test_liger_without_cuda_is_a_clear_error(tmp_path, dates_jsonl):
    from tuneforge.models import load_causal_lm

    model, _, _ = load_causal_lm("tiny-llama")
    with pytest.raises(gpu.GpuUnavailable, match=r"^train.liger \(Liger Triton kernels\) needs a CUDA GPU"):
        gpu.apply_liger(model)
    # From the CLI: exit 1 with the reason, no traceback, no run folder.
    recipe = tmp_path / "liger.yaml"
    recipe.write_text(json.dumps(_recipe(dates_jsonl, train={"liger": True})))
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "tuneforge.cli", "train", str(recipe), "-o", str(out)],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith("error: this recipe cannot train here:\n  - train.liger (Liger Triton kernels) "
                                  "needs a CUDA GPU")
    assert "Traceback" not in proc.stderr
    assert not out.exists()


def test_qlora_save_merges_into_the_reloaded_base(tmp_path):
    """qlora.save's merge (base reloaded from its files, adapter applied) on CPU,
    with an unquantised LoRA model standing in for the 4-bit one: it must give
    the same weights as lora's in-place merge."""
    from safetensors.torch import load_file

    from tuneforge.kinds import MODEL_KINDS
    from tuneforge.methods import lora, qlora
    from tuneforge.models import load_causal_lm

    model, tokenizer, _ = load_causal_lm("tiny-llama")
    model = lora.prepare(model, lora.Config(r=4, alpha=8, dropout=0.0), MODEL_KINDS["causal_lm"])
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)  # a trained adapter (B starts at zero)
    qlora.save(model, tokenizer, tmp_path / "q")
    lora.save(model, tokenizer, tmp_path / "l")
    assert (tmp_path / "q" / "adapter" / "adapter_model.safetensors").is_file()
    ours, reference = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("q", "l"))
    assert ours.keys() == reference.keys()
    assert all(torch.allclose(ours[k], reference[k], atol=1e-6) for k in ours)


def test_attn_implementation_reaches_from_pretrained():
    from tuneforge.models import load_causal_lm

    for name in ("eager", "sdpa"):
        model, _, _ = load_causal_lm("tiny-llama", attn_implementation=name)
        assert model.config._attn_implementation == name
    if not (CUDA and gpu._has_module("flash_attn")):
        with pytest.raises(gpu.GpuUnavailable, match="attn_implementation flash_attention_2 needs"):
            load_causal_lm("tiny-llama", attn_implementation="flash_attention_2")


def test_autocast_attention_runs_attention_in_bf16_and_nothing_else():
    """The FlashAttention helper, checked on CPU with SDPA (autocast works there too):
    attention projections run in bf16, the residual stream and the head stay float32."""
    from tuneforge.inference import lm_loss_sum
    from tuneforge.models import load_causal_lm

    model, tokenizer, _ = load_causal_lm("tiny-llama")
    layer = model.model.layers[0]
    seen = {}
    layer.self_attn.q_proj.register_forward_hook(lambda m, i, o: seen.__setitem__("q", o.dtype))
    layer.mlp.down_proj.register_forward_hook(lambda m, i, o: seen.__setitem__("mlp", o.dtype))
    layer.register_forward_hook(lambda m, i, o: seen.__setitem__("layer", (o[0] if isinstance(o, tuple) else o).dtype))
    cpu = torch.device("cpu")
    with torch.no_grad():
        before, _ = lm_loss_sum(model, _examples(), tokenizer.pad_token_id, cpu)
        assert seen == {"q": torch.float32, "mlp": torch.float32, "layer": torch.float32}
        assert gpu.autocast_attention(model) == 3  # tiny-llama's layers
        after, _ = lm_loss_sum(model, _examples(), tokenizer.pad_token_id, cpu)
    assert seen == {"q": torch.bfloat16, "mlp": torch.float32, "layer": torch.float32}
    assert after.dtype == torch.float32
    assert after.item() == pytest.approx(before.item(), rel=1e-2)
    ids = torch.tensor([[5, 6, 7]])  # generation (KV cache) runs through the wrapped blocks too
    assert model.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0).shape == (1, 6)


def test_bench_gpu_dry_run_writes_every_figure(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_gpu.py"), "--dry-run", "--variants", "plain",
                           "liger", "qlora", "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result) == {"date", "host", "device", "dry_run", "packages", "settings", "flops_per_token",
                           "flops_per_token_legacy", "conditions", "peak_flops", "variants", "target"}
    assert result["flops_per_token"] > 0 and result["flops_per_token_legacy"] > 0
    assert result["dry_run"] is True and result["settings"]["seq_len"] == 64
    plain = result["variants"]["plain"]
    for side in ("tuneforge", "baseline"):
        figures = plain[side]
        assert figures["tokens_per_s"] > 0 and figures["mfu_measured_peak"] > 0 and figures["peak_memory_mb"] > 0
        assert figures["useful_tokens"] == plain["tuneforge"]["useful_tokens"]
        assert len(figures["losses"]) == 4
    # Same initial weights, same examples in the same order: the loss curves agree.
    assert plain["loss_curve_max_abs_diff"] < 1e-3
    assert plain["speedup"] == pytest.approx(plain["tuneforge"]["tokens_per_s"] / plain["baseline"]["tokens_per_s"])
    if not CUDA:
        assert result["variants"]["liger"] == {"skipped": "Liger's Triton kernels need a CUDA GPU"}
        assert result["variants"]["qlora"] == {"skipped": "bitsandbytes 4-bit needs a CUDA GPU"}
    assert "plain    tuneforge" in proc.stdout and f"wrote {out}" in proc.stdout


# ------------------------------------------------------------- CUDA only


@pytest.fixture
def restore_llama_module():
    """Liger patches transformers' Llama module as well as the instance; undo that
    so later tests build plain models."""
    from transformers.models.llama import modeling_llama

    saved = dict(vars(modeling_llama))
    yield
    for key, value in saved.items():
        setattr(modeling_llama, key, value)


@pytest.mark.gpu
def test_qlora_trains_and_saves(tmp_path):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    from tuneforge.inference import lm_loss_sum
    from tuneforge.kinds import MODEL_KINDS
    from tuneforge.methods import qlora
    from tuneforge.models import load_causal_lm
    from tuneforge.training.loop import autocast

    dev = torch.device("cuda")
    model, tokenizer, path = load_causal_lm("tiny-llama", quantize_4bit=True)
    assert model.is_loaded_in_4bit
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    model = qlora.prepare(model, qlora.Config(r=4, alpha=8, dropout=0.0), MODEL_KINDS["causal_lm"]).to(dev)
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):
        with autocast(dev):
            loss, tokens = lm_loss_sum(model, _examples(), tokenizer.pad_token_id, dev)
        (loss / tokens).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert torch.isfinite(loss)
    moved = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, trainable[n])]
    assert any("lora_B" in n for n in moved) and any("lora_A" in n for n in moved)

    merged = qlora.save(model, tokenizer, tmp_path)
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert getattr(reloaded.config, "quantization_config", None) is None  # a plain model
    assert reloaded.config.pad_token_id == tokenizer.pad_token_id
    # The merged weight is the original (unquantised) base weight plus the adapter's
    # update, B @ A * scaling, merged in float32.
    q = model.get_base_model().model.layers[0].self_attn.q_proj
    delta = (q.lora_B["default"].weight @ q.lora_A["default"].weight).float().cpu() * q.scaling["default"]
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    name = "model.layers.0.self_attn.q_proj.weight"
    base_q, merged_q = dict(base.named_parameters())[name].detach(), dict(reloaded.named_parameters())[name].detach()
    assert delta.abs().max() > 1e-3  # training moved the adapter enough to tell
    assert torch.allclose(merged_q, base_q + delta, atol=1e-5)
    assert not torch.allclose(merged_q, base_q, atol=1e-3)
    scored = dict(merged.named_parameters())[name]  # what the trainer scores next: on the GPU, in bf16
    assert (scored.device.type, scored.dtype) == ("cuda", torch.bfloat16)
    assert torch.equal(scored.detach().cpu(), merged_q.to(torch.bfloat16))


@pytest.mark.gpu
def test_qlora_refuses_an_unquantised_model():
    pytest.importorskip("bitsandbytes")
    from tuneforge.kinds import MODEL_KINDS
    from tuneforge.methods import qlora
    from tuneforge.models import load_causal_lm

    model, _, _ = load_causal_lm("tiny-llama")
    with pytest.raises(ValueError, match="method qlora needs the base model loaded in 4 bits"):
        qlora.prepare(model, qlora.Config(), MODEL_KINDS["causal_lm"])


@pytest.mark.gpu
def test_qlora_recipe_trains_end_to_end(tmp_path, dates_jsonl):
    # Needs the trainer to load with models.load_options(recipe) (the 4-bit base).
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "run"
    metrics = api.train(_recipe(dates_jsonl, method={"name": "qlora"}), output=str(out), quiet=True)
    assert set(metrics) == {"test", "baseline", "validation"}
    assert (out / "model" / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "model" / "model.safetensors").is_file()


@pytest.mark.gpu
def test_liger_applies_and_keeps_the_loss(restore_llama_module):
    pytest.importorskip("liger_kernel")
    from tuneforge.inference import lm_loss_sum
    from tuneforge.models import load_causal_lm

    dev = torch.device("cuda")
    model, tokenizer, _ = load_causal_lm("tiny-llama")
    model.to(dev)
    with torch.no_grad():
        before, _ = lm_loss_sum(model, _examples(), tokenizer.pad_token_id, dev)
    assert gpu.apply_liger(model) == "llama"
    assert model.model.norm._get_name() == "LigerRMSNorm"
    assert model.model.layers[0].mlp._get_name() == "LigerSwiGLUMLP"
    with torch.no_grad():
        after, _ = lm_loss_sum(model, _examples(), tokenizer.pad_token_id, dev)
    assert after.item() == pytest.approx(before.item(), rel=1e-3)


@pytest.mark.gpu
def test_liger_refuses_a_model_it_has_no_kernels_for():
    pytest.importorskip("liger_kernel")
    from tuneforge.models import load_classifier

    model, _, _ = load_classifier("tiny-bert", ["neg", "pos"])
    with pytest.raises(ValueError, match="Liger has no kernels for model type 'bert'"):
        gpu.apply_liger(model)


@pytest.mark.gpu
def test_bf16_autocast_path_trains_on_cuda(tmp_path, dates_jsonl):
    from tuneforge.inference import lm_loss_sum
    from tuneforge.models import load_causal_lm
    from tuneforge.training.loop import autocast

    dev = torch.device("cuda")
    model, tokenizer, _ = load_causal_lm("tiny-llama")
    model.to(dev)
    with autocast(dev):
        assert torch.nn.Linear(8, 8).to(dev)(torch.randn(2, 8, device=dev)).dtype == torch.bfloat16
        loss, _ = lm_loss_sum(model, _examples(), tokenizer.pad_token_id, dev)
    loss.backward()
    assert next(model.parameters()).dtype == torch.float32  # master weights stay float32
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in model.parameters())
    # The whole recipe on the GPU, gradient checkpointing on.
    out = tmp_path / "run"
    metrics = api.train(_recipe(dates_jsonl, train={"gradient_checkpointing": True}), output=str(out), quiet=True)
    assert set(metrics) == {"test", "baseline", "validation"}
    assert json.loads((out / "manifest.json").read_text())["device"].startswith("cuda")


@pytest.mark.gpu
def test_flash_attention_2_trains_and_scores_like_sdpa():
    pytest.importorskip("flash_attn")
    from tuneforge.inference import lm_loss_sum, per_example_nll
    from tuneforge.models import load_causal_lm
    from tuneforge.training.loop import autocast

    dev = torch.device("cuda")
    losses = {}
    for name in ("sdpa", "flash_attention_2"):
        model, tokenizer, _ = load_causal_lm("tiny-llama", attn_implementation=name)
        model.to(dev)
        with autocast(dev):  # training: packed examples, bf16 autocast
            loss, _ = lm_loss_sum(model, _examples(), tokenizer.pad_token_id, dev)
        loss.backward()
        # scoring runs without autocast: float32 weights, attention still in bf16
        sums, _ = per_example_nll(model, _examples(), tokenizer.pad_token_id, 4, dev)
        losses[name] = (loss.item(), float(sums.sum()))
    assert losses["flash_attention_2"] == pytest.approx(losses["sdpa"], rel=2e-2)
