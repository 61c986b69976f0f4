"""tuneforge vs the plain Hugging Face baseline on one CUDA GPU, back to back.

    python bench/bench_gpu.py                  # writes a new bench/results/<UTC time>-<host>-gpu.json
    python bench/bench_gpu.py --steps 20       # quicker
    python bench/bench_gpu.py --dry-run        # a tiny model end to end on CPU (tests the script)

Model: a 1B-class Llama built from its config (hidden 2048, 16 layers, 32 heads,
8 KV heads, MLP 8192, vocab 32000, untied head: 1.10B parameters) with random
weights, saved once and loaded by every worker. Data: synthetic SFT examples of
random tokens at max length 2048: lengths uniform in [256, 2048], the first
10-50% of each a prompt without loss (`--lengths full` makes every example 2048
tokens with loss on all of them). LoRA r=16, alpha 32, all linear layers, lr 2e-4,
8 examples per step in one micro-batch, the same examples in the same order on both sides.

Each measurement runs in its own process (peak GPU memory is its own):
  tuneforge: its real training path: models.load_pretrained (4-bit loading for
    qlora), trainers.shared.apply_method (Liger, the method, gradient
    checkpointing), inference.lm_loss_sum (packing, head on supervised tokens
    only) and training.loop.fit with bf16 autocast; float32 master weights.
  baseline: transformers.Trainer + peft, bf16=True, otherwise default settings,
    padding to the longest example in each batch; the qlora variant loads the same
    4-bit base and calls peft.prepare_model_for_kbit_training (its own default
    checkpointing off, as on the tuneforge side); the liger variant sets
    use_liger_kernel=True (Liger's defaults, fused linear cross-entropy included);
    the gc variant activation_checkpointing=True.
Variants: plain, liger, gc (gradient checkpointing), qlora.

Figures, after --warmup steps: useful tokens/s (non-padding tokens), MFU = useful
FLOP/s over the GPU's peak dense bf16 FLOP/s, both as measured by a large bf16
matmul in this run and as the spec sheet says (989e12 for H100 SXM / H200, 756e12
for H100 PCIe), peak GPU memory (torch.cuda.max_memory_allocated), and the speedup.
Useful FLOPs per token as in bench/flops.py: 4x the frozen decoder weights and 6x
the LoRA weights for every token, 4 * vocab * d_model for the head at supervised
positions only, causal attention per example; `flops_per_token_legacy` keeps the
earlier 4N-for-every-token estimate.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchio import conditions, write_to  # noqa: E402
from flops import decoder_dims, sft_flops  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SEED = 42
PAD_ID = 0
LORA = {"r": 16, "alpha": 32, "dropout": 0.0}
LEARNING_RATE = 2e-4

MODELS = {
    "1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
           "num_key_value_heads": 8, "vocab_size": 32000, "max_position_embeddings": 4096,
           "tie_word_embeddings": False},
    # --dry-run: the same architecture, small enough for a CPU test.
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab_size": 512, "max_position_embeddings": 256,
             "tie_word_embeddings": False},
}
VARIANTS = {
    "plain": {},
    "liger": {"liger": True},
    "gc": {"gradient_checkpointing": True},
    "qlora": {"method": "qlora"},
}
NEEDS_CUDA = {"liger": "Liger's Triton kernels need a CUDA GPU", "qlora": "bitsandbytes 4-bit needs a CUDA GPU"}
# Peak dense bf16 tensor-core FLOP/s from NVIDIA's spec sheets (without sparsity).
SPEC_PEAK = [("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12)]
TARGET = {"mfu": 0.45, "speedup": 1.8}


def spec_peak(device_name: str):
    for key, flops in SPEC_PEAK:
        if all(part in device_name for part in key.split()):
            return flops
    return None


def peak_memory_mb(device: str) -> float:
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # CPU dry run: peak RSS


# ------------------------------------------------------------------ data


def synthetic_examples(args) -> list:
    """SFT-shaped examples of random tokens, the same in every worker (seeded)."""
    from tuneforge.data.render import IGNORE, Rendered

    rng = random.Random(SEED)
    vocab = MODELS[args.model]["vocab_size"]
    out = []
    for _ in range(args.steps * args.batch):
        if args.lengths == "full":
            length, prompt = args.seq_len, 0
        else:
            length = rng.randint(args.seq_len // 8, args.seq_len)
            prompt = int(length * rng.uniform(0.1, 0.5))
        ids = [rng.randrange(1, vocab) for _ in range(length)]  # 0 is padding
        out.append(Rendered(ids, [IGNORE] * prompt + ids[prompt:], False))
    return out


def step_order(examples: list, args) -> list[list[int]]:
    """tuneforge's batches for this seed (no length grouping, as the baseline does
    not group either): both sides take the same examples step by step."""
    from tuneforge.training.batching import plan_epoch

    plan = plan_epoch([len(e.input_ids) for e in examples], args.batch, 1, SEED, 0, False)
    return [step[0] for step in plan]


# --------------------------------------------------------------- workers


def worker_build(args) -> dict:
    """Build the model from its config with random weights and save it for the workers."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(SEED)
    config = LlamaConfig(**MODELS[args.model], pad_token_id=PAD_ID, bos_token_id=1, eos_token_id=2)
    with torch.device(args.device):
        model = LlamaForCausalLM(config)
    # bf16 files halve the disk traffic; workers load them as they like (fp32 master
    # weights, or 4-bit for qlora).
    model.to(torch.bfloat16 if args.device == "cuda" else torch.float32).save_pretrained(args.model_dir)
    total = sum(p.numel() for p in model.parameters())
    matmul = total - model.get_input_embeddings().weight.numel()
    return {"parameters": total, "matmul_parameters": matmul}


