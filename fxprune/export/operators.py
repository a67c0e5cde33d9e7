"""Which ONNX operators TensorRT's ONNX parser can import."""
from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

# The operators marked supported ("Y") in onnx-tensorrt's docs/operators.md for TensorRT 10.15
# (opsets 9 to 24). Earlier 10.x parsers lack only operators of opsets 23 and 24 (Attention,
# RMSNormalization, RotaryEmbedding, TensorScatter), which an opset-17 export never contains.
# Per-operator restrictions listed there (e.g. Dropout's `is_training` must be False, pooling is
# 2-D or 3-D only) are left to the parser, which reports them with the node's name.
TENSORRT_ONNX_OPS = frozenset("""
    Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh Attention AveragePool
    BatchNormalization BlackmanWindow Cast CastLike Ceil Celu Clip Concat Constant ConstantOfShape
    Conv ConvTranspose Cos Cosh CumSum DeformConv DepthToSpace DequantizeLinear Div Dropout Einsum
    Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather GatherElements GatherND Gelu Gemm
    GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample
    GroupNormalization GRU HammingWindow HannWindow HardSigmoid HardSwish Hardmax Identity If
    ImageScaler InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less LessOrEqual Log
    LogSoftmax Loop LRN LSTM LpNormalization LpPool MatMul Max MaxPool Mean
    MeanVarianceNormalization Min Mish Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad
    ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal RandomNormalLike RandomUniform
    RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax
    ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize ReverseSequence
    RMSNormalization RNN RoiAlign RotaryEmbedding Round STFT ScaledTanh Scan Scatter
    ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax Softplus
    Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh TensorScatter ThresholdedRelu Tile
    TopK Transpose Trilu Unsqueeze Upsample Where Xor
""".split())


def unsupported_by_tensorrt(model: str | os.PathLike | Any) -> list[str]:
    """Sorted op types in ``model`` (an ONNX path or ``onnx.ModelProto``) that TensorRT's ONNX
    parser does not import."""
    return sorted(op_types(model) - TENSORRT_ONNX_OPS)


def op_types(model: str | os.PathLike | Any) -> set[str]:
    """The op types in ``model`` (an ONNX path or ``onnx.ModelProto``), subgraphs of ``If``,
    ``Loop`` and ``Scan`` included."""
    if isinstance(model, (str, os.PathLike)):
        import onnx

        model = onnx.load(os.fspath(model), load_external_data=False)
    return {node.op_type for node in _nodes(model.graph)}


def _nodes(graph) -> Iterator:
    for node in graph.node:
        yield node
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else attr.graphs:
                yield from _nodes(sub)
