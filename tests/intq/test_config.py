"""QuantConfig: user-facing validation and the JSON round trip."""

from __future__ import annotations

import pytest

from intq.config import QuantConfig


def test_json_round_trip_keeps_every_field():
    config = QuantConfig(bits=4, first_last_bits=8, layer_bits={"node_conv2d_3": 8, "node_linear": 4}, percentile=99.9)
    back = QuantConfig.from_json(config.to_json())
    assert back == config
    assert back.layer_bits == {"node_conv2d_3": 8, "node_linear": 4}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bits": 6}, r"bits=6 is not a supported width: use 8, or 4"),
        ({"bits": True}, r"bits=True is not a supported width"),
        ({"first_last_bits": 2}, r"first_last_bits=2 is not a supported width"),
        ({"layer_bits": [("conv", 4)]}, r"layer_bits must map ONNX node names to 4 or 8"),
        ({"layer_bits": {"conv": 5}}, r"layer_bits entries \{'conv': 5\} are invalid"),
        ({"layer_bits": {3: 4}}, r"layer_bits entries \{3: 4\} are invalid"),
    ],
)
def test_invalid_widths_are_refused_with_a_sentence(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QuantConfig(**kwargs)


def test_bits_for_first_last_and_overrides():
    config = QuantConfig(bits=4, layer_bits={"b": 8, "last": 4})
    assert config.bits_for("a", first_or_last=False) == 4
    assert config.bits_for("first", first_or_last=True) == 8  # first_last_bits
    assert config.bits_for("b", first_or_last=False) == 8  # layer_bits wins over bits ...
    assert config.bits_for("last", first_or_last=True) == 4  # ... and over first_last_bits
    assert QuantConfig().bits_for("x", first_or_last=True) == 8


def test_layer_bits_is_copied():
    mapping = {"conv": 4}
    config = QuantConfig(layer_bits=mapping)
    mapping["conv"] = 8
    assert config.layer_bits == {"conv": 4}
