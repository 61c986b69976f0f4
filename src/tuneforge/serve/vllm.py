"""`--engine vllm`: hand generation to vLLM's own OpenAI server.

Only when vLLM is importable and a CUDA GPU is present; otherwise a clear
refusal (the torch engine serves everything on CPU). A LoRA run is served as
its base with the adapter (`--enable-lora --lora-modules`); an exported or
fully fine-tuned folder as is.
"""

from __future__ import annotations

import importlib.util
import sys
import tempfile
from pathlib import Path
from typing import Optional


def unavailable() -> Optional[str]:
    """Why vLLM cannot serve here, or None."""
    if importlib.util.find_spec("vllm") is None:
        return "vLLM is not installed (pip install vllm, on a machine with a CUDA GPU)"
    import torch

    if not torch.cuda.is_available():
        return "vLLM needs a CUDA GPU and torch sees none"
    return None


def command(target: str, adapters: dict[str, str], host: str, port: int,
            name: Optional[str] = None) -> list[str]:
    """The vLLM command line for TARGET (a classifier is refused: vLLM serves generation)."""
    from tuneforge.serve import registry

    served = registry.resolve(target, name)
    if served.task != "sft":
        raise registry.TargetError(f"{target} is a {served.task} model; --engine vllm serves generation only, "
                                   "use the default --engine torch")
    sources = ([served.own_adapter] if served.own_adapter else []) + \
        [registry.adapter_source(n, ref) for n, ref in adapters.items()]
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", served.base_path,
           "--served-model-name", served.base_name, "--host", host, "--port", str(port)]
    # A LoRA run's own pinned template first (what it was trained with), as the
    # torch engine does. Passed as a file: vLLM reads a template given inline
    # through unicode_escape, which mangles backslashes and non-ASCII text.
    template = (served.own_adapter and served.own_adapter.chat_template) or served.chat_template
    if template:
        path = Path(tempfile.mkdtemp(prefix="tuneforge-vllm-")) / "chat_template.jinja"
        path.write_text(template, encoding="utf-8")
        cmd += ["--chat-template", str(path)]
    if sources:
        cmd += ["--enable-lora", "--lora-modules", *[f"{s.name}={s.path}" for s in sources],
                "--max-lora-rank", "64"]
    return cmd  # the API key goes in VLLM_API_KEY, not on the command line (ps shows arguments)
