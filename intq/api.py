"""Public API: ``quantize``."""

from __future__ import annotations

import numpy as np
import torch
from onnx import TensorProto, helper

from intq.config import QuantConfig
from intq.quantizer.calibrate import CalibrationError, calibrate
from intq.quantizer.canonicalize import canonicalize
from intq.quantizer.capture import capture
from intq.quantizer.convert import convert
from intq.quantizer.model import QuantizedModel


def quantize(model, calib_data, config: QuantConfig | None = None, progress: bool = True) -> QuantizedModel:
    """Quantize ``model`` into an integer-only ``QuantizedModel``.

    model: a ``torch.nn.Module``, an ONNX file path or an ``onnx.ModelProto``.
    calib_data: a sequence of batches; a batch is a tensor/array (one-input
        models), a tuple in input order, or a dict keyed by input name.
    """
    config = config or QuantConfig()
    raw = list(calib_data)
    if not raw:
        raise CalibrationError(
            "The calibration set is empty: intq needs at least one batch of representative inputs to "
            "choose activation ranges. Pass a few hundred real samples."
        )
    first = _as_tuple(raw[0], None)
    gm = capture(model, first if isinstance(model, torch.nn.Module) else None)
    inputs = gm.meta["inputs"]
    batches = [_as_tuple(b, inputs) for b in raw]
    _check_finite(batches, inputs)
    try:
        canonicalize(gm, batches[0])
        observers = calibrate(gm, batches, progress=progress)
    except (IndexError, RuntimeError) as exc:
        where = _onnx_node_note(exc)
        if where is None:  # not the float model failing on the data: a bug, keep its traceback
            raise
        raise CalibrationError(
            f"The float model fails on the calibration data {where} ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}). Check that the arrays are valid inputs for it: "
            "token ids below the vocabulary size, sequences no longer than its maximum length, the value "
            "range it was trained on."
        ) from exc
    int_gm, layers, out_meta = convert(gm, observers, config)
    outputs = [dict(o, **m) for o, m in zip(gm.meta["outputs"], out_meta, strict=False)]
    return QuantizedModel(int_gm, inputs, outputs, layers, config, batches[0], float_graph=gm, observers=observers)


def _onnx_node_note(exc: BaseException) -> str | None:
    """The reader's "while running ONNX node ..." note, present when a node of the float model raised."""
    return next((n for n in getattr(exc, "__notes__", ()) if n.startswith("while running ONNX node")), None)


def _as_tuple(batch, inputs) -> tuple:
    if isinstance(batch, dict):
        if inputs is None:
            return tuple(_tensor(v, None) for v in batch.values())
        names = [i["name"] for i in inputs]
        missing = [n for n in names if n not in batch]
        if missing:
            raise CalibrationError(
                f"The calibration batch has no array for model input(s) {missing}; it has {sorted(batch)}. "
                "Key the arrays by the model's input names."
            )
        return tuple(_tensor(batch[n], i) for n, i in zip(names, inputs, strict=True))
    if isinstance(batch, (list, tuple)):
        items = list(batch)
    else:
        items = [batch]
    if inputs is not None and len(items) != len(inputs):
        raise CalibrationError(
            f"The model takes {len(inputs)} input(s) ({[i['name'] for i in inputs]}) but a calibration batch "
            f"has {len(items)} array(s)."
        )
    return tuple(_tensor(v, None if inputs is None else inputs[k]) for k, v in enumerate(items))


def _tensor(value, info) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(value)) if not isinstance(value, torch.Tensor) else value
    if info is None:
        return t
    want = np.dtype(helper.tensor_dtype_to_np_dtype(info["elem_type"]))
    arr = np.asarray(t.numpy() if isinstance(t, torch.Tensor) else t)
    if want.kind in "iu" and arr.dtype.kind == "f":
        raise CalibrationError(
            f"Calibration array for input {info['name']!r} holds floats ({arr.dtype}), but the model takes "
            f"{want} (e.g. token ids). Pass integer arrays for integer inputs."
        )
    t = torch.as_tensor(arr.astype(want, copy=False))
    shape = info.get("shape")
    if shape is not None:
        if len(shape) != t.dim() or any(isinstance(d, int) and d != s for d, s in zip(shape, t.shape, strict=False)):
            raise CalibrationError(
                f"Calibration array for input {info['name']!r} has shape {tuple(t.shape)}, but the model expects "
                f"{_shape_str(shape)} ({TensorProto.DataType.Name(info['elem_type']).lower()}). Reshape the data or "
                "pass the input it belongs to."
            )
    return t


def _shape_str(shape) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _check_finite(batches, inputs) -> None:
    for k, batch in enumerate(batches):
        for t, info in zip(batch, inputs, strict=False):
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                bad = int((~torch.isfinite(t)).sum())
                raise CalibrationError(
                    f"Calibration batch {k} has {bad} NaN/Inf value(s) in input {info['name']!r}. Remove or "
                    "repair those samples: a range cannot be calibrated from non-finite values."
                )
