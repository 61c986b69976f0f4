"""The bench's own bookkeeping: the FLOP accounting on a hand-computed case, the
layer shapes it reads off a real model, and result files that never overwrite."""

from __future__ import annotations

import datetime as dt
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from benchio import conditions, result_name, write_result  # noqa: E402
from flops import DecoderDims, decoder_dims, legacy_flops_per_token, sft_flops  # noqa: E402

DIMS = DecoderDims(layers=2, d_model=4, d_attn=4, vocab=10, body_linear_params=100, lora_params=5,
                   total_params=200)


def test_sft_flops_hand_computed():
    # Two examples of 3 and 1 tokens; the first has 2 supervised positions, the second none.
    flops = sft_flops(DIMS, lengths=[3, 1], targets=[2, 0])
    assert flops["terms"] == {
        "body": 4 * 100 * 4,                     # 1600: every token through the frozen linears, fwd + input grad
        "lora": 6 * 5 * 4,                       # 120: adapters, fwd + input grad + weight grad
        "lm_head": 4 * 10 * 4 * 2,               # 320: supervised positions only
        "attention": 6 * 2 * 4 * (3 * 4 + 1 * 2),  # 672: causal pairs per example, not the mean length
    }
    assert flops["total"] == 2712 and flops["per_token"] == 678
    assert flops["tokens"] == 4 and flops["supervised_tokens"] == 2
    # The earlier estimate: 4N for every token plus attention at the mean row length (4 tokens / 2 rows).
    assert legacy_flops_per_token(DIMS, tokens=4, rows=2) == 4 * 200 + 12 * 2 * 4 * 2


def test_attention_term_weights_long_examples():
    # Same tokens, same rows: one long and one short example cost more attention than two equal ones.
    skewed = sft_flops(DIMS, [7, 1], [1, 1])["terms"]["attention"]
    even = sft_flops(DIMS, [4, 4], [1, 1])["terms"]["attention"]
    assert skewed > even and legacy_flops_per_token(DIMS, 8, 2) == legacy_flops_per_token(DIMS, 8, 2)


def test_decoder_dims_match_a_real_lora_model():
    from peft import LoraConfig, get_peft_model
    from torch import nn
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=32, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    body = sum(m.weight.numel() for m in model.model.layers.modules() if isinstance(m, nn.Linear))
    total = sum(p.numel() for p in model.parameters())
    lora = get_peft_model(model, LoraConfig(r=2, target_modules="all-linear"))
    trainable = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    dims = decoder_dims(config, lora_r=2, total_params=total)
    assert (dims.body_linear_params, dims.lora_params, dims.d_attn) == (body, trainable, 8)


def test_two_runs_in_one_minute_keep_two_files(tmp_path):
    now = dt.datetime(2026, 12, 1, 23, 10, 42, tzinfo=dt.timezone.utc)
    first = write_result({"run": 1}, folder=tmp_path, now=now, host="vm")
    second = write_result({"run": 2}, folder=tmp_path, now=now, host="vm")
    later = write_result({"run": 3}, suffix="-data", folder=tmp_path, now=now + dt.timedelta(hours=1), host="vm")
    assert [p.name for p in (first, second, later)] == ["2026-12-01T2310-vm.json", "2026-12-01T2310-vm-2.json",
                                                         "2026-12-02T0010-vm-data.json"]
    assert [json.loads(p.read_text())["run"] for p in (first, second, later)] == [1, 2, 3]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in (first, second, later))


def test_result_name_is_utc_and_conditions_record_load():
    local = dt.datetime(2026, 12, 1, 23, 10, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    assert result_name("-serve", host="h", now=local) == "2026-12-01T2110-h-serve.json"
    snap = conditions()
    assert len(snap["loadavg"]) == 3 and dt.datetime.fromisoformat(snap["time"]).tzinfo is not None


@pytest.mark.parametrize("script", ["bench.py", "bench_data.py", "bench_serve.py", "bench_gpu.py", "bench_memory.py",
                                    "bench_packed_cls.py", "bench_fairness.py", "bench_dpo.py",
                                    "bench_reward_hh.py", "bench_grpo_dates.py"])
def test_bench_scripts_write_through_benchio(script):
    """No bench script names its own dated file (the overwrite this replaced)."""
    source = (Path(__file__).resolve().parents[2] / "bench" / script).read_text()
    assert "date.today()" not in source and ("write_result" in source or "write_to" in source)
