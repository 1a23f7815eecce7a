"""The commands that prepare and list what runs use: ``mlcil data`` (export-digits, cache,
synth-coco, synth-voc), ``list``, ``configs``, ``weights fetch`` and ``pretrain``."""

from __future__ import annotations

import argparse
import json
import sys

from mlcil.errors import MlcilError


def cmd_export_digits(args: argparse.Namespace) -> int:
    from mlcil.data.export import export_digit_scenes

    written = export_digit_scenes(
        args.output,
        classes=args.classes or (),
        train=args.train,
        test=args.test,
        seed=args.seed,
        overwrite=args.overwrite,
    )
    for split, path in written.items():
        print(f"{split}: {path}")
    return 0


def cmd_synthesize(args: argparse.Namespace) -> int:
    from mlcil.data.synthetic import write_synthetic_coco, write_synthetic_voc

    write = write_synthetic_coco if args.action == "synth-coco" else write_synthetic_voc
    sizes = {"image_size": tuple(args.image_size)} if args.image_size else {}
    summary = write(args.output, args.train, args.test, seed=args.seed, jobs=args.jobs, **sizes)
    print(json.dumps(summary, indent=1))
    print(f"written: {args.output} (data.root={args.output})")
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    from mlcil.data import build_image_cache
    from mlcil.experiment import load_config

    config = load_config(args.config, args.overrides)
    summary = build_image_cache(config.data)
    print(json.dumps(summary, indent=1))
    print(f"image cache: {summary['path']} (used by runs with data.image_cache=true)")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    del args
    from mlcil.data import DATASETS
    from mlcil.memory_policies import MEMORY_POLICIES
    from mlcil.methods import METHODS
    from mlcil.models import NETWORKS
    from mlcil.old_classes import RULE_SUMMARIES

    # Plugins may register longer names than the built-in ones: the column fits them all.
    names = (*METHODS, *NETWORKS, *DATASETS, *RULE_SUMMARIES)
    width = max(10, *(len(name) for name in names))
    print("methods (default old-class rule, method.old_classes, in brackets):")
    for name, cls in sorted(METHODS.items()):
        rule = cls.Params.model_fields.get("old_classes")
        tag = f"[{rule.default}] " if rule is not None else "[its own] "
        summary = _first_line(cls.__doc__ or sys.modules[cls.__module__].__doc__)
        print(f"  {name:<{width}} {tag}{summary}")
    print("networks:")
    for name, network in sorted(NETWORKS.items()):
        print(f"  {name:<{width}} {_first_line(network.__doc__)}")
    print("old-class rules (method.old_classes):")
    for name, summary in RULE_SUMMARIES.items():
        print(f"  {name:<{width}} {summary}")
    print("memory policies (memory.policy):")
    for name, policy in sorted(MEMORY_POLICIES.items()):
        print(f"  {name:<{width}} {_first_line(policy.__doc__)}")
    print("datasets (published protocols):")
    for name, spec in DATASETS.items():
        print(f"  {name:<{width}} {' '.join(spec.protocols)}".rstrip())
    return 0


def _first_line(text: str | None) -> str:
    """A docstring's first line ("" for none)."""
    lines = (text or "").strip().splitlines()
    return lines[0] if lines else ""


def cmd_configs(args: argparse.Namespace) -> int:
    import shutil
    import textwrap

    from mlcil.config.packaged import is_fragment, matching_configs, packaged_root, summary

    configs = matching_configs(args.pattern)
    if not configs:
        if args.pattern is None:
            raise MlcilError("no packaged configs found (this installation was built without them)")
        raise MlcilError(f"no shipped config matches {args.pattern!r} (`mlcil configs` lists all)")
    fragments = {name: path for name, path in configs.items() if is_fragment(path)}
    runnable = {name: path for name, path in configs.items() if name not in fragments}
    width = max(len(name) for name in configs)
    columns = max(shutil.get_terminal_size((100, 24)).columns, width + 40)
    # Never break inside a hyphenated word: a wrapped "method-neutral" would read back as two.
    wrap = textwrap.TextWrapper(
        width=columns - 1,
        initial_indent="",
        subsequent_indent=" " * (width + 4),
        break_on_hyphens=False,
    )
    print(f"shipped configs ({packaged_root()}); use one with: mlcil train --config NAME")
    for name, path in runnable.items():
        print(wrap.fill(f"  {name:<{width}}  {summary(path)}".rstrip()))
    if fragments:
        print(
            "fragments (partial configs: stack one on a config above, e.g. "
            "--config digits-b0-c2 --config methods-lwf):"
        )
        for name, path in fragments.items():
            print(wrap.fill(f"  {name:<{width}}  {summary(path)}".rstrip()))
    return 0


def cmd_weights(args: argparse.Namespace) -> int:
    """``mlcil weights fetch NAME``: hub weights downloaded into the hub cache now (for a
    machine without a network later), or ``imagenet:`` weights converted into mlcil's cache."""
    from mlcil import hub_weights, imagenet
    from mlcil.weights_cache import read_provenance

    name = args.name
    if hub_weights.is_hub_name(name):
        path = hub_weights.download(name, args.backbone)
        record = hub_weights.provenance(name, path)
    elif imagenet.is_imagenet_name(name):
        path = imagenet.imagenet_weights(name[len(imagenet.SCHEME) :])
        record = read_provenance(path)
    else:
        raise MlcilError(
            f"mlcil weights fetch: {name!r} names no weights to fetch: give timm/<model>.<tag>, "
            "hf-hub:<owner>/<repo> or imagenet:<name> (glyph weights: mlcil pretrain)"
        )
    print(json.dumps(record, indent=1))
    print(f"weights: {path}")
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from mlcil.experiment import load_config
    from mlcil.pretrain import PretrainRecipe, pretrain_backbone
    from mlcil.runs import make_runtime
    from mlcil.weights_cache import read_provenance

    config = load_config(args.config, args.overrides)
    changes = {k: getattr(args, k) for k in ("epochs", "lr", "batch_size", "seed")}
    recipe = PretrainRecipe(**{k: v for k, v in changes.items() if v is not None})
    runtime = make_runtime(config)
    path = pretrain_backbone(config.model, config.data.image_size, recipe, runtime=runtime)
    print(json.dumps(read_provenance(path), indent=1))
    print(f"weights: {path}")
    if recipe != PretrainRecipe():
        print(f"(not the default recipe: point model.pretrained at {path} to use these weights)")
    return 0
