"""Depth states of named blocks: s_0 (the first block's input) and every block's output.

Forward hooks record the states while the model runs unchanged (eval mode, no grad), so any
network whose blocks are called as ``block(x, ...)`` and keep the state's shape yields a
trajectory through depth: residual MLPs, CNN stages, transformer blocks. The first 2 samples
run first as a probe, which is where every rule about the blocks (consecutive, same shape,
each run once) and the data (it fits the model) is checked, with one-line messages.
See :mod:`koopnet.depth` for the fit and the hybrid built on these states.
"""

from __future__ import annotations

import torch
from torch import nn

from koopnet._checks import as_tensor, check_finite, check_int
from koopnet.models import model_device, model_dtype

__all__ = ["collect_depth_states", "from_rows", "resolve_blocks", "to_rows"]

# Errors a model raises on inputs of the wrong shape or dtype.
_MODEL_ERRORS = (RuntimeError, ValueError, TypeError, IndexError, KeyError)

# ----------------------------------------------------------------------------- validation






def resolve_blocks(model, blocks) -> list[str]:
    """Check that ``blocks`` names distinct submodules of ``model``; return the names.

    A module registered under several names (shared, as after ``blocks[1] = blocks[0]``) is
    refused by any of them: it runs at more than one position of the trajectory, and a hybrid
    that replaces it by one name would leave the others running the original.
    Whether the blocks are consecutive, run once and keep the state's shape shows only when
    the model runs (see :func:`collect_depth_states`).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}.")
    if isinstance(blocks, str) or not isinstance(blocks, (list, tuple)):
        raise TypeError(f"blocks must be a list of qualified module names such as "
                        f"['blocks.0', 'blocks.1']; got {blocks!r}.")
    if not blocks:
        raise ValueError("blocks is empty; name at least one block, e.g. ['blocks.0'].")
    modules = dict(model.named_modules(remove_duplicate=False))
    valid = [name for name in modules if name]
    for name in blocks:
        if not isinstance(name, str):
            raise TypeError(f"blocks must hold module names (strings); got {name!r}.")
        if name in modules and name:
            continue
        raise not_a_submodule(model, name, "block", valid)
    repeated = sorted({name for name in blocks if blocks.count(name) > 1})
    if repeated:
        raise ValueError(f"blocks names {repeated[0]!r} more than once; name each block once, "
                         "in the order they run.")
    for name in blocks:
        shared = [other for other, module in modules.items() if module is modules[name]]
        if len(shared) > 1:
            raise ValueError(f"block '{name}' is one module registered under the names "
                             f"{shared} (shared): it runs wherever the forward pass calls any "
                             "of them, and a hybrid replacing it under one name would leave the "
                             "others running it; give each position its own module "
                             "(copy.deepcopy) or name a span without it.")
    return list(blocks)


def not_a_submodule(model: nn.Module, name: str, role: str, valid: list[str]) -> Exception:
    """The error for a ``role`` ("block", "target") that names no submodule: what the name
    reaches instead, or a few valid names. One wording for every entry point."""
    found = _attribute(model, name)
    if found is not None:
        return TypeError(f"{role} '{name}' is a {type(found).__name__}, not an nn.Module; name "
                         "a submodule (see model.named_modules()).")
    shown = ", ".join(repr(v) for v in valid[:6]) + (", ..." if len(valid) > 6 else "")
    return ValueError(f"{role} '{name}' is not a submodule of the model; valid names include "
                      f"{shown or 'none (the model has no submodules)'}.")


def _attribute(model: nn.Module, name: str):
    """The object a dotted name reaches by attribute access, or None."""
    target = model
    for part in name.split("."):
        try:
            target = getattr(target, part)
        except (AttributeError, TypeError):
            return None
    return target


def check_data(model: nn.Module, data) -> torch.Tensor:
    """Data as one tensor [n, ...]: floats in the model's dtype, integers (token ids) kept."""
    if isinstance(data, torch.utils.data.DataLoader):
        xs = [torch.as_tensor(b[0] if isinstance(b, (tuple, list)) else b) for b in data]
        if not xs:
            raise ValueError("data (a DataLoader) yielded no batches; pass at least 2 samples.")
        data = torch.cat(xs)
    X = as_tensor(data, "data")
    if X.ndim < 1 or len(X) < 2:
        raise ValueError(f"data has shape {tuple(X.shape)}; pass at least 2 samples along "
                         "the first dimension.")
    if X.is_floating_point():
        X = X.to(model_dtype(model))
    return X


# ----------------------------------------------------------------------------- states


def to_rows(state: torch.Tensor, per_position: bool) -> torch.Tensor:
    """One state as rows: [B, W] flattened per sample, or per position [B*L, d]."""
    if not per_position or state.ndim == 2:
        return state.reshape(len(state), -1)
    if state.ndim == 3:  # [B, L, d] tokens
        return state.reshape(-1, state.shape[2])
    if state.ndim == 4:  # [B, C, H, W] feature maps: positions H*W, features C
        return state.permute(0, 2, 3, 1).reshape(-1, state.shape[1])
    raise ValueError(f"per_position=True needs states of shape [B, d], [B, L, d] or "
                     f"[B, C, H, W]; got {list(state.shape)}. Pass per_position=False.")


def from_rows(rows: torch.Tensor, like: torch.Tensor, per_position: bool) -> torch.Tensor:
    """Inverse of :func:`to_rows` for a state shaped as ``like``."""
    if per_position and like.ndim == 4:
        B, C, H, W = like.shape
        return rows.reshape(B, H, W, C).permute(0, 3, 1, 2)
    return rows.reshape(like.shape)


class _BlockError(TypeError):
    """A block called or returning in a way depth trajectories cannot follow."""


