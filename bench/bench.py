"""tuneforge against Hugging Face peers, their default and their strongest setup, on this machine.

    python bench/bench.py                 # `make bench`; writes a new bench/results/<UTC time>-<host>.json
    python bench/bench.py --sft-rows 32   # quicker
    python bench/bench.py --repeats 2 --trl-bf16   # two interleaved rounds; TRL in bf16 as well

Each side runs in its own process, so peak resident memory is its own; tuneforge
and its peers run back to back within one invocation (SFT sides, then
classification sides, `--repeats` rounds of each), so they see the same load,
which every side records (`conditions`: time and load averages).

SFT: smollm2-135m-instruct + LoRA (r=16, all-linear) on the Alpaca subset (chat
template, mixed lengths), float32. Every side trains the same token ids and
labels, in the same batches and order (tuneforge's seeded plan, no length
grouping), from the same LoRA initialisation, so the loss curves compare step by
step. Peers:
  sft-trl       the strongest setup a user can pick: TRL's SFTTrainer with
                padding_free=True (each batch one padding-free row), completion-only
                loss and its fused LM head (supervised positions only); SDPA, the
                attention implementation a CPU has (FlashAttention needs CUDA);
  sft-baseline  the plain one: transformers.Trainer + peft, default settings,
                padding to the longest sequence of each batch;
  sft-trl-bf16  (--trl-bf16) TRL in its default bf16 autocast: not the same
                losses, shown because this CPU has AMX-BF16.
Classification: minilm-l6 on an SST-2 subset, full fine-tuning, scored on the
SST-2 dev set; peers HF Trainer with train_sampling_strategy="group_by_length"
(strongest) and with its default random batches (plain).

Useful tokens are tokens that are not padding. Useful FLOPs count the work
training needs (bench/flops.py: frozen linears 4x and LoRA 6x their weights per
token, the LM head at supervised positions only, causal attention per example),
compared with this machine's measured fp32 matmul FLOP/s; `*_legacy` keeps the
earlier estimate (4N per token plus attention at the mean row length).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchio import conditions, write_to  # noqa: E402
from flops import decoder_dims, legacy_flops_per_token, sft_flops  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
ALPACA = SHARED / "alpaca" / "alpaca_merged.json"
SST2 = SHARED / "sst2"
SEED = 42


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --------------------------------------------------------------- SFT workers


def sft_rows(n: int) -> list[dict]:
    import random

    rows = json.loads(ALPACA.read_text())
    rows = [r for r in rows if r["output"].strip()]
    random.Random(SEED).shuffle(rows)
    return [{"prompt": (r["instruction"] + ("\n\n" + r["input"] if r["input"] else "")), "response": r["output"]}
            for r in rows[:n]]


def sft_settings(args) -> dict:
    return {"batch_size": args.sft_batch, "learning_rate": 2e-4, "max_length": args.sft_max_length, "r": 16,
            "alpha": 32, "dropout": 0.0}


def worker_sft_tuneforge(args) -> dict:
    from tuneforge import api

    s = sft_settings(args)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "train.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in sft_rows(args.sft_rows)))
        held = Path(tmp) / "held.jsonl"  # a tiny held-out file so nothing is carved out of train
        held.write_text("".join(json.dumps(r) + "\n" for r in sft_rows(args.sft_rows + 4)[-4:]))
        recipe = {
            "model": "smollm2-135m-instruct", "task": "sft",
            # No cleaning: the baseline trains on the raw rows, token for token the same.
            "data": {"train": str(data), "validation": str(held), "test": str(held), "dedup": False,
                     "clean": {"nfkc": False, "whitespace": False}},
            "method": {"name": "lora", "r": s["r"], "alpha": s["alpha"], "dropout": s["dropout"]},
            # group_by_length off: the same random batches as the baseline (which is
            # fed our order), so the loss curves compare step by step.
            "train": {"epochs": 1, "batch_size": s["batch_size"], "learning_rate": s["learning_rate"], "warmup": 0,
                      "max_length": s["max_length"], "seed": SEED, "log_every": 1, "eval_every": 10_000,
                      "group_by_length": False},
            "eval": {"baseline": False, "max_generate": 1, "max_new_tokens": 4, "bootstrap": False},
        }
        out = Path(tmp) / "run"
        api.train(recipe, output=str(out), quiet=True)
        log = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in log if "split" not in r]
    # Per-step time from each line's own window (log_every=1): training loop time only.
    seconds = sum(1.0 / r["tokens_per_s"] * r.get("tokens", 0) for r in steps if r.get("tokens"))
    return {"losses": [r["loss"] for r in steps], "train_seconds": seconds,
            "useful_tokens": sum(r["tokens"] for r in steps), "peak_rss_mb": peak_rss_mb()}


def _tokenised_sft(args):
    """The exact token ids and labels tuneforge trains on, so both sides see the same data."""
    from tuneforge import catalog
    from tuneforge.data.render import render, to_messages
    from tuneforge.models import load_tokenizer

    tok = load_tokenizer(catalog.resolve("smollm2-135m-instruct"))
    rendered = [render(tok, to_messages(r, None), args.sft_max_length) for r in sft_rows(args.sft_rows)]
    rows = [{"input_ids": r.input_ids, "labels": r.labels} for r in rendered if r.n_target]
    # tuneforge's data order for this seed (no length grouping): the baseline is fed
    # its rows in that order, so both sides take the same batches step by step.
    from tuneforge.training.batching import plan_epoch

    plan = plan_epoch([len(r["input_ids"]) for r in rows], args.sft_batch, 1, SEED, 0, False)
    return tok, [rows[i] for step in plan for mb in step for i in mb]


def timing_callback():
    """A Trainer callback keeping the logged losses and the training loop's own time
    (on_train_begin to on_train_end: model loading and Trainer set-up are not charged
    to the peer)."""
    from transformers import TrainerCallback

    class Timing(TrainerCallback):
        def __init__(self):
            self.losses, self.t0, self.seconds = [], 0.0, 0.0

        def on_train_begin(self, a, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_train_end(self, a, state, control, **kw):
            self.seconds = time.perf_counter() - self.t0

        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.losses.append(logs["loss"])

    return Timing()


def _lora_model(s: dict, attn_implementation: str = "sdpa"):
    """smollm2 + LoRA, initialised from the same seed on every side."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tuneforge import catalog

    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_pretrained(catalog.resolve("smollm2-135m-instruct"), dtype=torch.float32,
                                                 attn_implementation=attn_implementation)
    return get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=s["r"], lora_alpha=s["alpha"],
                                            lora_dropout=s["dropout"], target_modules="all-linear"))


