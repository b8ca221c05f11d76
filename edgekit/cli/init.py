"""``edgekit init MODEL``: a commented build file written from the model's own input signature.

A user who brings an ONNX file should not have to learn the preprocess keys from the bundle
format's spec: ``init`` reads the input (shape, layout, channels), picks the preprocessing preset
that fits (``imagenet`` for 3 channels, ``gray`` for 1, or ``--preprocess``), fills the size from
the fixed dims (or asks for it in a comment where the file leaves them open), and writes every
section a first build needs with a comment saying what it does. ``edgekit compile FILE`` then
builds it; the file is checked with the same schema before it is written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer
import yaml

from ..errors import ConfigError
from .exits import handle_errors
from .options import JsonOpt, parse_input_shape
from .output import console, print_json

DEFAULT_SIDE = 224  # where the file leaves height and width open and no --size/--input-shape says otherwise


def _flow(value: Any) -> str:
    # a scalar dumps as a document ("rgb\n...\n"): keep the value only
    return yaml.safe_dump(value, default_flow_style=True, width=1000).strip().removesuffix("...").strip()


def build_file_text(model: str, target: str, input_shape: list[int], notes: list[str], preprocess: dict[str, Any],
                    calibration: str | None, validation: str | None, output: str,
                    inputs: list[str] | None = None) -> str:
    """The build file, with a comment on every section (YAML that ``load_build`` accepts as it is);
    ``inputs``: the input names of a model with several (no image preprocessing, .npz data by name)."""
    name = Path(model).stem.split(":")[-1]
    lines = [
        f"# Build file for {model}, written by `edgekit init` from the model's input signature.",
        "# Build it with: edgekit compile THIS_FILE   (flags override any field; docs/build.md explains each)",
        "",
        "model:",
        f"  source: {model}",
        f"  name: {name}",
        "  version: 0.1.0",
        f"  input_shape: {_flow(input_shape)}   # batch first; the batch stays dynamic on the device",
        *[f"  # {n}" for n in notes],
        "  # labels_file: labels.txt          # one class name per line: the runtime then reports names",
        "",
        f"target: {target}   # `edgekit targets list` shows every device profile",
        "",
    ]
    if inputs:  # several inputs: the data is preprocessed tensors, one array per input name
        lines += [
            f"# The model has {len(inputs)} inputs: the data below are .npz files of preprocessed float tensors, one",
            f"# array per input name ({', '.join(inputs)}), samples along the first axis (and y for labels).",
            "preprocess: null",
            "",
            "# The INT8 quantizer calibrates on it: a few hundred typical inputs; part is held back to measure INT8",
            "# against FP32 (the fidelity gate, on every output).",
            "calibration:",
            f"  source: {calibration or 'calibration.npz'}" + ("" if calibration else
                                                               f"   # FILL IN: arrays {', '.join(inputs)}"),
        ]
    else:
        lines += [
            "# What the device does to an image before the model: resize to size, (x * scale - mean) / std per",
            f"# channel. Started from a preset ({preprocess.pop('_preset')}); match what the model was trained with.",
            "preprocess:",
            *[f"  {k}: {_flow(v)}" for k, v in preprocess.items()],
            "",
            "# Images (or an .npz of preprocessed x) the INT8 quantizer calibrates on: a few hundred typical inputs.",
            "# Part of them is held back to measure INT8 against FP32 (the fidelity gate).",
            "calibration:",
            f"  source: {calibration or 'calibration/'}" + ("" if calibration else "   # FILL IN: a folder of images"),
        ]
    if validation:
        lines += [
            "",
            "# Labelled data (class sub-folders, or an .npz with x and y): INT8 must stay within the budget.",
            "validation:",
            f"  source: {validation}",
            "accuracy:",
            "  max_accuracy_drop: 1.0   # top-1 points INT8 may lose against FP32",
        ]
    else:
        lines += [
            "",
            "# No labelled data given: INT8 is held to the label-free fidelity gate only (cosine to FP32).",
            "# Add `validation: {source: val/}` (class sub-folders) and a budget to check accuracy:",
            "# validation:",
            "#   source: val/",
            "accuracy:",
            "  max_accuracy_drop: null",
        ]
    lines += [
        "",
        "# quantize: {enabled: true}          # false ships FP32; the profile holds the other settings",
        "",
        f"output: {output}",
        "",
    ]
    return "\n".join(lines)


def model_input(model: str, input_shape: list[int] | None, size: list[int] | None) -> tuple[list[int], list[str]]:
    """The model's input shape to write, and notes on what init had to choose."""
    from ..config.presets import layout_and_size

    notes: list[str] = []
    if not model.endswith(".onnx"):
        if input_shape is None:
            raise ConfigError(f"{model} is not an ONNX file: give its input with --input-shape (e.g. 1,3,224,224)")
        return input_shape, notes
    import onnx

    from ..models.onnx_normalize import graph_inputs, raw_input_shape, resolve_input_shape

    if not Path(model).is_file():
        raise ConfigError(f"{model} does not exist")
    try:
        ins = graph_inputs(onnx.load(model, load_external_data=False))
    except Exception as exc:
        raise ConfigError(f"{model} cannot be read as ONNX: {exc}") from None
    if not ins:
        raise ConfigError(f"{model} has no inputs (every graph input is a weight)")
    if len(ins) > 1:
        notes.append(f"the model has {len(ins)} inputs {[i.name for i in ins]}: input_shape is the first one's; the "
                     f"others keep the shapes the file declares")
    dims = raw_input_shape(ins[0])
    if input_shape is None:
        layout, fixed = layout_and_size(dims)
        if len(dims) == 4 and fixed is None and layout is not None:
            hw = size or [DEFAULT_SIDE, DEFAULT_SIDE]
            c = dims[1] if layout == "NCHW" else dims[3]
            input_shape = [1, c, *hw] if layout == "NCHW" else [1, *hw, c]
            notes.append(f"the file leaves height and width open ({dims}): {hw[0]}×{hw[1]} chosen here, "
                         f"set the size you deploy at")
        else:
            input_shape = [1 if not (isinstance(d, int) and d > 0) else d for d in dims[:1]] + \
                          [d if isinstance(d, int) and d > 0 else 0 for d in dims[1:]]
            if 0 in input_shape[1:]:
                raise ConfigError(f"{model} input {dims} leaves dimensions open: give --input-shape")
    resolved = resolve_input_shape(dims, input_shape, True, Path(model).name)  # contradictions refused here
    notes.insert(0, f"as declared in the file: {dims}" + ("" if resolved == dims else f" (built as {resolved})"))
    return input_shape, notes


