"""Trace a model into a ``torch.fx.GraphModule`` with tensor shapes on every node."""
from __future__ import annotations

from collections.abc import Iterable
import contextlib
import difflib
import functools
import copy
import io
import os
import traceback
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.nn.modules import transformer
from torch.nn.utils import rnn as rnn_utils
from torch.fx.node import map_aggregate
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from .copying import copy_modules
from .errors import TraceError
from .modules import window_attention
from .modules.attention import PrunedMultiheadAttention
from .modules.recurrent import RecurrentStack

# Modules kept whole: their internals are handled by one channel rule each.
ALWAYS_LEAF = (nn.RNNBase, nn.RNNCellBase, nn.MultiheadAttention, PrunedMultiheadAttention, RecurrentStack)
# torch.nn modules that FX keeps whole by default but that are built from modules with rules.
TRACED_THROUGH = (nn.TransformerEncoder, nn.TransformerDecoder, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)
# Helpers that inspect their tensor argument in Python: recorded as calls, not traced into.
RECORDED = ((transformer, "_get_seq_len"), (rnn_utils, "pack_padded_sequence"),
            (rnn_utils, "pack_sequence"), (rnn_utils, "pad_packed_sequence"))
# Library calls traced as fxprune's equivalents (same arguments and results), written so that their
# channels can be followed; by qualified name, so the library need not be imported.
TRACED_AS = {"torchvision.models.swin_transformer.shifted_window_attention": window_attention.shifted_window_attention}
PACKING = (rnn_utils.pack_padded_sequence, rnn_utils.pack_sequence, rnn_utils.pad_packed_sequence)
PACKED_HINT = ("PackedSequence inputs are not supported: fxprune analyses recurrent layers on padded "
               "batches; prune a variant of the model that runs on the padded tensor")

HINT = (
    "Hint: name the module in `leaf_modules=` to keep it whole (its channels then become a "
    "boundary unless fxprune has a rule for it), or fix data-dependent arguments with "
    "`concrete_args=`."
)


class _Tracer(torch.fx.Tracer):
    """A tracer that keeps chosen modules as leaves and remembers where tracing failed."""

    def __init__(self, leaf_modules: Iterable[str | type[nn.Module]] = ()):
        # the same helpers, where a module imported them by name
        super().__init__(autowrap_functions=tuple(getattr(m, name) for m, name in RECORDED if not name.startswith("_")))
        leaves = list(leaf_modules)
        self.leaf_names = {x for x in leaves if isinstance(x, str)}
        self.leaf_types = tuple(x for x in leaves if isinstance(x, type))
        self.failed_in: str | None = None

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if qualname in self.leaf_names or isinstance(m, ALWAYS_LEAF + self.leaf_types):
            return True
        if isinstance(m, TRACED_THROUGH):
            return False
        return super().is_leaf_module(m, qualname)

    def create_proxy(self, kind, target, args, kwargs, *rest, **more):
        replacement = TRACED_AS.get(_qualified_name(target)) if kind == "call_function" else None
        if replacement is not None:  # a wrapped library function: trace fxprune's equivalent instead
            return replacement(*args, **kwargs)
        return super().create_proxy(kind, target, args, kwargs, *rest, **more)

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = f"'{self.path_of_module(m) or '<root>'}' ({type(m).__name__})"
            raise


def _qualified_name(target: Any) -> str:
    return f"{getattr(target, '__module__', '')}.{getattr(target, '__name__', '')}"


LAYER_NAME = "fxprune_layer"  # node meta: the name of the removable layer this add closes
KEPT_META = ("nn_module_stack", LAYER_NAME)


def as_tuple(example_inputs: Any) -> tuple:
    """Example inputs as a tuple of positional arguments."""
    return tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)


