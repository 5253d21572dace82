"""Validation Dice (finetune.validate, brainsegfounder.scoring) against MONAI's DiceMetric and a naive computation;
empty references in evaluate and fewshot.

Run: .venv/bin/python -m pytest -q tests/test_brainsegfounder_scoring.py (the MONAI comparison skips without monai)
"""

import csv
import json
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch

from brainsegfounder import evaluate, fewshot, finetune
from brainsegfounder.scoring import case_scores, predicted_regions, region_means
from shared.errors import InputError

NAMES = ("TC", "WT", "ET")
VALUES = (2, 1, 3)  # necrosis, edema, enhancing (nnU-Net's BraTS conversion)


def random_cases(seed=0, n=6, shape=(4, 4, 4)):
    """(pred, truth) boolean (3, *shape) region masks; some references and predictions empty on purpose."""
    rng = np.random.default_rng(seed)
    cases = []
    for i in range(n):
        pred, truth = rng.random((3, *shape)) < 0.3, rng.random((3, *shape)) < 0.3
        if i == 1:
            truth[2] = False  # empty ET reference, non-empty prediction: MONAI NaN, "score" 0
        if i == 2:
            truth[2], pred[2] = False, False  # empty / empty: MONAI NaN, "score" 1
        if i == 3:
            truth[0] = False
            pred[0] = False
        cases.append((pred, truth))
    return cases


def naive_dice(p, t):
    inter = sum(bool(a) and bool(b) for a, b in zip(p.ravel(), t.ravel()))
    total = int(p.sum()) + int(t.sum())
    return None if t.sum() == 0 else 2 * inter / total


def test_skip_matches_monai_dice_metric():
    metrics = pytest.importorskip("monai.metrics")
    cases = random_cases()
    per_case = {f"c{i}": case_scores(p, t, NAMES) for i, (p, t) in enumerate(cases)}
    ours = region_means(per_case, NAMES, "skip")
    metric = metrics.DiceMetric(include_background=True, reduction="mean_batch", get_not_nans=True)
    metric(torch.from_numpy(np.stack([p for p, _ in cases])).float(), torch.from_numpy(np.stack([t for _, t in cases])))
    monai_means, not_nans = metric.aggregate()
    assert [ours[n] for n in NAMES] == pytest.approx(monai_means.tolist(), abs=1e-6)
    assert [len(cases) - ours["skipped"][n] for n in NAMES] == not_nans.tolist() == [5, 6, 4]
    assert ours["mean"] == pytest.approx(float(monai_means.mean()), abs=1e-6)


def test_score_counts_empty_references_as_one_or_zero():
    cases = random_cases()
    per_case = {f"c{i}": case_scores(p, t, NAMES) for i, (p, t) in enumerate(cases)}
    score = region_means(per_case, NAMES, "score")
    skip = region_means(per_case, NAMES, "skip")
    et = [naive_dice(p[2], t[2]) for p, t in cases]
    assert et[1] is None and et[2] is None
    by_hand = [d for d in et if d is not None]
    assert skip["ET"] == pytest.approx(np.mean(by_hand))
    assert score["ET"] == pytest.approx(np.mean([*by_hand, 0.0, 1.0]))  # FP on empty 0, empty / empty 1
    assert score["skipped"] == {"TC": 0, "WT": 0, "ET": 0} and skip["skipped"] == {"TC": 1, "WT": 0, "ET": 2}
    one = region_means({"a": per_case["c2"]}, NAMES, "skip")  # ET without any reference: NaN, left out of the mean
    assert np.isnan(one["ET"]) and one["mean"] == pytest.approx((one["TC"] + one["WT"]) / 2)


def naive_regions(probs, values):
    """Thresholded channels -> label map (WT edema, then TC necrosis, then ET enhancing) -> regions, voxel by voxel."""
    necrosis, edema, enhancing = values
    regions = np.zeros(probs.shape, dtype=bool)
    for idx in np.ndindex(probs.shape[1:]):
        tc, wt, et = (probs[(k, *idx)] > 0.5 for k in range(3))
        label = enhancing if et else necrosis if tc else edema if wt else 0
        regions[(0, *idx)] = label in (necrosis, enhancing)
        regions[(1, *idx)] = label in (necrosis, edema, enhancing)
        regions[(2, *idx)] = label == enhancing
    return regions


