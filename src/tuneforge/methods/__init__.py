"""Adaptation methods. Each module has the same roles:

    prepare(model, cfg: MethodConfig, task: str) -> model ready to train
    save(model, tokenizer, folder: Path) -> writes the final, loadable model and
        returns the plain transformers model holding the final weights

and this one table maps recipe names to modules.
"""

from tuneforge.methods import freeze, full, lora, qlora

METHODS = {
    "full": full,
    "freeze": freeze,
    "lora": lora,
    "qlora": qlora,
}
