"""LoRA adapters via peft. The final model is saved twice: the adapter alone
(model/adapter/, loadable with peft.PeftModel.from_pretrained) and merged into
the base weights (model/, loadable with plain transformers)."""

from __future__ import annotations

from pathlib import Path

from tuneforge.recipe import MethodConfig

TASK_TYPES = {"classification": "SEQ_CLS", "sft": "CAUSAL_LM"}


def prepare(model, cfg: MethodConfig, task: str):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        task_type=TASK_TYPES[task], r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
    )
    return get_peft_model(model, config)


def save(model, tokenizer, folder: Path):
    model.save_pretrained(folder / "adapter")
    tokenizer.save_pretrained(folder / "adapter")
    merged = model.merge_and_unload()
    merged.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return merged
