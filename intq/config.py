"""Configuration dataclasses: frozen, validated, round-trip to JSON."""

from __future__ import annotations

import dataclasses
import enum
import json
from collections.abc import Mapping

WIDTHS = (4, 8)  # the weight/activation widths a layer can have


class Calibration(enum.StrEnum):
    """How an activation's clipping range is chosen from calibration data.

    - ``minmax``: the largest magnitude seen.
    - ``percentile``: the given percentile of magnitudes (outliers clipped).
    - ``mse``: the clip that minimizes the expected squared quantization
      error (rounding + clipping) over the observed histogram.
    """

    MINMAX = "minmax"
    PERCENTILE = "percentile"
    MSE = "mse"


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """What ``intq.quantize`` produces.

    bits: weight and activation width of the weighted layers (conv, linear): 8, or 4 for
        W4A4 with the first and last weighted layers at ``first_last_bits``.  A layer at
        b bits has b-bit weights (symmetric per output channel) and a b-bit input.
    first_last_bits: width of the first and last weighted layers (8 keeps the layers that
        see the raw input and produce the logits at full width under ``bits=4``, as HAWQV3).
    layer_bits: per-layer override, the weighted layer's ONNX node name -> 4 or 8 (e.g.
        what the bit-width ILP chooses); wins over ``bits`` and ``first_last_bits``.
    calibration: range estimator for activations (see ``Calibration``).
    percentile: used by ``percentile`` calibration, in (90, 100].
    residual_bits: width of the residual stream that residual adds produce (16, as I-ViT).
    per_channel_norm: LayerNorm outputs get one int8 scale per channel (folded into the
        next linear layer's weights and into the residual add's multipliers); a few
        channels of transformer LayerNorm outputs carry outliers that one per-tensor
        scale cannot hold (MiniLM-L6: embedding cosine 0.986 per-tensor vs 0.9998).
    """

    bits: int = 8
    calibration: Calibration = Calibration.PERCENTILE
    percentile: float = 99.99
    residual_bits: int = 16
    per_channel_norm: bool = True
    first_last_bits: int = 8
    layer_bits: Mapping[str, int] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        for name in ("bits", "first_last_bits"):
            value = getattr(self, name)
            if isinstance(value, bool) or value not in WIDTHS:
                raise ValueError(
                    f"{name}={value!r} is not a supported width: use 8, or 4 (W4A4); "
                    "set single layers with layer_bits={'<ONNX node name>': 4}."
                )
        if not isinstance(self.layer_bits, Mapping):
            raise ValueError(
                f"layer_bits must map ONNX node names to 4 or 8, e.g. {{'/conv1/Conv': 8}}, "
                f"got {type(self.layer_bits).__name__}."
            )
        bad = {
            k: v for k, v in self.layer_bits.items() if not isinstance(k, str) or isinstance(v, bool) or v not in WIDTHS
        }
        if bad:
            raise ValueError(
                f"layer_bits entries {bad} are invalid: each key is a weighted layer's ONNX node name and each "
                "value 4 or 8."
            )
        object.__setattr__(self, "layer_bits", dict(self.layer_bits))
        try:
            object.__setattr__(self, "calibration", Calibration(self.calibration))
        except ValueError:
            choices = ", ".join(c.value for c in Calibration)
            raise ValueError(f"calibration={self.calibration!r} is not one of: {choices}.") from None
        if not 90.0 < float(self.percentile) <= 100.0:
            raise ValueError(f"percentile={self.percentile} must lie in (90, 100], e.g. 99.99.")
        if self.residual_bits != 16:
            raise ValueError(f"residual_bits={self.residual_bits}: only a 16-bit residual stream is supported.")

    def bits_for(self, layer: str, first_or_last: bool) -> int:
        """The width of the weighted layer ``layer`` (its ONNX node name)."""
        if layer in self.layer_bits:
            return self.layer_bits[layer]
        return self.first_last_bits if first_or_last else self.bits

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        d["calibration"] = self.calibration.value
        d["layer_bits"] = dict(self.layer_bits)
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> QuantConfig:
        return cls(**json.loads(text))
