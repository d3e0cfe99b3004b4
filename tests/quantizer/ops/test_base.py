"""Activation ranges and their op-type suffixes (the contract shared with passes/ops/base.py)."""

from __future__ import annotations

import pytest

from intq.quantizer.ops.base import activation_range, check_range, class_or_instance_method, range_suffix


@pytest.mark.parametrize(
    ("bits", "unsigned", "expected"),
    [
        (8, False, (-128, 127)),
        (4, False, (-8, 7)),
        (4, True, (0, 15)),  # a ReLU output gains the sign bit
        (8, True, (0, 127)),  # ... except at 8 bits: the int8 carrier holds at most 127
        (2, False, (-2, 1)),
    ],
)
def test_activation_range(bits, unsigned, expected):
    assert activation_range(bits, unsigned) == expected


@pytest.mark.parametrize("bits", [1, 9, 4.5, 16])
def test_activation_range_refuses_other_widths(bits):
    with pytest.raises(ValueError, match=r"activation bits must be an int in \[2, 8\]"):
        activation_range(bits, False)


@pytest.mark.parametrize(
    ("lo", "hi", "suffix"),
    [(-128, 127, ""), (-8, 7, "_cm8x7"), (0, 15, "_c0x15"), (0, 127, "_c0x127"), (-32768, 32767, "_cm32768x32767")],
)
def test_range_suffix(lo, hi, suffix):
    assert range_suffix(lo, hi) == suffix


def test_range_suffix_of_another_default():
    assert range_suffix(-32768, 32767, default=(-32768, 32767)) == ""
    assert range_suffix(-128, 127, default=(-32768, 32767)) == "_cm128x127"


@pytest.mark.parametrize(("lo", "hi"), [(0, 0), (5, 3), (-129, 127), (0, 128), (0.5, 7)])
def test_check_range_refuses(lo, hi):
    with pytest.raises(ValueError, match=r"Op: clamp range .* must be integers with -128 <= qmin < qmax <= 127"):
        check_range(lo, hi, -128, 127, "Op")


def test_class_or_instance_method_binds_either():
    class Thing:
        name = "class"

        def __init__(self):
            self.name = "instance"

        @class_or_instance_method
        def who(self):
            return self.name

    assert Thing.who() == "class"
    assert Thing().who() == "instance"