class _Recording:
    """Forward hooks on the blocks that record s_0 and every block output of one pass."""

    def __init__(self, modules: list[nn.Module], names: list[str]) -> None:
        self.names, self.events = names, []
        self.hooks = []
        for i, module in enumerate(modules):
            self.hooks.append(module.register_forward_pre_hook(self._pre(i)))
            self.hooks.append(module.register_forward_hook(self._post(i)))

    def _pre(self, i):
        def hook(_module, args):
            if not args or not isinstance(args[0], torch.Tensor):
                raise _BlockError(f"block '{self.names[i]}' is not called with its state as the "
                                "first positional tensor; depth trajectories need blocks "
                                "called as block(x, ...).")
            self.events.append((i, "in", args[0]))
        return hook

    def _post(self, i):
        def hook(_module, _args, output):
            if not isinstance(output, torch.Tensor):
                raise _BlockError(f"block '{self.names[i]}' returns a {type(output).__name__}, "
                                "not a tensor; depth trajectories need blocks that return the "
                                "next state.")
            self.events.append((i, "out", output))
        return hook

    def states(self, check: bool) -> list[torch.Tensor]:
        """s_0..s_T of the last pass; ``check`` verifies order, chaining and shapes."""
        n = len(self.names)
        counts = [sum(1 for j, kind, _ in self.events if j == i and kind == "out")
                  for i in range(n)]
        for i, count in enumerate(counts):
            if count == 0:
                raise ValueError(f"block '{self.names[i]}' did not run in the model's forward "
                                 "pass; name blocks that the forward pass calls.")
            if count > 1:
                raise ValueError(f"block '{self.names[i]}' ran {count} times in one forward "
                                 "pass (the forward pass calls this module more than once); "
                                 "give each call its own module (copy.deepcopy) or name a "
                                 "span of blocks that run once each.")
        if check:
            order = [(j, kind) for j, kind, _ in self.events]
            if order != [(i, kind) for i in range(n) for kind in ("in", "out")]:
                ran = [self.names[j] for j, kind in order if kind == "out"]
                raise ValueError(f"blocks {self.names} are not consecutive: they ran as {ran} "
                                 "(or one runs inside another); name blocks in the order they "
                                 "run, each feeding the next.")
            tensors = [t for _, _, t in self.events]
            for i in range(n):
                inp, out = tensors[2 * i], tensors[2 * i + 1]
                if out.shape != inp.shape:
                    raise ValueError(f"block '{self.names[i]}' maps shape {list(inp.shape)} to "
                                     f"{list(out.shape)}; depth trajectories need blocks that "
                                     "keep the state's shape (same width in and out).")
                if i and not (inp is tensors[2 * i - 1] or torch.equal(inp, tensors[2 * i - 1])):
                    raise ValueError(f"blocks '{self.names[i - 1]}' and '{self.names[i]}' are "
                                     f"not consecutive: the input of '{self.names[i]}' is not "
                                     f"the output of '{self.names[i - 1]}'; name blocks that "
                                     "feed each other directly.")
        first_in = next(t for j, kind, t in self.events if j == 0 and kind == "in")
        outs = sorted((j, t) for j, kind, t in self.events if kind == "out")
        return [first_in, *(t for _, t in outs)]

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()


def depth_runs(model: nn.Module, names: list[str], X: torch.Tensor, batch_size: int):
    """Yield s_0..s_T (a list of tensors on CPU) per batch, in eval mode and without grad.

    The first 2 samples run first as a probe, so data that does not fit the model fails with
    the shape named instead of an error from deep inside it.
    """
    modules = dict(model.named_modules())
    recording = _Recording([modules[name] for name in names], names)
    modes = {m: m.training for m in model.modules()}
    device = model_device(model)
    model.eval()
    try:
        with torch.no_grad():
            try:
                model(X[:2].to(device))
            except _BlockError:
                raise
            except _MODEL_ERRORS as err:
                first = (str(err).strip().splitlines() or [""])[0]
                raise ValueError(f"data of shape {list(X.shape)} does not fit the model: on 2 "
                                 f"samples it raised {type(err).__name__}: {first.rstrip('.')}. "
                                 "Pass inputs [n, ...] shaped as the model takes them, samples "
                                 "first.") from err
            recording.states(check=True)
            for start in range(0, len(X), batch_size):
                recording.events.clear()
                model(X[start:start + batch_size].to(device))
                yield [s.detach().cpu() for s in recording.states(check=False)]
    finally:
        recording.remove()
        for module, mode in modes.items():
            module.train(mode)


def collect_depth_states(model: nn.Module, blocks, X, *, batch_size: int = 1024,
                         per_position: bool = False) -> torch.Tensor:
    """The trajectory of each sample through ``blocks``: s_0 (the first block's input) and
    every block's output, recorded with forward hooks in eval mode (the model is unchanged).

    Parameters
    ----------
    blocks : list of str
        Qualified names (``model.named_modules()``) of consecutive blocks, each feeding the
        next and keeping the state's shape.
    per_position : bool
        Positions as samples over the feature dimension (see the module docs).

    Shape: X [n, ...] -> states [n, T = len(blocks) + 1, W] (flattened per sample), or with
    ``per_position`` [n*L, T, d] (tokens [n, L, d]) / [n*H*W, T, C] (maps [n, C, H, W]).
    States are on the CPU in the model's dtype.
    """
    names = resolve_blocks(model, blocks)
    X = check_data(model, X)
    batch_size = check_int(batch_size, "batch_size", low=1)
    chunks = [torch.stack([to_rows(s, per_position) for s in states], dim=1)
              for states in depth_runs(model, names, X, batch_size)]
    states = torch.cat(chunks)  # [N, T, W]
    check_finite(states, "depth states", " Rescale the inputs or check the model's weights.")
    return states
