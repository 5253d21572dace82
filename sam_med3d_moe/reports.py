"""The tables of `evaluate`: the gate's routing per task and the paper's Table 1 split into fine-tuned classes and
other classes.

A task here is one target class of one dataset (a label value, or "union" for whole-foreground targets). A
prompt is routed to expert k when the mask selector uses it: the first-ranked specific expert's score s_top
exceeds tau (paper Sec. 2.3); otherwise the prompt goes to the general expert alone. The expected expert of a
task is the one fine-tuned on it (`tasks.expected_expert`), the general expert (0) for every other task.
"""

from collections import defaultdict

import numpy as np

from sam_med3d_moe.tasks import ExpertTask, expected_expert


def routed_expert(scores: np.ndarray, tau: float) -> tuple[np.ndarray, np.ndarray]:
    """Where the selector sends each prompt.

    Args:
        scores: (N, m) gate softmax, column 0 the general expert.
        tau: the selector threshold.
    Returns:
        destination (N,) int: k + 1 for specific expert k when its score s_top > tau, else 0; and s_top (N,).
    """
    s_top = scores[:, 1:].max(axis=1)
    top = scores[:, 1:].argmax(axis=1) + 1
    return np.where(s_top > tau, top, 0), s_top


def task_label(label: int | None) -> str:
    return "union" if label is None else str(label)


def routing_rows(records: list[dict], tasks: list[ExpertTask], expert_names, tau: float) -> list[dict]:
    """One row per task: how the gate routed its prompts.

    Args:
        records: one per evaluated target, {"dataset", "label", "scores" (steps, m) gate softmax of its prompts}.
        tasks: the ExpertTask of each specific expert.
        expert_names: the name of each specific expert (column headers).
        tau: the selector threshold.
    Returns:
        rows {"dataset", "label", "prompts", "expected", "share_general", "share_<name>"..., "mean_s_top",
        "accuracy"}; shares and accuracy in [0, 1] over the task's prompts.
    """
    grouped = defaultdict(list)
    for rec in records:
        grouped[(rec["dataset"], rec["label"])].append(np.asarray(rec["scores"], dtype=np.float64))
    names = ["general", *expert_names]
    rows = []
    for (dataset, label), chunks in sorted(grouped.items(), key=lambda kv: (kv[0][0], task_label(kv[0][1]))):
        scores = np.concatenate(chunks, axis=0)
        dest, s_top = routed_expert(scores, tau)
        want = expected_expert(tasks, dataset, label)
        row = {"dataset": dataset, "label": task_label(label), "prompts": len(dest), "expected": names[want]}
        row.update({f"share_{n}": round(float(np.mean(dest == k)), 4) for k, n in enumerate(names)})
        row["mean_s_top"] = round(float(s_top.mean()), 4)
        row["accuracy"] = round(float(np.mean(dest == want)), 4)
        rows.append(row)
    return rows


def table1_rows(rows: list[dict], tasks: list[ExpertTask], metrics: list[str]) -> list[dict]:
    """The paper's Table 1 split: mean of each metric over the targets of the fine-tuned classes (those some
    expert was fine-tuned on) and over the other classes (the original tasks, which must not be forgotten).

    Args:
        rows: per-target rows with "dataset", "label" (as `task_label` writes it) and the metrics.
        tasks: the experts' tasks that define "fine-tuned".
        metrics: the row keys to average.
    Returns:
        up to two rows {"classes": "fine-tuned" | "other", "targets", <metric>: mean}; a group with no target is
        left out.
    """
    tuned = [expected_expert(tasks, r["dataset"], _label(r["label"])) > 0 for r in rows]
    out = []
    for group, own in (
        ("fine-tuned", [r for r, t in zip(rows, tuned) if t]),
        ("other", [r for r, t in zip(rows, tuned) if not t]),
    ):
        if own:
            means = {m: round(float(np.mean([r[m] for r in own])), 4) for m in metrics}
            out.append({"classes": group, "targets": len(own), **means})
    return out


def _label(text: str) -> int | None:
    return None if text == "union" else int(text)