def test_validate_against_a_naive_computation(monkeypatch):
    rng = np.random.default_rng(1)
    shape = (4, 4, 3)
    probs = {f"c{i}": rng.random((3, *shape)).astype(np.float32) for i in range(3)}
    probs["c0"][:, 0, 0, 0] = [0.1, 0.2, 0.9]  # ET outside TC and WT: enhancing in the label map, so TC and WT too
    probs["c1"][:, 0, 0, 0] = [0.5, 0.5, 0.5]  # exactly 0.5 is not foreground
    labels = {c: rng.choice([0, 1, 2, 3], size=shape).astype(np.uint8) for c in probs}
    labels["c2"][labels["c2"] == 3] = 1  # no enhancing tumour in c2: its ET is skipped
    cases = [SimpleNamespace(case_id=c) for c in probs]
    current = {}  # the case read last is the one predicted next

    def fake_predict(model, image, **kw):
        return probs[current["case"]]

    def fake_read(case, channels):
        current["case"] = case.case_id
        return None, labels[case.case_id]

    monkeypatch.setattr(finetune, "read_volume", fake_read)
    monkeypatch.setattr(finetune, "predict_probabilities", fake_predict)
    model = torch.nn.Identity()
    run = dict(channels=["T1"], patch=(32, 32, 32), target="brats", values=VALUES, overlap=0.5, device="cpu", amp=False)
    skip = finetune.validate(model, cases, **run, empty_reference="skip")
    score = finetune.validate(model, cases, **run, empty_reference="score")
    assert model.training  # back in training mode
    naive = {n: [] for n in NAMES}
    naive_score = {n: [] for n in NAMES}
    naive_soft = {n: [] for n in NAMES}
    for c in probs:
        pred = naive_regions(probs[c], VALUES)
        lab = labels[c]
        truth = np.stack([(lab == 2) | (lab == 3), lab > 0, lab == 3])
        for k, n in enumerate(NAMES):
            d = naive_dice(pred[k], truth[k])
            if d is not None:
                naive[n].append(d)
            naive_score[n].append(d if d is not None else float(not pred[k].any()))
            if truth[k].any():  # soft Dice of the channel itself, no threshold, no label map (BSF)
                p = probs[c][k].astype(np.float64)
                naive_soft[n].append(2 * (p * truth[k]).sum() / (p.sum() + truth[k].sum()))
    assert skip["skipped"] == {"TC": 0, "WT": 0, "ET": 1} and score["skipped"] == {"TC": 0, "WT": 0, "ET": 0}
    for n in NAMES:
        assert skip[n] == pytest.approx(np.mean(naive[n]))
        assert score[n] == pytest.approx(np.mean(naive_score[n]))
    assert skip["mean"] == pytest.approx(np.mean([np.mean(naive[n]) for n in NAMES]))
    assert [skip["soft"][n] for n in NAMES] == pytest.approx([np.mean(naive_soft[n]) for n in NAMES])
    assert skip["soft"]["mean"] == pytest.approx(np.mean([np.mean(naive_soft[n]) for n in NAMES]))
    # scoring the thresholded channels directly (before this fix) gives another TC / WT for c0
    direct = probs["c0"] > 0.5
    assert not np.array_equal(direct, predicted_regions(probs["c0"], "brats", VALUES))


def test_predicted_regions_are_what_predict_and_evaluate_score():
    from brainsegfounder.predict import probabilities_to_labels
    from shared.metrics import brats_regions

    probs = np.random.default_rng(2).random((3, 5, 4, 3)).astype(np.float32)
    labels = probabilities_to_labels(probs, "brats", VALUES)
    rebuilt = brats_regions(labels, necrosis=2, edema=1, enhancing=3)
    assert np.array_equal(predicted_regions(probs, "brats", VALUES), np.stack([rebuilt[n] for n in NAMES]))


def _dataset(root, refs, preds):
    (root / "labelsTr").mkdir(parents=True)
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T1"}, "file_ending": ".nii.gz",
                                                   "labels": {"background": 0, "edema": 1, "necrosis": 2,
                                                              "enhancing": 3}, "numTraining": len(refs)}))  # fmt: skip
    (root / "preds").mkdir()
    for name in refs:
        nib.save(nib.Nifti1Image(refs[name], np.eye(4)), root / "labelsTr" / f"{name}.nii.gz")
        nib.save(nib.Nifti1Image(preds[name], np.eye(4)), root / "preds" / f"{name}.nii.gz")
    return root / "labelsTr", root / "preds"


