"""--precision: autocast for forward and loss (PyTorch's AMP). torch is imported when a context is built."""

from __future__ import annotations

PRECISIONS = {"fp32": None, "amp-fp16": "float16", "amp-bf16": "bfloat16"}  # --precision: autocast dtype


def autocast(precision: str, device):
    """--precision as an autocast context for forward and loss: convolutions and matmuls in float16 or bfloat16,
    BN and the loss in float32 (PyTorch's autocast lists); the weights and their gradients stay float32."""
    import torch

    dtype = PRECISIONS[precision]
    return torch.autocast(device.type, dtype=getattr(torch, dtype) if dtype else None, enabled=dtype is not None)
