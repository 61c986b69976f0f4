"""Adaptation methods, one module each, all with the same roles:

    NAME            the recipe's `method.name`
    Config          its `method:` section (pydantic, `name: Literal[NAME]` as the
                    tag; describe(), hints(), load_options())
    ADAPTER         True when the final model is also saved as an adapter (model/adapter/)
    MODEL_KINDS     the model kinds (tuneforge.kinds) it can train
    DEFAULT_LEARNING_RATES  model kind -> peak learning rate when train.learning_rate is unset
    WEIGHT_BYTES    bytes per base weight while training (4: float32; qlora's NF4 about 0.5)
    prepare(model, cfg, kind) -> the model ready to train
    save(model, tokenizer, folder) -> writes the final, loadable model and returns
        the plain transformers model holding the final weights
    trainable_parameters(model, cfg, kind) -> int, counted on a meta-device model
        (the memory pre-flight)

and this one table maps names to modules. `recipe.method` is the discriminated
union of their Configs; `tuneforge.recipe.register_method(module)` adds one
from outside the package (a plug-in, or a test) and rebuilds that union.
"""

from tuneforge.methods import dora, freeze, full, ia3, lora, qlora

METHODS = {m.NAME: m for m in (full, freeze, lora, dora, ia3, qlora)}


def describe(section: dict) -> str:
    """One line for a `method:` section read back from a run's recipe.yaml
    (keys the method does not take, as older runs wrote them, are ignored)."""
    module = METHODS.get(section.get("name"))
    if module is None:
        return str(section.get("name"))
    known = {k: v for k, v in section.items() if k in module.Config.model_fields}
    return module.Config.model_validate(known).describe()
