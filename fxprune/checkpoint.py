"""Checkpoints of rewritten models that load without the model's code and without unpickling code.

A checkpoint is ``torch.save({"format": "fxprune", "version": 1, "spec": <JSON>, "spec_checksum":
<CRC-32>, "state": {key: tensor}})``. The JSON spec holds the graph (every node's op, name, target,
args and kwargs), the module tree (each module's class, plain attributes, parameters, buffers and
children, by name), a CRC-32 of every tensor and the plain-JSON ``meta`` entries. Functions and
module classes are stored by qualified name and resolved at load only from allow-listed namespaces,
so ``torch.load(weights_only=True)`` reads the file and nothing in it names code that fxprune does
not know.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import importlib
import json
import keyword
import math
import operator
import os
import re
import zlib
from collections.abc import Callable
from typing import Any, BinaryIO

import torch
import torch.fx
from torch import nn
from torch.fx.immutable_collections import immutable_dict, immutable_list

from .errors import CheckpointError
from .trace import LAYER_NAME, RECORDED

FORMAT, VERSION = "fxprune", 1

# Functions are found by identity in these namespaces...
FUNCTION_NAMESPACES = (torch, torch.nn.functional, operator, math)
# ...or, in these packages, under their own module and name (torchvision's model code calls its
# own helpers, such as Swin's shifted_window_attention: library code, not the user's).
FUNCTION_PACKAGES = ("fxprune", "torchvision.ops", "torchvision.models")
# Single functions: FX records attribute reads of proxies (x.shape) as getattr; fxprune's tracer
# records its RECORDED helpers as calls.
FUNCTIONS = {("builtins", "getattr"), *((module.__name__, name) for module, name in RECORDED)}
# Packages whose nn.Module subclasses a checkpoint may name.
MODULE_PACKAGES = ("torch.nn", "torchvision.ops", "fxprune")

HOOKS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")  # change what runs
OPS = ("placeholder", "get_attr", "call_function", "call_method", "call_module", "output")
PLACEHOLDER = re.compile(r"\*{0,2}[A-Za-z_]\w*")  # an argument name, or *args / **kwargs
MODULE_BASE = frozenset(vars(nn.Module()))  # what nn.Module.__init__ sets: never stored as attributes
TORCH_ENUMS = {"dtype": torch.dtype, "memory_format": torch.memory_format, "layout": torch.layout}
NODE_TYPES = {t.__name__: t for t in (torch.Tensor, int, float, bool, str)}  # annotations kept; others dropped

PathLike = str | os.PathLike
Target = PathLike | BinaryIO  # a path, or a binary file object (io.BytesIO, an open file)


# --------------------------------------------------------------------------------------------
# State that torch modules derive from their attributes and parameters: not stored, rebuilt at load.

DERIVED: dict[type[nn.Module], tuple[tuple[str, ...], Callable[[nn.Module], None]]] = {}


def derived(cls: type[nn.Module], *attributes: str):
    """Register ``rebuild(module)``, which recomputes the ``attributes`` of ``cls`` after loading."""
    def register(rebuild: Callable[[nn.Module], None]) -> Callable[[nn.Module], None]:
        DERIVED[cls] = (attributes, rebuild)
        return rebuild
    return register


def _derived_of(cls: type) -> tuple[tuple[str, ...], Callable[[nn.Module], None] | None]:
    return next((DERIVED[c] for c in cls.__mro__ if c in DERIVED), ((), None))


@derived(nn.RNNBase, "_flat_weights", "_flat_weight_refs")
def _rnn(m: nn.RNNBase) -> None:
    m._init_flat_weights()  # the weights the kernel runs with, from _flat_weights_names


# --------------------------------------------------------------------------------------------
# Names of functions and classes

@functools.cache
def _function_index() -> dict[int, str]:
    index = {}
    for namespace in reversed(FUNCTION_NAMESPACES):  # the first namespace names a function
        for name, obj in vars(namespace).items():
            if callable(obj) and not name.startswith("__"):
                index[id(obj)] = f"{namespace.__name__}:{name}"
    return index


def _import(module: str):
    if module.split(".")[0] == "torchvision":
        from .zoo import torchvision_models
        torchvision_models()  # imports torchvision even where its compiled extension does not load
    return importlib.import_module(module)


def _in_package(module: str, packages: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def _resolve(qualified: str, kind: str, allowed: Callable[[str, str], bool]) -> Any:
    module, _, name = qualified.partition(":")
    if not name.isidentifier() or name.startswith("__") or not allowed(module, name):
        raise CheckpointError(f"{kind} '{qualified}' is not in fxprune's allow-list")
    try:
        return getattr(_import(module), name)
    except (ImportError, AttributeError) as e:
        raise CheckpointError(f"{kind} '{qualified}' cannot be found: {e}") from e


def resolve_function(qualified: str) -> Callable:
    """The allow-listed function stored as ``"module:name"``."""
    fn = _resolve(qualified, "function", lambda module, name: (module, name) in FUNCTIONS or _in_package(
        module, FUNCTION_PACKAGES) or any(module == ns.__name__ for ns in FUNCTION_NAMESPACES))
    if not callable(fn) or isinstance(fn, type):
        raise CheckpointError(f"function '{qualified}' is not a function")
    return fn


def resolve_class(qualified: str) -> type[nn.Module]:
    """The allow-listed nn.Module subclass stored as ``"module:name"``."""
    cls = _resolve(qualified, "module class", lambda module, name: _in_package(module, MODULE_PACKAGES))
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise CheckpointError(f"module class '{qualified}' is not an nn.Module subclass")
    return cls


def _function_name(fn: Any, where: str) -> str:
    name = _function_index().get(id(fn)) or f"{getattr(fn, '__module__', None)}:{getattr(fn, '__name__', None)}"
    try:
        if resolve_function(name) is fn:
            return name
    except CheckpointError:
        pass
    what = f"{getattr(fn, '__module__', None)}.{getattr(fn, '__qualname__', fn)}"
    allowed = ", ".join([ns.__name__ for ns in FUNCTION_NAMESPACES] + ["getattr", *FUNCTION_PACKAGES])
    raise CheckpointError(f"{where} refers to the function {what}, which is not in fxprune's allow-list "
                          f"({allowed}): the file would not load")


def _class_name(cls: type, where: str) -> str:
    name = f"{cls.__module__}:{cls.__qualname__}"
    try:
        if resolve_class(name) is cls:
            return name
    except CheckpointError:
        pass
    raise CheckpointError(f"{where} is a {cls.__module__}.{cls.__qualname__}, which is not in fxprune's allow-list "
                          f"of module classes (packages {', '.join(MODULE_PACKAGES)}): the file would not load")


def _check_node(op: str, name: str, target: Any, args: tuple) -> None:
    """What a node must satisfy to be saved and loaded: generated code reads placeholder targets
    verbatim, and dunder attributes would reach Python internals when the graph runs."""
    where = f"node '{name}'"
    if op not in OPS:
        raise CheckpointError(f"{where} has unknown op '{op}'")
    if op == "call_function":
        if target is getattr and not (len(args) == 2 and isinstance(args[1], str) and not args[1].startswith("__")):
            raise CheckpointError(f"{where} calls getattr with a dynamic or dunder attribute name")
    elif not isinstance(target, str):
        raise CheckpointError(f"{where} ({op}) has a target of type {type(target).__name__}")
    elif op == "placeholder" and (not PLACEHOLDER.fullmatch(target) or keyword.iskeyword(target.lstrip("*"))):
        raise CheckpointError(f"{where} has the invalid argument name {target!r}")
    elif op == "call_method" and target.startswith("__"):
        raise CheckpointError(f"{where} calls the dunder method '{target}'")


# --------------------------------------------------------------------------------------------
# Save

class _Writer:
    """Turns a GraphModule into a JSON-able spec and a flat dict of tensors (each tensor once)."""

    def __init__(self) -> None:
        self.state: dict[str, torch.Tensor] = {}
        self.keys: dict[int, str] = {}  # id(tensor) -> key in state
        self.parameters: dict[str, bool] = {}  # key -> requires_grad, for the keys that are nn.Parameters
        self.checksums: dict[str, int] = {}

    def tensor(self, t: torch.Tensor, name: str) -> str:
        if id(t) not in self.keys:
            self.keys[id(t)] = name
            self.state[name] = t.detach()
            self.checksums[name] = _checksum(t)
            if isinstance(t, nn.Parameter):
                self.parameters[name] = t.requires_grad
        return self.keys[id(t)]

    def value(self, x: Any, where: str) -> Any:
        encode = ENCODERS.get(type(x))
        if encode is not None:
            return encode(self, x, where)
        if callable(x) and not isinstance(x, (type, nn.Module)):
            return {"function": _function_name(x, where)}
        raise CheckpointError(f"{where} holds a {type(x).__module__}.{type(x).__qualname__}, "
                              "which a checkpoint cannot store")

    def module(self, path: str, m: nn.Module, paths: dict[int, str]) -> dict:
        prefix = f"{path}." if path else ""
        where = f"module '{path or '<root>'}'"
        if any(getattr(m, hooks) for hooks in HOOKS):
            raise CheckpointError(f"{where} has forward or backward hooks, which a checkpoint cannot store: "
                                  "remove them before saving")
        entry: dict[str, Any] = {"training": m.training}
        if path:
            entry["class"] = _class_name(type(m), where)
            skip, _ = _derived_of(type(m))
            entry["attributes"] = {k: self.value(v, f"{where} attribute '{k}'")
                                   for k, v in vars(m).items() if k not in MODULE_BASE and k not in skip}
        entry["parameters"] = {k: None if p is None else self.tensor(p, prefix + k) for k, p in m._parameters.items()}
        entry["buffers"] = {k: None if b is None else self.tensor(b, prefix + k) for k, b in m._buffers.items()}
        entry["non_persistent"] = sorted(m._non_persistent_buffers_set)
        entry["children"] = {k: None if c is None else paths[id(c)] for k, c in m._modules.items()}
        return entry


def _sequence(w: _Writer, x: list | tuple, where: str) -> list:
    return [w.value(v, where) for v in x]


def _pairs(w: _Writer, x: dict, where: str) -> dict:
    return {"dict": [[w.value(k, where), w.value(v, where)] for k, v in x.items()]}


ENCODERS: dict[type, Callable[[_Writer, Any, str], Any]] = {
    **{t: lambda w, x, where: x for t in (type(None), bool, int, float, str)},  # JSON as is
    list: _sequence,
    immutable_list: _sequence,
    tuple: lambda w, x, where: {"tuple": _sequence(w, x, where)},
    dict: _pairs,
    immutable_dict: _pairs,
    slice: lambda w, x, where: {"slice": _sequence(w, (x.start, x.stop, x.step), where)},
    type(Ellipsis): lambda w, x, where: {"ellipsis": None},
    torch.fx.Node: lambda w, x, where: {"node": x.name},
    torch.Size: lambda w, x, where: {"size": list(x)},
    torch.device: lambda w, x, where: {"device": str(x)},
    **{cls: lambda w, x, where, tag=tag: {tag: str(x).removeprefix("torch.")} for tag, cls in TORCH_ENUMS.items()},
}


def save(model: torch.fx.GraphModule, path: Target) -> None:
    """Write ``model`` to ``path`` (a file name, or a binary file object) so that :func:`load`
    rebuilds it in any process, without the code of the model it came from.

    Everything is checked before the file is written: a node calling a function, or a module of a
    class, outside fxprune's allow-list, or a module with forward or backward hooks, raises
    :class:`CheckpointError` naming the node or module. Of node ``meta`` only ``nn_module_stack`` and the layer name are
    kept (class names as strings, as ``torch.export`` stores them), of annotations only plain types,
    of ``model.meta`` only plain-JSON entries.
    """
    if not isinstance(model, torch.fx.GraphModule):
        raise CheckpointError(f"save takes a torch.fx.GraphModule (from fxprune.compact or fxprune.trace), "
                              f"got {type(model).__name__}")
    if type(model.graph._codegen) is not torch.fx.graph.CodeGen:
        raise CheckpointError(f"the graph uses {type(model.graph._codegen).__name__}; only plain FX code "
                              "generation can be stored")
    w = _Writer()
    named = dict(model.named_modules())  # each module once, under its first name
    paths = {id(m): p for p, m in named.items()}
    modules = {p: w.module(p, m, paths) for p, m in named.items()}
    nodes = []
    for n in model.graph.nodes:
        _check_node(n.op, n.name, n.target, n.args)
        where = f"node '{n.name}'"
        nodes.append({"op": n.op, "name": n.name, "target": w.value(n.target, where),
                      "args": w.value(n.args, where), "kwargs": w.value(n.kwargs, where),
                      "type": _type_name(n.type), "module_stack": _module_stack(n),
                      "layer": n.meta.get(LAYER_NAME)})
    meta = {k: v for k, v in model.meta.items() if isinstance(k, str) and _is_plain_json(v)}
    spec = {"class_name": type(model).__name__, "graph": nodes, "modules": modules,
            "parameters": w.parameters, "checksums": w.checksums, "meta": meta}
    text = json.dumps(spec)
    torch.save({"format": FORMAT, "version": VERSION, "spec": text, "spec_checksum": zlib.crc32(text.encode()),
                "state": w.state}, path)


def _module_stack(node: torch.fx.Node) -> list[list[str]] | None:
    """The modules whose forward computed ``node`` (fxprune names layers after them), with class
    names as strings, as torch.export serializes them."""
    stack = node.meta.get("nn_module_stack")
    if stack is None:
        return None
    return [[key, path, f"{cls.__module__}.{cls.__qualname__}" if isinstance(cls, type) else str(cls)]
            for key, (path, cls) in stack.items()]


def _type_name(annotation: Any) -> str | None:
    name = getattr(annotation, "__name__", None)
    return name if name in NODE_TYPES and NODE_TYPES[name] is annotation else None


def _checksum(t: torch.Tensor) -> int:
    """CRC-32 of a tensor's bytes: torch.load does not notice corrupted tensor data."""
    data = t.detach().contiguous().cpu()
    return zlib.crc32((ctypes.c_char * (data.numel() * data.element_size())).from_address(data.data_ptr()))


