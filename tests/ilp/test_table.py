"""The ILP table: validation messages, JSON round trip, groups from ties, rows from sensitivity records."""

from __future__ import annotations

import pytest

from intq.ilp.table import LayerRow, Table


def row(name, params=10, s=1.0, latency=True):
    return LayerRow(
        name, params, s, {4: 2.0, 8: 1.0}, {4: 5, 8: 10}, {4: 16, 8: 64}, {4: 0.5, 8: 1.0} if latency else None
    )


def test_json_round_trip():
    table = Table((row("a"), row("b", latency=False), row("c")), ties=(("a", "c"),), pins={"b": 4})
    back = Table.from_json(table.to_json())
    assert back == table
    assert back.layers[0].delta_w == {4: 2.0, 8: 1.0} and back.layers[1].latency is None


def test_default_pins_are_first_and_last_at_the_widest_width():
    table = Table((row("a"), row("b"), row("c")))
    assert table.resolved_pins() == {"a": 8, "c": 8}
    assert Table(table.layers, pins={}).resolved_pins() == {}


def test_overlapping_ties_merge():
    table = Table(tuple(row(n) for n in "abcde"), ties=(("b", "d"), ("d", "e")))
    assert table.groups() == [("a",), ("b", "d", "e"), ("c",)]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(ties=(("a", "zz"),)), r"tie group \['a', 'zz'\] names unknown layer\(s\) \['zz'\]"),
        (dict(pins={"zz": 8}), r"pins name unknown layer\(s\) \['zz'\]"),
        (dict(pins={"a": 2}), r"pins \{'a': 2\} use widths outside the candidates \[4, 8\]"),
        (dict(ties=(("a", "b"),), pins={"a": 8, "b": 4}), r"tied to one width but pinned to different widths"),
        (dict(ties=(("a", "c"),)), None),  # default pins: a and c both at 8, consistent
    ],
)
def test_validation(kwargs, message):
    rows = (row("a"), row("b"), row("c"))
    if message is None:
        Table(rows, **kwargs)
        return
    with pytest.raises(ValueError, match=message):
        Table(rows, **kwargs)


def test_row_validation():
    with pytest.raises(ValueError, match=r"layer 'x' has no delta_w for \[4\] bits"):
        Table((LayerRow("x", 1, 1.0, {8: 1.0}, {4: 1, 8: 2}, {4: 1, 8: 2}),))
    with pytest.raises(ValueError, match=r"layer 'x' has sensitivity -1.0"):
        Table((row("x", s=-1.0),))
    with pytest.raises(ValueError, match=r"layer 'a' has size_bytes \{4: nan\}"):
        Table((LayerRow("a", 1, 1.0, {4: 1, 8: 1}, {4: float("nan"), 8: 2}, {4: 1, 8: 2}),))
    with pytest.raises(ValueError, match=r"layer names \['a'\] appear more than once"):
        Table((row("a"), row("a")))


def test_from_sensitivity_derives_costs():
    records = [
        {"name": "conv", "params": 27, "macs": 1000, "trace": 5.4, "delta_w": {"4": 0.3, "8": 0.001}},
        {"name": "fc", "params": 40, "macs": 40, "trace": -0.2, "delta_w": {"4": 0.5, "8": 0.002}},
    ]
    table = Table.from_sensitivity(records, latency={"conv": {4: 1e-3, 8: 2e-3}})
    conv, fc = table.layers
    assert conv.size_bytes == {4: 14, 8: 27}  # 27 int4 weights packed two per byte: 14 bytes
    assert conv.bops == {4: 1000 * 16, 8: 1000 * 64}
    assert conv.sensitivity == pytest.approx(0.2) and conv.delta_w == {4: 0.3, 8: 0.001}
    assert fc.sensitivity == 0.0  # a negative trace estimate is noise around a PSD Hessian
    assert conv.latency == {4: 1e-3, 8: 2e-3} and fc.latency is None


def test_from_sensitivity_takes_the_cost_tables_columns():
    """With a cost table the size is ilp.costs's (weights packed + int32 bias), the same numbers the report shows."""
    from intq.ilp.costs import Cost

    records = [{"name": "conv", "params": 27, "macs": 1000, "trace": 5.4, "delta_w": {"4": 0.3, "8": 0.001}}]
    costs = {"conv": {8: Cost(27 + 12, 1000 * 64, 2e-3), 4: Cost(14 + 12, 1000 * 16, 1e-3, synthetic=True)}}
    conv = Table.from_sensitivity(records, costs=costs).layers[0]
    assert conv.size_bytes == {4: 26, 8: 39} and conv.bops == {4: 16000, 8: 64000}
    assert conv.latency == {4: 1e-3, 8: 2e-3}
    untimed = {"conv": {b: Cost(c.size_bytes, c.bops) for b, c in costs["conv"].items()}}
    assert Table.from_sensitivity(records, costs=untimed).layers[0].latency is None
    with pytest.raises(ValueError, match=r"cost table's layers \['fc'\] are not the sensitivity records' \['conv'\]"):
        Table.from_sensitivity(records, costs={"fc": costs["conv"]})
    wrong = {"conv": {8: Cost(39, 999 * 64), 4: Cost(26, 999 * 16)}}
    with pytest.raises(ValueError, match=r"layer 'conv' has BOPs .* but 1000 MACs per sample"):
        Table.from_sensitivity(records, costs=wrong)
    with pytest.raises(ValueError, match="not both"):
        Table.from_sensitivity(records, latency={"conv": {4: 1.0, 8: 1.0}}, costs=costs)
