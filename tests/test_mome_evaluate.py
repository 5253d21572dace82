"""mome.evaluate: Table 1/2 and per-task tables by hand, declared channel indices, label rules, split files, and the
lesion-restricted expert usage against Eq. 1. Run: .venv/bin/python -m pytest -q tests/test_mome_evaluate.py
"""

import csv
import json

import nibabel as nib
import numpy as np
import pytest
import torch

from mome import MoMEConfig, build_mome, evaluate
from mome.labels import binarise, lesion_values, parse_label_rule
from mome.splits import held_out, read_split_files, training_split
from mome.usage import expert_usage
from shared.dataset import list_cases, write_dataset_json
from shared.errors import InputError

TUMOUR_LABELS = {"background": 0, "necrosis": 1, "edema": 2, "enhancing": 3}


def write_dataset(root, channels: dict, labels: dict, cases: dict, split="Tr"):
    """A tiny nnU-Net raw dataset: cases = {case id: (label (X, Y, Z), {channel index: image})}."""
    (root / f"images{split}").mkdir(parents=True, exist_ok=True)
    (root / f"labels{split}").mkdir(parents=True, exist_ok=True)
    for case, (label, images) in cases.items():
        for index, image in images.items():
            nib.save(
                nib.Nifti1Image(image.astype(np.float32), np.eye(4)),
                root / f"images{split}" / f"{case}_{index:04d}.nii.gz",
            )
        nib.save(nib.Nifti1Image(label.astype(np.uint8), np.eye(4)), root / f"labels{split}" / f"{case}.nii.gz")
    if not (root / "dataset.json").exists():
        write_dataset_json(root, channel_names=channels, labels=labels, num_training=len(cases))
    return root


def save_pred(root, dataset, name, mask):
    (root / dataset).mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(mask.astype(np.uint8), np.eye(4)), root / dataset / f"{name}.nii.gz")


def rows(spec):
    """Per-image rows from (group, dataset, modality, dice) tuples."""
    return [{"group": g, "dataset": d, "modality": m, "dice": x} for g, d, m, x in spec]


def test_tables_by_hand():
    a = rows([("seen", "A", "T1", 0.2), ("seen", "A", "T1", 0.4), ("seen", "A", "FLAIR", 0.9),
              ("seen", "B", "DWI", 0.5), ("unseen", "C", "FLAIR", 0.6), ("unseen", "D", "T2", 0.1),
              ("unseen", "D", "T2", 0.3), ("new_lesion", "E", "T1", 0.0)])  # fmt: skip
    b = [dict(r, dice=1.0 - r["dice"]) for r in a]
    t1 = {r["model"]: r for r in evaluate.table1({"a": a, "b": b})}
    # image: mean of 4; task: tasks A/T1 0.3, A/FLAIR 0.9, B/DWI 0.5; dataset: A (0.2 + 0.4 + 0.9) / 3, B 0.5
    assert t1["a"]["seen_image"] == pytest.approx(2.0 / 4)
    assert t1["a"]["seen_task"] == pytest.approx((0.3 + 0.9 + 0.5) / 3)
    assert t1["a"]["seen_dataset"] == pytest.approx((0.5 + 0.5) / 2)
    assert t1["a"]["unseen_image"] == pytest.approx(1.0 / 3) and t1["a"]["unseen_dataset"] == pytest.approx(0.4)
    assert t1["b"]["seen_image"] == pytest.approx(0.5) and t1["a"]["new_lesion_image"] == 0.0
    assert (t1["a"]["seen_n_image"], t1["a"]["seen_n_task"], t1["a"]["seen_n_dataset"]) == (4, 3, 2)
    t2 = evaluate.table2({"a": a, "b": b})
    assert [r["dataset"] for r in t2] == ["C", "D", "lesion types not trained on: E"]
    # the unseen headline is the mean over unseen datasets, C 0.6 and D 0.2 (not the image mean 1/3)
    head = evaluate.headline(evaluate.table1({"a": a}))[0]
    assert head["UNSEEN (mean over datasets)"] == pytest.approx((0.6 + 0.2) / 2)
    assert head["unseen image (extra)"] == pytest.approx(1.0 / 3) and head["seen task"] == pytest.approx(1.7 / 3)
    assert t2[1]["a"] == pytest.approx(0.2) and t2[1]["b"] == pytest.approx(0.8) and t2[1]["images"] == 2
    tasks = evaluate.task_table({"a": a, "b": b})
    assert [(r["data"], r["dataset"], r["modality"]) for r in tasks][:3] == [
        ("seen", "A", "FLAIR"), ("seen", "A", "T1"), ("seen", "B", "DWI")]  # fmt: skip
    assert tasks[1]["a"] == pytest.approx(0.3) and tasks[1]["b"] == pytest.approx(0.7) and tasks[1]["images"] == 2