def worker_tuneforge(args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from tuneforge.inference import lm_loss_sum
    from tuneforge.models import load_options, load_pretrained, pretrained_options, quiet_transformers
    from tuneforge.recipe import load_recipe
    from tuneforge.run import Run
    from tuneforge.trainers import shared
    from tuneforge.training.loop import Objective, fit

    variant = VARIANTS[args.variant]
    dev = torch.device(args.device)
    examples = synthetic_examples(args)
    order = step_order(examples, args)
    recipe = load_recipe({
        "model": args.model_dir, "task": "sft", "device": args.device,
        "data": {"train": str(Path(args.model_dir) / "synthetic.jsonl")},  # never read: data is made here
        "method": {"name": variant.get("method", "lora"), **LORA},
        "train": {"max_steps": args.steps, "batch_size": args.batch, "learning_rate": LEARNING_RATE, "warmup": 0,
                  "max_length": args.seq_len, "seed": SEED, "log_every": 1, "group_by_length": False,
                  "gradient_checkpointing": variant.get("gradient_checkpointing", False),
                  "liger": variant.get("liger", False), "attn_implementation": args.attn},
    }, check_files=False)
    quiet_transformers()
    shared.seed_everything(SEED)
    model = load_pretrained(AutoModelForCausalLM, args.model_dir, pretrained_options(**load_options(recipe)))
    model = shared.apply_method(model.to(dev), recipe, quiet=True).to(dev)
    objective = Objective(
        plan=lambda epoch: [[order[i]] for i in range(len(order))],
        units=lambda batch: sum(examples[i].n_target for i in batch),
        loss_sum=lambda batch: lm_loss_sum(model, [examples[i] for i in batch], PAD_ID, dev),
        evaluate=None, metric="loss", higher_is_better=False,
    )
    with tempfile.TemporaryDirectory() as tmp:
        run = Run(Path(tmp) / "run", recipe)
        fit(model, objective, recipe.train, recipe.learning_rate, run, dev, quiet=True)
        log = [json.loads(x) for x in (run.path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in log if "split" not in r]
    # log_every=1: each line's window is one optimizer step of the loop alone.
    timed = steps[args.warmup:]
    return {"losses": [r["loss"] for r in steps], "useful_tokens": sum(r["tokens"] for r in timed),
            "train_seconds": sum(r["tokens"] / r["tokens_per_s"] for r in timed),
            "peak_memory_mb": peak_memory_mb(args.device)}


def worker_baseline(args) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, Trainer, TrainerCallback, TrainingArguments

    variant = VARIANTS[args.variant]
    cuda = args.device == "cuda"
    examples = synthetic_examples(args)
    order = step_order(examples, args)
    rows = [{"input_ids": examples[i].input_ids, "labels": examples[i].labels} for batch in order for i in batch]
    torch.manual_seed(SEED)
    attn = {} if args.attn == "auto" else {"attn_implementation": args.attn}
    if variant.get("method") == "qlora":
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(args.model_dir, quantization_config=quant, dtype=torch.bfloat16,
                                                     device_map={"": 0}, **attn)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    else:
        model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32, **attn)
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=LORA["r"], lora_alpha=LORA["alpha"],
                                             lora_dropout=LORA["dropout"], target_modules="all-linear"))

    def collate(batch):  # pad to the longest example in the batch
        width = max(len(b["input_ids"]) for b in batch)
        ids = [b["input_ids"] + [PAD_ID] * (width - len(b["input_ids"])) for b in batch]
        labels = [b["labels"] + [-100] * (width - len(b["labels"])) for b in batch]
        mask = [[1] * len(b["input_ids"]) + [0] * (width - len(b["input_ids"])) for b in batch]
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "attention_mask": torch.tensor(mask)}

    losses, seconds = [], []

    class Clock(TrainerCallback):  # per-step wall time, the GPU drained at both ends
        def on_step_begin(self, a, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            seconds.append(time.perf_counter() - self.t0)

        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(logs["loss"])

    with tempfile.TemporaryDirectory() as tmp:
        targs = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=args.batch, max_steps=args.steps,
            learning_rate=LEARNING_RATE, logging_steps=1, save_strategy="no", seed=SEED, report_to="none",
            disable_tqdm=True, use_cpu=not cuda, bf16=cuda, remove_unused_columns=False,
            activation_checkpointing=variant.get("gradient_checkpointing", False),
            use_liger_kernel=variant.get("liger", False))

        class InOrder(Trainer):  # default Trainer, except that it keeps the order given
            def _get_train_sampler(self, train_dataset=None):
                return torch.utils.data.SequentialSampler(train_dataset or self.train_dataset)

        InOrder(model=model, args=targs, train_dataset=rows, data_collator=collate, callbacks=[Clock()]).train()
    useful = [sum(len(examples[i].input_ids) for i in batch) for batch in order]
    return {"losses": losses, "useful_tokens": sum(useful[args.warmup:]),
            "train_seconds": sum(seconds[args.warmup:]), "peak_memory_mb": peak_memory_mb(args.device)}


