"""shared.inputs: predict --input as a file, a folder or a dataset, and evaluate --cases / --split subsets;
pytest -q tests/test_shared_inputs.py"""

import json
from pathlib import Path

import pytest

from shared.cli import make_parser
from shared.dataset import write_dataset_json
from shared.errors import InputError
from shared.inputs import add_input_args, add_subset_args, inputs_from_args, resolve_inputs, selected_cases


def touch(path: Path) -> Path:
    """An empty stand-in file: resolving inputs reads names, never voxels."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def listing(cases) -> list:
    return [(c.case_id, {i: p.name for i, p in c.files.items()}) for c in cases]


@pytest.fixture
def dataset(tmp_path) -> Path:
    """Dataset002_Order: channels FLAIR (0), T1w (1); imagesTr a (both), b (T1 only), label-only c; imagesTs x."""
    root = tmp_path / "Dataset002_Order"
    write_dataset_json(root, ["FLAIR", "T1w"], {"background": 0, "lesion": 1}, num_training=3)
    for name in ("a_0000", "a_0001", "b_0001"):
        touch(root / "imagesTr" / f"{name}.nii.gz")
    for name in ("a", "c"):
        touch(root / "labelsTr" / f"{name}.nii.gz")
    touch(root / "imagesTs" / "x_0000.nii.gz")
    return root


def test_a_single_file_is_one_case(tmp_path):
    scan = touch(tmp_path / "scans" / "scan.nii.gz")
    assert listing(resolve_inputs(scan)) == [("scan", {0: "scan.nii.gz"})]
    channel_file = touch(tmp_path / "BRATS_001_0002.nii")
    (case,) = resolve_inputs(channel_file)
    assert (case.case_id, case.files, case.channel_names, case.label) == ("BRATS_001", {2: channel_file}, {}, None)
    with pytest.raises(InputError, match=r"^--input .*notes\.txt is not a NIfTI file \(\.nii or \.nii\.gz\)\.$"):
        resolve_inputs(touch(tmp_path / "notes.txt"))
    with pytest.raises(InputError, match=r"^--input .*nowhere does not exist\.$"):
        resolve_inputs(tmp_path / "nowhere")


def test_a_folder_groups_channel_files_by_case(tmp_path):
    folder = tmp_path / "scans"
    for name in ("b_0000.nii.gz", "a_0001.nii.gz", "a_0000.nii", "scan.nii.gz", "notes.txt", ".tmp_a.nii.gz"):
        touch(folder / name)
    (folder / "sub_0000.nii.gz").mkdir()  # a folder, not an image
    expected = [("a", {0: "a_0000.nii", 1: "a_0001.nii.gz"}), ("b", {0: "b_0000.nii.gz"}), ("scan", {0: "scan.nii.gz"})]
    assert listing(resolve_inputs(folder)) == expected
    assert listing(resolve_inputs(folder, cases=["scan", "a"])) == [expected[0], expected[2]]
    with pytest.raises(InputError, match=r"^--cases q, z: not among the 3 case\(s\) of .*scans\.$"):
        resolve_inputs(folder, cases=["a", "z", "q"])
    touch(folder / "a_0000.nii.gz")
    with pytest.raises(InputError, match=r"a_0000\.nii\.gz and .*a_0000\.nii are both channel 0 of case a in scans\.$"):
        resolve_inputs(folder)
    (tmp_path / "empty").mkdir()
    touch(tmp_path / "empty" / "readme.md")
    with pytest.raises(InputError, match=r"^--input .*empty: no NIfTI image \(\.nii or \.nii\.gz\) found in"):
        resolve_inputs(tmp_path / "empty")


def test_a_dataset_folder_reads_images_of_the_split(dataset):
    cases = resolve_inputs(dataset, split="Tr")
    assert listing(cases) == [("a", {0: "a_0000.nii.gz", 1: "a_0001.nii.gz"}), ("b", {1: "b_0001.nii.gz"})]
    a, b = cases
    assert a.channel_names == {0: "FLAIR", 1: "T1"} and a.dataset == "Dataset002_Order"
    assert a.label == dataset / "labelsTr" / "a.nii.gz" and b.label is None and a.label_values == (0, 1)
    assert listing(resolve_inputs(dataset)) == [("x", {0: "x_0000.nii.gz"})]  # default: imagesTs
    with pytest.raises(InputError, match=r"^--cases c: not among the 2 case\(s\) of .*imagesTr\.$"):
        resolve_inputs(dataset, split="Tr", cases=["c"])  # a label without images is nothing to predict


def test_a_dataset_without_the_split_folder_names_the_other(dataset):
    for path in (dataset / "imagesTs").iterdir():
        path.unlink()
    (dataset / "imagesTs").rmdir()
    with pytest.raises(InputError, match=r"the dataset has no imagesTs folder; pass --split Tr for imagesTr\.$"):
        resolve_inputs(dataset, split="Ts")


def test_images_match_the_models_modalities_by_name_in_a_dataset_and_by_index_elsewhere(dataset, tmp_path):
    a, b = resolve_inputs(dataset, split="Tr")
    images = dataset / "imagesTr"
    # dataset.json orders FLAIR before T1; the model's order wins, and DWI (not in the dataset) is missing
    assert a.images(["T1w", "FLAIR", "DWI"]) == {"T1": images / "a_0001.nii.gz", "FLAIR": images / "a_0000.nii.gz",
                                                  "DWI": None}  # fmt: skip
    assert b.images(["T1", "FLAIR"]) == {"T1": images / "b_0001.nii.gz", "FLAIR": None}
    case = b.as_case(["T1", "FLAIR"])
    assert (case.case_id, case.images, case.missing) == ("b", {"T1": str(images / "b_0001.nii.gz"), "FLAIR": None},
                                                         ["FLAIR"])  # fmt: skip
    assert a.as_case(["T1"]).label == str(dataset / "labelsTr" / "a.nii.gz")

    folder = tmp_path / "plain"
    touch(folder / "p_0000.nii.gz")
    touch(folder / "p_0002.nii.gz")
    (p,) = resolve_inputs(folder)
    assert p.images(["T1", "T2", "FLAIR"]) == {"T1": folder / "p_0000.nii.gz", "T2": None,
                                                "FLAIR": folder / "p_0002.nii.gz"}  # fmt: skip
    with pytest.raises(InputError, match=r"p_0002\.nii\.gz: channel 0002 has no modality; the model takes 2 "
                                         r"channel\(s\), T1 FLAIR \(files CASE_0000 to CASE_0001\)\.$"):  # fmt: skip
        p.images(["T1", "FLAIR"])


def test_input_args_check_the_output_folder_before_work(dataset, tmp_path):
    parser = make_parser("predict")
    add_input_args(parser)
    args = parser.parse_args(["--input", str(dataset), "--output", str(tmp_path / "preds"), "--split", "Tr"])
    assert [c.case_id for c in inputs_from_args(args)] == ["a", "b"]
    assert parser.parse_args(["--input", "x", "--output", "y"]).split == "Ts"
    touch(tmp_path / "preds.nii.gz")
    args.output = str(tmp_path / "preds.nii.gz")
    with pytest.raises(InputError, match=r"^--output .*preds\.nii\.gz is a file, expected a folder\.$"):
        inputs_from_args(args)
    args.output = str(dataset / "imagesTr")
    with pytest.raises(InputError, match=r"^--output .*imagesTr is a folder of the input images; pick another"):
        inputs_from_args(args)


# ----------------------------------------------------------------------------- evaluate subsets


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


def test_selected_cases_from_cases_or_a_run_split(tmp_path):
    assert selected_cases() is None
    assert selected_cases(["b", "a", "b"]) == ["b", "a"]
    one = write_json(tmp_path / "split.json", {"Dataset001_X": {"train": ["a", "b"], "val": ["c"]}})
    assert selected_cases(split=one) == ["c"]
    assert selected_cases(split=one, subset="train", dataset="Dataset001_X") == ["a", "b"]
    with pytest.raises(InputError, match=r"split\.json holds the splits of Dataset001_X, not of Dataset009_Y\.$"):
        selected_cases(split=one, dataset="Dataset009_Y")
    two = write_json(tmp_path / "two.json", {"A": {"train": [], "val": ["a1"]}, "B": {"train": ["b1"], "val": []}})
    assert selected_cases(split=two, dataset="A") == ["a1"]
    with pytest.raises(InputError, match=r"holds the splits of several datasets \(A, B\)"):
        selected_cases(split=two)
    with pytest.raises(InputError, match=r"^--split .*two\.json lists no val case\.$"):
        selected_cases(split=two, dataset="B")
    with pytest.raises(InputError, match=r"^give --cases or --split, not both\.$"):
        selected_cases(["a"], one)
    with pytest.raises(InputError, match=r"^--fold 1: .*split\.json is a split\.json of a training run"):
        selected_cases(split=one, fold=1)
    with pytest.raises(InputError, match=r"^--fold selects a fold of --split FILE, which is not given\.$"):
        selected_cases(fold=0)


def test_selected_cases_from_nnunet_splits_final(tmp_path):
    folds = write_json(tmp_path / "splits_final.json", [{"train": ["a", "b"], "val": ["c"]},
                                                        {"train": ["a", "c"], "val": ["b"]}])  # fmt: skip
    assert selected_cases(split=folds, fold=1) == ["b"]
    assert selected_cases(split=folds, fold=0, subset="train", dataset="any name") == ["a", "b"]
    with pytest.raises(
        InputError, match=r"splits_final\.json is an nnU-Net splits_final\.json of 2 folds; pass --fold"
    ):
        selected_cases(split=folds)
    with pytest.raises(InputError, match=r"^--fold 2: .*splits_final\.json holds folds 0 to 1\.$"):
        selected_cases(split=folds, fold=2)


def test_selected_cases_refuses_unreadable_split_files(tmp_path):
    with pytest.raises(InputError, match=r"^--split .*missing\.json: file not found\.$"):
        selected_cases(split=tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(InputError, match=r"^--split .*bad\.json: not a readable JSON split file"):
        selected_cases(split=tmp_path / "bad.json")
    bad_ids = write_json(tmp_path / "ids.json", {"A": {"train": [], "val": [1, 2]}})
    with pytest.raises(InputError, match=r"ids\.json \[A\] val must be a list of case ids\.$"):
        selected_cases(split=bad_ids)
    no_val = write_json(tmp_path / "noval.json", {"A": {"train": ["a"]}})
    with pytest.raises(InputError, match=r'noval\.json \[A\]: expected \{"train": \[\.\.\.\], "val": \[\.\.\.\]\}\.$'):
        selected_cases(split=no_val)


def test_subset_args_are_exclusive_and_parse(capsys):
    parser = make_parser("evaluate")
    add_subset_args(parser)
    args = parser.parse_args(["--split", "s.json", "--fold", "2", "--subset", "train"])
    assert (args.cases, args.split, args.fold, args.subset) == (None, "s.json", 2, "train")
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--cases", "a", "--split", "s.json"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: --split: not allowed with argument --cases.\n"
