"""Build TensorRT engines from ONNX, and run them as a torch module."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from fxprune.errors import ExportError
from fxprune.export.onnx import names, require, to_onnx
from fxprune.export.operators import op_types, unsupported_by_tensorrt
from fxprune.trace import as_tuple


def to_tensorrt(
    model_or_onnx_path: nn.Module | str | os.PathLike,
    example_inputs: Any,
    path: str | os.PathLike,
    fp16: bool = True,
    int8: bool = False,
    min_batch: int = 1,
    opt_batch: int | None = None,
    max_batch: int | None = None,
    workspace: int = 1 << 30,
    calibrator: Any = None,
    fuse: bool = True,
) -> Path:
    """Build a serialized TensorRT engine at ``path`` from a module (exported first with
    :func:`~fxprune.export.to_onnx`, ``fuse`` passed on) or an ONNX file, and return ``path``.

    Every input gets one optimization profile: the shape of its example input with the batch
    (dim 0) ranging over ``min_batch`` ≤ ``opt_batch`` (default: the example's batch) ≤
    ``max_batch`` (default: ``opt_batch``). ``workspace`` caps the builder's scratch memory in
    bytes. ``fp16``/``int8`` allow those precisions. INT8 needs scales: ``calibrator`` (a
    ``tensorrt.IInt8Calibrator``) or an explicitly quantized ONNX graph (QuantizeLinear and
    DequantizeLinear nodes); without either, ``ExportError`` is raised rather than calibrating on
    the example inputs alone, which would fix the scales to one batch.

    Operators that TensorRT's ONNX parser does not support, parser errors and a failed build
    raise ``ExportError`` with TensorRT's own messages. Needs ``tensorrt`` and a CUDA GPU.
    """
    trt = _tensorrt()
    inputs = as_tuple(example_inputs)
    opt_batch = inputs[0].shape[0] if opt_batch is None else opt_batch
    max_batch = opt_batch if max_batch is None else max_batch
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise ValueError(f"need 1 <= min_batch <= opt_batch <= max_batch, got {min_batch}, {opt_batch}, {max_batch}")
    with tempfile.TemporaryDirectory() as tmp:
        if isinstance(model_or_onnx_path, (str, os.PathLike)):
            onnx_path = Path(model_or_onnx_path)
        else:
            onnx_path = to_onnx(model_or_onnx_path, inputs, Path(tmp) / "model.onnx", fuse=fuse)
        unsupported = unsupported_by_tensorrt(onnx_path)
        if unsupported:
            raise ExportError(f"TensorRT's ONNX parser does not support {', '.join(unsupported)} (in {onnx_path})")
        if int8 and calibrator is None and not {"QuantizeLinear", "DequantizeLinear"} & op_types(onnx_path):
            raise ExportError("int8=True needs a calibrator (a tensorrt.IInt8Calibrator) or an ONNX model "
                              "quantized explicitly with QuantizeLinear/DequantizeLinear nodes")
        engine = _build(trt, onnx_path, inputs, (min_batch, opt_batch, max_batch), fp16, int8, workspace, calibrator)
    path = Path(path)
    path.write_bytes(engine)
    return path


def _build(trt: ModuleType, onnx_path: Path, inputs: tuple, batches: tuple[int, int, int], fp16: bool, int8: bool,
           workspace: int, calibrator: Any) -> Any:
    """Parse ``onnx_path`` and build a serialized engine with one profile over ``batches``."""
    logger = _logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10 networks always have an explicit batch
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise ExportError(f"TensorRT cannot parse {onnx_path}:\n" + "\n".join(errors or logger.messages))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace)
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    if int8:
        config.set_flag(trt.BuilderFlag.INT8)
    profile = builder.create_optimization_profile()
    for name, x in _match_inputs([network.get_input(i).name for i in range(network.num_inputs)], inputs).items():
        profile.set_shape(name, *[(b, *x.shape[1:]) for b in batches])
    config.add_optimization_profile(profile)
    if calibrator is not None:
        config.int8_calibrator = calibrator
        config.set_calibration_profile(profile)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise ExportError("TensorRT could not build the engine:\n" + "\n".join(logger.messages))
    return engine


class TensorRTModule(nn.Module):
    """A serialized TensorRT engine run on CUDA tensors: ``forward`` takes the engine's inputs in
    order and returns a tensor, or a tuple where the engine has several outputs."""

    def __init__(self, path: str | os.PathLike):
        super().__init__()
        trt = _tensorrt()
        if not torch.cuda.is_available():
            raise ExportError("TensorRTModule needs a CUDA GPU; torch.cuda.is_available() is False")
        self._logger = _logger(trt)
        self._runtime = trt.Runtime(self._logger)  # must outlive the engine
        self.engine = self._runtime.deserialize_cuda_engine(Path(path).read_bytes())
        if self.engine is None:
            raise ExportError(f"TensorRT cannot load the engine {path}:\n" + "\n".join(self._logger.messages))
        self.context = self.engine.create_execution_context()
        tensors = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_names = [t for t in tensors if self.engine.get_tensor_mode(t) == trt.TensorIOMode.INPUT]
        self.output_names = [t for t in tensors if self.engine.get_tensor_mode(t) == trt.TensorIOMode.OUTPUT]
        self._dtypes = {t: _torch_dtype(trt, self.engine.get_tensor_dtype(t)) for t in tensors}

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        if len(inputs) != len(self.input_names):
            raise ValueError(f"the engine takes {len(self.input_names)} inputs ({', '.join(self.input_names)}), "
                             f"got {len(inputs)}")
        stream = torch.cuda.current_stream()
        inputs = tuple(x.to(stream.device, self._dtypes[n]).contiguous() for n, x in zip(self.input_names, inputs))
        for name, x in zip(self.input_names, inputs):
            self.context.set_input_shape(name, tuple(x.shape))
            self.context.set_tensor_address(name, x.data_ptr())
        outputs = []
        for name in self.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            if min(shape, default=0) < 0:
                raise ExportError(f"output '{name}' has a data-dependent shape {shape}; TensorRTModule cannot allocate it")
            outputs.append(torch.empty(shape, dtype=self._dtypes[name], device=stream.device))
            self.context.set_tensor_address(name, outputs[-1].data_ptr())
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise ExportError("TensorRT execution failed:\n" + "\n".join(self._logger.messages))
        return outputs[0] if len(outputs) == 1 else tuple(outputs)


def _tensorrt() -> ModuleType:
    return require("tensorrt", "tensorrt")


def _logger(trt: ModuleType):
    """A ``trt.ILogger`` that keeps TensorRT's warnings and errors for error messages."""

    Severity = trt.ILogger.Severity

    class Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.messages: list[str] = []

        def log(self, severity, msg: str) -> None:
            if severity in (Severity.INTERNAL_ERROR, Severity.ERROR, Severity.WARNING):
                self.messages.append(f"[{severity.name}] {msg}")

    return Logger()


def _match_inputs(network_inputs: list[str], inputs: tuple) -> dict[str, torch.Tensor]:
    """Example input of each network input: by the names ``to_onnx`` gives (it drops unused
    inputs), or else in order."""
    by_name = dict(zip(names("input", len(inputs)), inputs))
    if all(n in by_name for n in network_inputs):
        return {n: by_name[n] for n in network_inputs}
    if len(network_inputs) != len(inputs):
        raise ExportError(f"the network has {len(network_inputs)} inputs ({', '.join(network_inputs)}), "
                          f"but {len(inputs)} example inputs were given")
    return dict(zip(network_inputs, inputs))


def _torch_dtype(trt: ModuleType, dtype) -> torch.dtype:
    table = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT8": torch.int8,
             "UINT8": torch.uint8, "INT32": torch.int32, "INT64": torch.int64, "BOOL": torch.bool}
    for name, torch_dtype in table.items():
        if getattr(trt.DataType, name, None) == dtype:
            return torch_dtype
    raise ExportError(f"no torch dtype for TensorRT's {dtype}")
