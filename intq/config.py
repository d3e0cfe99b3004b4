"""Configuration dataclasses: frozen, validated, round-trip to JSON."""

from __future__ import annotations

import dataclasses
import enum
import json


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

    bits: weight and activation width of the integer layers (8 today).
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

    def __post_init__(self):
        if self.bits != 8:
            raise ValueError(
                f"bits={self.bits} is not available yet: this version quantizes to 8 bits "
                "(4-bit and mixed 4/8 come with the CNN/INT4 work); use bits=8."
            )
        try:
            object.__setattr__(self, "calibration", Calibration(self.calibration))
        except ValueError:
            choices = ", ".join(c.value for c in Calibration)
            raise ValueError(f"calibration={self.calibration!r} is not one of: {choices}.") from None
        if not 90.0 < float(self.percentile) <= 100.0:
            raise ValueError(f"percentile={self.percentile} must lie in (90, 100], e.g. 99.99.")
        if self.residual_bits != 16:
            raise ValueError(f"residual_bits={self.residual_bits}: only a 16-bit residual stream is supported.")

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        d["calibration"] = self.calibration.value
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> QuantConfig:
        return cls(**json.loads(text))
