"""cugrad.optim: SGD and Adam with PyTorch's update rules, one in-place op per parameter."""

from __future__ import annotations

import functools
import numbers
from collections.abc import Mapping

import numpy as np

from . import _trace
from . import functional as F
from ._arrays import asarray, to_numpy
from ._backend import backend_for_device, device_of
from ._checks import check_flag, check_scalar, describe
from ._trace import op_range
from .nn import Module, Parameter, _add_note, _loaded_array, _zero_grads

__all__ = ["Optimizer", "SGD", "Adam"]


def _in_range(name, p, update):
    """Run Parameter p's update in its op's NVTX range (the range ``F.sgd_step`` /
    ``F.adam_step`` would open), on p's device's clock."""
    if _trace._quiet:
        update()
        return
    with op_range(name, p.device):
        update()


class Optimizer:
    """Holds the parameters and their per-parameter state; ``step()`` updates every
    parameter that has a gradient, ``zero_grad()`` clears the gradients.

    A subclass defines ``_check(p, state)``: validate the update of Parameter ``p`` (its
    ``state`` is a dict kept for it across steps) and return a function of no arguments that
    makes it, so that ``step()`` checks every parameter before updating any. It may set
    ``_range`` (the step's NVTX range name, "optimizer.step" otherwise), ``_hyperparameters``
    (names shown by repr) and ``_state_names`` (the names of its per-parameter state
    entries: ``state_dict()`` saves every entry, ``load_state_dict()`` takes these)."""

    _range = "optimizer.step"
    _hyperparameters: tuple[str, ...] = ()      # shown by repr

    def __repr__(self):
        hyper = "".join(f"{k}={getattr(self, k)!r}, " for k in self._hyperparameters)
        n = len(self.params)
        count = f"{n} parameter{'s' if n != 1 else ''}"
        return f"{type(self).__name__}({hyper[:-2] + '; ' if hyper else ''}{count})"

    def __init__(self, params):
        name = type(self).__name__
        if isinstance(params, (Module, Parameter)) or not hasattr(params, "__iter__"):
            raise TypeError(f"{name}: params must be an iterable of cugrad.nn.Parameter, got "
                            f"{type(params).__name__}; pass model.parameters() (or [param])")
        self.params = tuple(params)     # fixed: each has its state (a new optimiser for others)
        if not self.params:
            raise ValueError(f"{name}: got an empty parameter list")
        first: dict[int, int] = {}
        for i, p in enumerate(self.params):
            if not isinstance(p, Parameter):
                raise TypeError(f"{name}: params[{i}] is {type(p).__name__}, "
                                "expected cugrad.nn.Parameter (pass model.parameters())")
            if id(p) in first:
                raise ValueError(f"{name}: params[{i}] is the same Parameter as "
                                 f"params[{first[id(p)]}] ({p!r}); it would be updated twice "
                                 "a step (model.parameters() lists a tied weight once)")
            first[id(p)] = i
        self.state: dict[int, dict] = {id(p): {} for p in self.params}

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the parameters' gradients (``nn.Module.zero_grad``'s rule)."""
        _zero_grads(f"{type(self).__name__}.zero_grad",
                    [(f"params[{i}]", p) for i, p in enumerate(self.params)], set_to_none)

    # -- checkpoints ---------------------------------------------------------------------
    _state_names: tuple[str, ...] = ()     # a parameter's state entries, all or none of them
    _nonnegative_state: tuple[str, ...] = ()   # entries that cannot be negative

    def state_dict(self) -> dict:
        """Each parameter's optimiser state as NumPy copies, keyed ``"{i}.{name}"`` with
        ``i`` the parameter's position in ``params``: SGD's ``"0.momentum_buf"``, Adam's
        ``"0.exp_avg"``, ``"0.exp_avg_sq"`` and ``"0.step"`` (its step count, a 0-d int64).
        A parameter not yet stepped has no entries. Safe to keep, and to save with
        ``np.savez(path, **opt.state_dict())``. The hyperparameters are not in it: they are
        the constructor's arguments (as the model's are not in ``Module.state_dict``)."""
        out = {}
        for i, p in enumerate(self.params):
            for name, value in self.state[id(p)].items():
                if name == "step":
                    value = np.array(int(value), dtype=np.int64)   # a device count: a sync
                else:
                    value = np.array(to_numpy(value), copy=True)
                out[f"{i}.{name}"] = value
        return out

    def load_state_dict(self, state) -> "Optimizer":
        """Take the state ``state_dict()`` gave (or ``np.load`` of a file it was saved to),
        in the parameters' dtype and on their device. Every key, shape, dtype and range (the
        parameters' dtype; Adam's ``exp_avg_sq`` >= 0; a step count in int64) is checked
        before anything changes; an error names the key. A parameter without entries starts
        afresh: its buffers are zeroed and its step count set to 0, in place (a first step
        makes the same of absent ones). Buffers that exist already are overwritten in place,
        so a CUDA graph captured with this optimiser (``capture_train_step``) replays with
        the loaded state."""
        where = f"{type(self).__name__}.load_state_dict"
        if not isinstance(state, Mapping):
            raise TypeError(f"{where}: state must be a mapping (as state_dict() returns), got "
                            f"{type(state).__name__}")
        grouped: dict[int, dict] = {}
        for key in state:
            index, _, name = str(key).partition(".")
            canonical = (index.isascii() and index.isdigit()
                         and (index == "0" or not index.startswith("0")))   # "00" is no alias
            if (not isinstance(key, str) or not canonical or name not in self._state_names
                    or int(index) >= len(self.params)):
                declared = "" if self._state_names else (
                    f" ({type(self).__name__} declares no state names: a subclass lists its "
                    "per-parameter state entries in _state_names for load_state_dict to "
                    "take them)")
                raise ValueError(
                    f"{where}: unexpected key {key!r}; expected '<i>.<name>' with i the index "
                    f"of one of the {len(self.params)} parameters and name one of "
                    f"{list(self._state_names)}{declared}")
            grouped.setdefault(int(index), {})[name] = state[key]
        new: dict[int, dict] = {}
        for i, entries in sorted(grouped.items()):
            missing = [n for n in self._state_names if n not in entries]
            if missing:
                raise ValueError(f"{where}: parameter {i} has {sorted(entries)} but not "
                                 f"{missing}; its entries come together")
            p = self.params[i]
            new[i] = {name: (_loaded_step(where, f"{i}.{name}", value) if name == "step"
                             else _loaded_buffer(where, f"{i}.{name}", value, p,
                                                 name in self._nonnegative_state))
                      for name, value in entries.items()}
        for i, p in enumerate(self.params):          # only now: all or nothing
            old, loaded = self.state[id(p)], new.get(i, {})
            for name in [n for n in old if n not in loaded]:
                # A fresh start in place: zero buffers and step 0 are what a first step
                # makes of absent ones, and a captured graph keeps the arrays it reads.
                if name == "step":
                    _put(old, name, 0)
                else:
                    old[name][...] = 0
            for name, value in loaded.items():
                _put(old, name, value)
        return self

    def step(self) -> None:
        """Update every parameter that has a gradient. All of them are checked first: a step
        that raises (a gradient of the wrong dtype or shape, a hyper-parameter set out of
        range; on the CPU, an overflow where NumPy is set to raise on one, or to warn with
        warnings made errors) has updated none of them, nor made any state (a first step's buffers), and
        the error says which parameter it was."""
        with op_range(self._range, self.params[0].device):
            updates, made = [], []      # made: (state, how many entries it had before)
            for i, p in enumerate(self.params):
                if p.grad is None:
                    continue
                state = self.state[id(p)]
                made.append((state, len(state)))
                try:
                    updates.append(self._check(p, state))
                except (TypeError, ValueError) as exc:
                    _forget_new_entries(made)
                    _add_note(exc, f"(in {type(self).__name__}.step, params[{i}]: {p!r}; "
                                   "no parameter was updated)")
                    raise
            if not _host_step_may_raise(self.params):
                for update in updates:
                    update()
                return
            # NumPy may raise on a floating-point error: the step is all or nothing, so what
            # earlier updates wrote is put back. This snapshot is the only one: the updates
            # skip F._deferred_update's copies (its guard for a direct F call).
            saved = []
            for p in self.params:
                if p.grad is not None:
                    st = self.state[id(p)]
                    arrays = [(a, a.copy()) for a in (p.data, *st.values())
                              if isinstance(a, np.ndarray)]
                    saved.append((st, dict(st), arrays))
            token = F._RESTORED_BY_CALLER.set(True)
            try:
                for update in updates:
                    update()
            except Exception as exc:
                for st, entries, arrays in saved:
                    for a, copy in arrays:
                        np.copyto(a, copy)
                    st.clear()
                    st.update(entries)
                _forget_new_entries(made)
                _add_note(exc, f"(in {type(self).__name__}.step: no parameter was updated)")
                raise
            finally:
                F._RESTORED_BY_CALLER.reset(token)

    def _check(self, p: Parameter, state: dict):
        """Validate p's update and return it as a function of no arguments that makes it
        (and records any per-step state) inside the op's range. A subclass written for the
        earlier hook, ``_update(p, state)`` (check and update in one), still works, without
        the all-or-nothing step."""
        if type(self)._update is not Optimizer._update:
            return functools.partial(self._update, p, state)
        raise NotImplementedError(f"{type(self).__name__} defines neither _check nor _update")

    def _update(self, p: Parameter, state: dict) -> None:
        raise NotImplementedError

    def _buffer(self, p: Parameter, state: dict, name: str):
        """A zero buffer like p, made on first use; it follows p to another device or dtype
        (as loading PyTorch's optimiser state casts it to the parameter's). A parameter
        whose shape changed is a new parameter: its state cannot follow."""
        buf = state.get(name)
        if buf is None:
            return state.setdefault(name, backend_for_device(p.device).xp.zeros_like(p.data))
        if tuple(buf.shape) != p.shape:
            raise ValueError(
                f"{type(self).__name__}: a parameter of shape {p.shape} has optimiser state "
                f"{name!r} of shape {tuple(buf.shape)}: it changed shape since its state was "
                "made; create a new optimiser for it")
        if device_of(buf) != p.device or buf.dtype != p.dtype:
            buf = state[name] = asarray(buf, device=p.device, dtype=p.dtype)
        return buf


def _forget_new_entries(made) -> None:
    """Delete the state entries a step that raised had made (a first step's buffers and
    count): ``made`` is [(state, how many entries it had before)], and new keys come last in
    a dict. A step that changed nothing leaves no entries, so state_dict() stays loadable."""
    for state, before in made:
        for name in list(state)[before:]:
            del state[name]


def _host_step_may_raise(params) -> bool:
    """Whether NumPy may raise midway (``F._numpy_may_raise``) and the step runs on the
    host."""
    return F._numpy_may_raise() and any(p.device == "cpu" for p in params)


def _loaded_buffer(where, key, value, p, nonnegative=False):
    """``value`` as an own C-contiguous float array of p's shape, dtype and device;
    ``nonnegative``: no element below 0."""
    buf = _loaded_array(where, key, value, p, kinds="f")
    if nonnegative and bool((buf < 0).any()):
        raise ValueError(f"{where}: key {key!r} holds negative values ({describe(value)}); "
                         "a running mean of squares is >= 0 (its square root is taken)")
    return buf


def _loaded_step(where, key, value) -> int:
    """A step count: a whole number >= 0, as a Python int or a 0-d array."""
    if isinstance(value, np.ndarray) and value.shape == ():
        value = value[()]
    elif hasattr(value, "shape") and tuple(value.shape) == ():   # a 0-d device array
        value = to_numpy(value)[()]
    if (isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral)
            or not 0 <= value <= F._STEP_MAX):
        raise ValueError(f"{where}: key {key!r} must be a step count, a whole number in "
                         f"[0, 2**63 - 1] (an int or a 0-d integer array), got {value!r}")
    return int(value)


def _put(state: dict, name: str, value) -> None:
    """state[name] = value, into the array already there where it has the same shape, dtype
    and device (a captured graph keeps reading it); a device step counter takes the count."""
    old = state.get(name)
    if name == "step":
        if old is not None and not isinstance(old, (int, np.integer)):
            old[...] = value                    # capturable Adam's 0-d counter
        else:
            state[name] = value
    elif (old is not None and tuple(old.shape) == tuple(value.shape)
          and old.dtype == value.dtype and device_of(old) == device_of(value)):
        old[...] = value
    else:
        state[name] = value


class SGD(Optimizer):
    """``g = grad + weight_decay·p``; with momentum, ``buf = momentum·buf + g`` and
    ``g = buf``; ``p -= lr·g`` (PyTorch's SGD without dampening or Nesterov)."""

    _range = "sgd.step"
    _hyperparameters = ("lr", "momentum", "weight_decay")
    _state_names = ("momentum_buf",)

    def __init__(self, params, lr, momentum=0.0, weight_decay=0.0):
        super().__init__(params)
        self.lr = check_scalar("SGD", "lr", lr)
        self.momentum = check_scalar("SGD", "momentum", momentum)
        self.weight_decay = check_scalar("SGD", "weight_decay", weight_decay)

    def _check(self, p, state):
        buf = self._buffer(p, state, "momentum_buf") if self.momentum else None
        update = F._checked_sgd_step(p.data, p.grad, buf, lr=self.lr, momentum=self.momentum,
                                     weight_decay=self.weight_decay)
        return functools.partial(_in_range, "sgd_step", p, update)


class Adam(Optimizer):
    """PyTorch's Adam (L2 weight decay added to the gradient, bias-corrected moments).

    ``capturable=True`` keeps each parameter's step count in device memory (a 0-d int64
    counter beside its moments, ``state["step"]``) and forms the bias corrections there, as
    PyTorch's option of that name does: the same updates, one more small launch per
    parameter, and a step that a CUDA graph can replay (``cugrad.capture_train_step``).
    With the default, the count is a Python int and the corrections come from the host.
    ``capturable`` may be switched between steps: the count carries over in the new form.
    Either count stops at 2**63 - 1 (the largest int64; both bias corrections are 1 there)."""

    _range = "adam.step"
    _hyperparameters = ("lr", "betas", "eps", "weight_decay", "capturable")
    _state_names = ("exp_avg", "exp_avg_sq", "step")
    _nonnegative_state = ("exp_avg_sq",)

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, *,
                 capturable=False):
        super().__init__(params)
        self.capturable = capturable
        self.lr = check_scalar("Adam", "lr", lr)
        self.betas = betas
        self.eps = check_scalar("Adam", "eps", eps, low_open=True)   # eps = 0: 0/0 at a zero gradient
        self.weight_decay = check_scalar("Adam", "weight_decay", weight_decay)

    # Checked when set, later too (opt.betas = ..., as the constructor checks them): the
    # step's own checks take scalars, and these two are not.
    @property
    def betas(self) -> tuple:
        return self._betas

    @betas.setter
    def betas(self, betas):
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"Adam: betas must be a pair (beta1, beta2), got {betas!r}")
        self._betas = tuple(check_scalar("Adam", f"betas[{i}]", b, high=1.0, high_open=True)
                            for i, b in enumerate(betas))

    @property
    def capturable(self) -> bool:
        return self._capturable

    @capturable.setter
    def capturable(self, capturable):
        self._capturable = check_flag("Adam", "capturable", capturable)

    def _check(self, p, state):
        if self.capturable:            # the op counts the step on the device
            step = self._counter(p, state)
        else:                          # counted when the update is made, not before; it
            step = min(self._host_count(state) + 1, F._STEP_MAX)   # stops, as a counter does
        update = F._checked_adam_step(
            p.data, p.grad, self._buffer(p, state, "exp_avg"),
            self._buffer(p, state, "exp_avg_sq"), step=step, lr=self.lr, beta1=self.betas[0],
            beta2=self.betas[1], eps=self.eps, weight_decay=self.weight_decay)

        def count_and_update():
            if not self.capturable:
                state["step"] = step
            update()
        return functools.partial(_in_range, "adam_step", p, count_and_update)

    @staticmethod
    def _counter(p, state):
        """The parameter's step counter, a 0-d int64 array on its device (0 steps at first);
        it follows p to another device, and takes over a host count (capturable switched on
        after some steps)."""
        count = state.get("step")
        xp = backend_for_device(p.device).xp
        if count is None:
            count = state["step"] = xp.zeros((), dtype="int64")
        elif isinstance(count, (int, np.integer)):
            count = state["step"] = asarray(np.array(count, dtype=np.int64), device=p.device,
                                            dtype="int64")
        elif device_of(count) != p.device:
            count = state["step"] = asarray(count, device=p.device, dtype="int64")
        return count

    @staticmethod
    def _host_count(state) -> int:
        """The step count as a Python int: a device counter (capturable switched off after
        some steps) is read once (a host sync) and replaced by its value."""
        count = state.get("step", 0)
        if not isinstance(count, (int, np.integer)):
            count = state["step"] = int(count)
        return int(count)
