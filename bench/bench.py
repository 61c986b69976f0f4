"""tuneforge vs the plain Hugging Face baseline, back to back on this machine.

    python bench/bench.py                 # `make bench`; writes bench/results/<date>-<host>.json
    python bench/bench.py --sft-rows 32   # quicker

Each measurement runs in its own process so peak resident memory is its own.
SFT: smollm2-135m-instruct + LoRA (r=16, all-linear) on the Alpaca subset
(chat template, mixed lengths); the baseline is transformers.Trainer + peft with
default settings and padding to the longest sequence in each batch. Both train
on the same examples, tokenised identically, with the same seed and
hyper-parameters. Classification: minilm-l6 on an SST-2 subset, full fine-tuning,
scored on the SST-2 dev set.

Useful tokens are tokens that are not padding. Useful FLOPs per token follow the
usual estimate: 6N for full fine-tuning, 4N for LoRA (frozen weights need no
weight gradients), plus 12 * layers * d_model * seq_len for attention, with N the
parameter count; they are compared with this machine's measured matmul FLOP/s.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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


def worker_sft_baseline(args) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from tuneforge import catalog

    s = sft_settings(args)
    tok, rows = _tokenised_sft(args)
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_pretrained(catalog.resolve("smollm2-135m-instruct"), dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=s["r"], lora_alpha=s["alpha"],
                                             lora_dropout=s["dropout"], target_modules="all-linear"))

    def collate(batch):  # pad to the longest sequence in the batch
        width = max(len(b["input_ids"]) for b in batch)
        ids = [b["input_ids"] + [tok.pad_token_id] * (width - len(b["input_ids"])) for b in batch]
        labels = [b["labels"] + [-100] * (width - len(b["labels"])) for b in batch]
        mask = [[1] * len(b["input_ids"]) + [0] * (width - len(b["input_ids"])) for b in batch]
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "attention_mask": torch.tensor(mask)}

    losses = []

    class Keep(TrainerCallback):
        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(logs["loss"])

    with tempfile.TemporaryDirectory() as tmp:
        targs = TrainingArguments(output_dir=tmp, per_device_train_batch_size=s["batch_size"], num_train_epochs=1,
                                  learning_rate=s["learning_rate"], logging_steps=1, save_strategy="no", seed=SEED,
                                  report_to="none", disable_tqdm=True, use_cpu=True, remove_unused_columns=False)
        class InOrder(Trainer):  # default Trainer, except that it keeps the order given
            def _get_train_sampler(self, train_dataset=None):
                return torch.utils.data.SequentialSampler(train_dataset or self.train_dataset)

        trainer = InOrder(model=model, args=targs, train_dataset=rows, data_collator=collate, callbacks=[Keep()])
        t0 = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - t0
    return {"losses": losses, "train_seconds": seconds, "useful_tokens": sum(len(r["input_ids"]) for r in rows),
            "peak_rss_mb": peak_rss_mb()}


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
            "eval": {"bootstrap": False},
        }
        out = Path(tmp) / "run"
        metrics = api.train(recipe, output=str(out), quiet=True)
        log = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in log if "split" not in r]
    seconds = sum(r["tokens"] / r["tokens_per_s"] for r in steps if r.get("tokens"))
    return {"examples": s["rows"], "train_seconds": seconds, "accuracy": metrics["test"]["accuracy"],
            "peak_rss_mb": peak_rss_mb()}


def worker_cls_baseline(args) -> dict:
    import numpy as np
    import torch
    from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding, Trainer, TrainingArguments

    from tuneforge import catalog
    from tuneforge.models import load_tokenizer

    s = cls_settings(args)
    import random

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
    with tempfile.TemporaryDirectory() as tmp:
        targs = TrainingArguments(output_dir=tmp, per_device_train_batch_size=s["batch_size"], num_train_epochs=1,
                                  learning_rate=s["learning_rate"], logging_steps=10, save_strategy="no", seed=SEED,
                                  report_to="none", disable_tqdm=True, use_cpu=True,
                                  per_device_eval_batch_size=64)
        trainer = Trainer(model=model, args=targs, train_dataset=encode(rows),
                          data_collator=DataCollatorWithPadding(tok))
        t0 = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - t0
        pred = trainer.predict(encode(dev))
    accuracy = float((np.argmax(pred.predictions, axis=1) == pred.label_ids).mean())
    return {"examples": s["rows"], "train_seconds": seconds, "accuracy": accuracy, "peak_rss_mb": peak_rss_mb()}


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


WORKERS = {"sft-tuneforge": worker_sft_tuneforge, "sft-baseline": worker_sft_baseline,
           "cls-tuneforge": worker_cls_tuneforge, "cls-baseline": worker_cls_baseline, "matmul": worker_matmul}


# ------------------------------------------------------------------- driver


def run_worker(name: str, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", name, "--sft-rows", str(args.sft_rows), "--sft-batch",
           str(args.sft_batch), "--sft-max-length", str(args.sft_max_length), "--cls-rows", str(args.cls_rows)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_seconds"] = time.perf_counter() - t0
    print(f"  {name}: done in {result['process_seconds']:.0f} s", file=sys.stderr)
    return result


def mean_tail(xs: list[float], k: int = 5) -> float:
    tail = xs[-k:]
    return sum(tail) / len(tail)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", choices=list(WORKERS))
    parser.add_argument("--sft-rows", type=int, default=96)
    parser.add_argument("--sft-batch", type=int, default=8)
    parser.add_argument("--sft-max-length", type=int, default=512)
    parser.add_argument("--cls-rows", type=int, default=2000)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(WORKERS[args.worker](args)))
        return

    print("benchmarking (each side in its own process) ...", file=sys.stderr)
    r = {name: run_worker(name, args) for name in WORKERS}
    from transformers import AutoConfig

    from tuneforge import catalog

    cfg = AutoConfig.from_pretrained(catalog.resolve("smollm2-135m-instruct"))
    n_params = 134_515_008
    tf, hf = r["sft-tuneforge"], r["sft-baseline"]
    avg_seq = tf["useful_tokens"] / args.sft_rows
    flops_per_token = 4 * n_params + 12 * cfg.num_hidden_layers * cfg.hidden_size * avg_seq
    tps = {k: v["useful_tokens"] / v["train_seconds"] for k, v in (("tuneforge", tf), ("baseline", hf))}
    ct, cb = r["cls-tuneforge"], r["cls-baseline"]
    eps = {"tuneforge": ct["examples"] / ct["train_seconds"], "baseline": cb["examples"] / cb["train_seconds"]}
    result = {
        "date": dt.datetime.now().isoformat(timespec="seconds"), "host": socket.gethostname(),
        "cpu_count": os.cpu_count(), "settings": {"sft": sft_settings(args) | {"rows": args.sft_rows},
                                                  "classification": cls_settings(args)},
        "sft": {
            "tokens_per_s_tuneforge": tps["tuneforge"], "tokens_per_s_baseline": tps["baseline"],
            "speedup": tps["tuneforge"] / tps["baseline"],
            "peak_rss_mb_tuneforge": tf["peak_rss_mb"], "peak_rss_mb_baseline": hf["peak_rss_mb"],
            "memory_ratio": tf["peak_rss_mb"] / hf["peak_rss_mb"],
            "train_seconds_tuneforge": tf["train_seconds"], "train_seconds_baseline": hf["train_seconds"],
            "loss_tuneforge": mean_tail(tf["losses"]), "loss_baseline": mean_tail(hf["losses"]),
            "useful_tokens": tf["useful_tokens"],
            # Same batches in the same order: the curves compare step by step.
            "loss_curve_tuneforge": tf["losses"], "loss_curve_baseline": hf["losses"],
            "loss_curve_max_abs_diff": max(abs(a - b) for a, b in zip(tf["losses"], hf["losses"])),
        },
        "classification": {
            "examples_per_s_tuneforge": eps["tuneforge"], "examples_per_s_baseline": eps["baseline"],
            "speedup": eps["tuneforge"] / eps["baseline"],
            "accuracy_tuneforge": ct["accuracy"], "accuracy_baseline": cb["accuracy"],
            "peak_rss_mb_tuneforge": ct["peak_rss_mb"], "peak_rss_mb_baseline": cb["peak_rss_mb"],
        },
        "matmul_flops_per_s": r["matmul"]["flops_per_s"],
        "flops_per_token_sft": flops_per_token,
        "flops_utilization": tps["tuneforge"] * flops_per_token / r["matmul"]["flops_per_s"],
        "flops_utilization_baseline": tps["baseline"] * flops_per_token / r["matmul"]["flops_per_s"],
    }
    out = ROOT / "bench" / "results" / f"{dt.date.today().isoformat()}-{socket.gethostname()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    s, c = result["sft"], result["classification"]
    print(f"""
                         tuneforge     HF baseline   ratio
