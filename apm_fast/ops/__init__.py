"""Fused operations: the primitive contract, the whole-model driver, precision selection."""
from .apm_fused import FusedCtx, backward_train, forward_train, unfold_patches, weight_names
from .function import fused_forward
from .precision import compute_dtype, precision
from .primitives import TorchPrimitives, acc_dtype_for

__all__ = ["TorchPrimitives", "acc_dtype_for", "forward_train", "backward_train", "FusedCtx",
           "weight_names", "unfold_patches", "fused_forward", "precision", "compute_dtype"]
