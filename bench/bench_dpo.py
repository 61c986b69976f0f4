"""DPO step time and peak memory: tuneforge against TRL's DPOTrainer on the same pairs and batches, on CPU.

    python bench/bench_dpo.py                       # writes a new bench/results/<UTC time>-<host>-dpo.json
    python bench/bench_dpo.py --pairs 16 --batch 4  # quicker

smollm2-135m-instruct + LoRA (r=16, alpha 32, dropout 0, all-linear), float32, DPO sigmoid loss, beta 0.1, on the
shortest `--pairs` HH-RLHF harmless pairs (rendered by tuneforge with the chat template, none truncated). Every
side trains the same token ids, in the same batches and order (tuneforge's seeded plan, no length grouping), from
the same LoRA initialisation, so the loss curves compare step by step. Each side runs in its own process, back to
back, so its peak resident memory (ru_maxrss: model loading included) is its own and all see the same load, which
each records (`conditions`: time and load averages).

  dpo-tuneforge        tuneforge's dpo trainer: reference log-probs once before training (timed apart), both sides
                       of every pair in one padding-free forward pass, the output head on response tokens only;
  dpo-trl              TRL 1.16 DPOTrainer with its defaults for a peft model: the reference recomputed every step
                       (adapter disabled), padded batches (TRL 1.16 has padding_free disabled);
  dpo-trl-precomputed  TRL with precompute_ref_log_probs=True: the reference once before training, as tuneforge
                       (the strongest setup a user can pick; its precompute is timed apart too);
  sft-tuneforge        tuneforge SFT on the chosen sides (the same conversations and tokens), the same batch size
                       and max_length: the memory yardstick for "no second model in memory";
  sft-tuneforge-2x     the same at twice the batch: as many sequences per forward pass as DPO (a pair is two).

TRL is handed the token ids directly (prompt_ids / chosen_ids / rejected_ids; its own dataset preparation is
skipped), float32 (bf16=False), dropout off, no gradient checkpointing, sequential sampling over tuneforge's order.
Step time is the training loop's own (tuneforge: its per-step log windows; TRL: on_train_begin to on_train_end,
and on_step_begin to on_step_end per step); `steady_*` is the median step after the first.
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

ROOT = Path(__file__).resolve().parents[1]
HH = ROOT.parent / "shared" / "data" / "hh_rlhf_harmless" / "harmless_base_test_pcr.jsonl"
MODEL = "smollm2-135m-instruct"
SEED, LR, BETA, R, ALPHA = 42, 5e-5, 0.1, 16, 32


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def shortest_rows(args) -> list[dict]:
    """The `--pairs` shortest HH-RLHF harmless pairs (by characters, file order breaking ties), then 2 more held
    out for validation."""
    rows = [json.loads(line) for line in HH.read_text().splitlines() if line.strip()]
    size = [len(r["prompt"] + r["chosen"] + r["rejected"]) for r in rows]
    order = sorted(range(len(rows)), key=lambda i: (size[i], i))
    return [rows[i] for i in order[:args.pairs + 2]]


def write_data(args, folder: Path) -> tuple[Path, Path]:
    """The training pairs and the 2 held-out ones as JSONL files in `folder`."""
    rows = shortest_rows(args)
    train, held = folder / "train.jsonl", folder / "validation.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows[:-2]))
    held.write_text("".join(json.dumps(r) + "\n" for r in rows[-2:]))
    return train, held


def tuneforge_recipe(args, train: Path, held: Path, task: str, batch: int) -> dict:
    """The recipe every tuneforge side trains: TRL's schedule (linear, no warm-up), no length grouping, no test pass
    beyond the minimum."""
    return {"name": f"bench-{task}", "model": MODEL, "task": task,
            "data": {"train": str(train), "validation": str(held), "split": [1.0, 0.0, 0.0], "dedup": False},
            "method": {"name": "lora", "r": R, "alpha": ALPHA, "dropout": 0.0, "target_modules": "all-linear"},
            "alignment": {"loss_type": "sigmoid", "beta": BETA},
            "train": {"epochs": 1, "batch_size": batch, "learning_rate": LR, "warmup": 0, "scheduler": "linear",
                      "max_length": args.max_length, "seed": SEED, "group_by_length": False, "log_every": 1,
                      "eval_every": 10_000, "dropout": 0.0},
            "eval": {"baseline": False, "max_new_tokens": 1, "max_generate": 1, "bootstrap": False}}


def step_times(out: Path) -> tuple[list[float], list[float], int]:
    """(loss per step, seconds per step, units trained) from a run's metrics.jsonl (logged every step)."""
    steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if "split" not in r and "loss" in r]
    seconds = [r["tokens"] / r["tokens_per_s"] if r.get("tokens_per_s") else 0.0 for r in steps]
    return [r["loss"] for r in steps], seconds, sum(r.get("tokens", 0) for r in steps)