def test_evaluate_skips_empty_references(tmp_path, capsys):
    a = np.zeros((4, 4, 4), np.uint8)
    a[0, 0, :2] = 3  # ET 2 voxels; pred 1 of them -> ET Dice 2/3
    pa = np.zeros_like(a)
    pa[0, 0, 0] = 3
    b = np.zeros_like(a)
    b[1, 1, :2] = 1  # only edema: empty TC and ET references; the prediction puts enhancing tumour there
    pb = np.zeros_like(a)
    pb[1, 1, :2] = 3
    gt, preds = _dataset(tmp_path / "Dataset1_X", {"a": a, "b": b}, {"a": pa, "b": pb})
    evaluate.main(["--pred", str(preds), "--gt", str(gt), "--out", str(tmp_path / "skip.csv")])
    printed = capsys.readouterr().out
    summary = {r["class"]: r for r in csv.DictReader(open(tmp_path / "skip_summary.csv"))}
    assert float(summary["ET"]["mean_dice"]) == pytest.approx(2 / 3) and summary["ET"]["n_skipped_dice"] == "1"
    assert (
        float(summary["WT"]["mean_dice"]) == pytest.approx((2 / 3 + 1) / 2) and summary["WT"]["n_skipped_dice"] == "0"
    )
    assert "      ET    2       1" in printed
    rows = {(r["case"], r["class"]): r["dice"] for r in csv.DictReader(open(tmp_path / "skip.csv"))}
    assert rows[("b", "ET")] == "nan" and float(rows[("a", "ET")]) == pytest.approx(2 / 3)
    evaluate.main(
        ["--pred", str(preds), "--gt", str(gt), "--empty-reference", "score", "--out", str(tmp_path / "s.csv")]
    )
    summary = {r["class"]: r for r in csv.DictReader(open(tmp_path / "s_summary.csv"))}
    assert float(summary["ET"]["mean_dice"]) == pytest.approx((2 / 3 + 0) / 2)


def _arm(folder, arm, recorded):
    """An arm of one run whose final validation holds per-case Dice: c1 has an empty ET reference, predicted 0."""
    per_case = {"c0": {"dice": {"TC": 0.5, "WT": 0.7, "ET": 0.6}, "empty": []},
                "c1": {"dice": {"TC": 0.3, "WT": 0.9, "ET": 0.0}, "empty": ["ET"]}}  # fmt: skip
    final = {**region_means(per_case, NAMES, recorded), "empty_reference": recorded, "per_case": per_case}
    run = {"fraction": 1.0, "repeat": 0, "train_cases": ["t"], "final": final, "best": final}
    folder.mkdir()
    (folder / "summary.json").write_text(json.dumps({"arm": arm, "data": "/d", "target": "brats", "seed": 0,
                                                     "regions": list(NAMES), "runs": [run]}))  # fmt: skip
    return str(folder)


def test_fewshot_rescores_with_the_requested_convention(tmp_path, capsys):
    a, b = _arm(tmp_path / "a", "scratch", "score"), _arm(tmp_path / "b", "two-stage", "skip")
    fewshot.main([a, b, "--out", str(tmp_path / "t.csv")])  # default skip: arm a rescored
    rows = list(csv.DictReader(open(tmp_path / "t.csv")))
    skip = (0.4 + 0.8 + 0.6) / 3
    assert [float(r["dice"]) for r in rows] == pytest.approx([skip, skip])
    assert "ET 1 of 2 cases" in capsys.readouterr().out
    fewshot.main([a, b, "--empty-reference", "score", "--out", str(tmp_path / "s.csv")])
    rows = list(csv.DictReader(open(tmp_path / "s.csv")))
    assert [float(r["dice"]) for r in rows] == pytest.approx([(0.4 + 0.8 + 0.3) / 3] * 2)
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    del summary["runs"][0]["final"]["per_case"]
    (tmp_path / "a" / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(InputError, match="holds no per-case Dice to rescore"):
        fewshot.main([a, b])
