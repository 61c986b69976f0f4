"""`--engine vllm`: hand generation to vLLM's own OpenAI server.

Only when vLLM is importable and a CUDA GPU is present; otherwise a clear
refusal (the torch engine serves everything on CPU). A LoRA run is served as
its base with the adapter (`--enable-lora --lora-modules`); an exported or
fully fine-tuned folder as is.

The key goes in VLLM_API_KEY, which holds one key: recent vLLMs take several
on `--api-key`, but a command line is readable by every local user (ps), so
several keys are refused rather than exposed. vLLM's server does not enforce
tuneforge's other limits; `UNPROTECTED` names them and the CLI prints them.
"""

from __future__ import annotations

import importlib.util
import sys
import tempfile
from pathlib import Path
from typing import Optional

# What tuneforge's own server enforces and vLLM's does not (vLLM's security
# guide: its key is checked only under /v1, /v2, /inference and /cohere).
UNPROTECTED = (
    "request bodies have no size limit (tuneforge: --max-body-mb, 413)",
    "no per-request token cap beyond the context (tuneforge: --max-request-tokens)",
    "no bounded queue: overload is not answered 429 with Retry-After (tuneforge: --max-queue)",
    "no per-request timeout (tuneforge: --timeout, 504)",
    "the API key guards only the /v1/... routes: /metrics, /tokenize, /detokenize and vLLM's other "
    "routes answer without one (tuneforge: every route but /health needs a key)",
    "no admin keys: adapters are fixed at start-up",
)


def notice() -> str:
    """What the operator is told at start-up: the protections they lose."""
    lines = "".join(f"\n  - {item}" for item in UNPROTECTED)
    return ("note: --engine vllm hands the port to vLLM's own server, without tuneforge's protections:"
            f"{lines}\nPut an authenticating, size- and rate-limiting proxy in front of it, or serve with "
            "the default --engine torch.")


def key_env(api_keys: list[str]) -> dict[str, str]:
    """The environment that gives vLLM the API key; several keys are refused."""
    if len(api_keys) != 1:
        raise ValueError(f"--engine vllm takes exactly one API key, not {len(api_keys)}: vLLM reads one from "
                         "VLLM_API_KEY, and several on its command line would be readable by every local "
                         "user (ps). Configure one key, or use the default --engine torch, which takes several")
    return {"VLLM_API_KEY": api_keys[0]}


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
    from tuneforge import kinds
    from tuneforge.serve import registry

    served = registry.resolve(target, name)
    if served.kind != kinds.CAUSAL_LM:
        raise registry.TargetError(f"{target} is a {served.kind} model; --engine vllm serves generation only, "
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