def worker_sft_baseline(args) -> dict:
    """The plain peer: transformers.Trainer + peft, defaults, padding to the longest row of each batch."""
    import torch
    from transformers import Trainer, TrainingArguments

    s = sft_settings(args)
    tok, rows = _tokenised_sft(args)
    model = _lora_model(s)

    def collate(batch):  # pad to the longest sequence in the batch
        width = max(len(b["input_ids"]) for b in batch)
        ids = [b["input_ids"] + [tok.pad_token_id] * (width - len(b["input_ids"])) for b in batch]
        labels = [b["labels"] + [-100] * (width - len(b["labels"])) for b in batch]
        mask = [[1] * len(b["input_ids"]) + [0] * (width - len(b["input_ids"])) for b in batch]
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "attention_mask": torch.tensor(mask)}

    timing = timing_callback()
    with tempfile.TemporaryDirectory() as tmp:
        targs = TrainingArguments(output_dir=tmp, per_device_train_batch_size=s["batch_size"], num_train_epochs=1,
                                  learning_rate=s["learning_rate"], logging_steps=1, save_strategy="no", seed=SEED,
                                  report_to="none", disable_tqdm=True, use_cpu=True, remove_unused_columns=False,
                                  train_sampling_strategy="sequential")  # the order given: tuneforge's batches
        Trainer(model=model, args=targs, train_dataset=rows, data_collator=collate, callbacks=[timing]).train()
    return {"losses": timing.losses, "train_seconds": timing.seconds,
            "useful_tokens": sum(len(r["input_ids"]) for r in rows), "peak_rss_mb": peak_rss_mb()}


