"""Gradients through frozen input embeddings, for LoRA with gradient checkpointing.

With checkpointing, a checkpointed block only passes gradients back to its LoRA weights when its input requires
grad, and a frozen embedding's output does not. transformers' ``enable_input_require_grads`` (which TRL calls for
every PEFT model) marks that output ``requires_grad_(True)`` in place, making it a *leaf* that requires grad; a
model that then adds to its embeddings in place (BLIP's text embeddings: ``embeddings += position_embeddings``)
fails with "a leaf Variable that requires grad is being used in an in-place operation". The hook here returns a
copy of the output instead: a non-leaf that requires grad, to which in-place additions are allowed.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["embeddings_require_grad"]


def _require_grad(module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
    return output if output.requires_grad else output.detach().requires_grad_(True).clone()


def embeddings_require_grad(model: nn.Module) -> None:
    """Replace transformers' input-embedding hooks of ``model`` (and of every sub-model) with copying ones."""
    from transformers import PreTrainedModel

    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            module.disable_input_require_grads()
    hooks, seen = [], set()
    for module in model.modules():
        if not isinstance(module, PreTrainedModel):
            continue
        try:
            embeddings = module.get_input_embeddings()
        except NotImplementedError:
            continue
        if embeddings is None or id(embeddings) in seen:
            continue
        seen.add(id(embeddings))
        hooks.append(embeddings.register_forward_hook(_require_grad))
    if not hooks:
        raise ValueError(f"{type(model).__name__} exposes no input embeddings: LoRA cannot train through "
                         "gradient checkpointing; set gradient_checkpointing: false")
    # transformers' disable_input_require_grads() removes the hooks it finds here.
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            module._require_grads_hooks = hooks
            break
