"""Structured pruning with Torch-Pruning's DepGraph: whole channels leave the model.

Unstructured sparsity (zeroed single weights) does not make dense CPU kernels faster; removing
channels does, as long as the channel counts left are ones the device's INT8 kernels use
(``round_to``: VNNI works in 16-channel blocks, NEON and TensorRT's tensor cores in 8).
DepGraph finds the layers coupled to each channel (residual adds, concatenations, depthwise
convolutions, batch norms, squeeze-excitation, parameters outside modules such as ConvNeXt's layer
scale or ViT's class token) so the pruned model stays consistent. The head, whose outputs are the
model's outputs, is never pruned.

What DepGraph alone gets wrong is handled here, and said in ``PruneResult.notes``:

* ``nn.MultiheadAttention`` keeps its heads and every head loses the same dimensions;
  ``round_to`` applies to the whole width of grouped layers (``_make_pruner``).
* Attention blocks it has no pruner for (Swin, MaxViT) are kept whole (``_plan``).
* Graphs it cannot follow (ShuffleNet's channel shuffle) are pruned block by block (``_blockwise``).

Coverage of the torchvision classification zoo: ``benchmarks/prune_zoo.py``.
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
    notes: list[str] = field(default_factory=list)  # how attention and other special layers were handled


@dataclass
class _Plan:
    """What the pruner must be told about a model beyond its plain layers (found by ``_plan``)."""

    ignored: list[Any] = field(default_factory=list)  # modules and parameters never pruned
    out_channel_groups: dict[Any, int] = field(default_factory=dict)  # module → channel groups pruned alike
    notes: list[str] = field(default_factory=list)
    ignored_names: list[str] = field(default_factory=list)
    opaque: list[Any] = field(default_factory=list)  # attention blocks traced as one layer, kept whole


def _is_attention(m) -> bool:
    """An attention block Torch-Pruning has no pruner for (Swin's ShiftedWindowAttention, MaxViT's
    RelativePositionalMultiHeadAttention, ...): it reshapes by a head count stored as a plain attribute."""
    from torch import nn

    if isinstance(m, nn.MultiheadAttention):
        return False
    return type(m).__name__.endswith("Attention") or (
        any(isinstance(getattr(m, a, None), int) for a in ("num_heads", "n_heads"))
        and any(isinstance(c, nn.Linear) for c in m.children()))


def _plan(model) -> _Plan:
    """Attention handling: heads of ``nn.MultiheadAttention`` are kept and every head loses the same
    dimensions (so ``embed_dim`` stays divisible by ``num_heads``); other attention blocks are kept whole
    (with them the residual width they read and write): Torch-Pruning is shown each as one opaque layer,
    because following their window partitions, shifts and per-head bias tables channel by channel
    never finishes (Swin) or cuts heads apart."""
    from torch import nn

    plan = _Plan()
    mha, other = 0, {}
    inside: set[int] = set()
    for name, m in model.named_modules():
        if id(m) in inside:
            continue
        if isinstance(m, nn.MultiheadAttention):
            mha += 1
            plan.out_channel_groups[m] = m.num_heads
        elif _is_attention(m):
            other[type(m).__name__] = other.get(type(m).__name__, 0) + 1
            plan.ignored.append(m)
            plan.opaque.append(m)
            plan.ignored_names.append(name)
            inside.update(id(c) for c in m.modules())
    if mha:
        plan.notes.append(f"{mha} MultiheadAttention: heads kept, head dims pruned evenly")
    for kind, n in sorted(other.items()):
        plan.notes.append(f"{n} {kind}: internals kept (no pruner for them), so is the residual width they write")
    return plan


def _fix_attributes(model) -> None:
    """Widths some models keep in plain attributes and use in forward: torchvision's VisionTransformer
    reshapes its patch embedding by ``hidden_dim``."""
    from torch import nn

    for m in model.modules():
        proj = getattr(m, "conv_proj", None)
        if isinstance(getattr(m, "hidden_dim", None), int) and isinstance(proj, nn.Conv2d):
            m.hidden_dim = proj.out_channels


def _make_pruner(model, example, importance, settings: PrunePass, ignored: list[Any], plan: _Plan,
                 round_to: int):
    """Torch-Pruning's MetaPruner, with ``round_to`` applied to the whole width of grouped layers.

    MetaPruner rounds a grouped layer's per-group count against its total width (so a multi-head layer
    at round_to 16 was never pruned); here the kept width per group is rounded so that groups × kept
    is a multiple of ``round_to`` (a layer too narrow for that stays whole).
    """
    import math

    import torch_pruning as tp
    from torch import nn

    class Pruner(tp.pruner.MetaPruner):
        def __init__(self, *a, **kw):
            self._groups_of_root: dict[int, int] = {}
            self._last_module = None
            super().__init__(*a, **kw)
            for attr in ("get_out_channels", "get_in_channels"):
                original = getattr(self.DG, attr)

                def remember(module, _original=original):
                    self._last_module = module
                    return _original(module)

                setattr(self.DG, attr, remember)

        def _get_channel_groups(self, group):
            groups = super()._get_channel_groups(group)
            self._groups_of_root[id(group[0].dep.target.module)] = groups
            return groups

        def _round_to(self, n_pruned, current_channels, round_to):
            groups = self._groups_of_root.get(id(self._last_module), 1)
            if groups <= 1:
                return super()._round_to(n_pruned, current_channels, round_to)
            size = current_channels // groups
            step = round_to // math.gcd(groups, round_to)  # kept per group: a multiple of this
            kept = size - n_pruned
            kept -= kept % step
            if kept <= 0:  # too narrow to round: leave the layer whole
                return 0
            return size - kept

    class Opaque(tp.pruner.function.BasePruningFunc):
        """An attention block as one layer from its first Linear's inputs to its last Linear's outputs
        (it is ignored, so these are never called to prune)."""

        def _linears(self, layer):
            return [m for m in layer.modules() if isinstance(m, nn.Linear)]

        def prune_out_channels(self, layer, idxs):
            raise ConfigError(f"{type(layer).__name__} is kept whole: it cannot be pruned")

        def prune_in_channels(self, layer, idxs):
            raise ConfigError(f"{type(layer).__name__} is kept whole: it cannot be pruned")

        def get_out_channels(self, layer):
            return self._linears(layer)[-1].out_features

        def get_in_channels(self, layer):
            return self._linears(layer)[0].in_features

    # While the graph is traced, an opaque block is an identity: its inside is never followed.
    for m in plan.opaque:
        m.forward = _identity
    try:
        return Pruner(
            model, example, importance=importance, global_pruning=settings.global_pruning,
            pruning_ratio=settings.ratio, iterative_steps=settings.iterations, ignored_layers=ignored,
            round_to=round_to if round_to > 1 else None,
            customized_pruners={type(m): Opaque() for m in plan.opaque} or None,
            # fresh dicts: MetaPruner's defaults are shared between calls and it writes into them
            in_channel_groups={}, out_channel_groups=dict(plan.out_channel_groups), num_heads={})
    finally:
        for m in plan.opaque:
            del m.forward


def _identity(x, *args, **kwargs):
    return x * 1.0


def _blockwise(model, example, importance, settings: PrunePass, ignored: list[Any], round_to: int):
    """Pruners for the largest sub-blocks Torch-Pruning can trace, each keeping its input and output widths.

    Used where the whole graph defeats tracing (ShuffleNet's channel shuffle reshapes channels into groups
    and back): inside each block that traces on its own (ShuffleNet's branches), the channels between its
    first and last layer are pruned; the widths crossing block boundaries stay, so the untraceable code
    between blocks sees the tensors it expects. Each block is pruned in a copy first and kept only if
    its output keeps its shape.
    """
    import copy

    import torch
    from torch import nn

    captured: dict[int, tuple[Any, tuple[int, ...]]] = {}

    def hook(module, args, output):
        if len(args) == 1 and isinstance(args[0], torch.Tensor) and isinstance(output, torch.Tensor):
            captured.setdefault(id(module), (args[0].detach(), tuple(output.shape)))

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
    ignored_ids = {id(x) for item in ignored if isinstance(item, nn.Module) for x in item.modules()}
    layers = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
    pruners, blocks = [], []

    def visit(parent, name: str, block) -> None:
        free = [m for m in block.modules() if isinstance(m, layers) and id(m) not in ignored_ids]
        if len(free) < 2:  # one layer alone has only its output width, which is kept
            return
        if block is not model and id(block) in captured:
            x, shape = captured[id(block)]
            last = [m for m in block.modules() if isinstance(m, layers)][-1]
            trial, probe = copy.deepcopy(block), copy.deepcopy(block)
            try:
                # probe: pruned at once to the full ratio, to see that the block keeps its output shape
                keep = [[c for m, c in zip(block.modules(), copy_.modules()) if id(m) in ignored_ids or m is last]
                        for copy_ in (trial, probe)]
                once = settings.model_copy(update={"iterations": 1})
                plans = [_plan(trial), _plan(probe)]
                _make_pruner(probe, x, importance, once, keep[1] + plans[1].ignored, plans[1], round_to).step()
                with torch.no_grad():
                    ok = tuple(probe(x).shape) == shape
                pruner = (_make_pruner(trial, x, importance, settings, keep[0] + plans[0].ignored, plans[0], round_to)
                          if ok else None)
            except Exception:  # noqa: BLE001  this block does not trace either: try its children
                ok = False
            if ok:
                setattr(parent, name.rsplit(".", 1)[-1], trial)
                pruners.append(pruner)
                blocks.append(name)
                return
        for child_name, child in block.named_children():
            visit(block, f"{name}.{child_name}" if name else child_name, child)

    visit(None, "", model)
    return pruners, blocks


def _ignored(model, settings: PrunePass) -> tuple[str, Any, list[Any], _Plan]:
    """The head, the layers never pruned (the head, ``settings.ignore``, attention kept whole), the plan."""
    head_name, head = find_head(model)
    ignored: list[Any] = [head]
    modules = dict(model.named_modules())
    for name in settings.ignore:
        if name not in modules:
            close = [n for n in modules if n and name.split(".")[-1] in n][:5]
            raise ConfigError(f"prune.ignore: the model has no module {name!r}"
                              + (f" (did you mean {', '.join(close)}?)" if close else ""))
        ignored.append(modules[name])
    plan = _plan(model)
    ignored.extend(plan.ignored)
    return head_name, head, ignored, plan


def _check_runs(model, example, out_shape: tuple[int, ...]) -> None:
    import torch

    _fix_attributes(model)
    model.zero_grad(set_to_none=True)
    model.eval()
    with torch.no_grad():
        try:
            shape = tuple(model(example).shape)
        except RuntimeError as exc:
            raise ConfigError(f"the pruned {type(model).__name__} no longer runs ({str(exc).splitlines()[0]}): "
                              f"a layer Torch-Pruning cannot follow was cut; name it (or its block) in "
                              f"prune.ignore") from exc
    if shape != out_shape:
        raise ConfigError(f"pruning changed the output shape {out_shape} → {shape}: name the layers producing "
                          f"it in prune.ignore")


def _restore(model, backup) -> None:
    """Put ``model`` back as it was before a failed first step (a module's state is its ``__dict__``)."""
    model.__dict__.clear()
    model.__dict__.update(backup.__dict__)


def prune(model, example, settings: PrunePass, round_to: int, *,
          gradients: Callable[[Any], int] | None = None,
          between_steps: Callable[[int, int], dict[str, Any] | None] | None = None) -> PruneResult:
    """Prune ``model`` in place by ``settings`` (``iterations`` steps).

    ``gradients(model)`` fills ``.grad`` before each step (Taylor importance needs it);
    ``between_steps(step, iterations)`` runs after each step (fine-tuning) and returns what it measured.

    Where Torch-Pruning cannot follow the whole graph (tracing fails, or the first step leaves a model
    that does not run: ShuffleNet's channel shuffle), the model is put back and pruned block by block
    (``_blockwise``); ``PruneResult.notes`` says so.
    """
    import copy

    import torch
    import torch_pruning as tp

    if settings.importance == "taylor" and gradients is None:
        raise ConfigError("importance: taylor needs gradients from training batches: set finetune.run to the "
                          "training run (compiling a run folder does), or use importance: magnitude")
    head_name, head, ignored, plan = _ignored(model, settings)
    importance = (tp.importance.GroupTaylorImportance() if settings.importance == "taylor"
                  else tp.importance.GroupMagnitudeImportance(p=2))
    model.eval()
    before = count(model, example)
    with torch.no_grad():
        out_shape = tuple(model(example).shape)
    out_dim = _out_features(head)
    try:
        backup = copy.deepcopy(model)  # to start again block by block if the whole model fails
    except (RuntimeError, TypeError) as exc:  # a model that cannot be copied gets no fallback
        log.info("prune: %s cannot be copied (%s): no block-by-block fallback", type(model).__name__, exc)
        backup = None
    try:
        pruners = [_make_pruner(model, example, importance, settings, ignored, plan, round_to)]
        if settings.importance == "taylor":
            gradients(model)
        pruners[0].step()
        _check_runs(model, example, out_shape)
    except Exception as exc:  # noqa: BLE001  Torch-Pruning cannot follow the whole graph: go block by block
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        if backup is None:
            raise ConfigError(f"Torch-Pruning cannot prune {type(model).__name__} ({reason}): name the layers it "
                              f"cannot follow in prune.ignore, or drop the prune pass") from exc
        log.info("prune: whole-model pruning failed (%s); pruning block by block", reason)
        _restore(model, backup)
        head_name, head, ignored, plan = _ignored(model, settings)
        pruners, blocks = _blockwise(model, example, importance, settings, ignored, round_to)
        if not pruners:
            raise ConfigError(f"Torch-Pruning cannot prune {type(model).__name__} ({reason}), nor any block of "
                              f"it: prune it outside edgekit, or drop the prune pass") from exc
        plan.notes.append(f"whole-model pruning failed ({reason[:120]}); pruned inside {len(blocks)} blocks "
                          f"that trace, their input and output widths kept")
        if settings.importance == "taylor":
            gradients(model)
        for pruner in pruners:
            pruner.step()
        _check_runs(model, example, out_shape)
    del backup
    result = PruneResult(before, before, head=head_name, round_to=round_to,
                         ignored=[head_name, *settings.ignore, *plan.ignored_names], notes=plan.notes)
    for note in plan.notes:
        log.info("prune: %s", note)
    for step in range(settings.iterations):
        if step > 0:  # the first step was taken above
            if settings.importance == "taylor":
                gradients(model)
            for pruner in pruners:
                pruner.step()
            _check_runs(model, example, out_shape)
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
