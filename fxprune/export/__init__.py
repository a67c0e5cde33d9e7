"""Deployment: ONNX export checked with ONNX Runtime, TensorRT engines, and TensorRT's ONNX coverage.

``onnx``/``onnxruntime`` (extra ``onnx``) and ``tensorrt`` (extra ``tensorrt``) are imported only
when a function needs them.
"""
from .onnx import to_onnx
from .operators import TENSORRT_ONNX_OPS, unsupported_by_tensorrt
from .tensorrt import TensorRTModule, to_tensorrt

__all__ = ["TENSORRT_ONNX_OPS", "TensorRTModule", "to_onnx", "to_tensorrt", "unsupported_by_tensorrt"]