SFT useful tokens/s    {s['tokens_per_s_tuneforge']:10.1f}    {s['tokens_per_s_baseline']:10.1f}    {s['speedup']:.2f}x
SFT peak RSS (MB)      {s['peak_rss_mb_tuneforge']:10.0f}    {s['peak_rss_mb_baseline']:10.0f}    {s['memory_ratio']:.2f}
SFT final loss (mean5) {s['loss_tuneforge']:10.4f}    {s['loss_baseline']:10.4f}    max step diff {s['loss_curve_max_abs_diff']:.4f}
CLS examples/s         {c['examples_per_s_tuneforge']:10.1f}    {c['examples_per_s_baseline']:10.1f}    {c['speedup']:.2f}x
CLS dev accuracy       {c['accuracy_tuneforge']:10.4f}    {c['accuracy_baseline']:10.4f}
CLS peak RSS (MB)      {c['peak_rss_mb_tuneforge']:10.0f}    {c['peak_rss_mb_baseline']:10.0f}
matmul GFLOP/s {result['matmul_flops_per_s'] / 1e9:.1f}; useful FLOP/s utilisation: tuneforge \
{result['flops_utilization']:.1%}, baseline {result['flops_utilization_baseline']:.1%}
wrote {out}""")


if __name__ == "__main__":
    main()
