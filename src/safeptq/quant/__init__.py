"""Quantization primitives: typed settings, fake-quant ops, LWC quantizers, ``QuantLinear``,
LET/SmoothQuant smoothing and orthogonal rotations. No calibration loop and no export here."""

from safeptq.quant.args import QuantArgs, Scheme, Strategy, check_group_size, preset_names, resolve_scheme
from safeptq.quant.qlinear import QuantLinear, unwrap_decoder_layer, wrap_decoder_layer, wrap_linear
from safeptq.quant.quantizer import ActQuantizer, QuantizedWeight, WeightQuantizer, quantize_weight
from safeptq.quant.rotation import (
    CayleyRotation,
    add_online_hadamard,
    fuse_residual_rotation,
    random_hadamard,
)
from safeptq.quant.smoothing import LayerSmoothing, attach_smoothing, fold_smoothing, init_smoothing

__all__ = [
    "QuantArgs",
    "Scheme",
    "Strategy",
    "check_group_size",
    "preset_names",
    "resolve_scheme",
    "QuantLinear",
    "wrap_linear",
    "wrap_decoder_layer",
    "unwrap_decoder_layer",
    "ActQuantizer",
    "WeightQuantizer",
    "QuantizedWeight",
    "quantize_weight",
    "CayleyRotation",
    "add_online_hadamard",
    "fuse_residual_rotation",
    "random_hadamard",
    "LayerSmoothing",
    "attach_smoothing",
    "fold_smoothing",
    "init_smoothing",
]