def worker_matmul(args) -> dict:
    """Dense matmul FLOP/s here: bf16 on the GPU (the ceiling MFU is measured against)."""
    import torch

    if args.device == "cuda":
        n, dtype, reps = 8192, torch.bfloat16, 50
        name = torch.cuda.get_device_name()
    else:
        n, dtype, reps, name = 512, torch.float32, 10, "cpu"
    a = torch.randn(n, n, device=args.device, dtype=dtype)
    b = torch.randn(n, n, device=args.device, dtype=dtype)

    def sync():
        if args.device == "cuda":
            torch.cuda.synchronize()

    for _ in range(5):
        a @ b
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync()
    return {"flops_per_s": 2 * n**3 * reps / (time.perf_counter() - t0), "device_name": name, "dtype": str(dtype)}


WORKERS = {"build": worker_build, "tuneforge": worker_tuneforge, "baseline": worker_baseline, "matmul": worker_matmul}


# ------------------------------------------------------------------ driver


def run_worker(name: str, args, variant: str = "plain") -> dict:
    cmd = [sys.executable, __file__, "--worker", name, "--variant", variant, "--model-dir", args.model_dir,
           "--model", args.model, "--device", args.device, "--seq-len", str(args.seq_len), "--batch", str(args.batch),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--lengths", args.lengths, "--attn", args.attn]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        # One failing side (say, out of memory) is a result to report, not a reason to lose the others.
        print(f"  {name} ({variant}): FAILED\n{proc.stderr[-2000:]}", file=sys.stderr)
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"  {name} ({variant}): done in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return result


def flop_accounting(examples: list, config: dict, built: dict) -> tuple[float, float]:
    """Useful FLOPs per token (bench/flops.py: head at supervised positions, causal
    attention per example) and the earlier estimate (4 * matmul weights for every
    token, the head included, plus 12 * layers * d_model * token-weighted length)."""
    from types import SimpleNamespace

    lengths = [len(e.input_ids) for e in examples]
    targets = [sum(1 for x in e.labels[1:] if x != -100) for e in examples]
    dims = decoder_dims(SimpleNamespace(**config), LORA["r"], built["parameters"])
    legacy = (4 * built["matmul_parameters"]
              + 12 * config["num_hidden_layers"] * config["hidden_size"] * sum(n * n for n in lengths) / sum(lengths))
    return sft_flops(dims, lengths, targets)["per_token"], legacy


def summarise(side: dict, flops_per_token: float, measured: float, spec) -> dict:
    if "error" in side:
        return side
    tps = side["useful_tokens"] / side["train_seconds"]
    out = {"tokens_per_s": tps, "mfu_measured_peak": tps * flops_per_token / measured,
           "mfu_spec_peak": tps * flops_per_token / spec if spec else None,
           "peak_memory_mb": side["peak_memory_mb"], "train_seconds": side["train_seconds"],
           "useful_tokens": side["useful_tokens"], "losses": side["losses"]}
    return out


def measure(args) -> dict:
    import torch
    import transformers

    skipped = {v: NEEDS_CUDA[v] for v in args.variants if v in NEEDS_CUDA and args.device != "cuda"}
    print("benchmarking (each side in its own process) ...", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        args.model_dir = str(Path(tmp) / "model")
        built = run_worker("build", args)
        if "error" in built:
            raise SystemExit(f"could not build the model: {built['error']}")
        raw = {v: {"tuneforge": run_worker("tuneforge", args, v), "baseline": run_worker("baseline", args, v)}
               for v in args.variants if v not in skipped}
        matmul = run_worker("matmul", args)
    examples = synthetic_examples(args)
    config = MODELS[args.model]
    flops_per_token, legacy_flops_per_token = flop_accounting(examples, config, built)
    spec = spec_peak(matmul["device_name"]) if args.device == "cuda" else None
    variants = {}
    for name, sides in raw.items():
        tf, hf = (summarise(sides[k], flops_per_token, matmul["flops_per_s"], spec) for k in ("tuneforge", "baseline"))
        entry = {"tuneforge": tf, "baseline": hf}
        if "error" not in tf and "error" not in hf:
            entry["speedup"] = tf["tokens_per_s"] / hf["tokens_per_s"]
            entry["memory_ratio"] = tf["peak_memory_mb"] / hf["peak_memory_mb"]
            entry["loss_curve_max_abs_diff"] = max(abs(a - b) for a, b in zip(tf["losses"], hf["losses"]))
        variants[name] = entry
    variants.update({name: {"skipped": reason} for name, reason in skipped.items()})
    plain = variants.get("plain", {})
    return {
        "date": dt.datetime.now().isoformat(timespec="seconds"), "host": socket.gethostname(),
        "device": matmul["device_name"], "dry_run": args.dry_run,
        "packages": {"torch": torch.__version__, "transformers": transformers.__version__},
        "settings": {"model": config, "parameters": built["parameters"],
                     "matmul_parameters": built["matmul_parameters"], "seq_len": args.seq_len, "batch": args.batch,
                     "steps": args.steps, "warmup_steps": args.warmup, "lengths": args.lengths, "lora": LORA,
                     "learning_rate": LEARNING_RATE, "attn_implementation": args.attn,
                     "useful_tokens_total": sum(len(e.input_ids) for e in examples)},
        "flops_per_token": flops_per_token, "flops_per_token_legacy": legacy_flops_per_token,
        "conditions": conditions(),
        "peak_flops": {"measured_matmul": matmul["flops_per_s"], "measured_dtype": matmul["dtype"], "spec": spec},
        "variants": variants,
        "target": {**TARGET, "met": bool(
            "speedup" in plain and plain["speedup"] >= TARGET["speedup"]
            and (plain["tuneforge"]["mfu_spec_peak"] or plain["tuneforge"]["mfu_measured_peak"]) >= TARGET["mfu"])},
    }


def table(result: dict) -> str:
    spec = result["peak_flops"]["spec"]
    settings = result["settings"]
    lines = [(f"{result['device']}: {settings['parameters'] / 1e9:.2f}B-parameter Llama, seq {settings['seq_len']}, "
              f"batch {settings['batch']}, {settings['steps']} steps ({settings['warmup_steps']} warm-up)"),
             f"peak matmul FLOP/s ({result['peak_flops']['measured_dtype']}): measured "
             f"{result['peak_flops']['measured_matmul'] / 1e12:.3g}T"
             + (f", spec {spec / 1e12:.0f}T" if spec else ", no spec figure for this device"),
             f"{'variant':8} {'side':10} {'tokens/s':>10} {'MFU meas':>9} {'MFU spec':>9} {'peak MB':>9} "
             f"{'speedup':>8}"]
    for name, entry in result["variants"].items():
        if "skipped" in entry:
            lines.append(f"{name:8} skipped: {entry['skipped']}")
            continue
        for side in ("tuneforge", "baseline"):
            s = entry[side]
            if "error" in s:
                lines.append(f"{name:8} {side:10} FAILED: {s['error'][:80]}")
                continue
            mfu_spec = f"{s['mfu_spec_peak']:.1%}" if s["mfu_spec_peak"] is not None else "-"
            speed = f"{entry['speedup']:.2f}x" if side == "tuneforge" and "speedup" in entry else ""
            lines.append(f"{name:8} {side:10} {s['tokens_per_s']:10.0f} {s['mfu_measured_peak']:9.1%} {mfu_spec:>9} "
                         f"{s['peak_memory_mb']:9.0f} {speed:>8}")
    lines.append(f"target (plain LoRA): MFU >= {TARGET['mfu']:.0%} and >= {TARGET['speedup']}x the baseline: "
                 f"{'met' if result['target']['met'] else 'not met'}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", choices=list(WORKERS))
    parser.add_argument("--variant", choices=list(VARIANTS), default="plain")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--dry-run", action="store_true", help="tiny model on CPU, a few steps: tests the script")
    parser.add_argument("--model", choices=list(MODELS), default="1b")
    parser.add_argument("--model-dir", default="")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=8, help="examples per step")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5, help="first steps left out of the timing")
    parser.add_argument("--lengths", choices=["mixed", "full"], default="mixed")
    parser.add_argument("--attn", choices=["auto", "sdpa", "flash_attention_2", "eager"], default="auto")
    parser.add_argument("--out", help="results file (default: a new bench/results/<UTC time>-<host>-gpu.json)")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(WORKERS[args.worker](args)))
        return

    import torch

    if args.dry_run:
        args.model, args.device, args.seq_len, args.batch, args.steps, args.warmup = "tiny", "cpu", 64, 2, 4, 1
    elif not torch.cuda.is_available():
        print("bench_gpu.py measures GPU training and torch sees no CUDA GPU here: nothing to measure. "
              "Run it on a CUDA machine (after `pip install 'tuneforge[gpu]'` for the liger and qlora variants), "
              "or pass --dry-run to check the script on a tiny CPU model.")
        return
    if args.steps <= args.warmup:
        raise SystemExit("--steps must be larger than --warmup")
    result = measure(args)
    out = args.out
    if args.dry_run and out is None:  # a script check, not a measurement: kept out of bench/results
        out = str(Path(tempfile.gettempdir()) / "bench_gpu_dry_run.json")
    out = write_to(out, result, "-gpu")
    print(table(result))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