def worker_tuneforge(args, task: str, batch_factor: int = 1) -> dict:
    from tuneforge import api

    timed = {}
    if task == "dpo":
        from tuneforge.trainers import dpo

        real = dpo.reference_logps

        def timed_reference(*a, **kw):
            t0 = time.perf_counter()
            out = real(*a, **kw)
            timed["reference_seconds"] = time.perf_counter() - t0
            return out

        dpo.reference_logps = timed_reference
    with tempfile.TemporaryDirectory() as tmp:
        train, held = write_data(args, Path(tmp))
        if task == "sft":  # the chosen side of each pair as the conversation SFT trains on: the same tokens
            from tuneforge.data.pairs import prompt_messages

            for path in (train, held):
                rows = [json.loads(x) for x in path.read_text().splitlines()]
                path.write_text("".join(json.dumps({"messages": prompt_messages(r["prompt"]) + [
                    {"role": "assistant", "content": r["chosen"]}]}) + "\n" for r in rows))
        out = Path(tmp) / "run"
        api.train(tuneforge_recipe(args, train, held, task, args.batch * batch_factor), output=str(out), quiet=True)
        losses, seconds, tokens = step_times(out)
    return {"losses": losses, "step_seconds": seconds, "train_seconds": sum(seconds), "tokens": tokens,
            "peak_rss_mb": peak_rss_mb(), **timed}


def trl_rows(args) -> tuple[object, list[dict]]:
    """The pairs as TRL's collator takes them, in tuneforge's batch order: prompt_ids, chosen_ids, rejected_ids,
    the completions ending at their last scored token (the tokens tuneforge scores)."""
    from tuneforge import catalog
    from tuneforge.evaluate.policy import render_split
    from tuneforge.models import load_tokenizer
    from tuneforge.training.batching import plan_epoch

    tokenizer = load_tokenizer(catalog.resolve(MODEL))
    pairs, _ = render_split(tokenizer, shortest_rows(args)[:-2], args.max_length)

    def split(rendered) -> tuple[list[int], list[int]]:
        scored = [i for i, x in enumerate(rendered.labels) if x != -100]
        return rendered.input_ids[:scored[0]], rendered.input_ids[scored[0]:scored[-1] + 1]

    rows = []
    for p in pairs:
        (prompt, chosen), (prompt_r, rejected) = split(p.chosen), split(p.rejected)
        assert prompt == prompt_r, "a pair's two sides must share their prompt tokens"
        rows.append({"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected})
    plan = plan_epoch([len(p.chosen.input_ids) + len(p.rejected.input_ids) for p in pairs], args.batch, 1, SEED, 0,
                      False)
    return tokenizer, [rows[i] for step in plan for mb in step for i in mb]


def worker_trl(args, precompute: bool = False) -> dict:
    import random

    import numpy as np
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from tuneforge import catalog

    class PreTokenized(DPOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset  # already prompt_ids / chosen_ids / rejected_ids

    class Timing(TrainerCallback):
        def __init__(self):
            self.losses, self.t0, self.seconds, self.steps, self.step0 = [], 0.0, 0.0, [], 0.0

        def on_train_begin(self, a, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_begin(self, a, state, control, **kw):
            self.step0 = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            self.steps.append(time.perf_counter() - self.step0)

        def on_train_end(self, a, state, control, **kw):
            self.seconds = time.perf_counter() - self.t0

        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.losses.append(logs["loss"])

    tokenizer, rows = trl_rows(args)
    model = AutoModelForCausalLM.from_pretrained(catalog.resolve(MODEL), dtype=torch.float32)
    random.seed(SEED)
    np.random.seed(SEED)
    torch.manual_seed(SEED)  # as tuneforge seeds right before the adapter is made: the same LoRA initialisation
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=R, lora_alpha=ALPHA, lora_dropout=0.0,
                                             target_modules="all-linear"))
    timing = Timing()
    with tempfile.TemporaryDirectory() as tmp:
        config = DPOConfig(output_dir=tmp, per_device_train_batch_size=args.batch, num_train_epochs=1,
                           learning_rate=LR, beta=BETA, loss_type=["sigmoid"], logging_steps=1, save_strategy="no",
                           seed=SEED, report_to="none", disable_tqdm=True, use_cpu=True, bf16=False,
                           gradient_checkpointing=False, max_length=None, precompute_ref_log_probs=precompute,
                           train_sampling_strategy="sequential", dataset_num_proc=None)
        t0 = time.perf_counter()
        trainer = PreTokenized(model=model, args=config, train_dataset=Dataset.from_list(rows),
                               processing_class=tokenizer, callbacks=[timing])
        setup = time.perf_counter() - t0
        trainer.train()
    return {"losses": timing.losses, "train_seconds": timing.seconds, "step_seconds": timing.steps,
            "tokens": sum(len(r["prompt_ids"]) * 2 + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in rows),
            "peak_rss_mb": peak_rss_mb(), "trainer_setup_seconds": setup,
            **({"reference_seconds": setup} if precompute else {})}


WORKERS = {"dpo-tuneforge": lambda a: worker_tuneforge(a, "dpo"), "sft-tuneforge": lambda a: worker_tuneforge(a, "sft"),
           "sft-tuneforge-2x": lambda a: worker_tuneforge(a, "sft", batch_factor=2),
           "dpo-trl": worker_trl, "dpo-trl-precomputed": lambda a: worker_trl(a, precompute=True)}
SIDES = ("dpo-tuneforge", "dpo-trl", "dpo-trl-precomputed", "sft-tuneforge", "sft-tuneforge-2x")


def run_worker(name: str, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", name, "--pairs", str(args.pairs), "--batch", str(args.batch),
           "--max-length", str(args.max_length)]
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}))
    before, t0 = conditions(), time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result |= {"process_seconds": time.perf_counter() - t0, "conditions": {"start": before, "end": conditions()}}
    print(f"  {name}: {result['train_seconds']:.1f} s training, peak {result['peak_rss_mb']:.0f} MB "
          f"(load {before['loadavg'][0]:.2f})", file=sys.stderr)
    return result


