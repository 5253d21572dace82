"""shared.cli conventions: one-line parse errors, defaults in --help, validators, output checks, run_cli exit codes;
pytest -q tests/test_shared_cli.py"""

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from shared.cli import (
    check_output_dir,
    check_output_file,
    fold_count,
    fold_index,
    fraction,
    make_parser,
    non_negative_float,
    non_negative_int,
    overlap_fraction,
    positive_float,
    positive_int,
    probability,
    read_json_file,
    run_cli,
)
from shared.errors import InputError, short_list

REPO = Path(__file__).resolve().parents[1]
DESCRIPTION = """Train a tiny thing.

    python -m tiny --lr 0.1 --out runs/x
"""


def tiny_parser() -> argparse.ArgumentParser:
    parser = make_parser(DESCRIPTION, prog="tiny")
    parser.add_argument("--lr", type=positive_float, default=1e-2, help="learning rate")
    parser.add_argument("--features", type=positive_int, nargs="+", default=[32, 64], help="widths")
    parser.add_argument("--dropout", type=probability, default=0.0, help="dropout rate")
    parser.add_argument("--patch", type=int, nargs=3, help="tile (default: the training patch)")
    parser.add_argument("--stop-after", type=positive_int, help="stop early")
    parser.add_argument("--mode", choices=["a", "b"], default="a", help="mode, 100%% sure")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True, help="mixed precision")
    parser.add_argument("--out", required=True, help="run folder")
    return parser


