"""Finding the word embedding, watching its calls, and perturbing its rows or its output.

One forward hook serves both targets. During the clean pass it records each call's token
ids and output and captures the gradient of that output. During an adversarial pass it
adds the output-target offset (if any) and records the outputs again, so an inner ascent
step can take the gradient with respect to them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_adv import functional as F

__all__ = ["EmbeddingCall", "EmbeddingTap", "OutputSpace", "WeightRowSpace", "find_embedding"]


def _embedding_listing(root: nn.Module) -> str:
    names = [name or "<root>" for name, m in root.named_modules() if isinstance(m, nn.Embedding)]
    return ", ".join(repr(n) for n in names) if names else "none"


def _from_input_embeddings(root: nn.Module) -> list[tuple[str, nn.Embedding]]:
    """Embeddings returned by ``get_input_embeddings()`` of ``root`` or its submodules."""
    found: dict[int, tuple[str, nn.Embedding]] = {}
    for name, module in root.named_modules():
        getter = getattr(module, "get_input_embeddings", None)
        if not callable(getter):
            continue
        try:
            embedding = getter()
        except (NotImplementedError, AttributeError):
            continue
        embedding = _unwrap(embedding)
        if isinstance(embedding, nn.Embedding) and id(embedding.weight) not in found:
            found[id(embedding.weight)] = (_name_of(root, embedding) or name, embedding)
    return list(found.values())


def _unwrap(module: Any) -> Any:
    """The plain ``nn.Embedding`` inside a wrapper such as a peft LoRA layer."""
    while not isinstance(module, nn.Embedding) and isinstance(module, nn.Module):
        inner = getattr(module, "base_layer", None)
        if inner is None:  # peft's ModulesToSaveWrapper: the forward uses the active copy
            copies = getattr(module, "modules_to_save", None)
            active = getattr(module, "active_adapter", None)
            active = active[0] if isinstance(active, (list, tuple)) and active else active
            if isinstance(copies, nn.ModuleDict) and isinstance(active, str) and active in copies:
                inner = copies[active]
        if not isinstance(inner, nn.Module):
            break
        module = inner
    return module


def _name_of(root: nn.Module, target: nn.Module) -> str | None:
    for name, module in root.named_modules():
        if module is target:
            return str(name)
    return None


def find_embedding(root: nn.Module, spec: str | None) -> tuple[str, nn.Embedding]:
    """Resolve the word embedding of ``root``.

    Args:
        root: the LightningModule.
        spec: ``None`` to ask ``get_input_embeddings()``; a dotted module path inside
            ``root``; or a name suffix (``"word_embeddings"``) matching one ``nn.Embedding``.

    Raises:
        RuntimeError: nothing matches, or several modules do; the message lists the
            ``nn.Embedding`` modules found.
    """
    listing = _embedding_listing(root)
    if spec is None:
        candidates = _from_input_embeddings(root)
        if len(candidates) == 1:
            return candidates[0]
        if not candidates:
            raise RuntimeError(
                "Could not find the word embedding: no module of the LightningModule has a "
                "`get_input_embeddings()` that returns an `nn.Embedding`. Pass `embedding=` "
                f"with the module's name. `nn.Embedding` modules found: {listing}."
            )
        names = ", ".join(repr(name) for name, _ in candidates)
        raise RuntimeError(
            f"Found several word embeddings through `get_input_embeddings()`: {names}. "
            "Pass `embedding=` with the one to perturb."
        )

    modules = dict(root.named_modules())
    exact = modules.get(spec)
    if exact is not None:
        exact = _unwrap(exact)
        if not isinstance(exact, nn.Embedding):
            raise RuntimeError(
                f"`embedding={spec!r}` names a {type(exact).__name__}, not an `nn.Embedding`. "
                f"`nn.Embedding` modules found: {listing}."
            )
        return spec, exact

    matches = [
        (name, module)
        for name, module in modules.items()
        if isinstance(module, nn.Embedding) and (name == spec or name.endswith("." + spec))
    ]
    if len(matches) == 1 or (matches and len({id(m.weight) for _, m in matches}) == 1):
        return matches[0]  # several modules sharing one weight are one embedding
    what = "matches no" if not matches else f"matches {len(matches)}"
    raise RuntimeError(
        f"`embedding={spec!r}` {what} `nn.Embedding` module; it must match exactly one. "
        f"Pass a dotted path or a longer suffix. `nn.Embedding` modules found: {listing}."
    )


def modules_sharing_weight(root: nn.Module, embedding: nn.Embedding) -> list[nn.Embedding]:
    """Every ``nn.Embedding`` in ``root`` that uses the same weight as ``embedding``."""
    shared = [
        module
        for module in root.modules()
        if isinstance(module, nn.Embedding) and module.weight is embedding.weight
    ]
    return shared or [embedding]


class _GradSlot:
    """Where a tensor hook leaves the gradient of an embedding output.

    The hook lives on the output tensor, so whatever it references lives as long as the
    output. It must not reference the output itself (through the ``EmbeddingCall``): autograd
    keeps hooks outside Python's cycle collector, and such a cycle would never be freed.
    """

    __slots__ = ("grad",)

    def __init__(self) -> None:
        self.grad: Tensor | None = None

    def __call__(self, grad: Tensor) -> None:
        self.grad = grad


@dataclass
class EmbeddingCall:
    """One call of the embedding during a pass: the ids it saw and what it returned."""

    ids: Tensor
    output: Tensor
    slot: _GradSlot = field(default_factory=_GradSlot, repr=False)

    @property
    def grad(self) -> Tensor | None:
        """The gradient of the loss with respect to ``output``, once backward has run."""
        return self.slot.grad


class EmbeddingTap:
    """Forward hooks on every module sharing the word-embedding weight.

    Args:
        name: the embedding's name inside the LightningModule, for messages.
        modules: the ``nn.Embedding`` modules sharing one weight.
    """

    def __init__(self, name: str, modules: list[nn.Embedding]) -> None:
        self.name = name
        self.modules = modules
        self.weight: Tensor = modules[0].weight
        self.padding_idx: int | None = modules[0].padding_idx
        self.calls: list[EmbeddingCall] = []
        self._recording = False
        self._capture_grads = False
        self._offsets: list[Tensor] | None = None
        self._without_grad = False
        self._keep = True
        self._count = 0
        self._handles: list[Any] = []

    def attach(self) -> None:
        self.detach()
        self._handles = [m.register_forward_hook(self._hook) for m in self.modules]

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.stop()

    def record(self, capture_grads: bool) -> None:
        """Start recording calls (and, for the clean pass, the gradients of their outputs)."""
        self.calls, self._count = [], 0
        self._recording = True
        self._capture_grads = capture_grads

    def pause(self) -> None:
        """Stop recording new calls; the recorded ones keep receiving their gradients."""
        self._recording = False

    def stop(self) -> None:
        self._recording = False
        self._capture_grads = False
        self._offsets = None

    def take_calls(self) -> list[EmbeddingCall]:
        calls, self.calls, self._count = self.calls, [], 0
        return calls

    @contextmanager
    def pass_with(self, offsets: list[Tensor] | None, without_grad: bool = False,
                  keep: bool = True) -> Iterator[list[EmbeddingCall]]:
        """Record the calls of one pass, adding ``offsets`` to the outputs. With
        ``without_grad`` the calls are recorded under ``torch.no_grad()`` too. Without
        ``keep`` the offsets are applied but no call is kept, so the pass's embedding
        outputs are freed as early as the model itself frees them."""
        saved = (self.calls, self._recording, self._capture_grads, self._offsets,
                 self._without_grad, self._keep, self._count)
        calls: list[EmbeddingCall] = []
        self.calls, self._recording, self._capture_grads = calls, True, False
        self._offsets, self._without_grad, self._keep, self._count = (
            offsets, without_grad, keep, 0
        )
        try:
            yield calls
        finally:
            (self.calls, self._recording, self._capture_grads, self._offsets,
             self._without_grad, self._keep, self._count) = saved

    def _hook(self, module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor | None:
        grad_enabled = torch.is_grad_enabled()
        # Offsets asked for explicitly (an attack's pass) apply with or without gradient.
        applying = self._offsets is not None
        if not self._recording or not (grad_enabled or self._without_grad or applying):
            return None
        index = self._count
        self._count += 1
        if self._offsets is not None:
            if index >= len(self._offsets) or self._offsets[index].shape != output.shape:
                raise RuntimeError(
                    f"The embedding {self.name!r} was called differently in the adversarial "
                    "pass than in the clean pass (call count or shape changed), so the "
                    "output-target perturbation cannot be applied. Make the loss method "
                    "deterministic in how it calls the model, or use target='weight'."
                )
            output = output + self._offsets[index].to(output.dtype)
        if not self._keep:
            return output
        if grad_enabled and not output.requires_grad:
            # A frozen embedding: its output still carries the gradient that builds r.
            output = output.detach().requires_grad_(True)
        call = EmbeddingCall(ids=args[0], output=output)
        if self._capture_grads:
            output.register_hook(call.slot)  # type: ignore[no-untyped-call]
        self.calls.append(call)
        return output


def _batch_layout(calls: list[EmbeddingCall], name: str, batch_size: int | None,
                  input_ids: Tensor | None = None) -> tuple[int, list[int]]:
    """The number of examples and, per call, the dimension of its output that indexes them.

    Most models look up ``(batch, tokens)``; XLNet transposes its ids first and looks up
    ``(tokens, batch)``. With ``batch_size`` known, a call whose first dimension differs from
    it but whose second matches is read as batch-second. When both match (as many tokens as
    examples), a call whose ids are the batch's ``input_ids`` transposed is batch-second.
    """
    dims = [_batch_dim(call, batch_size, input_ids) for call in calls]
    sizes = {call.output.shape[dim] for call, dim in zip(calls, dims, strict=True)}
    if len(sizes) != 1 or any(call.output.dim() < 2 for call in calls):
        raise RuntimeError(
            f"target='output' needs every call of the embedding {name!r} to return "
            f"(batch, ..., hidden) or (tokens, batch, hidden) with one batch size; got "
            f"shapes {[tuple(c.output.shape) for c in calls]}. Use target='weight'."
        )
    return sizes.pop(), dims


def _batch_dim(call: EmbeddingCall, batch_size: int | None, input_ids: Tensor | None) -> int:
    shape = call.output.shape
    if batch_size is None or call.output.dim() < 3 or shape[1] != batch_size:
        return 0
    if shape[0] != batch_size:
        return 1
    if input_ids is None or input_ids.shape != call.ids.shape:
        return 0
    ids = input_ids.to(call.ids.device)
    return 1 if torch.equal(call.ids, ids.t()) and not torch.equal(call.ids, ids) else 0


class OutputSpace:
    """Perturbations added to the embedding output, one row per example.

    A row concatenates, for one example, the (tokens x hidden) entries of every call of the
    embedding in a forward pass; padding positions are kept at zero.
    """

    def __init__(self, tap: EmbeddingTap, calls: list[EmbeddingCall],
                 batch_size: int | None = None, attention_mask: Tensor | None = None,
                 input_ids: Tensor | None = None) -> None:
        self.tap = tap
        self.calls = calls
        self.hidden = tap.weight.shape[1]
        self.batch, self.dims = _batch_layout(calls, tap.name, batch_size, input_ids)
        self.shapes = [call.output.shape for call in calls]
        self.keep: Tensor | None = None
        tokens: list[Tensor] | None
        if tap.padding_idx is not None:
            tokens = [call.ids != tap.padding_idx for call in calls]
        else:
            # No padding row (GPT-2, XLNet, T5): the batch's attention mask says which
            # positions are padding, for the calls whose ids it matches.
            tokens = _masked_positions(calls, attention_mask, self.dims)
        if tokens is not None:
            self.keep = self.flatten([
                keep.unsqueeze(-1).expand(call.output.shape)
                for keep, call in zip(tokens, calls, strict=True)
            ])

    def flatten(self, tensors: list[Tensor]) -> Tensor:
        return torch.cat([
            t.movedim(dim, 0).reshape(self.batch, -1)
            for t, dim in zip(tensors, self.dims, strict=True)
        ], dim=1)

    def gradient(self, grads: list[Tensor], dtype: torch.dtype) -> Tensor:
        flat = self.flatten([g.to(dtype) for g in grads])
        return flat if self.keep is None else torch.where(self.keep, flat, 0.0)

    def mask(self, r: Tensor) -> Tensor:
        return r if self.keep is None else torch.where(self.keep, r, 0.0)

    def entries(self, shape: torch.Size) -> Tensor:
        """The number of perturbable (non-padding) entries of each row, shape ``(B, 1)``."""
        if self.keep is None:
            return torch.full((shape[0], 1), shape[1], device=self.tap.weight.device)
        return self.keep.sum(dim=1, keepdim=True)

    def reference(self, dtype: torch.dtype) -> Tensor:
        """The clean embedding output in perturbation shape, padding zeroed."""
        return self.mask(self.flatten([c.output.detach().to(dtype) for c in self.calls]))

    @contextmanager
    def applied(self, r: Tensor, keep: bool = True,
                release: bool = False) -> Iterator[list[EmbeddingCall]]:
        """Add ``r`` to the outputs during the block (``release`` changes nothing here)."""
        sizes = [shape.numel() // self.batch for shape in self.shapes]
        pieces = torch.split(r, sizes, dim=1)
        offsets = [
            p.reshape(_moved(shape, dim)).movedim(0, dim)
            for p, shape, dim in zip(pieces, self.shapes, self.dims, strict=True)
        ]
        with self.tap.pass_with(offsets, keep=keep) as calls:
            yield calls


def _masked_positions(calls: list[EmbeddingCall], attention_mask: Tensor | None,
                      dims: list[int]) -> list[Tensor] | None:
    """Per call, the positions to perturb according to ``attention_mask``, transposed for a
    call that looks up its ids batch-second (XLNet); ``None`` when it matches no call."""
    if attention_mask is None or attention_mask.dim() != 2:
        return None
    masks, matched = [], False
    for call, dim in zip(calls, dims, strict=True):
        mask = attention_mask.t() if dim == 1 else attention_mask
        if call.ids.shape == mask.shape:
            masks.append(mask.to(call.ids.device) != 0)
            matched = True
        else:  # another input (a decoder's ids): every position counts
            masks.append(torch.ones_like(call.ids, dtype=torch.bool))
    return masks if matched else None


def _moved(shape: torch.Size, dim: int) -> list[int]:
    """``shape`` with dimension ``dim`` moved to the front."""
    return [shape[dim], *shape[:dim], *shape[dim + 1:]]


class WeightRowSpace:
    """Perturbations of the embedding rows a batch touches, as a single row.

    The rows' gradient is the scatter-add of the output gradients by token id, which is
    the weight gradient of a plain ``nn.Embedding`` restricted to this micro-batch. Only the
    touched rows are backed up, and they are copied back into the same storage.
    """

    def __init__(self, tap: EmbeddingTap, calls: list[EmbeddingCall]) -> None:
        self.tap = tap
        weight = tap.weight
        self.hidden = weight.shape[1]
        self.ids = torch.cat([call.ids.reshape(-1) for call in calls])
        self.inverse, self.row_ids = F.group_rows(self.ids)
        keep = self.row_ids >= 0
        if tap.padding_idx is not None:
            keep = keep & (self.row_ids != tap.padding_idx)
        #: Which groups are real, non-padding rows, shape ``(groups, 1)``: it broadcasts
        #: over the hidden size instead of holding a flag per entry.
        self.keep = keep.unsqueeze(1)
        self._backup: Tensor | None = None

    def _rows(self, tensors: list[Tensor], dtype: torch.dtype) -> Tensor:
        flat = torch.cat([t.reshape(-1, self.hidden).to(dtype) for t in tensors])
        return torch.zeros_like(flat).index_add_(0, self.inverse, flat)

    def gradient(self, grads: list[Tensor], dtype: torch.dtype) -> Tensor:
        return torch.where(self.keep, self._rows(grads, dtype), 0.0).reshape(1, -1)

    def mask(self, r: Tensor) -> Tensor:
        return torch.where(self.keep, r.reshape(-1, self.hidden), 0.0).reshape(1, -1)

    def entries(self, shape: torch.Size) -> Tensor:
        """The number of perturbable entries of the single row, shape ``(1, 1)``."""
        return self.keep.sum().reshape(1, 1) * self.hidden

    def reference(self, dtype: torch.dtype) -> Tensor:
        """The touched rows of the weight (each once) in perturbation shape, padding zeroed."""
        rows = self.tap.weight.detach().index_select(0, self.row_ids.clamp_min(0))
        return self.mask(rows.to(dtype))

    @contextmanager
    def applied(self, r: Tensor, keep: bool = True,
                release: bool = False) -> Iterator[list[EmbeddingCall]]:
        """Add ``r`` to the touched rows during the block, then copy the rows back.

        With ``release`` the caller is done with ``r``, and the backup moves into its
        memory once the rows are written: the pass then holds one row-sized buffer, not two.
        """
        weight = self.tap.weight
        if self._backup is None:
            self._backup = weight.detach().index_select(0, self.ids)
        per_position = r.reshape(-1, self.hidden).index_select(0, self.inverse)
        perturbed = (self._backup.to(per_position.dtype) + per_position).to(weight.dtype)
        try:
            with torch.no_grad():
                # Duplicated ids write identical values, so the order of writes is irrelevant.
                weight.index_copy_(0, self.ids, perturbed)
            # This frame lives through the pass: drop the temporaries before it starts.
            del per_position, perturbed
            backup = self._backup
            if (release and r.dtype == backup.dtype and r.is_contiguous()
                    and r.numel() == backup.numel()):
                self._backup = r.detach().view_as(backup).copy_(backup)
                del backup
            with self.tap.pass_with(None, keep=keep) as calls:
                yield calls
        finally:
            self.restore()

    def restore(self) -> None:
        if self._backup is not None:
            with torch.no_grad():
                self.tap.weight.index_copy_(0, self.ids, self._backup)
