"""Map safeptq's :class:`~safeptq.quant.args.Scheme` onto compressed-tensors' config objects.

safeptq's ``QuantArgs`` already uses compressed-tensors' field names, so the mapping is one to
one; what this module adds is the decision of which on-disk format (if any) a scheme can be
served from. Used by the exporter and by the llm-compressor baselines, so both describe the same
scheme to the libraries in the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

from safeptq.quant.args import QuantArgs, Scheme, Strategy

__all__ = [
    "DEFAULT_TARGETS",
    "DEFAULT_IGNORE",
    "PACK_QUANTIZED",
    "INT_QUANTIZED",
    "ServingFormat",
    "serving_format",
    "to_quantization_args",
    "to_quantization_scheme",
]

DEFAULT_TARGETS: tuple[str, ...] = ("Linear",)
"""Every ``nn.Linear``: the decoder's projections (the embedding is an ``nn.Embedding``)."""

DEFAULT_IGNORE: tuple[str, ...] = ("lm_head",)
"""The output head stays dense, as in every llm-compressor/vLLM recipe."""

PACK_QUANTIZED = "pack-quantized"
INT_QUANTIZED = "int-quantized"


@dataclass(frozen=True)
class ServingFormat:
    """Outcome of :func:`serving_format`: a compressed-tensors format, or why there is none."""

    format: str | None
    reason: str

    @property
    def served(self) -> bool:
        return self.format is not None


def _bits(args: QuantArgs | None) -> str:
    return "16" if args is None else str(args.num_bits)


def serving_format(scheme: Scheme) -> ServingFormat:
    """The compressed-tensors format that vLLM serves ``scheme`` from, if there is one.

    * integer weights (2–8 bits, per group or channel), no activation or KV quantization →
      ``pack-quantized`` (W4A16, W8A16; symmetric or asymmetric);
    * int8 symmetric per-channel weights with dynamic per-token int8 activations →
      ``int-quantized`` (W8A8);
    * anything else (W4A8, W4A4, KV-cache quantization) has no serving kernel: ``None``.
    """
    w, a = scheme.weights, scheme.input_activations
    label = f"W{_bits(w)}A{_bits(a)}" + ("" if scheme.kv_cache is None else f"KV{scheme.kv_cache.num_bits}")
    if scheme.kv_cache is not None:
        return ServingFormat(None, f"{label}: no engine serves a quantized KV cache in this form")
    if w is None:
        return ServingFormat(None, f"{label}: activation-only quantization has no serving format")
    if w.strategy not in (Strategy.GROUP, Strategy.CHANNEL):
        return ServingFormat(
            None, f"{label}: weights quantized per {w.strategy.value}, not per group/channel"
        )
    if a is None:
        return ServingFormat(PACK_QUANTIZED, f"{label}: weight-only integer quantization")
    int8_acts = a.num_bits == 8 and a.dynamic and a.strategy is Strategy.TOKEN
    int8_weights = w.num_bits == 8 and w.symmetric and w.strategy is Strategy.CHANNEL
    if int8_acts and int8_weights:
        return ServingFormat(INT_QUANTIZED, f"{label}: int8 weights per channel, dynamic int8 tokens")
    return ServingFormat(None, f"{label}: no engine kernel for {w.num_bits}-bit weights with "
                               f"{a.num_bits}-bit activations")


def to_quantization_args(args: QuantArgs):
    """compressed-tensors ``QuantizationArgs`` equal to ``args`` (integer type)."""
    from compressed_tensors.quantization import QuantizationArgs

    return QuantizationArgs(
        num_bits=args.num_bits,
        type="int",
        symmetric=args.symmetric,
        strategy=args.strategy.value,
        group_size=args.group_size,
        dynamic=args.dynamic,
    )


def to_quantization_scheme(scheme: Scheme, targets: tuple[str, ...] | list[str] = DEFAULT_TARGETS,
                           format: str | None = None):
    """compressed-tensors ``QuantizationScheme`` for the linear layers (KV cache not included)."""
    from compressed_tensors.quantization import QuantizationScheme

    return QuantizationScheme(
        targets=list(targets),
        weights=None if scheme.weights is None else to_quantization_args(scheme.weights),
        input_activations=(
            None if scheme.input_activations is None else to_quantization_args(scheme.input_activations)
        ),
        format=format,
    )