def test_help_keeps_the_description_and_shows_every_default():
    text = " ".join(tiny_parser().format_help().split("\n\n", 1)[1].split())  # description and flags, unwrapped
    assert "Train a tiny thing.\n\n    python -m tiny --lr 0.1 --out runs/x" in tiny_parser().format_help()
    assert "learning rate (default: 0.01)" in text
    assert "widths (default: 32 64)" in text
    assert "dropout rate (default: 0.0)" in text
    assert "mode, 100% sure (default: a)" in text
    assert "mixed precision (default: True)" in text
    assert "(default: the training patch)" in text and "(default: None)" not in text
    assert "stop early --mode" in text  # None means "not given": no default shown
    assert "run folder (default" not in text  # a required flag has no default


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--lr", "0"], "error: --lr: must be a positive number, got 0."),
        (["--lr", "x"], "error: --lr: expected a number, got 'x'."),
        (["--features", "32", "0"], "error: --features: must be a positive integer, got 0."),
        (["--dropout", "2"], "error: --dropout: must be a probability in [0, 1], got 2."),
        (["--bogus"], "error: the following arguments are required: --out."),
        (["--out", "o", "--bogus", "1"], "error: unrecognized arguments: --bogus 1."),
        (["--out", "o", "--mode", "c"], "error: --mode: invalid choice: 'c' (choose from 'a', 'b')."),
    ],
)
def test_parse_errors_are_one_line_and_exit_2(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        tiny_parser().parse_args(argv)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == message + "\n"


def test_valid_flags_parse_to_numbers():
    args = tiny_parser().parse_args(["--out", "o", "--lr", "1e-3", "--features", "8", "16", "--dropout", "1"])
    assert (args.lr, args.features, args.dropout, args.out) == (1e-3, [8, 16], 1.0, "o")


@pytest.mark.parametrize(
    "validator, good, bad",
    [
        (positive_int, {"1": 1, "320": 320}, ["0", "-3", "1.5", "two"]),
        (non_negative_int, {"0": 0, "7": 7}, ["-1", "0.5"]),
        (positive_float, {"1e-5": 1e-5, "3": 3.0}, ["0", "-0.1", "nan", "inf"]),
        (non_negative_float, {"0": 0.0, "3e-5": 3e-5}, ["-1", "-1e-9", "nan", "-inf"]),
        (probability, {"0": 0.0, "1": 1.0, "0.25": 0.25}, ["1.5", "-0.1", "nan"]),
        (fraction, {"1": 1.0, "0.1": 0.1}, ["0", "1.01", "-1"]),
        (overlap_fraction, {"0": 0.0, "0.5": 0.5}, ["1", "-0.5"]),
        (fold_index, {"-1": -1, "0": 0, "4": 4}, ["-2", "0.5"]),
        (fold_count, {"2": 2, "10": 10}, ["1", "0", "2.5"]),
    ],
)
def test_validators_accept_and_refuse(validator, good, bad):
    for text, value in good.items():
        assert validator(text) == value and type(validator(text)) is type(value)
    for text in bad:
        with pytest.raises(argparse.ArgumentTypeError):
            validator(text)


def test_read_json_file_refuses_in_one_sentence(tmp_path):
    (tmp_path / "good.json").write_text('{"a": [1, 2]}')
    assert read_json_file(tmp_path / "good.json", "--prompts", "JSON prompt file") == {"a": [1, 2]}
    with pytest.raises(InputError, match=r"^--plans .*nope\.json: file not found\.$"):
        read_json_file(tmp_path / "nope.json", "--plans", "plans.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(InputError, match=r"^--plans .*bad\.json: not a readable plans\.json \(Expecting .*\)\.$"):
        read_json_file(tmp_path / "bad.json", "--plans", "plans.json")
    (tmp_path / "binary.json").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(InputError, match=r"^--split .*binary\.json: not a readable JSON split file \(.*codec"):
        read_json_file(tmp_path / "binary.json", "--split", "JSON split file")
    with pytest.raises(InputError, match=r"^--split .*: not a readable JSON split file \(.*Is a directory"):
        read_json_file(tmp_path, "--split", "JSON split file")


def test_output_file_checks(tmp_path):
    assert check_output_file(tmp_path / "new" / "m.csv", "--out", suffixes=(".csv",)) == tmp_path / "new" / "m.csv"
    (tmp_path / "existing.csv").write_text("old")
    check_output_file(tmp_path / "existing.csv", "--out", suffixes=(".csv",))  # replaced at the end: fine
    (tmp_path / "folder.csv").mkdir()
    with pytest.raises(InputError, match=r"^--out .*folder\.csv is a folder; give a file name ending in \.csv\.$"):
        check_output_file(tmp_path / "folder.csv", "--out", suffixes=(".csv",))
    with pytest.raises(InputError, match=r"^--out .*m\.txt: file name must end in \.csv\.$"):
        check_output_file(tmp_path / "m.txt", "--out", suffixes=(".csv",))
    with pytest.raises(InputError, match=r"^--output .*mask: file name must end in \.nii\.gz or \.nii\.$"):
        check_output_file(tmp_path / "mask", "--output", suffixes=(".nii.gz", ".nii"))
    with pytest.raises(InputError, match=r"existing\.csv is a file, so nothing can be written below it\.$"):
        check_output_file(tmp_path / "existing.csv" / "deeper" / "m.csv", "--out")


def test_output_dir_checks(tmp_path):
    assert check_output_dir(tmp_path / "preds", "--output") == tmp_path / "preds"
    assert not (tmp_path / "preds").exists()  # checked, not created
    (tmp_path / "preds.nii.gz").write_bytes(b"x")
    with pytest.raises(InputError, match=r"^--output .*preds\.nii\.gz is a file, expected a folder\.$"):
        check_output_dir(tmp_path / "preds.nii.gz", "--output")
    with pytest.raises(InputError, match=r"preds\.nii\.gz is a file, so nothing can be written below it\.$"):
        check_output_dir(tmp_path / "preds.nii.gz" / "sub", "--output")


def test_run_cli_exit_codes_and_messages(capsys):
    def bad_input():
        raise InputError("--data x: no dataset.json found.")

    def nan_loss():
        raise FloatingPointError("loss is NaN at step 3; no checkpoint written yet.")

    for main, code, message in ((bad_input, 2, "--data x: no dataset.json found."),
                                (nan_loss, 3, "loss is NaN at step 3; no checkpoint written yet.")):  # fmt: skip
        with pytest.raises(SystemExit) as exit_info:
            run_cli(main)
        assert exit_info.value.code == code
        assert capsys.readouterr().err == f"error: {message}\n"


def test_short_list_sorts_and_cuts_after_ten_names():
    assert short_list(["c", "a", 2]) == "2, a, c"
    assert short_list(f"c{i:02d}" for i in range(12)) == ", ".join(f"c{i:02d}" for i in range(10)) + " and 2 more"
    assert short_list([]) == ""


def test_run_cli_leaves_the_process_group_after_main(monkeypatch):
    import torch.distributed  # noqa: F401  (a training CLI has imported it)

    from shared import harness

    calls = []
    monkeypatch.setattr(harness, "cleanup_distributed", lambda: calls.append("cleanup"))
    run_cli(lambda: calls.append("main"))
    assert calls == ["main", "cleanup"]


def test_run_cli_does_not_load_torch_for_cli_that_never_did():
    code = "import sys; from shared.cli import run_cli; run_cli(lambda: None); print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_errors_module_depends_on_nothing_of_the_project():
    listed = "sorted(m for m in sys.modules if 'shared.' in m)"
    code = f"import sys, shared.errors as e; print(hasattr(e, 'run_cli'), {listed})"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False ['shared.errors']"
