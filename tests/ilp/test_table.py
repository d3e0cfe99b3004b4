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


def timed(name, l8, l4):
    return LayerRow(name, 10, 1.0, {4: 2.0, 8: 1.0}, {4: 5, 8: 10}, {4: 16, 8: 64}, {4: l4, 8: l8})


def test_remainder_shifts_the_4bit_latency_costs():
    """Kernels a 1/0.5 s, b 3/2 s at 8/4 bits; the time outside them 10 s at all-8, 14 s at all-4 (4 more): a holds
    1/4 of the layers' 8-bit time, so its 4-bit cost gains 1 s, b's 3 s."""
    table = Table((timed("a", 1.0, 0.5), timed("b", 3.0, 2.0)), remainder_s={8: 10.0, 4: 14.0})
    assert table.cost("latency", "a", 4) == pytest.approx(1.5) and table.cost("latency", "b", 4) == pytest.approx(5.0)
    assert table.cost("latency", "a", 8) == 1.0 and table.cost("size", "a", 4) == 5  # shifts: latency at 4 only
    assert table.reference_cost("latency") == pytest.approx(4.0)
    assert table.predicted_latency({"a": 8, "b": 8}) == pytest.approx(14.0)  # 10 + 1 + 3, the 8-bit model
    assert table.predicted_latency({"a": 4, "b": 4}) == pytest.approx(16.5)  # 14 + 0.5 + 2, the 4-bit model
    assert table.predicted_latency({"a": 4, "b": 8}) == pytest.approx(14.5)  # 10 + 4/4 + 0.5 + 3
    assert Table.from_json(table.to_json()) == table
    constant = Table(table.layers, remainder_s={8: 10.0})  # no 4-bit model time: the same remainder at 4
    assert constant.cost("latency", "b", 4) == 2.0 and constant.predicted_latency({"a": 4, "b": 4}) == 12.5


@pytest.mark.parametrize(
    "remainder, layers, message",
    [
        ({4: 1.0}, None, r"remainder at \[4\] bits needs the all-8-bit one too"),
        ({8: 1.0, 2: 1.0}, None, r"remainder_s \{2: 1\.0\}: give finite seconds for candidate widths \[4, 8\]"),
        ({8: 1.0, 4: float("nan")}, None, r"remainder_s \{4: nan\}"),
        ({8: 1.0, 4: 2.0}, (timed("a", 1.0, 0.5), row("b", latency=False)), r"layers \['b'\] have no latency"),
        ({8: 1.0, 4: 2.0}, (timed("a", 0.0, 0.5), timed("b", 0.0, 0.5)), r"all-8-bit latency is 0\.0"),
    ],
)
def test_remainder_validation(remainder, layers, message):
    with pytest.raises(ValueError, match=message):
        Table(layers or (timed("a", 1.0, 0.5), timed("b", 3.0, 2.0)), remainder_s=remainder)


def test_predicted_latency_needs_the_reference_remainder():
    with pytest.raises(ValueError, match=r"no remainder_s for the reference width"):
        Table((timed("a", 1.0, 0.5),)).predicted_latency({"a": 8})


def test_input_noise_adds_the_activation_term():
    """objective(b) = Tr/n * dW_b + max(0, Tr_A) * S_b^2 / 12; a layer without noise (or an old record) keeps the
    weight term alone; the term survives the JSON round trip."""
    records = [
        {"name": "a", "params": 10, "macs": 100, "trace": 5.0, "delta_w": {"4": 2.0, "8": 0.5}, "act_trace": 3.0},
        {"name": "b", "params": 4, "macs": 40, "trace": 8.0, "delta_w": {"4": 1.0, "8": 0.25}, "act_trace": -1.0},
        {"name": "c", "params": 4, "macs": 40, "trace": 4.0, "delta_w": {"4": 1.0, "8": 0.5}},
    ]
    noise = {"a": {4: 0.3, 8: 0.001}, "b": {4: 7.0, 8: 1.0}, "c": {4: 9.0, 8: 1.0}}
    table = Table.from_sensitivity(records, input_noise=noise)
    a, b, c = table.layers
    assert a.objective(4) == pytest.approx(0.5 * 2.0 + 3.0 * 0.3) and a.objective(8) == pytest.approx(0.25 + 0.003)
    assert b.act_term == {4: 0.0, 8: 0.0} and b.objective(4) == pytest.approx(2.0)  # a negative trace is noise
    assert c.act_term is None and c.objective(4) == pytest.approx(1.0)  # no input trace recorded
    again = Table.from_json(table.to_json())
    assert [r.objective(4) for r in again.layers] == [r.objective(4) for r in table.layers]
    assert Table.from_sensitivity(records).layers[0].act_term is None  # no noise given: weights only
