"""Classifier inference, model alone: packed batches against padded chunks and one text at a time.

    python bench/bench_packed_cls.py          # writes a new bench/results/<UTC time>-<host>-packed-cls.json

minilm-l6 with a sequence-classification head, the 872 SST-2 dev sentences in
their file order, micro-batches of 32 (what `tuneforge serve --max-batch 32`
hands the model), three ways, for bfloat16 and float32 weights:
  packed   one padding-free row per micro-batch (inference.packed_class_logits,
           what serve does for BERT-style models);
  padded   each micro-batch length-sorted into padded chunks of 8 (serve's path
           for models that cannot pack, serve/engine.CLASSIFY_CHUNK);
  single   one text per forward pass (serve with --max-batch 1).
The modes alternate within each round so they see the same load; texts/s is the
median over rounds. No HTTP: this is the model's share of serving. The packed and
padded logits are compared, so a fast wrong answer cannot pass.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchio import conditions, write_result  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEV = ROOT.parent / "shared" / "data" / "sst2" / "dev.tsv"
BATCH = 32


def modes(model, pad_id: int):
    import torch

    from tuneforge.inference import collate, packed_class_logits
    from tuneforge.serve.engine import CLASSIFY_CHUNK
    from tuneforge.training.batching import eval_batches

    cpu = torch.device("cpu")

    def packed(batch):
        return packed_class_logits(model, batch, cpu)

    def padded(batch):
        out = torch.empty(len(batch), model.config.num_labels)
        for chunk in eval_batches([len(x) for x in batch], CLASSIFY_CHUNK):
            out[chunk] = model(**collate([batch[i] for i in chunk], pad_id, cpu)).logits.float()
        return out

    def single(batch):
        return torch.cat([model(**collate([x], pad_id, cpu)).logits.float() for x in batch])

    return {"packed": packed, "padded": padded, "single": single}


def measure(dtype_name: str, ids: list[list[int]], rounds: int) -> dict:
    import torch

    from tuneforge.inference import supports_packed_classification
    from tuneforge.models import load_classifier

    model, tok, _ = load_classifier("minilm-l6", ["negative", "positive"])
    model = model.to(getattr(torch, dtype_name)).eval()
    if not supports_packed_classification(model):
        sys.exit("minilm-l6 did not pass the packed-classification self-check")
    fns = modes(model, tok.pad_token_id)
    batches = [ids[i:i + BATCH] for i in range(0, len(ids), BATCH)]
    seconds = {name: [] for name in fns}
    with torch.inference_mode():
        for fn in fns.values():  # warm-up
            fn(batches[0])
        logits = {name: torch.cat([fn(b).float() for b in batches[:4]]) for name, fn in fns.items()}
        for _ in range(rounds):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                for b in batches:
                    fn(b)
                seconds[name].append(time.perf_counter() - t0)
    tps = {name: len(ids) / statistics.median(s) for name, s in seconds.items()}
    diff = max(float((logits["packed"] - logits[k]).abs().max()) for k in ("padded", "single"))
    return {"texts_per_s": tps, "seconds_per_round": seconds, "max_abs_logit_diff_packed_vs_padded": diff,
            "packed_vs_padded": tps["packed"] / tps["padded"], "packed_vs_single": tps["packed"] / tps["single"],
            "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"], choices=["bfloat16", "float32"])
    args = parser.parse_args()
    from tuneforge import catalog
    from tuneforge.inference import encode
    from tuneforge.models import load_tokenizer

    texts = [line.rsplit("\t", 1)[0] for line in DEV.read_text().splitlines()[1:]]
    ids = encode(load_tokenizer(catalog.resolve("minilm-l6")), texts, 512)
    started = conditions()
    results = {d: measure(d, ids, args.rounds) for d in args.dtypes}
    out = {"benchmark": "packed classification (model alone)", "date": started["time"], "model": "minilm-l6",
           "texts": len(ids), "micro_batch": BATCH, "rounds": args.rounds, "results": results,
           "conditions": {"start": started, "end": conditions()}}
    for d, r in results.items():
        t = r["texts_per_s"]
        print(f"{d:<9} packed {t['packed']:7.1f}  padded {t['padded']:7.1f}  single {t['single']:7.1f} texts/s"
              f"  (packed/padded {r['packed_vs_padded']:.2f}x, "
              f"max logit diff {r['max_abs_logit_diff_packed_vs_padded']:.1e})")
    print(f"wrote {write_result(out, '-packed-cls')}")


if __name__ == "__main__":
    main()
