"""OpenVINO as the encoder's CPU runtime: a torch module converted once, then run by OpenVINO's CPU plugin.

On this project's 2-core machine OpenVINO ran the EfficientNet-Lite0 image forward in exact fp32 faster than
torch's best bf16 plan (compiled, BN folded, one conv kept in fp32), and the MiniLM text tower in bf16 3x faster
than torch for a one-query search (see README, "Encoder forward variants"). Conversion traces the module
(OpenVINO's PyTorch frontend, seconds), where ``torch.compile`` took 7-20 s per process.

Vitrine does not phone home, and OpenVINO would: ``import openvino`` sends a usage event to Intel (Google
Analytics) and counts imports in ``~/intel`` unless the user opted out, and ``openvino.convert_model`` sends more.
So the package is imported with its telemetry module blocked (``_import_openvino``: OpenVINO then uses its own
no-op stub), and models are converted through the PyTorch frontend directly. Callers check the result against
their torch fp32 forward and fall back to torch when it drifts or when conversion fails (see
:class:`common.image_forward.ImageRunner` and :class:`common.encoder.ItemEncoder`).
"""
from __future__ import annotations

import importlib.util
import sys
import threading
import warnings
from typing import Any

import numpy as np
import torch

PRECISIONS = ("f32", "bf16")


def available() -> bool:
    """True where the ``openvino`` package is installed (it is a dependency; a trimmed install may lack it)."""
    return importlib.util.find_spec("openvino") is not None


def _import_openvino() -> Any:
    """``openvino`` with its usage telemetry off for this process: with ``openvino_telemetry`` unimportable, its
    model-conversion tools fall back to their own stub (``openvino.tools.ovc.telemetry_stub``), which sends and
    writes nothing. A process that imported the telemetry package itself keeps it."""
    if "openvino" not in sys.modules:
        sys.modules.setdefault("openvino_telemetry", None)  # None in sys.modules: `import` raises ImportError
    import openvino

    return openvino


class OpenVINOModel:
    """A torch module compiled by OpenVINO for the CPU; ``model(array)`` -> its outputs as numpy arrays.

    ``example`` fixes the inputs' ranks and dtypes for tracing; every dimension stays dynamic, so batch size and
    token count vary freely. ``threads`` caps OpenVINO's threads (the caller's torch thread count, which Ray
    sets from an actor's CPUs). One inference at a time per model (an infer request is not thread-safe).
    """

    def __init__(self, module: torch.nn.Module, example: torch.Tensor, precision: str = "f32", threads: int = 0):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}. Got {precision!r}")
        ov = _import_openvino()
        from openvino.frontend import FrontEndManager
        from openvino.frontend.pytorch.ts_decoder import TorchScriptPythonDecoder

        with torch.no_grad(), warnings.catch_warnings():
            # HF's attention masks branch on shapes in Python; traced with a mask present, each branch is the one
            # every input takes (no padding offset, not causal), so the tracer's "might not generalize" is noise
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            decoder = TorchScriptPythonDecoder(module.eval(), example_input=(example,))
        frontend = FrontEndManager().load_by_framework("pytorch")
        model = frontend.convert(frontend.load(decoder))
        # No pinning: OpenVINO pins its threads to cores by default, and two one-thread models in two processes
        # (a Serve replica beside an encoder actor) were pinned to the same core, each at half speed (measured:
        # 34 against 67 calls/s); unpinned, one two-thread model ran at 97% of its pinned speed.
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY",
                                  "ENABLE_CPU_PINNING": False}
        if threads > 0:
            config["INFERENCE_NUM_THREADS"] = threads
        self.precision = precision
        self.compiled = ov.Core().compile_model(model, "CPU", config)
        self.outputs = len(self.compiled.outputs)
        self._request = self.compiled.create_infer_request()
        self._lock = threading.Lock()

    def __call__(self, x: np.ndarray | torch.Tensor) -> list[np.ndarray]:
        if isinstance(x, torch.Tensor):
            x = x.numpy()
        with self._lock:
            result = self._request.infer({0: np.ascontiguousarray(x)})  # copies the outputs out of the request
        return [np.asarray(result[i]) for i in range(self.outputs)]
