"""Functional form and ``nn.Module`` (the module layer, docs/architecture.md).

Validation of user input lives here, at the public entry points (:func:`csra`,
:class:`CSRAFunction`, :class:`CSRATriton`), in one place (:func:`_check_inputs`,
``common.scalars``): every entry refuses the same inputs with the same message. The op layer's
:func:`ops.run` then chooses the call's route.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

from . import interop, maps, ops
from .common import Scalars, check_lam, check_normalize, check_temperatures, scalars
from .reference import OFFICIAL_TEMPERATURES

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
#: The layouts of x: (B, in_ch, h, w); (B, N, in_ch) tokens; (B, in_ch, N) (CSRAFunction's)
_NDIM = {"nchw": 4, "tokens": 3, "bdn": 3}


def _autocast(x: Tensor) -> Tensor:
    """Under autocast, x goes to the autocast dtype as a 1x1 conv's input would (the official
    head is a conv; autocast casts every floating input but fp64). The weight stays as it is:
    the kernels round it to x's dtype for the products and take the row norms from it in
    fp32, as the official code does under autocast. Called where autocast is enabled on x's
    device."""
    if x.dtype == torch.float64:
        return x
    dtype = torch.get_autocast_dtype(x.device.type)
    return x if x.dtype == dtype else x.to(dtype)


def _check_inputs(x, weight, layout: str) -> Tensor:
    """Validates x (in ``layout``: "nchw", "tokens" or "bdn") and weight; returns x as it is,
    cast to the autocast dtype under autocast (the op views it as (B, D, N):
    ``common.as_bdn``)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if not isinstance(weight, Tensor):
        raise TypeError(f"weight: expected a torch.Tensor, got {type(weight).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"x: expected dtype float16, bfloat16, float32 or float64, got {x.dtype}")
    if weight.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"weight: expected dtype float16, bfloat16, float32 or float64, "
                        f"got {weight.dtype}")
    if weight.dim() != 3 or weight.shape[0] == 0 or weight.shape[2] == 0:
        raise ValueError(f"weight: expected shape (heads, classes, in_ch) with heads >= 1 and "
                         f"in_ch >= 1, got {tuple(weight.shape)}")
    if x.device != weight.device:
        raise ValueError(f"x and weight must be on the same device: x on {x.device}, "
                         f"weight on {weight.device}")
    d = weight.shape[2]
    ndim = _NDIM.get(layout)
    if ndim is None:
        raise ValueError(f"layout: expected 'nchw' or 'tokens', got {layout!r}")
    if x.dim() != ndim:
        what = {"nchw": "a 4-D (B, in_ch, h, w) tensor", "tokens": "3-D tokens (B, N, in_ch)",
                "bdn": "a 3-D (B, in_ch, N) tensor"}[layout]
        raise ValueError(f"x: expected {what}, got shape {tuple(x.shape)}")
    ch = 2 if layout == "tokens" else 1
    if x.shape[ch] != d:
        raise ValueError(f"x: expected {d} channels (dim {ch}), got {x.shape[ch]} "
                         f"(shape {tuple(x.shape)})")
    if math.prod(x.shape[1:2] if layout == "tokens" else x.shape[2:]) == 0:
        what = {"nchw": "h*w >= 1 positions", "tokens": "N >= 1 tokens",
                "bdn": "N >= 1 positions"}[layout]
        raise ValueError(f"x: expected {what}, got shape {tuple(x.shape)}")
    if not x.is_meta and torch.is_autocast_enabled(x.device.type):
        return _autocast(x)
    return x


def _call(x, weight, temperatures, lam, normalize, layout: str) -> Tensor:
    """The functional entries' one call (:func:`csra`, :class:`CSRAFunction`): every argument
    validated, then :func:`ops.run`."""
    xs = _check_inputs(x, weight, layout)
    sc = scalars(temperatures, lam, weight.shape[0], x.device)
    return ops.run(xs, weight, sc, check_normalize(normalize), layout).y


