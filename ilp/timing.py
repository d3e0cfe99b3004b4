"""Run and time compiled intq models on their target: in this process, or on a remote device through TVM RPC.

Timing is TVM's ``time_evaluator`` on the Relax VM.  The inputs are set
once (``VirtualMachine.set_input``) and ``invoke_stateful("main")`` is timed:
one warm-up call (discarded), then ``repeats`` measurements, each the mean of
``number`` calls, where ``number`` starts at 1 and grows until one
measurement lasts at least ``min_repeat_ms``.  The latency is the median of
the ``repeats`` means, in seconds.  Setting the inputs once keeps their
conversion and any host-to-device copy out of the timing, and works for a
``main`` that returns a tuple (which ``time_evaluator`` cannot send back over
RPC).

Remote devices (``RemoteSpec``), with the TVM 0.27 tools::

    python -m tvm.exec.rpc_tracker --host 0.0.0.0 --port 9190               # anywhere both sides reach
    python -m tvm.exec.rpc_server --tracker HOST:9190 --key KEY             # on the device
    python -m tvm.exec.query_rpc_tracker --host HOST --port 9190            # lists the servers

``Runner`` opens one session for its lifetime:
``tvm.rpc.connect_tracker(host, port).request(key, priority, session_timeout)``.
Each model's library is written with its target's exporter (a cross
compiler for ``arm``, see ``passes/targets.py``), uploaded
(``RPCSession.upload``), loaded (``RPCSession.load_module``; the file is then
removed from the server), and run by a ``relax.VirtualMachine`` over the
remote module on the remote device (``RPCSession.device``).  The timing loop
runs on the device; only its results travel.
"""

from __future__ import annotations

import dataclasses
import math
import os
import statistics
import tempfile
import uuid
from collections.abc import Sequence

import numpy as np

from intq.passes import compat
from intq.passes.build import to_numpy
from intq.passes.pipeline import Compiled

tvm = compat.tvm


@dataclasses.dataclass(frozen=True)
class RemoteSpec:
    """An RPC tracker and the key its device servers registered with.

    session_timeout_s: the server ends the session after this long (0: never).
    """

    tracker_host: str
    tracker_port: int
    key: str
    priority: int = 1
    session_timeout_s: float = 0.0

    def __post_init__(self):
        if not self.tracker_host or not isinstance(self.tracker_host, str):
            raise ValueError(f"RemoteSpec: tracker_host={self.tracker_host!r}; give the tracker's host name or IP.")
        if isinstance(self.tracker_port, bool) or not isinstance(self.tracker_port, int):
            raise ValueError(f"RemoteSpec: tracker_port={self.tracker_port!r} must be an int port number.")
        if not 0 < self.tracker_port < 65536:
            raise ValueError(f"RemoteSpec: tracker_port={self.tracker_port} is not a TCP port (1-65535).")
        if not self.key or not isinstance(self.key, str):
            raise ValueError(
                f"RemoteSpec: key={self.key!r}; give the key the device's server registered with "
                "(python -m tvm.exec.rpc_server --tracker HOST:PORT --key KEY)."
            )
        if not (math.isfinite(self.session_timeout_s) and self.session_timeout_s >= 0):
            raise ValueError(f"RemoteSpec: session_timeout_s={self.session_timeout_s} must be >= 0 (0: no limit).")

    @property
    def address(self) -> str:
        return f"{self.tracker_host}:{self.tracker_port}"


def _device_type(target) -> str:
    kind = target.kind.name
    return "cpu" if kind in ("llvm", "c") else kind