def worker_sft_trl(args, bf16: bool = False) -> dict:
    """The strongest peer: TRL's SFTTrainer, padding-free (each batch's examples end to end
    in one row, position ids restarting per example; transformers turns those into a
    block-diagonal mask for SDPA, the attention CPUs have), completion-only loss, and
    TRL's fused LM head (supervised positions only). Same batches in the same order as
    tuneforge, so no dataset-level packing (BFD would regroup the examples). float32 like
    tuneforge unless bf16 (TRL's default precision, bf16 autocast); TRL's default
    activation checkpointing is off (it trades speed for memory)."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    s = sft_settings(args)
    tok, rows = _tokenised_sft(args)
    data = Dataset.from_list([{"input_ids": r["input_ids"], "completion_mask": [int(x != -100) for x in r["labels"]]}
                              for r in rows])
    model = _lora_model(s)
    timing = timing_callback()
    with tempfile.TemporaryDirectory() as tmp:
        config = SFTConfig(output_dir=tmp, per_device_train_batch_size=s["batch_size"], num_train_epochs=1,
                           learning_rate=s["learning_rate"], logging_steps=1, save_strategy="no", seed=SEED,
                           report_to="none", disable_tqdm=True, use_cpu=True, bf16=bf16,
                           activation_checkpointing=False, padding_free=True, completion_only_loss=True,
                           packing=False, max_length=None,  # rows are already cut to max_length
                           train_sampling_strategy="sequential", dataset_num_proc=None)
        trainer = SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tok, callbacks=[timing])
        trainer.train()
    return {"losses": timing.losses, "train_seconds": timing.seconds,
            "useful_tokens": sum(len(r["input_ids"]) for r in rows), "peak_rss_mb": peak_rss_mb(),
            "trl_padding_free": trainer.padding_free, "trl_completion_only_loss": trainer.completion_only_loss}


def worker_sft_trl_bf16(args) -> dict:
    return worker_sft_trl(args, bf16=True)


# ---------------------------------------------------- classification workers


def cls_settings(args) -> dict:
    return {"batch_size": 32, "learning_rate": 1e-4, "max_length": 64, "rows": args.cls_rows}


def worker_cls_tuneforge(args) -> dict:
    from tuneforge import api

    s = cls_settings(args)
    with tempfile.TemporaryDirectory() as tmp:
        recipe = {
            "model": "minilm-l6", "task": "classification",
            "data": {"train": str(SST2 / "train.tsv"), "validation": str(SST2 / "dev.tsv"),
                     "test": str(SST2 / "dev.tsv"), "text_column": "sentence", "max_rows": s["rows"], "dedup": False},
            "method": {"name": "full"},
            # Length-grouped batches (tuneforge's default): the classification win.
            "train": {"epochs": 1, "batch_size": s["batch_size"], "learning_rate": s["learning_rate"], "warmup": 0,
                      "max_length": s["max_length"], "seed": SEED, "log_every": 1, "eval_every": 10_000},
            "eval": {"bootstrap": False, "robustness": False},  # training speed and accuracy only
        }
        out = Path(tmp) / "run"
        metrics = api.train(recipe, output=str(out), quiet=True)
        log = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in log if "split" not in r]
    seconds = sum(r["tokens"] / r["tokens_per_s"] for r in steps if r.get("tokens"))
    return {"examples": s["rows"], "train_seconds": seconds, "accuracy": metrics["test"]["accuracy"],
            "peak_rss_mb": peak_rss_mb()}


def worker_cls_baseline(args, strategy: str = "random") -> dict:
    """HF Trainer, full fine-tuning, DataCollatorWithPadding; strategy "random" is its
    default, "group_by_length" its LengthGroupedSampler (the strongest setup it offers)."""
    import random

    import numpy as np
    import torch
    from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding, Trainer, TrainingArguments

    from tuneforge import catalog
    from tuneforge.models import load_tokenizer

    s = cls_settings(args)
    lines = (SST2 / "train.tsv").read_text().splitlines()[1:]
    rows = [line.rsplit("\t", 1) for line in lines]
    rows = random.Random(SEED).sample(rows, s["rows"])
    dev = [line.rsplit("\t", 1) for line in (SST2 / "dev.tsv").read_text().splitlines()[1:]]
    path = catalog.resolve("minilm-l6")
    tok = load_tokenizer(path)

    def encode(pairs):
        enc = tok([t for t, _ in pairs], truncation=True, max_length=s["max_length"])
        return [{"input_ids": i, "attention_mask": m, "labels": int(y)}
                for i, m, (_, y) in zip(enc["input_ids"], enc["attention_mask"], pairs)]

    torch.manual_seed(SEED)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    timing = timing_callback()
    with tempfile.TemporaryDirectory() as tmp:
        targs = TrainingArguments(output_dir=tmp, per_device_train_batch_size=s["batch_size"], num_train_epochs=1,
                                  learning_rate=s["learning_rate"], logging_steps=10, save_strategy="no", seed=SEED,
                                  report_to="none", disable_tqdm=True, use_cpu=True,
                                  per_device_eval_batch_size=64, train_sampling_strategy=strategy)
        trainer = Trainer(model=model, args=targs, train_dataset=encode(rows), processing_class=tok,
                          data_collator=DataCollatorWithPadding(tok), callbacks=[timing])
        trainer.train()
        pred = trainer.predict(encode(dev))
    accuracy = float((np.argmax(pred.predictions, axis=1) == pred.label_ids).mean())
    return {"examples": s["rows"], "train_seconds": timing.seconds, "accuracy": accuracy,
            "peak_rss_mb": peak_rss_mb()}


def worker_cls_grouped(args) -> dict:
    return worker_cls_baseline(args, strategy="group_by_length")


def worker_matmul(args) -> dict:
    """This machine's fp32 matmul throughput, the ceiling for useful FLOP/s."""
    import torch

    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    reps, t0 = 20, time.perf_counter()
    for _ in range(reps):
        a @ b
    seconds = time.perf_counter() - t0
    return {"flops_per_s": 2 * n**3 * reps / seconds, "threads": torch.get_num_threads()}