def summary(runs: dict) -> dict:
    ours = runs["dpo-tuneforge"]

    def per_step(r: dict) -> float:
        return r["train_seconds"] / max(len(r["losses"]), 1)

    def steady(r: dict) -> float:  # the median step after the first (which pays first-touch allocation)
        later = sorted(r["step_seconds"][1:]) or r["step_seconds"]
        return later[len(later) // 2]

    peers = {name: {"step_seconds": per_step(r), "speedup": per_step(r) / per_step(ours),
                    "steady_step_seconds": steady(r), "steady_speedup": steady(r) / steady(ours),
                    "max_loss_diff": max((abs(a - b) for a, b in zip(ours["losses"], r["losses"])), default=None),
                    "reference_seconds": r.get("reference_seconds")}
             for name, r in runs.items() if name.startswith("dpo-trl")}
    return {"tuneforge_step_seconds": per_step(ours), "tuneforge_steady_step_seconds": steady(ours),
            "tuneforge_reference_seconds": ours.get("reference_seconds"),
            "vs": peers, "speed_ratio_vs_trl_default": peers["dpo-trl"]["speedup"],
            "speed_ratio_vs_trl_precomputed": peers["dpo-trl-precomputed"]["speedup"],
            "peak_rss_mb": {name: r["peak_rss_mb"] for name, r in runs.items()},
            "dpo_over_sft_peak_rss": ours["peak_rss_mb"] / runs["sft-tuneforge"]["peak_rss_mb"],
            "dpo_over_sft_2x_peak_rss": ours["peak_rss_mb"] / runs["sft-tuneforge-2x"]["peak_rss_mb"],
            "sft_2x_note": "SFT with twice the batch: the same sequences per forward pass as DPO (a pair is two)"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", choices=list(WORKERS))
    parser.add_argument("--pairs", type=int, default=24, help="training pairs (the shortest HH-RLHF ones)")
    parser.add_argument("--batch", type=int, default=4, help="pairs per step")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS of every side (1 steadies timings on a shared "
                        "machine, where descheduled OpenMP threads stall each parallel region)")
    parser.add_argument("--out", help="result path (default: a new bench/results/<UTC time>-<host>-dpo.json)")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(WORKERS[args.worker](args)))
        return
    started = conditions()
    runs = {name: run_worker(name, args) for name in SIDES}
    result = {"date": started["time"], "host": socket.gethostname(), "cpu_count": os.cpu_count(),
              "command": " ".join([Path(sys.executable).name, *sys.argv]),
              "conditions": {"start": started, "end": conditions()},
              "settings": {"model": MODEL, "method": f"lora r={R} alpha={ALPHA} dropout 0 all-linear",
                           "loss": f"sigmoid beta={BETA}", "learning_rate": LR, "pairs": args.pairs,
                           "batch": args.batch, "max_length": args.max_length, "dtype": "float32",
                           "threads": args.threads or "torch default"},
              "summary": summary(runs), "runs": runs}
    path = write_to(args.out, result, "-dpo")
    s = result["summary"]
    print(f"{path}\n  step time: tuneforge {s['tuneforge_step_seconds']:.2f} s; TRL default "
          f"{s['vs']['dpo-trl']['step_seconds']:.2f} s ({s['speed_ratio_vs_trl_default']:.2f}x); TRL precomputed "
          f"{s['vs']['dpo-trl-precomputed']['step_seconds']:.2f} s ({s['speed_ratio_vs_trl_precomputed']:.2f}x)\n"
          f"  peak RSS: DPO / SFT = {s['dpo_over_sft_peak_rss']:.2f} (same batch), "
          f"{s['dpo_over_sft_2x_peak_rss']:.2f} (SFT at twice the batch)  {s['peak_rss_mb']}")


if __name__ == "__main__":
    main()
