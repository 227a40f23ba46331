"""Decode-speed rewrite for CPU: oneDNN pre-packed weights for every projection.

Batch-1 decoding is a chain of matrix-vector products; MKL's GEMV on this class of CPU reaches
about half the bandwidth oneDNN does with a packed weight layout (measured in bench/).
"""

from __future__ import annotations

from ..nn import onednn_available, pack_linears
from .model import Transformer


def optimize_for_inference(model: Transformer, rows_hint: int = 1) -> Transformer:
    """Pack the linear weights of ``model`` in place (CPU only; a no-op elsewhere).

    The packed model serves generation and forward passes but has no ``state_dict`` entries for
    the linear weights any more: export or train the unpacked model.
    """
    model.eval().requires_grad_(False)
    if model.tok_embeddings.weight.device.type == "cpu" and onednn_available():
        pack_linears(model, rows_hint)
    return model
