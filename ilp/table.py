"""The bit-width ILP's data: one row per weighted layer, plus the layers' ties and pins.

A row holds, for each candidate width ``b`` (4 and 8 by default):

- ``delta_w[b]``: the weight perturbation ``||W - Q_b(W)||^2``;
- ``size_bytes[b]``, ``bops[b]``, ``latency[b]``: the layer's cost at ``b`` bits
  (latency in seconds; optional, needed only for a latency budget);

and ``sensitivity``, the average Hessian trace ``Tr(H)/n`` (``n = params``).
The ILP's objective for width ``b`` is ``sensitivity * delta_w[b]`` (HAWQV3),
plus, when the row has one, ``act_term[b] = Tr(H_A) * S_b^2 / 12``: a layer at
``b`` bits also reads a ``b``-bit input, rounded onto a grid of step ``S_b``
(the converter's input scale at that width), whose noise raises the loss by
``1/2 Tr(H_A) S_b^2 / 12`` as the weights' raises it by ``1/2 sensitivity *
delta_w[b]`` (``quantizer/sensitivity.py``, "Input activations").  An input
the converter keeps at int8 at every width has the same term at both.

``ties``: groups of layers that must share one width (e.g. layers that read
one activation, whose width is the input width of each).  ``pins``: layers
held at a given width; ``None`` pins the first and the last layer (in table
order) to the widest width, as HAWQV3 and the ``first_last_bits`` default do.

``Table.from_sensitivity`` builds the rows from ``quantizer.sensitivity``'s
records and a cost table (``ilp.costs.layer_costs``, or any ``{layer: {bits:
cost}}`` whose costs have ``size_bytes``, ``bops`` and ``latency_s``): the
costs are ``ilp.costs``'s, the one definition of a layer's size (packed
weights plus the int32 bias, ``ceil(params * b / 8) + 4 * C``) and BOPs
(``macs * b * b``: a layer at ``b`` bits has ``b``-bit weights and a
``b``-bit input activation).  Without a cost table the size counts the
packed weights alone, ``ceil(params * b / 8)`` (a sensitivity record does
not know the output channels, so the bias is left out: budgets on such a
table are fractions of the all-INT8 *weight* bytes).  Nothing here imports
torch.

The remainder.  A whole model's time is not the sum of its layers' kernels:
``r(a)``, the time outside them under the width assignment ``a``
(``ilp.costs``: quantize, attention, residual adds, the requantize a 4-bit
layer's output gets on its own, ...), is measured at two assignments, all
layers at the widest width ``R`` (8) and the widths of the narrow model
timed whole (every layer at 4 when it was quantized so):
``remainder_s = {R: r(all-R), b: r(all-b)}``.  Between them it is taken to
be linear in the share of the layers' time that runs narrow, each layer's
share being its own kernel time at ``R``:

    s_i    = latency_i[R] / sum_j latency_j[R]
    r(a)   = r[R] + sum_b (r[b] - r[R]) * sum_{i: a_i = b} s_i
    T(a)   = r(a) + sum_i latency_i[a_i]  = r[R] + sum_i (latency_i[a_i] + shift_i[a_i])
    shift_i[b] = s_i * (r[b] - r[R])     (0 at R, and at a width whose remainder is unknown)

``T`` is then exactly the measured model time at all-``R`` and at all-``b``.
Weighting by ``latency_i[R]`` rather than by layer count: the work the
narrow model adds outside the kernels (a requantize per layer output,
moving its activations) grows with the layer, as its kernel time does; the
weights must not depend on ``a`` for ``r`` to stay linear in the ILP's
binaries.  ``Table.cost("latency", layer, b)`` is ``latency_i[b] +
shift_i[b]``: the ILP's latency budget constrains ``T(a) - r[R]``, as a
fraction of its all-``R`` value ``sum_i latency_i[R]`` (the weighted
layers' INT8 time).  Without ``remainder_s`` (or with ``r[R]`` alone) the
shifts are 0: the remainder is the same at every width.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Iterable, Mapping, Sequence

COSTS = ("size", "bops", "latency")
_COLUMN = {"size": "size_bytes", "bops": "bops", "latency": "latency"}


def _values(records) -> list:
    return list(records.values() if isinstance(records, Mapping) else records)


def _per_bits(values: Mapping | None, bits: Sequence[int], what: str, layer: str, optional=False) -> dict | None:
    if values is None:
        if optional:
            return None
        raise ValueError(f"ILP table: layer {layer!r} has no {what}; give one value per width {list(bits)}.")
    out = {int(b): float(v) for b, v in values.items()}
    missing = [b for b in bits if b not in out]
    if missing:
        raise ValueError(
            f"ILP table: layer {layer!r} has no {what} for {missing} bits; give one per width {list(bits)}."
        )
    bad = {b: out[b] for b in bits if not (math.isfinite(out[b]) and out[b] >= 0)}
    if bad:
        raise ValueError(f"ILP table: layer {layer!r} has {what} {bad}; values must be finite and >= 0.")
    return {b: out[b] for b in bits}


def remainder_shifts(
    latency: Mapping[str, Mapping[int, float]], remainder_s: Mapping[int, float] | None, reference: int
) -> dict[str, dict[int, float]]:
    """``{layer: {b: shift_i[b]}}`` for each width ``b`` of ``remainder_s`` (module docstring, "The remainder").

    ``latency``: every layer's latency by width (``latency[i][reference]`` is its weight); ``remainder_s``:
    the remainder at all-``b`` for the widths measured, the reference width's included.  Every shift is 0
    when ``remainder_s`` is None or gives the reference width alone.
    """
    narrow = {b: r for b, r in (remainder_s or {}).items() if b != reference}
    if not narrow:
        return {name: {} for name in latency}
    if reference not in remainder_s:
        raise ValueError(
            f"ILP remainder: the remainder at {sorted(narrow)} bits needs the all-{reference}-bit one too, as the "
            f"anchor of the interpolation; got widths {sorted(remainder_s)}."
        )
    ref = math.fsum(per[reference] for per in latency.values())
    if not ref > 0:
        raise ValueError(
            f"ILP remainder: the layers' all-{reference}-bit latency is {ref}; it weighs each layer's share of the "
            "remainder and must be positive."
        )
    return {
        name: {b: per[reference] / ref * (r - remainder_s[reference]) for b, r in narrow.items()}
        for name, per in latency.items()
    }


@dataclasses.dataclass(frozen=True)
class LayerRow:
    """One weighted layer (see the module docstring)."""

    name: str
    params: int
    sensitivity: float
    delta_w: Mapping[int, float]
    size_bytes: Mapping[int, float]
    bops: Mapping[int, float]
    latency: Mapping[int, float] | None = None
    act_term: Mapping[int, float] | None = None  # Tr(H_A) * S_b^2 / 12 (module docstring); None: weights only

    def cost(self, kind: str, bits: int) -> float:
        column = getattr(self, _COLUMN[kind])
        if column is None:
            raise ValueError(
                f"ILP table: layer {self.name!r} has no measured latency; measure the latency table before "
                "asking for a latency budget."
            )
        return column[bits]

    def objective(self, bits: int) -> float:
        return self.sensitivity * self.delta_w[bits] + (self.act_term[bits] if self.act_term else 0.0)


@dataclasses.dataclass(frozen=True)
class Table:
    """The rows in graph order, the candidate widths, ties, pins and the measured remainders (module docstring)."""

    layers: tuple[LayerRow, ...]
    bits: tuple[int, ...] = (4, 8)
    ties: tuple[tuple[str, ...], ...] = ()
    pins: Mapping[str, int] | None = None
    #: seconds outside the layers' kernels with every layer at a width, by width (module docstring)
    remainder_s: Mapping[int, float] | None = None

    def __post_init__(self):
        bits = tuple(sorted({int(b) for b in self.bits}))
        if not bits or any(b < 2 for b in bits):
            raise ValueError(f"ILP table: bits={list(self.bits)}; give the candidate widths, e.g. [4, 8].")
        object.__setattr__(self, "bits", bits)
        if not self.layers:
            raise ValueError("ILP table: no layers.")
        rows = []
        for row in self.layers:
            name = str(row.name)
            if not (math.isfinite(row.sensitivity) and row.sensitivity >= 0):
                raise ValueError(
                    f"ILP table: layer {name!r} has sensitivity {row.sensitivity}; it must be finite and >= 0."
                )
            if int(row.params) <= 0:
                raise ValueError(f"ILP table: layer {name!r} has params={row.params}; it must be positive.")
            rows.append(
                LayerRow(
                    name=name,
                    params=int(row.params),
                    sensitivity=float(row.sensitivity),
                    delta_w=_per_bits(row.delta_w, bits, "delta_w", name),
                    size_bytes=_per_bits(row.size_bytes, bits, "size_bytes", name),
                    bops=_per_bits(row.bops, bits, "bops", name),
                    latency=_per_bits(row.latency, bits, "latency", name, optional=True),
                    act_term=_per_bits(row.act_term, bits, "act_term", name, optional=True),
                )
            )
        object.__setattr__(self, "layers", tuple(rows))
        names = [r.name for r in rows]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"ILP table: layer names {dup} appear more than once.")
        known = set(names)
        ties = tuple(tuple(str(n) for n in group) for group in self.ties)
        for group in ties:
            unknown = [n for n in group if n not in known]
            if unknown:
                raise ValueError(f"ILP table: tie group {list(group)} names unknown layer(s) {unknown}.")
        object.__setattr__(self, "ties", ties)
        if self.pins is not None:
            pins = {str(n): int(b) for n, b in self.pins.items()}
            unknown = sorted(set(pins) - known)
            if unknown:
                raise ValueError(f"ILP table: pins name unknown layer(s) {unknown}.")
            bad = {n: b for n, b in pins.items() if b not in bits}
            if bad:
                raise ValueError(f"ILP table: pins {bad} use widths outside the candidates {list(bits)}.")
            object.__setattr__(self, "pins", pins)
        if self.remainder_s is not None:
            remainder = {int(b): float(v) for b, v in self.remainder_s.items()}
            bad = {b: v for b, v in remainder.items() if b not in bits or not math.isfinite(v)}
            if bad:
                raise ValueError(
                    f"ILP table: remainder_s {bad}: give finite seconds for candidate widths {list(bits)} only."
                )
            untimed = [r.name for r in rows if r.latency is None]
            if untimed and set(remainder) - {bits[-1]}:
                raise ValueError(
                    f"ILP table: layers {untimed} have no latency, which weighs their share of the remainder; "
                    "measure every layer's latency or drop remainder_s."
                )
            object.__setattr__(self, "remainder_s", remainder)
        resolved = self.resolved_pins()
        for group in self.groups():
            pinned = {n: resolved[n] for n in group if n in resolved}
            if len(set(pinned.values())) > 1:
                raise ValueError(
                    f"ILP table: layers {list(group)} are tied to one width but pinned to different widths "
                    f"{pinned}; drop a pin or the tie."
                )
        # each layer's remainder shift by width, not a field (derived); an unusable remainder_s fails here
        latency = {r.name: r.latency for r in rows}
        object.__setattr__(self, "_shifts", remainder_shifts(latency, self.remainder_s, self.reference_bits))

    # ------------------------------------------------------------ derived
    @property
    def reference_bits(self) -> int:
        """The width whose all-layer cost budgets are fractions of (the widest, 8)."""
        return self.bits[-1]

    def row(self, name: str) -> LayerRow:
        found = self._rows.get(name)
        if found is None:
            raise KeyError(f"ILP table: no layer {name!r}")
        return found

    @functools.cached_property
    def _rows(self) -> dict[str, LayerRow]:
        return {r.name: r for r in self.layers}

    def resolved_pins(self) -> dict[str, int]:
        if self.pins is not None:
            return dict(self.pins)
        first, last = self.layers[0].name, self.layers[-1].name
        return {first: self.reference_bits, last: self.reference_bits}

    def groups(self) -> list[tuple[str, ...]]:
        """The layers partitioned into width-sharing groups (overlapping ties merged), in table order."""
        parent = {r.name: r.name for r in self.layers}

        def find(n):
            while parent[n] != n:
                parent[n] = parent[parent[n]]
                n = parent[n]
            return n

        for group in self.ties:
            for n in group[1:]:
                parent[find(n)] = find(group[0])
        out: dict[str, list[str]] = {}
        for r in self.layers:
            out.setdefault(find(r.name), []).append(r.name)
        return [tuple(g) for g in out.values()]

    def cost(self, kind: str, name: str, bits: int) -> float:
        """Layer ``name``'s ``kind`` cost at ``bits`` as the ILP counts it: its row's, and for latency plus its
        share of the remainder's change at that width (``shift``, module docstring)."""
        cost = self.row(name).cost(kind, bits)
        return cost + self._shifts[name].get(bits, 0.0) if kind == "latency" else cost

    def total(self, kind: str, assignment: Mapping[str, int]) -> float:
        """The cost of ``kind`` (size, bops, latency) of a per-layer width assignment (``cost`` summed)."""
        return math.fsum(self.cost(kind, r.name, assignment[r.name]) for r in self.layers)

    def predicted_latency(self, assignment: Mapping[str, int]) -> float:
        """``T(a)``, the whole model's predicted seconds (module docstring); needs the reference remainder."""
        if self.remainder_s is None or self.reference_bits not in self.remainder_s:
            raise ValueError(
                "ILP table: no remainder_s for the reference width; build the table from a cost table measured "
                "with the whole model (ilp.costs.layer_costs(..., measure_model=True))."
            )
        return self.remainder_s[self.reference_bits] + self.total("latency", assignment)

    def reference_cost(self, kind: str) -> float:
        return self.total(kind, {r.name: self.reference_bits for r in self.layers})

    def objective(self, assignment: Mapping[str, int]) -> float:
        return math.fsum(r.objective(assignment[r.name]) for r in self.layers)

    # ------------------------------------------------------------ construction, JSON
    @classmethod
    def from_sensitivity(
        cls,
        records: Iterable,
        latency: Mapping[str, Mapping[int, float]] | None = None,
        bits: Sequence[int] = (4, 8),
        ties: Sequence[Sequence[str]] = (),
        pins: Mapping[str, int] | None = None,
        costs: Mapping[str, Mapping[int, object]] | None = None,
        remainder_s: Mapping[int, float] | None = None,
        input_noise: Mapping[str, Mapping[int, float]] | None = None,
    ) -> Table:
        """Rows from sensitivity records (``LayerSensitivity`` objects or their ``to_dict()``), in order.

        input_noise: ``{layer: {bits: S_b^2 / 12}}`` (``quantizer.sensitivity.input_noise``): with it each
            row gets ``act_term[b] = max(0, act_trace) * input_noise[layer][b]`` (module docstring); a
            layer it does not list, or a record without ``act_trace``, keeps the weight term alone.

        costs: ``{layer: {bits: cost}}`` (an ``ilp.costs.CostTable``): the size, BOPs and latency columns
            (see the module docstring); it must cost exactly the records' layers, with the records' MACs.
            A ``CostTable`` also gives ``remainder_s`` (its ``remainders``) unless one is passed.
        latency: ``{layer: {bits: seconds}}``, when no ``costs`` are given.
        remainder_s: the remainder at all-``b`` by width ``b`` (module docstring).

        A negative trace estimate is set to 0: the Gauss-Newton (KL) Hessian is
        positive semi-definite, so a negative estimate is sampling noise.
        """
        if costs is not None and latency is not None:
            raise ValueError("ILP table: give the latency inside costs= or as latency=, not both.")
        dicts = [rec.to_dict() if hasattr(rec, "to_dict") else dict(rec) for rec in _values(records)]
        if costs is not None:
            names = [d["name"] for d in dicts]
            if sorted(costs) != sorted(names):
                raise ValueError(
                    f"ILP table: the cost table's layers {sorted(costs)} are not the sensitivity records' "
                    f"{sorted(names)}; measure both on the same model."
                )
        rows = []
        for d in dicts:
            name, params, macs = d["name"], int(d["params"]), int(d["macs"])
            if costs is None:
                size = {b: math.ceil(params * b / 8) for b in bits}
                bops = {b: macs * b * b for b in bits}
                lat = None if latency is None else latency.get(name)
            else:
                per = costs[name]
                size = {b: per[b].size_bytes for b in bits if b in per}
                bops = {b: per[b].bops for b in bits if b in per}
                lat = {b: per[b].latency_s for b in bits if b in per and per[b].latency_s is not None} or None
                wrong = {b: v for b, v in bops.items() if v != macs * b * b}
                if wrong:
                    raise ValueError(
                        f"ILP table: layer {name!r} has BOPs {wrong} in the cost table but {macs} MACs per sample in "
                        "its sensitivity record; measure both on the same model and example shapes."
                    )
            noise = (input_noise or {}).get(name)
            act = None
            if noise is not None and "act_trace" in d and all(b in noise for b in bits):
                act = {b: max(0.0, float(d["act_trace"])) * float(noise[b]) for b in bits}
            rows.append(
                LayerRow(
                    name=name,
                    params=params,
                    sensitivity=max(0.0, float(d["trace"]) / params),
                    delta_w=d["delta_w"],
                    size_bytes=size,
                    bops=bops,
                    latency=lat,
                    act_term=act,
                )
            )
        if remainder_s is None and costs is not None:
            remainder_s = getattr(costs, "remainders", None)
        return cls(tuple(rows), tuple(bits), tuple(tuple(g) for g in ties), pins, remainder_s)

    def to_dict(self) -> dict:
        def col(m):
            return None if m is None else {str(b): v for b, v in m.items()}

        return {
            "bits": list(self.bits),
            "ties": [list(g) for g in self.ties],
            "pins": self.pins,
            "remainder_s": col(self.remainder_s),
            "layers": [
                {
                    "name": r.name,
                    "params": r.params,
                    "sensitivity": r.sensitivity,
                    "delta_w": col(r.delta_w),
                    "size_bytes": col(r.size_bytes),
                    "bops": col(r.bops),
                    "latency": col(r.latency),
                    "act_term": col(r.act_term),
                }
                for r in self.layers
            ],
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> Table:
        try:
            rows = tuple(LayerRow(**row) for row in d["layers"])
            ties = tuple(tuple(g) for g in d.get("ties", ()))
            return cls(rows, tuple(d.get("bits", (4, 8))), ties, d.get("pins"), d.get("remainder_s"))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"ILP table JSON is malformed ({type(exc).__name__}: {exc}).") from exc

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_json(cls, text: str) -> Table:
        return cls.from_dict(json.loads(text))