def csra(x: Tensor, weight: Tensor, temperatures: Sequence[float], lam: float,
         normalize: bool = True, layout: str = "nchw") -> Tensor:
    """Multi-head CSRA logits (B, C) in x's dtype (the autocast dtype under autocast).

    x: (B, in_ch, h, w) features (any strides; channels_last is read in place), or with
    ``layout="tokens"`` (B, N, in_ch) tokens as a ViT emits them. weight: (heads, classes,
    in_ch). temperatures: one per head; ``math.inf`` or 99 makes a max-pooling head. lam: the
    weight of the attention logit, a number or a one-element tensor on x's device (it gets a
    gradient). normalize: divide each class's scores by its weight row's L2 norm.
    """
    if layout not in ("nchw", "tokens"):
        raise ValueError(f"layout: expected 'nchw' or 'tokens', got {layout!r}")
    return _call(x, weight, temperatures, lam, normalize, layout)


class CSRAFunction:
    """``CSRAFunction.apply(x, weight, temperatures, lam, normalize=True) -> y``: :func:`csra`
    on a (B, in_ch, N) view of the features (any strides), under the name of the
    ``autograd.Function`` it once was. Every argument is validated as :func:`csra` validates
    it; the call takes the route :func:`csra` would (autograd, torch.compile, export, ONNX,
    torch.func: the same)."""

    @staticmethod
    def apply(x, weight, temperatures, lam, normalize=True) -> Tensor:
        return _call(x, weight, temperatures, lam, normalize, "bdn")


def _head_call(head: "CSRATriton", x: Tensor, layout: str) -> Tensor:
    """``csra`` for a ``CSRATriton``, whose temperatures, lam and normalize were validated when
    they were set: under torch.compile and torch.export the temperatures and lam reach the ops
    as the module's values tensor (:meth:`CSRATriton._traced_scalars`), else as the Python
    values. (A function rather than a method, and the attributes read one statement each:
    both cost fewer instructions per call; bench/NOTES.md.)"""
    compiling = torch.compiler.is_compiling()
    weight = head._parameters.get("weight")
    if weight is None:              # (nn.DataParallel's replicas hold plain tensors)
        weight = head.weight
    if compiling:
        sc = head._traced_scalars(weight)
    else:
        lam = head._parameters.get("lam")
        sc = Scalars(head._temperatures, head._lam if lam is None else lam)
    if weight.shape != head._shape:                # torch.Size == tuple
        raise ValueError(f"weight: expected shape (heads, classes, in_ch) = {head._shape}, "
                         f"got {tuple(weight.shape)}")
    xs = _check_inputs(x, weight, layout)
    lam = sc.lam
    if lam.__class__ is not float and isinstance(lam, Tensor) and lam.device != xs.device:
        raise ValueError(f"lam: the learnable lam is on {lam.device}, x on {xs.device}")
    return ops.run(xs, weight, sc, head._normalize, layout, compiling).y