def _is_plain_json(x: Any) -> bool:
    try:
        return json.loads(json.dumps(x)) == x
    except (TypeError, ValueError):
        return False


# --------------------------------------------------------------------------------------------
# Load

class _Reader:
    """Rebuilds objects from a spec: every module is complete before the GraphModule is returned."""

    def __init__(self, state: dict[str, torch.Tensor], parameters: dict[str, bool]) -> None:
        self.tensors = {k: nn.Parameter(t, parameters[k]) if k in parameters else t for k, t in state.items()}
        self.nodes: dict[str, torch.fx.Node] = {}

    def value(self, x: Any) -> Any:
        if isinstance(x, list):
            return [self.value(v) for v in x]
        if not isinstance(x, dict):
            return x
        (tag, payload), = x.items()
        return DECODERS[tag](self, payload)

    def shell(self, path: str, entry: dict) -> nn.Module:
        """The module at ``path`` with its attributes, not yet its tensors and children; its
        ``__init__`` is not called (its arguments are not stored)."""
        cls = resolve_class(entry["class"])
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        attributes = {k: self.value(v) for k, v in entry["attributes"].items()}
        clash = MODULE_BASE.intersection(attributes)
        if clash:
            raise CheckpointError(f"module '{path}' stores nn.Module internals {sorted(clash)} as attributes")
        vars(m).update(attributes)
        return m

    def fill(self, m: nn.Module, entry: dict, modules: dict[str, nn.Module]) -> None:
        m.training = bool(entry["training"])
        for k, key in entry["parameters"].items():
            m.register_parameter(k, None if key is None else self.tensors[key])
        non_persistent = set(entry["non_persistent"])
        for k, key in entry["buffers"].items():
            m.register_buffer(k, None if key is None else self.tensors[key], persistent=k not in non_persistent)
        for k, path in entry["children"].items():
            m.add_module(k, None if path is None else modules[path])

    def graph(self, nodes: list[dict]) -> torch.fx.Graph:
        graph = torch.fx.Graph()
        for spec in nodes:
            op, name = spec["op"], spec["name"]
            target, args, kwargs = self.value(spec["target"]), self.value(spec["args"]), self.value(spec["kwargs"])
            _check_node(op, name, target, args)
            if op == "call_function" and not callable(target):
                raise CheckpointError(f"node '{name}' calls a {type(target).__name__}")
            node_type = None if spec["type"] is None else NODE_TYPES[spec["type"]]
            node = graph.create_node(op, target, tuple(args), dict(kwargs), name=name, type_expr=node_type)
            if node.name != name:
                raise CheckpointError(f"node name {name!r} is invalid or repeated")
            if spec["module_stack"] is not None:
                node.meta["nn_module_stack"] = {str(k): (str(path), str(cls)) for k, path, cls in spec["module_stack"]}
            if spec.get("layer") is not None:
                node.meta[LAYER_NAME] = str(spec["layer"])
            self.nodes[name] = node
        return graph