def trace(
    model: nn.Module,
    example_inputs: Any,
    leaf_modules: Iterable[str | type[nn.Module]] = (),
    concrete_args: dict[str, Any] | None = None,
) -> torch.fx.GraphModule:
    """Symbolically trace ``model`` and record ``tensor_meta`` (shape, dtype) on every node.

    Shapes are propagated on the meta device, so no real arithmetic runs and nothing in ``model``
    changes. RNN and attention modules, and modules named in ``leaf_modules`` (qualified names or
    classes), stay single nodes. Raises :class:`TraceError` naming the module that FX cannot trace.

    >>> gm = trace(torchvision.models.resnet18(), torch.randn(1, 3, 224, 224))
    >>> gm.graph.find_nodes(op="output")[0].args[0].meta["tensor_meta"].shape
    torch.Size([1, 1000])
    """
    if any(isinstance(x, rnn_utils.PackedSequence) for x in (example_inputs, *as_tuple(example_inputs))):
        raise TraceError(f"an example input is a PackedSequence. {PACKED_HINT}")
    tracer = _Tracer(leaf_modules)
    try:
        with _traceable_torch():
            graph = tracer.trace(model, concrete_args)
    except Exception as e:
        where = tracer.failed_in or f"'<root>' ({type(model).__name__})"
        raise TraceError(f"cannot trace module {where}{_construct(e)}: {type(e).__name__}: {e}. {HINT}") from e
    for node in graph.nodes:
        if node.op == "call_function" and node.target in PACKING:
            raise TraceError(f"node '{node.name}' calls {node.target.__name__}. {PACKED_HINT}")
    gm = torch.fx.GraphModule(tracer.root, graph, type(model).__name__)
    if isinstance(model, torch.fx.GraphModule):
        _keep_module_stacks(model.graph, graph)
    propagate_shapes(gm, example_inputs)
    return gm


def _construct(e: BaseException) -> str:
    """Where the model's own code failed to trace: ' at file:line (the line)', or ''."""
    torch_dir = os.path.dirname(torch.__file__)
    frames = [f for f in traceback.extract_tb(e.__traceback__) if not f.filename.startswith(torch_dir)
              and os.path.dirname(f.filename) != os.path.dirname(__file__)]
    if not frames:
        return ""
    f = frames[-1]
    return f" at {os.path.basename(f.filename)}:{f.lineno} ({(f.line or '').strip()})"


def _keep_module_stacks(before: torch.fx.Graph, after: torch.fx.Graph) -> None:
    """Re-tracing a GraphModule forgets which module each node was computed in and the names of
    its layers: copy those records over where the two graphs hold the same nodes."""
    old, new = list(before.nodes), list(after.nodes)
    key = lambda n: (n.op, n.target if isinstance(n.target, str) else id(n.target))  # noqa: E731
    # FX drops unused attribute reads when it traces generated code again: align the two sequences
    matcher = difflib.SequenceMatcher(None, [key(n) for n in old], [key(n) for n in new], autojunk=False)
    for i, j, size in matcher.get_matching_blocks():
        for a, b in zip(old[i:i + size], new[j:j + size]):
            b.meta.update({k: a.meta[k] for k in KEPT_META if k in a.meta})


@contextlib.contextmanager
def no_attention_fastpath():
    """Run attention and transformer layers on their plain path: the fused fast path checks tensor
    values (untraceable) and is one op that FLOP counting does not see into."""
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


@contextlib.contextmanager
def _traceable_torch():
    """Disable the fused attention fast path and record the RECORDED helpers as calls while tracing."""
    originals = [(module, name, getattr(module, name)) for module, name in RECORDED]

    def recorded(fn):
        def call(*args, **kwargs):
            proxy = next((a for a in args if isinstance(a, torch.fx.Proxy)), None)
            return proxy.tracer.create_proxy("call_function", fn, args, kwargs) if proxy is not None else fn(*args, **kwargs)
        return call

    for module, name, fn in originals:
        setattr(module, name, recorded(fn))
    try:
        with no_attention_fastpath():
            yield
    finally:
        for module, name, fn in originals:
            setattr(module, name, fn)


