"""Structured pruning with Torch-Pruning's DepGraph: whole channels leave the model.

Unstructured sparsity (zeroed single weights) does not make dense CPU kernels faster; removing
channels does, as long as the channel counts left are ones the device's INT8 kernels use
(``round_to``: VNNI works in 16-channel blocks, NEON and TensorRT's tensor cores in 8).
DepGraph finds the layers coupled to each channel (residual adds, concatenations, depthwise
convolutions, batch norms) so the pruned model stays consistent. The head, whose outputs are
the model's outputs, is never pruned.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..config.build import PrunePass
from ..errors import ConfigError

log = logging.getLogger(__name__)


def find_head(model) -> tuple[str, Any]:
    """The layer producing the outputs: an EdgeNet's ``head``, else the last Linear or Conv."""
    from torch import nn

    head = getattr(model, "head", None)
    if isinstance(head, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return "head", head
    last = None
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            last = (name, m)
    if last is None:
        raise ConfigError(f"{type(model).__name__} has no Linear or Conv layer: there is nothing to prune")
    return last


def count(model, example) -> dict[str, int]:
    """MACs and parameters of one forward pass on ``example`` (Torch-Pruning's counter)."""
    import torch_pruning as tp

    macs, params = tp.utils.count_ops_and_params(model, example)
    return {"macs": int(macs), "params": int(params)}


def channel_counts(model) -> dict[str, int]:
    """Output channels (features) of every conv and linear layer, by module name."""
    from torch import nn

    out = {}
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            out[name] = m.out_channels
        elif isinstance(m, nn.Linear):
            out[name] = m.out_features
    return out


@dataclass
class PruneResult:
    before: dict[str, int]
    after: dict[str, int]
    steps: list[dict[str, Any]] = field(default_factory=list)
    head: str = ""
    round_to: int = 1
    ignored: list[str] = field(default_factory=list)


def prune(model, example, settings: PrunePass, round_to: int, *,
          gradients: Callable[[Any], int] | None = None,
          between_steps: Callable[[int, int], dict[str, Any] | None] | None = None) -> PruneResult:
    """Prune ``model`` in place by ``settings`` (``iterations`` steps).

    ``gradients(model)`` fills ``.grad`` before each step (Taylor importance needs it);
    ``between_steps(step, iterations)`` runs after each step (fine-tuning) and returns what it measured.
    """
    import torch
    import torch_pruning as tp

    if settings.importance == "taylor" and gradients is None:
        raise ConfigError("importance: taylor needs gradients from training batches: set finetune.run to the "
                          "training run (compiling a run folder does), or use importance: magnitude")
    head_name, head = find_head(model)
    ignored = [head]
    modules = dict(model.named_modules())
    for name in settings.ignore:
        if name not in modules:
            close = [n for n in modules if n and name.split(".")[-1] in n][:5]
            raise ConfigError(f"prune.ignore: the model has no module {name!r}"
                              + (f" (did you mean {', '.join(close)}?)" if close else ""))
        ignored.append(modules[name])
    importance = (tp.importance.GroupTaylorImportance() if settings.importance == "taylor"
                  else tp.importance.GroupMagnitudeImportance(p=2))
    model.eval()
    before = count(model, example)
    out_dim = _out_features(head)
    pruner = tp.pruner.MetaPruner(
        model, example, importance=importance, global_pruning=settings.global_pruning,
        pruning_ratio=settings.ratio, iterative_steps=settings.iterations, ignored_layers=ignored,
        round_to=round_to if round_to > 1 else None)
    result = PruneResult(before, before, head=head_name, round_to=round_to,
                         ignored=[head_name, *settings.ignore])
    for step in range(settings.iterations):
        if settings.importance == "taylor":
            gradients(model)
        pruner.step()
        model.zero_grad(set_to_none=True)
        model.eval()
        with torch.no_grad():
            model(example)  # the pruned graph still runs
        figures = count(model, example)
        row: dict[str, Any] = {"step": step + 1, **figures}
        if between_steps is not None:
            measured = between_steps(step, settings.iterations)
            if measured:
                row["finetune"] = measured
        result.steps.append(row)
        log.info("prune step %d/%d: %.3g MMACs, %.3g M parameters", step + 1, settings.iterations,
                 figures["macs"] / 1e6, figures["params"] / 1e6)
    if _out_features(head) != out_dim:  # ignored_layers keeps it; a changed head would change the outputs
        raise ConfigError(f"pruning changed the head {head_name} ({out_dim} → {_out_features(head)} outputs)")
    result.after = count(model, example)
    return result


def _out_features(layer) -> int:
    return getattr(layer, "out_features", None) or getattr(layer, "out_channels")


def save_program(model, example, path: Path, dynamic_batch: bool) -> Path:
    """The pruned model saved whole as a torch.export program (``.pt2``): it compiles like any model.

    A state dict would not do: the pruned layers no longer fit the original architecture's code.
    """
    import torch

    model.eval()
    shape = list(example.shape)
    args = (torch.zeros([2, *shape[1:]], dtype=example.dtype),) if dynamic_batch else (example,)
    dynamic = ({0: torch.export.Dim("batch", min=1, max=1024)},) if dynamic_batch else None
    program = torch.export.export(model, args, dynamic_shapes=dynamic)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, str(path))
    return path
