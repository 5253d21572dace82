"""Which task expert answers which target: the expert-to-task mapping of SAM-Med3D-MoE.

A target is one binary mask: a label value of one case of one dataset (`label` an int), or every label > 0 of
a case at once (`label` None, the `--union` targets such as a whole lesion). An expert is fine-tuned on the
targets of one or more datasets, optionally only on chosen label values (`finetune_expert --labels 3 5`, the
paper's experts for weak classes); its checkpoint records that as an `ExpertTask`. The gate is trained with
target class k + 1 for a target that expert k covers and 0 (the general expert) for every other target, and
the evaluation splits the paper's Table 1 into "fine-tuned classes" and "other classes" with the same rule.
"""

from dataclasses import dataclass

from shared.errors import InputError


@dataclass(frozen=True)
class ExpertTask:
    """The targets one expert was fine-tuned on."""

    datasets: tuple[str, ...]  # dataset folder names, e.g. ("Dataset905_PhantomTumour",)
    labels: tuple[int, ...] | None = None  # label values; None: every target of these datasets (union ones too)

    def __post_init__(self):
        if not self.datasets:
            raise InputError("an expert task needs at least one dataset.")
        object.__setattr__(self, "datasets", tuple(sorted(set(self.datasets))))
        if self.labels is not None:
            if not self.labels or any(int(v) < 1 for v in self.labels):
                raise InputError(f"--labels must name label values >= 1, got {list(self.labels)}.")
            object.__setattr__(self, "labels", tuple(sorted({int(v) for v in self.labels})))

    @property
    def name(self) -> str:
        """Readable name: every dataset (not only the first) and the label values, e.g. "A+B:labels3,5"."""
        base = "+".join(self.datasets)
        return base if self.labels is None else f"{base}:labels{','.join(map(str, self.labels))}"

    def covers(self, dataset: str, label: int | None) -> bool:
        """Whether the target (dataset, label value or None for a union target) is one of this expert's."""
        if dataset not in self.datasets:
            return False
        return self.labels is None or (label is not None and int(label) in self.labels)

    def to_dict(self) -> dict:
        return {"datasets": list(self.datasets), "labels": None if self.labels is None else list(self.labels)}

    @classmethod
    def from_dict(cls, values: dict) -> "ExpertTask":
        labels = values.get("labels")
        return cls(datasets=tuple(values["datasets"]), labels=None if labels is None else tuple(labels))


def check_disjoint(tasks: list[ExpertTask], sources: list[str]) -> None:
    """Refuse two experts that claim the same target (the gate would have two right answers for it).

    Args:
        tasks: one per expert, in expert order.
        sources: the checkpoint of each, named in the error.
    """
    for a in range(len(tasks)):
        for b in range(a + 1, len(tasks)):
            shared = sorted(set(tasks[a].datasets) & set(tasks[b].datasets))
            for dataset in shared:
                la, lb = tasks[a].labels, tasks[b].labels
                if la is None or lb is None or set(la) & set(lb):
                    raise InputError(
                        f"--experts {sources[a]} and {sources[b]} both cover targets of {dataset} "
                        f"(labels {la or 'all'} and {lb or 'all'}); each target needs one expert."
                    )


def expected_expert(tasks: list[ExpertTask], dataset: str, label: int | None) -> int:
    """The gate's target class of a target: k + 1 if expert k covers it, else 0 (the general expert)."""
    for k, task in enumerate(tasks):
        if task.covers(dataset, label):
            return k + 1
    return 0