@handle_errors
def init_cmd(
    model: str = typer.Argument(..., help="The model: a .onnx file (or module:factory with --input-shape)"),
    target: str = typer.Option("x86-openvino-cpu", "--target", "-t", help="Device profile to build for"),
    preprocess: Optional[str] = typer.Option(None, "--preprocess", help="Preset: imagenet, inception, caffe, unit, "
                                             "gray [default: imagenet for 3 channels, gray for 1]"),
    input_shape: Optional[str] = typer.Option(None, help="Input shape, e.g. 1,3,224,224 (fills open dims)"),
    size: Optional[str] = typer.Option(None, help="Image size H,W where the model leaves it open"),
    calibration: Optional[str] = typer.Option(None, help="Calibration images (folder) or .npz"),
    validation: Optional[str] = typer.Option(None, help="Labelled validation data (class sub-folders) or .npz"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Build file to write [default: MODEL.yaml]"),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing build file"),
    as_json: bool = JsonOpt,
) -> None:
    """Write a commented build file for MODEL from its input signature (then: edgekit compile FILE)."""
    from ..config.presets import layout_and_size, parse_size, preset

    shape, notes = model_input(model, parse_input_shape(input_shape), parse_size(size))
    inputs = onnx_input_names(model) if model.endswith(".onnx") else []
    path = output or Path(f"{Path(model).stem.split(':')[-1]}.yaml")
    bundle = f"build/{Path(model).stem.split(':')[-1]}-{Path(target).stem}.ekb"
    if len(inputs) > 1:
        if preprocess:
            raise ConfigError(f"{model} has {len(inputs)} inputs {inputs}: its data is given as tensors by input "
                              f"name, not preprocessed from images", hint="leave out --preprocess")
        text = build_file_text(model, target, shape, notes, {}, calibration, validation, bundle, inputs)
        _write_checked(path, text, force)
        _done(path, text, shape, None, target, as_json)
        return
    layout, hw = layout_and_size(shape)
    channels = (shape[1] if layout == "NCHW" else shape[3]) if layout else None
    name = preprocess or ("gray" if channels == 1 else "imagenet")
    pre = preset(name)
    gives = 1 if pre["color"] == "gray" else 3
    if isinstance(channels, int) and channels != gives:
        raise ConfigError(f"the model takes {channels} channel(s); preset {name!r} gives {gives} ({pre['color']})",
                          hint="use --preprocess gray" if channels == 1 else "use --preprocess imagenet (or another "
                                                                             "RGB preset)")
    if hw is None:
        raise ConfigError(f"input {shape} is not an image input (N, C, H, W or N, H, W, C with 1 or 3 channels)",
                          hint="write the build file by hand with preprocess: {type: tensor} (docs/build.md)")
    pre.update(size=hw, layout=layout)
    text = build_file_text(model, target, shape, notes, {"_preset": name, **pre}, calibration, validation, bundle)
    _write_checked(path, text, force)
    _done(path, text, shape, name, target, as_json)


def onnx_input_names(model: str) -> list[str]:
    """The ONNX file's data inputs (``model_input`` has read it already, so it is readable)."""
    import onnx

    from ..models.onnx_normalize import graph_inputs

    return [i.name for i in graph_inputs(onnx.load(model, load_external_data=False))]


def _write_checked(path: Path, text: str, force: bool) -> None:
    """Write ``path`` only if it is new (or ``force``) and valid as written."""
    from ..config import load_build

    if path.exists() and not force:
        raise ConfigError(f"{path} exists; pass --force to overwrite it or -o another file")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    try:
        load_build(tmp)  # the file is valid as written, or nothing is written
    except Exception:
        tmp.unlink()
        raise
    tmp.replace(path)


def _done(path: Path, text: str, shape: list[int], preprocess: str | None, target: str, as_json: bool) -> None:
    if as_json:
        print_json({"build_file": str(path), "input_shape": shape, "preprocess": preprocess, "target": target})
        return
    console.print(text, highlight=False, markup=False)
    console.print(f"wrote [bold]{path}[/]: edgekit compile {path}")