WORKERS = {"matmul": worker_matmul,
           "sft-tuneforge": worker_sft_tuneforge, "sft-trl": worker_sft_trl, "sft-trl-bf16": worker_sft_trl_bf16,
           "sft-baseline": worker_sft_baseline,
           "cls-tuneforge": worker_cls_tuneforge, "cls-grouped": worker_cls_grouped,
           "cls-baseline": worker_cls_baseline}
SFT_PEERS = ("sft-trl", "sft-baseline")  # strongest first; sft-trl-bf16 only with --trl-bf16
CLS_PEERS = ("cls-grouped", "cls-baseline")


# ------------------------------------------------------------------- driver


def run_worker(name: str, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", name, "--sft-rows", str(args.sft_rows), "--sft-batch",
           str(args.sft_batch), "--sft-max-length", str(args.sft_max_length), "--cls-rows", str(args.cls_rows)]
    before = conditions()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_seconds"] = time.perf_counter() - t0
    result["conditions"] = {"start": before, "end": conditions()}
    print(f"  {name}: done in {result['process_seconds']:.0f} s (load {before['loadavg'][0]:.2f})", file=sys.stderr)
    return result


def mean_tail(xs: list[float], k: int = 5) -> float:
    tail = xs[-k:]
    return sum(tail) / len(tail)


def median(xs: list[float]) -> float:
    xs = sorted(xs)
    mid = len(xs) // 2
    return xs[mid] if len(xs) % 2 else (xs[mid - 1] + xs[mid]) / 2


def run_rounds(args, raw: Path) -> dict[str, list[dict]]:
    """Every side once per round, tuneforge and its peers back to back, so they see
    the same load; SFT rounds first, then classification, matmul at both ends.
    The raw worker results are saved to `raw` after each worker (--summarise RAW
    rebuilds the result from them)."""
    sft = ("sft-tuneforge",) + SFT_PEERS + (("sft-trl-bf16",) if args.trl_bf16 else ())
    groups = {"sft": sft, "cls": ("cls-tuneforge",) + CLS_PEERS}
    order = ["matmul"] + [n for part in args.only for _ in range(args.repeats) for n in groups[part]] + ["matmul"]
    runs: dict[str, list[dict]] = {}
    for name in order:
        runs.setdefault(name, []).append(run_worker(name, args))
        raw.write_text(json.dumps({"args": vars(args), "runs": runs}))
    return runs