def test_channel_files_are_found_by_declared_index_and_label_rule_scores_tumour_core(tmp_path):
    """channel_names {"0": "T1", "2": "FLAIR"}: predict writes CASE_0002 for FLAIR, evaluate must read it."""
    label = np.zeros((8, 8, 8), np.uint8)
    label[2:4, 2:4, 2:4], label[4:6, 2:4, 2:4], label[2:4, 4:6, 2:4] = 1, 2, 3
    image = np.random.default_rng(0).normal(size=(8, 8, 8))
    root = write_dataset(tmp_path / "Dataset001_T", {"0": "T1", "2": "T1ce"}, TUMOUR_LABELS,
                         {"c0": (label, {0: image, 2: image})})  # fmt: skip
    core = np.isin(label, [1, 3])
    save_pred(tmp_path / "pred", root.name, "c0_0000", label > 0)  # T1 predicts the whole tumour
    save_pred(tmp_path / "pred", root.name, "c0_0002", core)  # T1ce predicts the tumour core
    out = tmp_path / "eval"
    args = ["--data", str(root), "--pred", str(tmp_path / "pred"), "--names", "m", "--out", str(out)]
    evaluate.main([*args, "--label-rule", "T1ce=necrosis,enhancing"])
    with open(out / "per_image.csv") as f:
        dice = {r["modality"]: float(r["dice"]) for r in csv.DictReader(f)}
    assert dice == {"T1": 1.0, "T1ce": 1.0}
    evaluate.main(args)  # default: lesion = every label > 0, so the T1ce core misses the edema
    with open(out / "per_image.csv") as f:
        dice = {r["modality"]: float(r["dice"]) for r in csv.DictReader(f)}
    assert dice["T1ce"] == pytest.approx(2 * 16 / (16 + 24))
    (tmp_path / "pred" / root.name / "c0_0002.nii.gz").unlink()
    with pytest.raises(InputError, match=r"lacks 1 predictions: Dataset001_T/c0_0002"):
        evaluate.main(args)


def test_label_rules_names_values_regions_and_refusals(tmp_path):
    tumour = tmp_path / "Dataset001_Tumour"
    write_dataset_json(tumour, channel_names=["T1", "T1ce"], labels=TUMOUR_LABELS, num_training=1)
    brats = tmp_path / "Dataset137_BraTS"  # nnU-Net's BraTS conversion with region labels
    write_dataset_json(
        brats,
        channel_names=["T1ce", "FLAIR"],
        num_training=1,
        labels={"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": 3},
    )
    ms = tmp_path / "Dataset003_MS"
    write_dataset_json(ms, channel_names=["T1ce"], labels={"background": 0, "lesion": 1}, num_training=1)
    assert parse_label_rule("Dataset137_BraTS:T1c=tumor core") == ("Dataset137_BraTS", "T1ce", ("tumor core",))
    got = lesion_values([tumour, brats], ["T1ce=1,3", "Dataset137_BraTS:T1ce=tumor core"])
    assert got[("Dataset001_Tumour", "T1ce")] == (1, 3) and got[("Dataset001_Tumour", "T1")] == (1, 2, 3)
    assert got[("Dataset137_BraTS", "T1ce")] == (2, 3) and got[("Dataset137_BraTS", "FLAIR")] == (1, 2, 3)
    np.testing.assert_array_equal(binarise(np.array([0, 1, 2, 3]), (1, 3)), [0, 1, 0, 1])
    with pytest.raises(InputError, match="Dataset003_MS has no label 'necrosis' .* restrict the rule"):
        lesion_values([tumour, ms], ["T1ce=necrosis,enhancing"])
    with pytest.raises(InputError, match="value 4 is not a label of Dataset001_Tumour"):
        lesion_values([tumour], ["T1ce=4"])
    with pytest.raises(InputError, match="expected .DATASET:.MODALITY=LABELS"):
        lesion_values([tumour], ["T1ce"])
    with pytest.raises(InputError, match="no --data dataset has a DWI channel"):
        lesion_values([tumour], ["DWI=1"])