class CSRATriton(nn.Module):
    """Multi-head class-specific residual attention head.

    ``weight`` is one parameter of shape (heads, classes, in_ch), initialised like the official
    per-head 1x1 convs. ``temperatures=None`` takes the official list for 1, 2, 4, 6 or 8 heads.
    ``load_state_dict`` also accepts the official keys ``multi_head.{k}.head.weight`` (C, d, 1, 1)
    and mmpretrain's ``csra_heads.{k}.head.weight`` (:meth:`from_mmpretrain` builds a head from
    mmpretrain's config fields).

    ``temperatures``, ``lam`` and ``normalize`` are the module's one copy of those values,
    Python attributes validated when assigned (a learnable lam is the parameter ``lam``).
    Under torch.compile the module hands the ops a tensor of them, ``_values``: derived from
    the Python values whenever those or the weight's device change, never written in place,
    and not a buffer, so that nn.Module's machinery (``.to``, ``.type``, ``to_empty``,
    ``load_state_dict``, copies, pickling) cannot cast, move, share or strand it; a call whose
    ``_values`` is not on the weight's device takes the Python values instead.
    """

    #: The attributes a call reads, each validated when set (see the properties below).
    _LIVE = ("temperatures", "lam", "normalize")

    def __init__(self, in_ch: int, classes: int, heads: int = 4, lam: float = 0.1,
                 temperatures: Sequence[float] | None = None, normalize: bool = True):
        super().__init__()
        for name, v in (("in_ch", in_ch), ("classes", classes), ("heads", heads)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected an integer >= 1, got {v!r}")
        if temperatures is None:
            if heads not in OFFICIAL_TEMPERATURES:
                raise ValueError(f"temperatures: no official list for heads={heads} (official: "
                                 f"{sorted(OFFICIAL_TEMPERATURES)}); pass temperatures explicitly")
            temperatures = OFFICIAL_TEMPERATURES[heads]
        self.in_ch, self.classes, self.heads = in_ch, classes, heads
        self.__dict__["_shape"] = (heads, classes, in_ch)
        self.temperatures = temperatures
        self.lam = lam
        self.normalize = normalize
        self.weight = nn.Parameter(torch.empty(heads, classes, in_ch))
        self.reset_parameters()

    # Module state is live: every method reads these when it is called, and each is validated
    # when it is set (a bad value raises at the assignment, naming the attribute).
    # nn.Module.__setattr__ would register an nn.Parameter (or a tensor assigned over a buffer)
    # before a property's setter sees it, so assignments to these names are routed here first.
    def __setattr__(self, name, value):
        if name in CSRATriton._LIVE:
            object.__setattr__(self, name, value)     # the property's setter
        else:
            super().__setattr__(name, value)
            if name == "weight":     # (load_state_dict(assign=True), a new Parameter)
                self._derive()

    def __delattr__(self, name):
        if name in CSRATriton._LIVE:
            raise AttributeError(f"{name}: cannot be deleted; assign a new value")
        super().__delattr__(name)

    def __getstate__(self):
        state = super().__getstate__() if hasattr(super(), "__getstate__") else dict(self.__dict__)
        state = dict(state)
        state.pop("_values", None)        # derived: made again on unpickling
        return state

    def __setstate__(self, state):
        # A module pickled whole by an earlier version kept temperatures, lam and normalize as
        # plain attributes, and a _scalars buffer: read them through the setters.
        old = {k: state.pop(k) for k in CSRATriton._LIVE if k in state}
        state.pop("_op_temperatures", None)
        buffers = state.get("_buffers")
        if buffers is not None and "_scalars" in buffers:
            state["_buffers"] = {k: v for k, v in buffers.items() if k != "_scalars"}
        super().__setstate__(state)
        if "_shape" not in self.__dict__:
            self.__dict__["_shape"] = (self.heads, self.classes, self.in_ch)
        for k, v in old.items():
            setattr(self, k, v)
        self._derive()

    def __copy__(self):
        """A new head sharing the weight (and a learnable lam) with this one, with registries
        of its own: assigning ``lam``, ``temperatures``, ``normalize`` or a parameter on either
        leaves the other as it was (``copy.copy`` of a plain Module shares its parameter
        dictionary, so that a new lam on the copy would reach this head)."""
        new = self.__class__.__new__(self.__class__)
        state = self.__getstate__()
        for k in ("_parameters", "_buffers", "_modules"):
            state[k] = dict(state[k])
        new.__setstate__(state)
        return new

    def _derive(self) -> None:
        """Makes ``_values`` (see the class docstring) from the Python values, on the weight's
        device (none before the weight exists)."""
        d = self.__dict__
        weight = self._parameters.get("weight") if "_parameters" in d else None
        temps = d.get("_temperatures")
        if weight is None or temps is None:
            d["_values"] = None
            return
        lam = d.get("_lam")
        d["_values"] = ops.op_values(Scalars(temps, lam if lam is not None else 0.0),
                                     weight.device, False)

    def _apply(self, fn, *args, **kwargs):
        # .to(), .cuda(), .type(), to_empty(), share_memory(), ...: the values follow the
        # weight's device, made again from the Python values (never cast)
        out = super()._apply(fn, *args, **kwargs)
        self._derive()
        return out

    def _traced_scalars(self, weight: Tensor) -> Scalars:
        """The scalars of a call under torch.compile and torch.export: ``_values`` (a graph
        input: the graph holds no Python float of them, so that assigning new ones costs no
        recompile) and a learnable lam; the Python values where ``_values`` is not on the
        weight's device (a weight moved by ``.data`` or ``load_state_dict(assign=True)``: the
        graph then guards on the values) and under ONNX export (standard operators, which read
        them)."""
        lam = self._parameters.get("lam")
        if lam is None and getattr(self, "_is_replica", False):   # nn.DataParallel's replica
            lam = self.__dict__["_lam"] if isinstance(self.__dict__["_lam"], Tensor) else None
        values = self._values
        if values is None or values.device != weight.device or \
                torch.onnx.is_in_onnx_export():
            return Scalars(self._temperatures, lam if lam is not None else self._lam)
        return Scalars(None, lam, values)

    @property
    def temperatures(self) -> tuple[float, ...]:
        """One per head (inf: a max head); assign a new sequence to change them (a tuple, so
        that an in-place edit cannot bypass the validation)."""
        return self._temperatures

    @temperatures.setter
    def temperatures(self, value) -> None:
        self.__dict__["_temperatures"] = check_temperatures(value, self.heads)
        self._derive()

    @property
    def lam(self) -> float | nn.Parameter:
        """The weight of the attention logit: a finite Python number, or a one-element
        ``nn.Parameter`` (a learnable lam: registered as the parameter ``lam``, so optimizers,
        ``.to()`` and ``state_dict`` see it, and given its exact gradient)."""
        p = self._parameters.get("lam")
        return p if p is not None else self.__dict__["_lam"]

    @lam.setter
    def lam(self, value) -> None:
        if isinstance(value, Tensor):
            check_lam(value)
            if getattr(self, "_is_replica", False) and not isinstance(value, nn.Parameter):
                # nn.DataParallel's replicas get their parameters as plain tensors (views of
                # the original's, through which the gradient flows back): kept as they are
                self.__dict__["_lam"] = value
                return
            if not isinstance(value, nn.Parameter):
                raise TypeError("lam: a tensor lam must be an nn.Parameter (learnable); for a "
                                "fixed lam pass a Python number")
            self._parameters["lam"] = value
            self.__dict__["_lam"] = None
        else:
            self.__dict__["_lam"] = check_lam(value)
            self._parameters.pop("lam", None)
        self._derive()

    @property
    def normalize(self) -> bool:
        """Whether each class's scores are divided by its weight row's L2 norm."""
        return self._normalize

    @normalize.setter
    def normalize(self, value) -> None:
        self.__dict__["_normalize"] = check_normalize(value)

    def reset_parameters(self) -> None:
        # PyTorch's Conv2d default: kaiming_uniform_(a=sqrt(5)) with fan_in = in_ch (1x1 kernel).
        with torch.no_grad():
            for k in range(self.heads):
                nn.init.kaiming_uniform_(self.weight[k], a=math.sqrt(5))

    def forward(self, x: Tensor) -> Tensor:
        """x (B, in_ch, h, w) -> logits (B, classes) in x's dtype."""
        return _head_call(self, x, "nchw")

    def forward_tokens(self, x: Tensor) -> Tensor:
        """x (B, N, in_ch) tokens (e.g. a ViT's patch tokens, class token dropped) -> (B, classes)."""
        return _head_call(self, x, "tokens")

    def _checked_weight(self) -> Tensor:
        w = self.weight
        if w.shape != self._shape:     # torch.Size == tuple
            raise ValueError(f"weight: expected shape (heads, classes, in_ch) = "
                             f"{self._shape}, got {tuple(w.shape)}")
        return w

    def extra_repr(self) -> str:
        temps = [("inf" if math.isinf(t) else f"{t:g}") for t in self.temperatures]
        lam = self.lam
        if isinstance(lam, Tensor):     # its value only where reading it costs no device sync
            lam = f"learnable({lam.item():g})" if lam.device.type == "cpu" else "learnable"
        return (f"in_ch={self.in_ch}, classes={self.classes}, heads={self.heads}, lam={lam}, "
                f"temperatures=[{', '.join(temps)}], normalize={self.normalize}")

    def attention_maps(self, x: Tensor, classes=None) -> Tensor:
        """(B, heads, K, h, w): the softmax weights over positions each head used, or for a max
        head a one-hot of the position the forward chose; K = all classes or ``classes``
        (indices), computed in class chunks. fp32 (fp64 for fp64 x)."""
        return maps.attention_maps(self._map_input(x), self.weight, self._map_scalars(),
                                   self.normalize, classes)

    def score_maps(self, x: Tensor, classes=None) -> Tensor:
        """(B, heads, K, h, w): the normalised class scores s, the maps the official
        visualisation overlays; K = all classes or ``classes`` (indices)."""
        return maps.score_maps(self._map_input(x), self.weight, self._map_scalars(),
                               self.normalize, classes)

    def _map_input(self, x: Tensor) -> Tensor:
        """x validated (and cast under autocast) as for forward, kept (B, in_ch, h, w)."""
        return _check_inputs(x, self._checked_weight(), "nchw")

    def _map_scalars(self) -> Scalars:
        """The temperatures and lam (a learnable one's value, detached) for the maps."""
        lam = self.lam
        return Scalars(self._temperatures, lam.detach() if isinstance(lam, Tensor) else lam)

    def to_official_state_dict(self, prefix: str = "") -> dict:
        """The weight in the official layout: ``{prefix}multi_head.{k}.head.weight`` (C, d, 1, 1)."""
        return interop.weight_to_official(self.weight, prefix)

    def to_mmpretrain_state_dict(self, prefix: str = "") -> dict:
        """The weight in mmpretrain's ``CSRAClsHead`` layout:
        ``{prefix}csra_heads.{k}.head.weight`` (C, d, 1, 1); ``prefix="head."`` for a whole
        ``ImageClassifier``'s state dict."""
        return interop.weight_to_official(self.weight, prefix, "csra_heads")

    @classmethod
    def from_mmpretrain(cls, num_classes: int, in_channels: int, num_heads: int, lam: float,
                        **_ignored) -> "CSRATriton":
        """The head an mmpretrain config ``dict(type='CSRAClsHead', num_classes=..,
        in_channels=.., num_heads=.., lam=..)`` describes (its temperatures are the official
        ones for 1, 2, 4, 6 or 8 heads, as here; ``loss``, ``init_cfg`` and other keys of the
        config are mmpretrain's own and ignored). Load its weights with ``load_state_dict`` or
        :func:`load_official`."""
        if num_heads not in OFFICIAL_TEMPERATURES:
            raise ValueError(f"num_heads: mmpretrain's CSRAClsHead takes "
                             f"{sorted(OFFICIAL_TEMPERATURES)}, got {num_heads!r}")
        if isinstance(lam, (int, float)) and not lam > 0:
            raise ValueError(f"lam: mmpretrain's CSRAClsHead needs lam > 0, got {lam!r}")
        return cls(in_channels, num_classes, num_heads, lam)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # Also accepts the official and mmpretrain layouts under this module's prefix (see
        # interop.py).
        if prefix + "weight" not in state_dict and any(
                k.startswith(tuple(prefix + layout + "." for layout in interop.LAYOUTS))
                for k in state_dict):
            try:
                weight = interop.official_to_weight(state_dict, prefix, self.heads, self.classes,
                                                    self.in_ch)
                _, keys = interop.find_official(state_dict, prefix)
            except interop.OfficialCheckpointError as exc:
                error_msgs.append(str(exc))
                return
            for key in keys.values():
                state_dict.pop(key)
            state_dict[prefix + "weight"] = weight
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


def load_official(state_dict: Mapping[str, Tensor], prefix: str | None = None,
                  lam: float = 0.1, temperatures=None, normalize: bool = True, head=None):
    """A CSRATriton holding the official head found in ``state_dict`` (a full official model's
    checkpoint is fine: ``classifier.`` and DataParallel's ``module.`` prefixes are found), or
    mmpretrain's ``CSRAClsHead`` (``csra_heads.{k}.head.weight``, alone or under an
    ``ImageClassifier``'s ``head.``; a checkpoint file's ``{"state_dict": ...}`` wrapper is
    unwrapped). With ``head=`` an existing CSRATriton is filled instead, and must fit. Returns
    the module."""
    state_dict = interop.unwrap(state_dict)
    if head is None:
        weight = interop.official_to_weight(state_dict, prefix)
        head = CSRATriton(weight.shape[2], weight.shape[1], heads=weight.shape[0], lam=lam,
                          temperatures=temperatures, normalize=normalize)
    else:
        weight = interop.official_to_weight(state_dict, prefix, head.heads, head.classes,
                                            head.in_ch)
    with torch.no_grad():
        head.weight.copy_(weight)
    return head
