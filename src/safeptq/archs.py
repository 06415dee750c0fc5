"""Architecture adapters: one declarative spec per decoder family, read by smoothing, rotation, both
engines, activation quantization and the exporter instead of assuming Llama.

What differs between the families, and what it means for the equivalent transforms:

- **norm gain**: Llama-style RMSNorm multiplies by ``w``; Gemma's by ``1 + w`` — a smoothing scale
  folds into it as ``(1 + w) / s - 1``, not ``w / s``.
- **sandwich norms** (Gemma 2/3): ``post_attention_layernorm`` and ``post_feedforward_layernorm``
  normalise each sub-block's *output* before the residual add, and the MLP reads
  ``pre_feedforward_layernorm`` (in Llama, ``post_attention_layernorm`` is the norm the MLP reads).
  A residual-stream rotation does not commute with a per-channel gain applied after normalisation,
  so rotation is not an equivalent transform there.
- **q/k norms** (Qwen3, Gemma 3): each head of q and k is RMS-normalised after the projection, which
  undoes a per-channel q·k scale: the ``qk`` smoothing pair is not equivalent.
- **fused projections** (Phi-3): ``qkv_proj`` and ``gate_up_proj``; the norm→linear pairs and the
  rotation work on the fused linears, the ``vo`` and ``qk`` pairs (which need v or q/k alone) do not.
- **biases** (Qwen2): q/k/v biases are scaled with their rows; rotations touch inputs only.

A family not listed, or a transform a family does not support, is refused before any weight is
loaded (:func:`spec_for_config`) or switched off with the reason logged and recorded.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from .errors import ConfigError, UnknownNameError

__all__ = ["ArchSpec", "SPECS", "spec_for_config", "spec_of_layer", "spec_of_model", "ALL_PAIRS"]

ALL_PAIRS: tuple[str, ...] = ("attn_in", "mlp_in", "vo", "qk", "up_down")


@dataclass(frozen=True)
class ArchSpec:
    family: str
    model_types: tuple[str, ...]
    layer_class: str  # the transformers decoder-layer class of the family
    attn_norm: str = "input_layernorm"
    mlp_norm: str = "post_attention_layernorm"
    post_norms: tuple[str, ...] = ()  # sandwich norms on the sub-block outputs
    norm_offset: float = 0.0  # gain = offset + weight (Gemma: 1)
    attn_readers: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    mlp_readers: tuple[str, ...] = ("mlp.gate_proj", "mlp.up_proj")
    attn_writer: str = "self_attn.o_proj"
    mlp_writer: str = "mlp.down_proj"
    mlp_up: str = "mlp.up_proj"  # the linear whose rows multiply act(gate) (up_down smoothing)
    mlp_up_offset: bool = False  # True: up is the second half of the rows of a fused gate_up_proj
    # transforms that are not equivalent on this family, with the reason (pair name or "rotation")
    not_equivalent: dict[str, str] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    @property
    def linears(self) -> tuple[str, ...]:
        """Every quantized linear of a decoder layer, relative to the layer."""
        return (*self.attn_readers, self.attn_writer, *self.mlp_readers, self.mlp_writer)

    @property
    def fused(self) -> bool:
        return len(self.attn_readers) == 1

    def legal_pairs(self, pairs=ALL_PAIRS) -> tuple[str, ...]:
        return tuple(p for p in pairs if p not in self.not_equivalent)

    def check_pairs(self, pairs) -> None:
        bad = [p for p in pairs if p in self.not_equivalent]
        if bad:
            raise ConfigError(f"smoothing pair {bad[0]!r} is not an equivalent transform on {self.family}: "
                              f"{self.not_equivalent[bad[0]]}")

    @property
    def rotation_ok(self) -> bool:
        return "rotation" not in self.not_equivalent

    def check_rotation(self) -> None:
        if not self.rotation_ok:
            raise ConfigError(f"a residual rotation is not an equivalent transform on {self.family}: "
                              f"{self.not_equivalent['rotation']}")


_QK_NORM = "q_norm/k_norm re-normalise each head after the projection, which undoes a per-channel q·k scale"
_SANDWICH = ("post_attention_layernorm / post_feedforward_layernorm apply a per-channel gain after normalising each "
             "sub-block's output, which a residual rotation does not commute with")
_FUSED = "v (and q, k) are rows of the fused qkv_proj; the pair needs them as separate linears"

SPECS: dict[str, ArchSpec] = {s.family: s for s in (
    ArchSpec("llama", ("llama",), "LlamaDecoderLayer"),
    ArchSpec("mistral", ("mistral",), "MistralDecoderLayer"),
    ArchSpec("qwen2", ("qwen2",), "Qwen2DecoderLayer", notes=("q/k/v biases scale with their rows",)),
    ArchSpec("qwen3", ("qwen3",), "Qwen3DecoderLayer", not_equivalent={"qk": _QK_NORM}),
    ArchSpec("gemma2", ("gemma2",), "Gemma2DecoderLayer", mlp_norm="pre_feedforward_layernorm",
             post_norms=("post_attention_layernorm", "post_feedforward_layernorm"), norm_offset=1.0,
             not_equivalent={"rotation": _SANDWICH}),
    ArchSpec("gemma3", ("gemma3_text",), "Gemma3DecoderLayer", mlp_norm="pre_feedforward_layernorm",
             post_norms=("post_attention_layernorm", "post_feedforward_layernorm"), norm_offset=1.0,
             not_equivalent={"rotation": _SANDWICH, "qk": _QK_NORM}),
    ArchSpec("phi3", ("phi3",), "Phi3DecoderLayer", attn_readers=("self_attn.qkv_proj",),
             mlp_readers=("mlp.gate_up_proj",), mlp_up="mlp.gate_up_proj", mlp_up_offset=True,
             not_equivalent={"vo": _FUSED, "qk": _FUSED}),
)}

_BY_TYPE = {t: s for s in SPECS.values() for t in s.model_types}
_BY_LAYER = {s.layer_class: s for s in SPECS.values()}


def spec_for_config(config) -> ArchSpec:
    """The spec of a model from its config alone (before any weight is loaded); one line otherwise."""
    mt = getattr(config, "model_type", None)
    if mt == "gemma3" and getattr(config, "text_config", None) is not None:
        raise ConfigError("gemma3 multimodal checkpoints are not supported; use the text model (gemma3_text, "
                          "e.g. google/gemma-3-270m or -1b)")
    if mt not in _BY_TYPE:
        arch = ", ".join(getattr(config, "architectures", None) or []) or "?"
        raise UnknownNameError(f"architecture {mt!r} ({arch}) is not supported; supported families: "
                               f"{', '.join(SPECS)}")
    return _BY_TYPE[mt]


def spec_of_layer(layer: nn.Module) -> ArchSpec:
    """The spec of a decoder layer, by its transformers class."""
    name = type(layer).__name__
    if name not in _BY_LAYER:
        raise ConfigError(f"decoder layer {name} is not of a supported family ({', '.join(SPECS)})")
    return _BY_LAYER[name]


def spec_of_model(model: nn.Module) -> ArchSpec:
    return spec_for_config(model.config)