def test_split_files_nnunet_folds_and_fixed_mappings(tmp_path):
    one = np.zeros((4, 4, 4))
    a = write_dataset(tmp_path / "Dataset001_A", ["T1"], {"background": 0, "lesion": 1},
                      {f"a{i}": (one, {0: one}) for i in range(4)})  # fmt: skip
    b = write_dataset(tmp_path / "Dataset002_B", ["FLAIR"], {"background": 0, "lesion": 1},
                      {f"b{i}": (one, {0: one}) for i in range(3)})  # fmt: skip
    write_dataset(b, ["FLAIR"], {}, {"t0": (one, {0: one})}, split="Ts")
    folds = [{"train": ["a0", "a1"], "val": ["a2", "a3"]}, {"train": ["a2", "a3"], "val": ["a0", "a1"]}]
    (tmp_path / "splits_final.json").write_text(json.dumps(folds))
    (tmp_path / "fixed.json").write_text(json.dumps({"Dataset002_B": {"train": ["b0", "b1"], "test": ["b2", "t0"]}}))
    split = read_split_files([tmp_path / "splits_final.json", tmp_path / "fixed.json"], [a, b], fold=1)
    assert split["Dataset001_A"] == folds[1]  # matched to A by its case ids
    assert held_out(split["Dataset002_B"]) == ["b2", "t0"] and held_out(split["Dataset001_A"]) == ["a0", "a1"]
    assert training_split([a, b], [tmp_path / "splits_final.json", tmp_path / "fixed.json"], 0, 5)[
        "Dataset002_B"]["train"] == ["b0", "b1"]  # fmt: skip
    with pytest.raises(InputError, match=r"gives no split for the --data dataset\(s\) \['Dataset001_A'\]"):
        training_split([a, b], [tmp_path / "fixed.json"], 0, 5)
    with pytest.raises(InputError, match=r"^--fold 4: .*splits_final\.json holds folds 0 to 1\.$"):
        read_split_files([tmp_path / "splits_final.json"], [a], fold=4)
    (tmp_path / "bad.json").write_text(json.dumps({"Dataset001_A": {"train": ["a0"], "test": ["a0", "zz"]}}))
    with pytest.raises(InputError, match=r"\['a0'\] are in both 'train' and 'test'"):
        read_split_files([tmp_path / "bad.json"], [a])
    (tmp_path / "bad.json").write_text(json.dumps({"Dataset001_A": {"train": ["a0"], "test": ["zz"]}}))
    with pytest.raises(InputError, match=r"Dataset001_A has no case\(s\) \['zz'\]"):
        read_split_files([tmp_path / "bad.json"], [a])
    (tmp_path / "other.json").write_text(json.dumps([{"train": ["x0"], "val": ["x1"]}]))
    with pytest.raises(InputError, match="belong to none of the --data datasets"):
        read_split_files([tmp_path / "other.json"], [a, b])
    # a seen dataset missing from the split is refused (its training cases would be scored), an unseen one is not
    with pytest.raises(InputError, match="no split for the seen dataset Dataset002_B"):
        evaluate.collect_images([a, b], {"Dataset001_A": folds[0]})
    images = evaluate.collect_images([a, b], {"Dataset001_A": folds[0]}, groups={"Dataset002_B": "unseen"})
    assert sorted({(im["dataset"], im["case"]) for im in images}) == [("Dataset001_A", "a2"), ("Dataset001_A", "a3"),
        ("Dataset002_B", "b0"), ("Dataset002_B", "b1"), ("Dataset002_B", "b2")]  # fmt: skip
    test_set = evaluate.collect_images([b], split, test_set=True)  # imagesTs/labelsTs, held-out ids of the split
    assert [(im["case"], im["label"].endswith("labelsTs/t0.nii.gz")) for im in test_set] == [("t0", True)]
    with pytest.raises(InputError, match="--test-set: .*Dataset001_A has no imagesTs folder"):
        evaluate.collect_images([a], split, test_set=True)


