"""``--dry-run``: what a run would do (sessions, set sizes, weights, model), printed before
anything is trained or written."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mlcil.experiment import Experiment


def dry_run_summary(experiment: Experiment, run_dir: Path) -> str:
    """Sessions, set sizes, weights file status and a model summary, without training."""
    from mlcil.requirements import weights_status

    config = experiment.config
    lines = [
        f"run: {config.run_name} -> {run_dir}",
        f"method: {config.method.to_dict()}",
        f"dataset: {config.data.dataset} ({len(experiment.train_source)} train / "
        f"{len(experiment.test_source)} test images, {len(experiment.class_names)} classes), "
        f"protocol {config.protocol}, overlap {config.data.overlap}",
        f"device: {experiment.runtime.device} ({experiment.runtime.precision})",
        f"classes ({len(experiment.class_names)}): {', '.join(experiment.class_names)}",
        "",
        "session  new  classes                          train  test",
    ]
    for session, sizes in zip(experiment.sessions, experiment.session_sizes(), strict=True):
        names = ", ".join(experiment.class_names[c] for c in session.new_classes)
        if len(names) > 31:
            names = names[:28] + "..."
        lines.append(
            f"{session.index:>7}  {len(session.new_classes):>3}  {names:<31} "
            f"{sizes['train_images']:>6} {sizes['test_images']:>5}"
        )
    memory = config.memory
    if memory.enabled:
        budget = (
            f"{memory.per_class} per class" if memory.total is None else f"{memory.total} total"
        )
        lines.append(f"exemplar memory: {budget}, labels {memory.labels}")
    else:
        lines.append("exemplar memory: off")
    lines.append(f"pretrained weights: {weights_status(config.model)}")
    method = experiment.build_method(load_weights=False)
    for session in experiment.sessions:
        method.network.add_session(len(session.new_classes))
    lines.append("")
    lines.append(f"model after the last session ({config.model.backbone}, {config.model.network}):")
    total = trainable = 0
    for name, count, grad in method.network.summary():
        lines.append(f"  {name:<20} {count:>12,d} parameters ({grad:,d} trainable)")
        total += count
        trainable += grad
    lines.append(f"  {'total':<20} {total:>12,d} parameters ({trainable:,d} trainable)")
    return "\n".join(lines)
