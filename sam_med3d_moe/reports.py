"""The tables of `evaluate`: the gate's routing per task and the paper's Table 1 split into fine-tuned classes and
other classes.

A task here is one target class of one dataset (a label value, or "union" for whole-foreground targets). A
prompt is routed to expert k when the mask selector uses it: the first-ranked specific expert's score s_top
exceeds tau (paper Sec. 2.3) and the selector mode reads an expert at all (not "general"); otherwise the prompt
goes to the general expert alone. Routing is reported per prompt type (click or box): the gate reads the
prompt tokens, so clicks and boxes of one class may be routed differently. The expected expert of a
task is the one fine-tuned on it (`tasks.expected_expert`), the general expert (0) for every other task.
"""

from collections import defaultdict

import numpy as np

from sam_med3d_moe.tasks import ExpertTask, expected_expert


def routed_expert(scores: np.ndarray, tau: float, mode: str = "weighted") -> tuple[np.ndarray, np.ndarray]:
    """Where the selector sends each prompt.

    Args:
        scores: (N, m) gate softmax, column 0 the general expert.
        tau: the selector threshold.
        mode: the selector mode; "general" never uses an expert.
    Returns:
        destination (N,) int: k + 1 for specific expert k when its score s_top > tau (and mode is not
        "general"), else 0; and s_top (N,).
    """
    s_top = scores[:, 1:].max(axis=1)
    top = scores[:, 1:].argmax(axis=1) + 1
    used = np.zeros_like(s_top, dtype=bool) if mode == "general" else s_top > tau
    return np.where(used, top, 0), s_top


def task_label(label: int | None) -> str:
    return "union" if label is None else str(label)


def routing_rows(
    records: list[dict], tasks: list[ExpertTask], expert_names, tau: float, mode: str = "weighted"
) -> list[dict]:
    """One row per task and prompt type: how the selector routed its prompts.

    Args:
        records: {"dataset", "label", "prompt" ("click" or "box"), "scores" (steps, m) gate softmax of the
            prompts of that type of one target}.
        tasks: the ExpertTask of each specific expert.
        expert_names: the name of each specific expert (column headers).
        tau, mode: the selector threshold and mode.
    Returns:
        rows {"dataset", "label", "prompt", "prompts", "expected", "share_general", "share_<name>"...,
        "mean_s_top", "accuracy"}; shares and accuracy in [0, 1] over those prompts.
    """
    grouped = defaultdict(list)
    for rec in records:
        key = (rec["dataset"], rec["label"], rec["prompt"])
        grouped[key].append(np.asarray(rec["scores"], dtype=np.float64))
    names = ["general", *expert_names]
    rows = []
    for (dataset, label, prompt), chunks in sorted(grouped.items(), key=lambda kv: (kv[0][0], task_label(kv[0][1]),
                                                                                    kv[0][2] != "click")):  # fmt: skip
        scores = np.concatenate(chunks, axis=0)
        dest, s_top = routed_expert(scores, tau, mode)
        want = expected_expert(tasks, dataset, label)
        row = {"dataset": dataset, "label": task_label(label), "prompt": prompt, "prompts": len(dest),
               "expected": names[want]}  # fmt: skip
        row.update({f"share_{n}": round(float(np.mean(dest == k)), 4) for k, n in enumerate(names)})
        row["mean_s_top"] = round(float(s_top.mean()), 4)
        row["accuracy"] = round(float(np.mean(dest == want)), 4)
        rows.append(row)
    return rows


def table1_rows(rows: list[dict], tasks: list[ExpertTask], metrics: list[str]) -> list[dict]:
    """The paper's Table 1 split: mean of each metric over the targets of the fine-tuned classes (those some
    expert was fine-tuned on; in the new-task setting, the new task) and over the other classes (the original
    tasks, which must not be forgotten), and the mean over classes of the per-class means.

    Args:
        rows: per-target rows with "dataset", "label" (as `task_label` writes it) and the metrics.
        tasks: the experts' tasks that define "fine-tuned".
        metrics: the row keys to average.
    Returns:
        up to two rows {"classes": "fine-tuned" | "other", "targets", "class_count", <metric>: mean over
        targets, "class_mean_<metric>": mean over classes}; a group with no target is left out.
    """
    tuned = [expected_expert(tasks, r["dataset"], _label(r["label"])) > 0 for r in rows]
    out = []
    for group, own in (
        ("fine-tuned", [r for r, t in zip(rows, tuned) if t]),
        ("other", [r for r, t in zip(rows, tuned) if not t]),
    ):
        if own:
            per_class = defaultdict(list)
            for r in own:
                per_class[(r["dataset"], r["label"])].append(r)
            means = {m: round(float(np.mean([r[m] for r in own])), 4) for m in metrics}
            class_means = {
                f"class_mean_{m}": round(float(np.mean([np.mean([r[m] for r in c]) for c in per_class.values()])), 4)
                for m in metrics
            }
            out.append({"classes": group, "targets": len(own), "class_count": len(per_class), **means, **class_means})
    return out


def _label(text: str) -> int | None:
    return None if text == "union" else int(text)
