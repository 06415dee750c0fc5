"""Checkpoint export: compressed-tensors formats that vLLM serves, or a dense fake-quant copy."""

from safeptq.export.compressed_tensors import (
    DENSE,
    README_FILE,
    SIDE_FILE,
    bits_per_weight,
    export_compressed,
    quantized_linears,
    reload_check,
)
from safeptq.export.grid import check_qparams, recover_qparams
from safeptq.export.schemes import ServingFormat, serving_format, to_quantization_scheme

__all__ = [
    "DENSE",
    "README_FILE",
    "SIDE_FILE",
    "bits_per_weight",
    "export_compressed",
    "quantized_linears",
    "reload_check",
    "check_qparams",
    "recover_qparams",
    "ServingFormat",
    "serving_format",
    "to_quantization_scheme",
]