def sft_flop_accounting(args) -> tuple[dict, object]:
    from transformers import AutoConfig

    from tuneforge import catalog

    cfg = AutoConfig.from_pretrained(catalog.resolve("smollm2-135m-instruct"))
    dims = decoder_dims(cfg, sft_settings(args)["r"], total_params=134_515_008)
    _, rows = _tokenised_sft(args)
    lengths = [len(r["input_ids"]) for r in rows]
    targets = [sum(1 for x in r["labels"][1:] if x != -100) for r in rows]  # positions that predict a target
    return sft_flops(dims, lengths, targets), dims


def side_figures(run: dict, flops: dict, legacy_per_token: float, peak: float) -> dict:
    tps = run["useful_tokens"] / run["train_seconds"]
    return {"tokens_per_s": tps, "train_seconds": run["train_seconds"], "peak_rss_mb": run["peak_rss_mb"],
            "loss_mean_last5": mean_tail(run["losses"]), "losses": run["losses"],
            "flops_utilization": flops["total"] / run["train_seconds"] / peak,
            "flops_utilization_legacy": tps * legacy_per_token / peak, "conditions": run["conditions"]}


def sft_summary(runs: dict, args, peak: float) -> dict:
    flops, dims = sft_flop_accounting(args)
    tokens = runs["sft-tuneforge"][0]["useful_tokens"]
    legacy = legacy_flops_per_token(dims, tokens, args.sft_rows)
    sides = {name: [side_figures(r, flops, legacy, peak) for r in rs] for name, rs in runs.items()
             if name.startswith("sft-")}
    for name, rs in runs.items():
        if name.startswith("sft-") and rs[0]["useful_tokens"] != tokens:
            raise RuntimeError(f"{name} trained {rs[0]['useful_tokens']} tokens, tuneforge {tokens}")
    tf = sides["sft-tuneforge"]
    out = {"useful_tokens": tokens, "supervised_tokens": flops["supervised_tokens"],
           "flops_per_token": flops["per_token"], "flops_terms": flops["terms"],
           "flops_per_token_legacy": legacy, "sides": sides}
    for name in sides:
        if name == "sft-tuneforge":
            continue
        ratios = [a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(tf, sides[name])]
        out[f"speedup_vs_{name[4:]}"] = median(ratios)
        out[f"speedup_vs_{name[4:]}_rounds"] = ratios
        out[f"loss_curve_max_abs_diff_vs_{name[4:]}"] = max(
            abs(a - b) for a, b in zip(tf[0]["losses"], sides[name][0]["losses"]))
        out[f"memory_ratio_vs_{name[4:]}"] = tf[0]["peak_rss_mb"] / sides[name][0]["peak_rss_mb"]
    return out


def cls_summary(runs: dict) -> dict:
    sides = {name: [{"examples_per_s": r["examples"] / r["train_seconds"], "train_seconds": r["train_seconds"],
                     "accuracy": r["accuracy"], "peak_rss_mb": r["peak_rss_mb"], "conditions": r["conditions"]}
                    for r in rs] for name, rs in runs.items() if name.startswith("cls-")}
    tf = sides["cls-tuneforge"]
    out = {"sides": sides}
    for name in CLS_PEERS:
        ratios = [a["examples_per_s"] / b["examples_per_s"] for a, b in zip(tf, sides[name])]
        out[f"speedup_vs_{name[4:]}"] = median(ratios)
        out[f"speedup_vs_{name[4:]}_rounds"] = ratios
    return out


LABELS = {"sft-tuneforge": "tuneforge", "sft-trl": "TRL SFTTrainer padding-free (strongest)",
          "sft-trl-bf16": "TRL padding-free, bf16 autocast", "sft-baseline": "HF Trainer + peft, padded (plain)",
          "cls-tuneforge": "tuneforge", "cls-grouped": "HF Trainer group_by_length (strongest)",
          "cls-baseline": "HF Trainer random batches (plain)"}


