"""Functional form and ``nn.Module`` (the module layer, docs/ARCHITECTURE.md).

Validation of user input lives here, at the public entry points; the ops below assume it.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from . import interop, maps, ops
from .common import check_lam, check_temperatures
from .reference import OFFICIAL_TEMPERATURES

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


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
    """Validates x (in ``layout``) and weight; returns x as it is, cast to the autocast dtype
    under autocast (the op views it as (B, D, N): ``common.as_bdn``)."""
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
    if layout == "nchw":
        if x.dim() != 4:
            raise ValueError(f"x: expected a 4-D (B, in_ch, h, w) tensor, got shape {tuple(x.shape)}")
        if x.shape[1] != d:
            raise ValueError(f"x: expected {d} channels (dim 1), got {x.shape[1]} "
                             f"(shape {tuple(x.shape)})")
        if x.shape[2] * x.shape[3] == 0:
            raise ValueError(f"x: expected h*w >= 1 positions, got shape {tuple(x.shape)}")
    elif layout == "tokens":
        if x.dim() != 3:
            raise ValueError(f"x: expected 3-D tokens (B, N, in_ch), got shape {tuple(x.shape)}")
        if x.shape[2] != d:
            raise ValueError(f"x: expected {d} channels (dim 2), got {x.shape[2]} "
                             f"(shape {tuple(x.shape)})")
        if x.shape[1] == 0:
            raise ValueError(f"x: expected N >= 1 tokens, got shape {tuple(x.shape)}")
    else:
        raise ValueError(f"layout: expected 'nchw' or 'tokens', got {layout!r}")
    return _autocast(x) if torch.is_autocast_enabled(x.device.type) else x


def csra(x: Tensor, weight: Tensor, temperatures: Sequence[float], lam: float,
         normalize: bool = True, layout: str = "nchw") -> Tensor:
    """Multi-head CSRA logits (B, C) in x's dtype (the autocast dtype under autocast).

    x: (B, in_ch, h, w) features (any strides; channels_last is read in place), or with
    ``layout="tokens"`` (B, N, in_ch) tokens as a ViT emits them. weight: (heads, classes, in_ch).
    temperatures: one per head; ``math.inf`` or 99 makes a max-pooling head. lam: the weight of
    the attention logit, a number or a one-element tensor on x's device (it gets a gradient). normalize: divide each class's scores by its weight row's L2 norm.
    """
    xs = _check_inputs(x, weight, layout)
    temps = check_temperatures(temperatures, weight.shape[0])
    lam = check_lam(lam, x.device)
    return ops.run(xs, weight, temps, lam, bool(normalize), layout)


def _head_call(head: "CSRATriton", x: Tensor, layout: str) -> Tensor:
    """``csra`` for a ``CSRATriton``, whose temperatures and lam were validated when they were
    set (``_temperatures`` as ``check_temperatures`` returns them: inf = max head); under
    torch.compile and torch.export with the arguments of ``CSRATriton._traced_args``. (A
    function rather than a method, and the eager arguments read one statement each rather
    than as a tuple: both cost fewer instructions per call; bench/NOTES.md.)"""
    if torch.compiler.is_compiling():
        weight, temps, lam, normalize, scalars = head._traced_args()
        compiling = True
    else:
        weight = head._checked_weight()
        temps = head._temperatures
        lam = head.lam
        normalize = head._normalize
        scalars = None
        compiling = False
    xs = _check_inputs(x, weight, layout)
    if isinstance(lam, Tensor) and lam.device != xs.device:
        raise ValueError(f"lam: the learnable lam is on {lam.device}, x on {xs.device}")
    return ops.run(xs, weight, temps, lam, normalize, layout, scalars, compiling)


class CSRATriton(nn.Module):
    """Multi-head class-specific residual attention head.

    ``weight`` is one parameter of shape (heads, classes, in_ch), initialised like the official
    per-head 1x1 convs. ``temperatures=None`` takes the official list for 1, 2, 4, 6 or 8 heads.
    ``load_state_dict`` also accepts the official keys ``multi_head.{k}.head.weight`` (C, d, 1, 1)
    and mmpretrain's ``csra_heads.{k}.head.weight`` (:meth:`from_mmpretrain` builds a head from
    mmpretrain's config fields).
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
        self._register_scalars(None)
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

    def __delattr__(self, name):
        if name in CSRATriton._LIVE:
            raise AttributeError(f"{name}: cannot be deleted; assign a new value")
        super().__delattr__(name)

    def __setstate__(self, state):
        # A module pickled whole by an earlier version kept temperatures, lam and normalize as
        # plain attributes: route them through the setters.
        old = {k: state.pop(k) for k in CSRATriton._LIVE if k in state}
        state.pop("_op_temperatures", None)          # (kept by earlier versions)
        super().__setstate__(state)
        for k, v in old.items():
            setattr(self, k, v)
        if "_scalars" not in self._buffers:           # pickled before the mirror existed
            self._register_scalars(self.weight.device)
            self._sync_scalars()

    def _register_scalars(self, device) -> None:
        """The temperatures and lam as a tensor, for compiled calls (see :meth:`_traced_args`):
        written from the Python values at every assignment and device or dtype move, never
        read back; not saved in the state dict."""
        self.register_buffer("_scalars", torch.zeros(self.heads + 1, dtype=torch.int64,
                                                     device=device), persistent=False)

    def _sync_scalars(self) -> None:
        """Writes the temperatures and lam into the ``_scalars`` buffer (a learnable lam's slot
        holds 0: the parameter itself reaches the ops). On a GPU each element is filled by a
        small kernel, so that an assignment never waits for the device."""
        buf = self._buffers.get("_scalars")
        temps = self.__dict__.get("_temperatures")
        if buf is None or temps is None or buf.is_meta:    # (during __init__; no data on meta)
            return
        lam = self.__dict__.get("_lam")
        vals = ops.scalars_tensor(temps, lam if isinstance(lam, float) else 0.0)
        if buf.shape != vals.shape:
            raise RuntimeError("_scalars: expected one element per head and one for lam")
        with torch.no_grad():
            if buf.device.type == "cpu":
                buf.copy_(vals)
            else:
                for i, v in enumerate(vals.tolist()):
                    buf[i].fill_(v)

    def _apply(self, fn, *args, **kwargs):
        # .to(), .cuda(), to_empty(), ...: the mirror is rewritten on its new device (to_empty
        # leaves it uninitialised; int64 bits are untouched by dtype casts anyway)
        out = super()._apply(fn, *args, **kwargs)
        self._sync_scalars()
        return out

    @property
    def temperatures(self) -> tuple[float, ...]:
        """One per head (inf: a max head); assign a new sequence to change them (a tuple, so
        that an in-place edit cannot bypass the validation)."""
        return self._temperatures

    @temperatures.setter
    def temperatures(self, value) -> None:
        temps = check_temperatures(value, self.heads)
        self.__dict__["_temperatures"] = tuple(temps)
        self._sync_scalars()

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
        self._sync_scalars()

    @property
    def normalize(self) -> bool:
        """Whether each class's scores are divided by its weight row's L2 norm."""
        return self._normalize

    @normalize.setter
    def normalize(self, value) -> None:
        if not isinstance(value, (bool, int, np.bool_)) or isinstance(value, Tensor):
            raise TypeError(f"normalize: expected a bool, got {type(value).__name__}")
        self.__dict__["_normalize"] = bool(value)

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

    def _traced_args(self) -> tuple:
        """(weight, temperatures, lam, normalize, scalars) of a call under torch.compile and
        torch.export: the temperatures and lam reach the ops as the ``_scalars`` buffer, a
        graph input, so that the graph holds no Python float of them and assigning new ones
        costs no recompile (a float would be a guarded constant); ``temperatures`` and a
        number lam are then placeholders. The ONNX exporter takes the floats (its graph is
        standard operators; scalars None)."""
        if torch.onnx.is_in_onnx_export():
            return self._checked_weight(), self._temperatures, self.lam, self.normalize, None
        lam = self._parameters.get("lam")
        if lam is None and getattr(self, "_is_replica", False):   # nn.DataParallel's replica
            lam = self.__dict__["_lam"]
        return (self._checked_weight(), [1.0] * self.heads, lam if lam is not None else 0.0,
                self.normalize, self._buffers["_scalars"])

    def _checked_weight(self) -> Tensor:
        w = self.weight
        if w.shape != (self.heads, self.classes, self.in_ch):     # torch.Size == tuple
            raise ValueError(f"weight: expected shape (heads, classes, in_ch) = "
                             f"{(self.heads, self.classes, self.in_ch)}, got {tuple(w.shape)}")
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
        return maps.attention_maps(self._map_input(x), self.weight, self.temperatures,
                                   self.normalize, classes, self.lam)

    def score_maps(self, x: Tensor, classes=None) -> Tensor:
        """(B, heads, K, h, w): the normalised class scores s, the maps the official
        visualisation overlays; K = all classes or ``classes`` (indices)."""
        return maps.score_maps(self._map_input(x), self.weight, self.temperatures,
                               self.normalize, classes)

    def _map_input(self, x: Tensor) -> Tensor:
        """x validated (and cast under autocast) as for forward, kept (B, in_ch, h, w)."""
        return _check_inputs(x, self._checked_weight(), "nchw")

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