def propagate_shapes(gm: torch.fx.GraphModule, example_inputs: Any) -> None:
    """Store ``tensor_meta`` on every node of ``gm`` by running it with meta-device tensors.

    No arithmetic runs and no data is allocated: the graph runs over a shadow of ``gm``'s module
    tree (a shallow copy of each module holding meta tensors), so ``gm`` and the model it shares
    modules with (BatchNorm statistics in training mode included) are untouched. A graph that reads
    tensor values (a leaf module with data-dependent control flow) runs on a real copy.
    """
    inputs = [_on_meta(x) if isinstance(x, torch.Tensor) else x for x in as_tuple(example_inputs)]
    try:
        _run_shape_prop(meta_shadow(gm), inputs)
        return
    except Exception:
        shadow = copy.deepcopy(gm)
        try:
            with torch.no_grad():
                _run_shape_prop(shadow, as_tuple(example_inputs), on_meta=False)
        except Exception as e:
            cause = e.__cause__ or e
            node = str(e).partition("node=")[2].partition(" with meta=")[0] or "?"
            raise TraceError(f"shape propagation failed at {node}: {type(cause).__name__}: {cause}") from e
    for src, dst in zip(shadow.graph.nodes, gm.graph.nodes):
        if "tensor_meta" in src.meta:
            dst.meta["tensor_meta"] = src.meta["tensor_meta"]


def meta_shadow(root: nn.Module) -> nn.Module:
    """A shallow copy of ``root``'s module tree in which every tensor is a meta tensor of the same
    shape: running it computes shapes only and changes nothing in ``root``."""
    return copy_modules(root, _on_meta, private=False)


class FetchOnce:
    """Interpreter mixin that looks each attribute path up once: ``fetch_attr`` walks the module
    tree one name at a time, for every call and every attribute node."""

    def fetch_attr(self, target: str) -> Any:
        found = self.__dict__.setdefault("_fetched", {})
        if target not in found:
            found[target] = super().fetch_attr(target)
        return found[target]


class _MetaShapeProp(FetchOnce, ShapeProp):
    """ShapeProp on meta tensors that skips ops whose output is shaped like their input, and reads
    a tensor's memory format from its own flags (``_extract_tensor_metadata`` derives it in Python,
    for symbolic shapes, which meta tensors of concrete shapes do not need)."""

    def run_node(self, n: torch.fx.Node) -> Any:
        result = torch.fx.Interpreter.run_node(self, n)
        tensors = [False]

        def describe(x: Any) -> Any:
            if not isinstance(x, torch.Tensor):
                return x
            tensors[0] = True
            return TensorMetadata(x.shape, x.dtype, x.requires_grad, x.stride(), _memory_format(x), False, {})

        meta = map_aggregate(result, describe)
        if tensors[0]:
            n.meta["tensor_meta"] = meta
        n.meta["type"] = type(result)
        return result

    def call_module(self, target, args, kwargs):
        if isinstance(self.fetch_attr(target), _shape_keeping_modules()):
            return args[0]
        return super().call_module(target, args, kwargs)

    def call_function(self, target, args, kwargs):
        from .rules import activation, arithmetic

        if target in activation.FUNCTIONS and isinstance(args[0], torch.Tensor):
            return args[0]
        if target in arithmetic.ADD + arithmetic.MUL and len(args) == 2 and all(
                isinstance(a, torch.Tensor) for a in args) and args[0].shape == args[1].shape \
                and args[0].dtype == args[1].dtype:
            return args[0]
        return super().call_function(target, args, kwargs)


@functools.cache
def _shape_keeping_modules() -> tuple[type, ...]:
    from .rules import activation

    return (*activation.MODULES, nn.modules.batchnorm._BatchNorm)


def _memory_format(t: torch.Tensor) -> torch.memory_format | None:
    for fmt in (torch.contiguous_format, torch.channels_last, torch.channels_last_3d):
        if (fmt is torch.contiguous_format or t.dim() == (4 if fmt is torch.channels_last else 5)) \
                and t.is_contiguous(memory_format=fmt):
            return fmt
    return None


def _run_shape_prop(gm: torch.fx.GraphModule, inputs, on_meta: bool = True) -> None:
    with contextlib.redirect_stderr(io.StringIO()):  # ShapeProp prints the traceback it raises
        (_MetaShapeProp if on_meta else ShapeProp)(gm).propagate(*inputs)


def _on_meta(t: torch.Tensor) -> torch.Tensor:
    meta = torch.empty_like(t, device="meta")
    return nn.Parameter(meta, t.requires_grad) if isinstance(t, nn.Parameter) else meta
