"""Architectures of this project, registered with timm / transformers on import."""

from effitrain.models import (
    illama,  # noqa: F401  (registers illama_* and test_illama with timm)
    mamba_r,  # noqa: F401  (registers mambar_* and test_mambar with timm)
    memory_lm,  # noqa: F401  (registers MemoryLMConfig / MemoryLM with transformers' AutoConfig / AutoModel)
)