class Runner:
    """Where compiled models run: this process, or one RPC session (opened on entering, closed on leaving).

    ``spec``: the ``TargetSpec`` the models were compiled for (``Compiled.spec``).
    """

    def __init__(self, spec, remote: RemoteSpec | None = None):
        self.spec = spec
        self.remote = remote
        self._session = None
        self._tmp: tempfile.TemporaryDirectory | None = None
        if remote is None and not spec.runs_here:
            raise ValueError(
                f"Target {spec.name!r} does not run on this machine; time it on its device through an RPC tracker "
                "with remote=RemoteSpec(tracker_host, tracker_port, key)."
            )

    @property
    def where(self) -> str:
        return "this machine" if self.remote is None else f"key {self.remote.key!r} at tracker {self.remote.address}"

    def __enter__(self) -> Runner:
        if self.remote is not None:
            r = self.remote
            try:
                tracker = tvm.rpc.connect_tracker(r.tracker_host, r.tracker_port)
                self._session = tracker.request(r.key, priority=r.priority, session_timeout=r.session_timeout_s)
            except (OSError, RuntimeError) as exc:
                raise RuntimeError(
                    f"Cannot open an RPC session for key {r.key!r} at tracker {r.address} ({exc}); check that the "
                    "tracker runs (python -m tvm.exec.query_rpc_tracker --host HOST --port PORT lists its servers) "
                    "and that a server registered with this key is free."
                ) from exc
            self._tmp = tempfile.TemporaryDirectory(prefix="intq-rpc-")
        return self

    def __exit__(self, *exc) -> None:
        self._session = None  # the connection closes with the last reference
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def _load(self, compiled: Compiled):
        if self.remote is None:
            device = compat.vm_device(compiled.target)
            return compat.VirtualMachine(compiled.executable, device), device
        if self._session is None:
            raise RuntimeError("Runner: open the RPC session first (use the Runner in a `with` block).")
        name = f"intq_{uuid.uuid4().hex[:12]}.so"
        path = os.path.join(self._tmp.name, name)
        compiled.export(path)
        self._session.upload(path)
        module = self._session.load_module(name)
        self._session.remove(name)
        os.remove(path)
        device = self._session.device(_device_type(compiled.target), 0)
        return compat.VirtualMachine(module, device), device

    def _set_inputs(self, compiled: Compiled, inputs: Sequence[np.ndarray]):
        if len(inputs) != len(compiled.input_names):
            raise ValueError(
                f"The model takes {len(compiled.input_names)} input(s) {compiled.input_names}; "
                f"got {len(inputs)} arrays."
            )
        vm, device = self._load(compiled)
        args = [tvm.runtime.tensor(np.require(a, requirements="C"), device) for a in inputs]
        vm.set_input("main", *args)
        return vm, device

    def run(self, compiled: Compiled, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        """The outputs of ``main`` on ``inputs`` (in ``compiled.input_names`` order), as numpy arrays."""
        vm, _ = self._set_inputs(compiled, inputs)
        vm.invoke_stateful("main")
        out = vm.get_outputs("main")
        return to_numpy(out)

    def time(
        self, compiled: Compiled, inputs: Sequence[np.ndarray], repeats: int = 20, min_repeat_ms: float = 10.0
    ) -> float:
        """Median seconds per call of ``main`` on ``inputs`` (see the module docstring)."""
        check_timing(repeats, min_repeat_ms)
        vm, device = self._set_inputs(compiled, inputs)
        timer = vm.time_evaluator(
            "invoke_stateful", device, number=1, repeat=int(repeats), min_repeat_ms=int(math.ceil(min_repeat_ms))
        )
        results = [float(t) for t in timer("main").results]
        median = statistics.median(results)
        if not (math.isfinite(median) and median > 0):
            raise RuntimeError(f"Timing on {self.where} returned {results}; expected positive, finite seconds.")
        return median


def check_timing(repeats: int, min_repeat_ms: float) -> None:
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats={repeats!r}: give the number of timed measurements, an int >= 1 (e.g. 20).")
    if not (math.isfinite(min_repeat_ms) and min_repeat_ms >= 0):
        raise ValueError(f"min_repeat_ms={min_repeat_ms!r} must be >= 0 (milliseconds per measurement).")