def test_lesion_usage_shares_add_up_to_the_fused_margin_of_eq1(tmp_path):
    torch.manual_seed(0)
    cfg = MoMEConfig(modalities=("T1", "FLAIR"), features=(4, 8, 16))
    model = build_mome(cfg).eval()
    model.deep_supervision = False
    label = np.zeros((16, 16, 16), np.uint8)
    label[5:9, 6:10, 4:8] = 1
    image = np.random.default_rng(1).normal(size=(16, 16, 16)) + 3 * label
    root = write_dataset(tmp_path / "Dataset001_A", ["T1", "FLAIR"], {"background": 0, "lesion": 1},
                         {"c0": (label, {0: image, 1: image})})  # fmt: skip
    case = list_cases(root)[0]
    images = [{"dataset": root.name, "modality": m, "case_obj": case} for m in ("T1", "FLAIR")]
    magnitude, lesion = expert_usage(model, images, (16, 16, 16), torch.device("cpu"), cfg.modalities,
                                     lesion_values([root]))  # fmt: skip
    x = torch.from_numpy(((image - image.mean()) / image.std()).astype(np.float32))[None, None]
    with torch.no_grad():
        fused = model(x)[0]  # (K, D, H, W) = o^1
        shallow = [e.encoder.stages[0](x) for e in model.experts]
        _, maps = model.gate.unet.forward_features(torch.cat([x, *shallow], dim=1), all_levels=False)
        g = maps[0][0].view(2, 2, 16, 16, 16)  # expert n, class k: channel n*K + k
        e = [expert(x)[0][0] for expert in model.experts]  # finest deep-supervision logits of each expert alone
    inside = torch.from_numpy(label > 0)
    per_expert = [((e[i][1] * g[i, 1] - e[i][0] * g[i, 0])[inside]).sum() for i in range(2)]
    margin = (fused[1] - fused[0])[inside]
    torch.testing.assert_close(sum(per_expert), margin.sum(), rtol=1e-4, atol=1e-4)  # Eq. 1 at lesion voxels
    row = lesion[0]
    assert row["lesion_voxels"] == 64 and row["mean_margin"] == pytest.approx(float(margin.mean()), rel=1e-4)
    for i, name in enumerate(cfg.modalities):  # signed, normalised by the absolute total margin
        assert row[f"expert_{name}"] == pytest.approx(float(per_expert[i] / margin.sum().abs()), rel=1e-3)
    naive = torch.stack([(e[i] * g[i]).abs().mean() for i in range(2)])
    assert magnitude[0]["expert_T1"] == pytest.approx(float(naive[0] / naive.sum()), rel=1e-4)


def test_usage_signs_with_a_negative_total_margin_by_hand(tmp_path):
    """Constant experts under a uniform gate (g = 1/2): expert T1 says background (logits 3, 0), FLAIR lesion (0, 1).

    Per lesion voxel c_T1 = 0.5 * 0 - 0.5 * 3 = -1.5 and c_FLAIR = 0.5 * 1 - 0.5 * 0 = 0.5: the total margin is -1
    (the lesion is missed). Shares c_i / |sum c| = (-1.5, 0.5): T1 pulls towards background, FLAIR towards lesion;
    dividing by the signed total would give (1.5, -0.5), the opposite reading.
    """
    torch.manual_seed(0)
    cfg = MoMEConfig(modalities=("T1", "FLAIR"), features=(4, 8))
    model = build_mome(cfg).eval()
    model.deep_supervision = False
    model.gate.init_uniform()
    with torch.no_grad():
        for expert, bias in zip(model.experts, ([3.0, 0.0], [0.0, 1.0])):
            head = expert.decoder.seg_layers[-1]
            head.weight.zero_()
            head.bias.copy_(torch.tensor(bias))
    label = np.zeros((8, 8, 8), np.uint8)
    label[2:4, 2:4, 2:4] = 1
    image = np.random.default_rng(0).normal(size=(8, 8, 8))
    root = write_dataset(tmp_path / "Dataset001_A", ["T1", "FLAIR"], {"background": 0, "lesion": 1},
                         {"c0": (label, {0: image, 1: image})})  # fmt: skip
    other = write_dataset(tmp_path / "Dataset002_B", ["T1"], {"background": 0, "lesion": 1},
                          {"b0": (label, {0: image})})  # fmt: skip
    images = [{"dataset": d.name, "modality": "T1", "case_obj": list_cases(d)[0]} for d in (other, root)]
    magnitude, lesion = expert_usage(model, images, (8, 8, 8), torch.device("cpu"), cfg.modalities,
                                     lesion_values([root, other]))  # fmt: skip
    # one row per dataset and modality: T1 of two datasets (lesion types) stays apart
    assert [(r["dataset"], r["input_modality"], r["images"]) for r in lesion] == [
        ("Dataset001_A", "T1", 1), ("Dataset002_B", "T1", 1)]  # fmt: skip
    row = lesion[0]
    assert row["lesion_voxels"] == 8 and row["mean_margin"] == pytest.approx(-1.0, abs=1e-6)
    assert (row["expert_T1"], row["expert_FLAIR"]) == (pytest.approx(-1.5, abs=1e-6), pytest.approx(0.5, abs=1e-6))
    # magnitude: mean over voxels and classes of |e * g|: (1.5 + 0) / 2 and (0 + 0.5) / 2 -> shares 3/4, 1/4
    assert magnitude[0]["expert_T1"] == pytest.approx(0.75, abs=1e-6)
    assert magnitude[0]["expert_FLAIR"] == pytest.approx(0.25, abs=1e-6)