def print_table(result: dict, path: Path) -> None:
    s, c = result["sft"], result["classification"]
    if s:
        print_sft(s)
    if c:
        print_cls(c)
    flops = (f"; FLOPs/token {s['flops_per_token'] / 1e6:.1f}M (legacy {s['flops_per_token_legacy'] / 1e6:.1f}M)"
             if s else "")
    print(f"matmul {result['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s{flops}\nwrote {path}")


def print_sft(s: dict) -> None:
    print("\nSFT (smollm2-135m + LoRA, Alpaca)           tokens/s   peak RSS MB   loss(last5)   FLOP util")
    for name, rs in s["sides"].items():
        r = rs[0]
        tps = median([x["tokens_per_s"] for x in rs])
        print(f"  {LABELS[name]:<42} {tps:8.1f}   {r['peak_rss_mb']:10.0f}   {r['loss_mean_last5']:10.4f}"
              f"   {r['flops_utilization']:6.1%} (legacy {r['flops_utilization_legacy']:.1%})")
    for key in [k for k in s if k.startswith("speedup_vs_") and not k.endswith("_rounds")]:
        print(f"  tuneforge {key.replace('_', ' ')}: {s[key]:.2f}x"
              f"  (max step loss diff {s['loss_curve_max_abs_diff_vs_' + key[11:]]:.2e})")


def print_cls(c: dict) -> None:
    print("CLS (minilm-l6, SST-2)                      examples/s   dev accuracy   peak RSS MB")
    for name, rs in c["sides"].items():
        eps = median([x["examples_per_s"] for x in rs])
        print(f"  {LABELS[name]:<42} {eps:8.1f}   {rs[0]['accuracy']:10.4f}   {rs[0]['peak_rss_mb']:10.0f}")
    for key in [k for k in c if k.startswith("speedup_vs_") and not k.endswith("_rounds")]:
        print(f"  tuneforge {key.replace('_', ' ')}: {c[key]:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", choices=list(WORKERS))
    parser.add_argument("--sft-rows", type=int, default=96)
    parser.add_argument("--sft-batch", type=int, default=8)
    parser.add_argument("--sft-max-length", type=int, default=512)
    parser.add_argument("--cls-rows", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=1, help="rounds of every side (ratios: the median)")
    parser.add_argument("--trl-bf16", action="store_true", help="also TRL in bf16 autocast (TRL's default precision)")
    parser.add_argument("--out", help="result path (default: a new bench/results/<UTC time>-<host>.json)")
    parser.add_argument("--only", nargs="+", choices=["sft", "cls"], default=["sft", "cls"],
                        help="run these parts only")
    parser.add_argument("--summarise", metavar="RAW", help="rebuild the result from a run's raw worker file")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(WORKERS[args.worker](args)))
        return
    if args.summarise:
        saved = json.loads(Path(args.summarise).read_text())
        args = argparse.Namespace(**({"only": ["sft", "cls"]} | saved["args"] | {"out": args.out}))
        runs = saved["runs"]
        started = runs["matmul"][0]["conditions"]["start"]
    else:
        raw = Path(tempfile.gettempdir()) / f"tuneforge-bench-raw-{os.getpid()}.json"
        print(f"benchmarking (each side in its own process, tuneforge and peers interleaved); raw: {raw}",
              file=sys.stderr)
        started = conditions()
        runs = run_rounds(args, raw)
    peak = max(r["flops_per_s"] for r in runs["matmul"])
    result = {
        "date": started["time"], "host": socket.gethostname(), "cpu_count": os.cpu_count(),
        "conditions": {"start": started, "end": runs["matmul"][-1]["conditions"]["end"]}, "repeats": args.repeats,
        "settings": {"sft": sft_settings(args) | {"rows": args.sft_rows}, "classification": cls_settings(args)},
        "sft": sft_summary(runs, args, peak) if "sft" in args.only else None,
        "classification": cls_summary(runs) if "cls" in args.only else None,
        "matmul_flops_per_s": peak, "matmul_runs": runs["matmul"],
        "flops_note": "flops_utilization counts the work training needs (bench/flops.py: LM head on supervised "
                      "positions, causal attention per example); *_legacy is the earlier 4N-per-token estimate",
    }
    print_table(result, write_to(args.out, result))


if __name__ == "__main__":
    main()