def _tuple(r: _Reader, payload: list) -> tuple:
    return tuple(r.value(v) for v in payload)


def _torch_enum(cls: type, name: str) -> Any:
    obj = getattr(torch, name, None)
    if not isinstance(obj, cls):
        raise CheckpointError(f"'{name}' is not a torch.{cls.__name__}")
    return obj


DECODERS: dict[str, Callable[[_Reader, Any], Any]] = {
    "tuple": _tuple,
    "dict": lambda r, p: {r.value(k): r.value(v) for k, v in p},
    "slice": lambda r, p: slice(*_tuple(r, p)),
    "ellipsis": lambda r, p: ...,
    "node": lambda r, p: r.nodes[p],
    "function": lambda r, p: resolve_function(p),
    "size": lambda r, p: torch.Size(p),
    "device": lambda r, p: torch.device(p),
    **{tag: lambda r, p, cls=cls: _torch_enum(cls, p) for tag, cls in TORCH_ENUMS.items()},
}


def load(path: Target) -> torch.fx.GraphModule:
    """The GraphModule that :func:`save` wrote to ``path`` (a file name, or a binary file object):
    same graph, module classes, parameter names, tensors (tied ones still shared),
    ``requires_grad`` and train/eval modes.

    Tensors are read with ``torch.load(weights_only=True)``; functions and module classes come only
    from fxprune's allow-list, and running the graph reads no attribute and calls no method whose
    name starts with ``__``. A file that is not a complete fxprune checkpoint of a version this
    fxprune reads raises :class:`CheckpointError` naming ``path`` (or a file object's ``name``); a
    missing or unreadable file raises the ``OSError`` from opening it.
    """
    stream = hasattr(path, "read")
    where = getattr(path, "name", "<file object>") if stream else path
    with contextlib.nullcontext(path) if stream else open(path, "rb") as f:
        try:
            saved = torch.load(f, weights_only=True)
        except Exception as e:
            reason = (str(e).strip() or "-").splitlines()[0]
            raise CheckpointError(f"{where}: torch.load cannot read it (not a torch file, or truncated or "
                                  f"corrupted): {type(e).__name__}: {reason}") from e
    if not (isinstance(saved, dict) and saved.get("format") == FORMAT):
        raise CheckpointError(f"{where}: not an fxprune checkpoint (a torch file holding a {type(saved).__name__} "
                              f"without format '{FORMAT}'; write checkpoints with fxprune.save)")
    version = saved.get("version")
    if isinstance(version, int) and version > VERSION:
        raise CheckpointError(f"{where}: written in checkpoint format version {version} by a newer fxprune; "
                              f"this one reads version {VERSION}: upgrade fxprune")
    try:
        if version != VERSION:
            raise CheckpointError(f"unknown format version {version!r}")
        if zlib.crc32(saved["spec"].encode()) != saved["spec_checksum"]:
            raise CheckpointError("its spec does not match its checksum: the file is corrupted")
        return _build(json.loads(saved["spec"]), saved["state"])
    except CheckpointError as e:
        raise CheckpointError(f"{where}: {e}") from e
    except Exception as e:
        raise CheckpointError(f"{where}: malformed fxprune checkpoint: {type(e).__name__}: {e}") from e


def _build(spec: dict, state: dict[str, torch.Tensor]) -> torch.fx.GraphModule:
    checksums = spec["checksums"]
    if set(state) != set(checksums) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise CheckpointError("its tensors do not match its spec")
    corrupted = [k for k, t in state.items() if _checksum(t) != checksums[k]]
    if corrupted:
        raise CheckpointError(f"the data of tensor(s) {', '.join(corrupted[:5])} do not match their checksums: "
                              "the file is corrupted")
    r = _Reader(state, spec["parameters"])
    class_name = spec["class_name"]
    if not class_name.isidentifier():
        raise CheckpointError(f"invalid class name {class_name!r}")
    gm = torch.fx.GraphModule(nn.Module(), torch.fx.Graph(), class_name)
    entries = spec["modules"]
    modules = {path: gm if path == "" else r.shell(path, entry) for path, entry in entries.items()}
    for path, entry in entries.items():
        r.fill(modules[path], entry, modules)
    for m in modules.values():
        _, rebuild = _derived_of(type(m))
        if rebuild is not None:
            rebuild(m)
    gm.graph = r.graph(spec["graph"])
    gm.graph.lint()  # every get_attr and call_module target exists
    gm.meta.update(spec["meta"])
    return gm
