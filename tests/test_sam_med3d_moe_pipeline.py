"""SAM-Med3D-MoE end to end on tiny phantoms: general -> expert -> gate (exact resume) -> predict (one image, or a
folder with a JSON file of prompt sets) -> evaluate, the official-checkpoint converter, and bad input refused
in one sentence (flags, resume with other flags, a plain state_dict where a run is expected).

Run: pytest tests/test_sam_med3d_moe_pipeline.py
"""

import argparse
import csv
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from sam_med3d_moe import convert_checkpoint, evaluate, finetune_expert, predict, train, train_gate
from sam_med3d_moe.config import config_by_name
from sam_med3d_moe.model import build_model
from shared.checkpoint import load_checkpoint, save_checkpoint
from shared.errors import InputError
from shared.phantom import write_phantom_datasets

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "--folds",
    "4",
    "--fold",
    "0",
    "--num-clicks",
    "3",
    "--batch-size",
    "1",
    "--device",
    "cpu",
    "--save-every",
    "1",
    "--spacing",
    "1.5",
    "--workers",
    "0",
]


pytestmark = pytest.mark.usefixtures("cache_root")  # tests/conftest.py: caches in a temporary folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache_root):
    """Tiny general model, lesion expert and MoE (2 steps each) on 4-case 24^3 phantoms."""
    root = tmp_path_factory.mktemp("sam_med3d_moe")
    anatomy, tumour = (
        str(d)
        for d in write_phantom_datasets(
            root / "data", datasets=["anatomy", "tumour"], cases=4, shape=(24, 24, 24), seed=2
        )
    )
    general, expert, moe = root / "general", root / "expert", root / "moe"
    train.main(
        ["--data", anatomy, "--modalities", "T1", "--config", "tiny", "--steps", "2", "--out", str(general), *TINY]
    )
    finetune_expert.main(
        [
            "--general",
            str(general / "checkpoint.pt"),
            "--data",
            tumour,
            "--modalities",
            "FLAIR",
            "--union",
            "--steps",
            "2",
            "--out",
            str(expert),
            *TINY,
        ]
    )
    gate = [
        "--general",
        str(general / "checkpoint.pt"),
        "--experts",
        str(expert / "checkpoint.pt"),
        "--data",
        anatomy,
        tumour,
        "--modalities",
        "T1",
        "FLAIR",
        "--union",
        tumour,
        "--gate-lr",
        "1e-3",
        "--steps",
        "2",
        *TINY,
    ]
    train_gate.main([*gate, "--out", str(moe)])
    return {
        "root": root,
        "anatomy": anatomy,
        "tumour": tumour,
        "general": general,
        "expert": expert,
        "moe": moe,
        "gate_args": gate,
    }


def test_expert_changes_only_the_decoder_and_moe_keeps_the_general_model(runs):
    general = load_checkpoint(runs["general"] / "checkpoint.pt", expect_kind="sam_med3d")["model"]
    expert = load_checkpoint(runs["expert"] / "checkpoint.pt", expect_kind="sam_med3d_expert")
    moe = load_checkpoint(runs["moe"] / "checkpoint.pt", expect_kind="sam_med3d_moe")["model"]
    assert expert["config"]["task"] == Path(runs["tumour"]).name
    changed = {k for k, v in general.items() if not torch.equal(v, expert["model"][k])}
    # frozen encoders, trained decoder; the IoU head is outside every loss (as officially), so it gets no gradient
    assert changed and all(k.startswith("mask_decoder.") for k in changed)
    assert "mask_decoder.transformer.layers.0.mlp.lin1.weight" in changed
    assert not any(k.startswith("mask_decoder.iou_prediction_head") for k in changed)
    assert all(torch.equal(v, moe[f"sam.{k}"]) for k, v in general.items())  # the general expert is never updated
    # default --expert-lr 0: the MoE's expert is bit-identical to the expert run (the FT-expert row of Table 1)
    decoder = {k[len("mask_decoder.") :]: v for k, v in expert["model"].items() if k.startswith("mask_decoder.")}
    assert decoder and all(torch.equal(v, moe[f"experts.0.{k}"]) for k, v in decoder.items())


def test_gate_training_with_expert_lr_trains_the_expert_decoder_only(runs, tmp_path):
    # --tau 0: the selector uses the expert at every click, so it is stepped at every step
    train_gate.main([*runs["gate_args"], "--expert-lr", "1e-4", "--tau", "0", "--out", str(tmp_path / "moe_lr")])
    expert = load_checkpoint(runs["expert"] / "checkpoint.pt")["model"]
    frozen = load_checkpoint(runs["moe"] / "checkpoint.pt")["model"]
    trained = load_checkpoint(tmp_path / "moe_lr" / "checkpoint.pt")["model"]
    changed = {k for k, v in trained.items() if not torch.equal(v, frozen[k])}
    assert any(k.startswith("experts.0.") for k in changed)
    assert all(k.startswith(("experts.0.", "gate.")) for k in changed)  # nothing else than the expert and gate
    decoder = {k[len("mask_decoder.") :]: v for k, v in expert.items() if k.startswith("mask_decoder.")}
    assert not all(torch.equal(v, trained[f"experts.0.{k}"]) for k, v in decoder.items())


def test_assemble_refuses_an_expert_fine_tuned_from_another_general_model(runs, tmp_path):
    other = tmp_path / "other_general.pt"
    save_checkpoint(other, **build_model(config_by_name("tiny")).state_dict())
    with pytest.raises(InputError, match="was not fine-tuned from --general"):
        train_gate.assemble(other, [runs["expert"] / "checkpoint.pt"], "tiny", 0.5, "weighted")


def test_per_class_expert_and_the_gate_targets_of_its_classes(runs, tmp_path, monkeypatch):
    # an expert fine-tuned on label 2 of the anatomy only; with the lesion expert in the MoE, the gate target of
    # an anatomy label-2 target is 2, of the tumour's union targets 1, of any other anatomy label 0
    weak = tmp_path / "expert_label2"
    finetune_expert.main(
        ["--general", str(runs["general"] / "checkpoint.pt"), "--data", runs["anatomy"], "--modalities", "T1",
         "--labels", "2", "--steps", "1", "--out", str(weak), *TINY]
    )  # fmt: skip
    ckpt = load_checkpoint(weak / "checkpoint.pt")
    anatomy, tumour = Path(runs["anatomy"]).name, Path(runs["tumour"]).name
    assert ckpt["config"]["expert_task"] == {"datasets": [anatomy], "labels": [2]}
    assert ckpt["config"]["task"] == f"{anatomy}:labels2"
    seen, drawn, gate_targets = [], [], []
    prepare, stream = train_gate.prepare_data, train_gate.batches

    def recording_prepare(*a, **k):
        entries, targets = prepare(*a, **k)
        seen.extend(targets)
        return entries, targets

    def recording_batches(*a, **k):
        for batch in stream(*a, **k):
            drawn.extend(batch["target"].tolist())
            yield batch

    def recording_loss(logits, target):
        gate_targets.append(target.tolist())
        return torch.nn.functional.cross_entropy(logits, target)

    monkeypatch.setattr(train_gate, "prepare_data", recording_prepare)
    monkeypatch.setattr(train_gate, "batches", recording_batches)
    monkeypatch.setattr(train_gate, "gate_loss", recording_loss)
    args = list(runs["gate_args"])
    args[args.index("--experts") + 1 : args.index("--experts") + 2] = [str(runs["expert"] / "checkpoint.pt"),
                                                                      str(weak / "checkpoint.pt")]  # fmt: skip
    args[args.index("--steps") + 1] = "6"
    train_gate.main([*args, "--batch-size", "2", "--out", str(tmp_path / "moe2")])
    rule = {(tumour, None): 1, (anatomy, 2): 2}
    want = [rule.get((seen[i].dataset, seen[i].label), 0) for i in drawn]
    per_step = [gate_targets[i * 3] for i in range(6)]  # 3 interaction steps (--num-clicks) share one target
    assert [t for step in per_step for t in step] == want
    assert set(want) == {0, 1, 2}  # all three kinds of target were drawn
    saved = load_checkpoint(tmp_path / "moe2" / "checkpoint.pt")["config"]
    assert saved["expert_tasks"][1] == {"datasets": [anatomy], "labels": [2]}


def test_gate_training_resumes_exactly_with_loader_workers(runs, tmp_path):
    # the fixture's run had no loader worker; here step 1 runs with 2 workers, then --resume with 1
    train_gate.main([*runs["gate_args"], "--out", str(tmp_path / "resumed"), "--stop-after", "1", "--workers", "2"])
    train_gate.main([*runs["gate_args"], "--out", str(tmp_path / "resumed"), "--resume", "--workers", "1"])
    straight = load_checkpoint(runs["moe"] / "checkpoint.pt")["model"]
    resumed = load_checkpoint(tmp_path / "resumed" / "checkpoint.pt")["model"]
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_predict_writes_a_mask_in_the_input_grid(runs, tmp_path):
    image = sorted(Path(runs["tumour"], "imagesTr").glob("*_0003.nii.gz"))[0]
    label = Path(runs["tumour"], "labelsTr", image.name.replace("_0003", ""))
    model = str(runs["moe"] / "checkpoint.pt")
    for name, prompt in (
        ("point", ["--point", "12", "12", "12", "--point", "10", "12", "12"]),
        ("negative_ct", ["--point", "12", "12", "12", "--negative", "3", "3", "3", "--ct-clamp"]),
        ("box", ["--box", "6", "6", "6", "18", "18", "18"]),
        ("label", ["--label", str(label), "--clicks", "2"]),
    ):
        out = tmp_path / f"{name}.nii.gz"
        predict.main(["--model", model, "--image", str(image), "--output", str(out), "--device", "cpu", *prompt])
        written, ref = nib.load(out), nib.load(image)
        assert written.shape == ref.shape and np.allclose(written.affine, ref.affine)
        assert set(np.unique(np.asarray(written.dataobj))) <= {0, 1}


def test_evaluate_reports_clicks_max_and_box(runs, tmp_path):
    args = evaluate.parse_args(
        [
            "--model",
            str(runs["expert"] / "checkpoint.pt"),
            "--data",
            runs["tumour"],
            "--split",
            str(runs["moe"] / "split.json"),
            "--modalities",
            "FLAIR",
            "--union",
            "--clicks",
            "2",
            "--box",
            "--out",
            str(tmp_path),
            "--name",
            "expert",
            "--device",
            "cpu",
        ]
    )
    result = evaluate.evaluate(args)
    row = result["summary"][0]
    assert row["targets"] == 1 and row["label"] == "union"
    wanted = {"dice_click1", "dice_click2", "dice_max_over_clicks", "dice_native", "nsd_native", "dice_box",
              "dice_box_native", "nsd_box_native"}  # fmt: skip
    assert wanted <= set(row) and all(0 <= row[k] <= 1 for k in wanted)
    # one target: its max over the clicks is the larger of its two click values
    assert row["dice_max_over_clicks"] == pytest.approx(max(row["dice_click1"], row["dice_click2"]), abs=1e-5)
    # the expert's own task (the tumour's union targets) makes them the fine-tuned classes of Table 1
    assert [r["classes"] for r in result["table1"]] == ["fine-tuned"] and result["routing"] == []
    assert {p.name for p in tmp_path.iterdir()} == {"expert_targets.csv", "expert_summary.csv", "expert_table1.csv"}


def test_evaluate_an_moe_with_routing_and_selector_overrides(runs, tmp_path):
    # frozen experts (default --expert-lr 0): "--selector general" must score exactly as the general model and
    # "--selector top1 --tau 0" exactly as the expert run; the routing CSV splits clicks from boxes
    def run(model, name, *extra):
        args = evaluate.parse_args(
            ["--model", str(runs[model] / "checkpoint.pt"), "--data", runs["anatomy"], runs["tumour"], "--split",
             str(runs["moe"] / "split.json"), "--modalities", "T1", "FLAIR", "--union", Path(runs["tumour"]).name,
             "--clicks", "2", "--box", "--finetuned-from", str(runs["moe"] / "checkpoint.pt"), "--out",
             str(tmp_path), "--name", name, "--device", "cpu", *extra]
        )  # fmt: skip
        result = evaluate.evaluate(args)
        with open(tmp_path / f"{name}_targets.csv") as f:
            result["targets"] = list(csv.DictReader(f))
        return result

    general, expert = run("general", "general"), run("expert", "expert")
    as_general = run("moe", "moe_general", "--selector", "general", "--tau", "0")  # tau 0: s_top > tau always
    as_expert = run("moe", "moe_top1", "--selector", "top1", "--tau", "0")
    metrics = [k for k in general["targets"][0] if k.startswith(("dice", "nsd"))]
    for want, got in ((general, as_general), (expert, as_expert)):
        assert [r["target"] for r in got["targets"]] == [r["target"] for r in want["targets"]]
        for a, b in zip(want["targets"], got["targets"]):
            assert all(float(a[m]) == pytest.approx(float(b[m]), abs=1e-4) for m in metrics), a["target"]
    assert not all(a[m] == b[m] for a, b in zip(general["targets"], expert["targets"]) for m in metrics)
    n_lesion = sum(r["dataset"] == Path(runs["tumour"]).name for r in general["targets"])
    assert [(r["classes"], r["targets"]) for r in general["table1"]] == [
        ("fine-tuned", n_lesion), ("other", len(general["targets"]) - n_lesion)
    ]  # fmt: skip
    share = [k for k in as_general["routing"][0] if k.startswith("share_") and k != "share_general"]
    assert len(share) == 1
    per_class = {(r["dataset"], r["label"]) for r in general["targets"]}
    for result, to_expert in ((as_general, 0.0), (as_expert, 1.0)):
        rows = result["routing"]
        assert {(r["dataset"], r["label"], r["prompt"]) for r in rows} == {(*c, p) for c in per_class
                                                                         for p in ("click", "box")}  # fmt: skip
        for r in rows:
            targets = sum((t["dataset"], t["label"]) == (r["dataset"], r["label"]) for t in general["targets"])
            assert r["prompts"] == targets * (2 if r["prompt"] == "click" else 1)
            assert r["share_general"] == 1 - to_expert and r[share[0]] == to_expert
            assert r["accuracy"] == (to_expert if r["expected"] != "general" else 1 - to_expert)
    assert (tmp_path / "moe_top1_routing.csv").exists() and not (tmp_path / "general_routing.csv").exists()


def test_box_prompts_only_from_trained_box_embeddings(runs, tmp_path):
    image = sorted(Path(runs["tumour"], "imagesTr").glob("*_0003.nii.gz"))[0]
    box = ["--box", "6", "6", "6", "18", "18", "18"]

    def predict_box(model, out, *extra):
        predict.main(
            ["--model", str(model), "--image", str(image), "--output", str(out), "--device", "cpu", *box, *extra]
        )
        return np.asarray(nib.load(out).dataobj)

    # the general run and the MoE trained boxes (--box-prob 0.5): recorded, per decoder in the MoE
    assert load_checkpoint(runs["general"] / "checkpoint.pt")["box_trained"] is True
    assert load_checkpoint(runs["moe"] / "checkpoint.pt")["box_trained"] == {"general": True, "experts": [True]}
    # a run with --box-prob 0 records untrained boxes, and predict refuses its --box in one sentence
    no_box = tmp_path / "no_box"
    train.main(["--data", runs["anatomy"], "--modalities", "T1", "--config", "tiny", "--steps", "1", "--box-prob",
                "0", "--out", str(no_box), *TINY])  # fmt: skip
    assert load_checkpoint(no_box / "checkpoint.pt")["box_trained"] is False
    with pytest.raises(InputError, match="never trained its box embeddings"):
        predict_box(no_box / "checkpoint.pt", tmp_path / "refused.nii.gz")
    assert not (tmp_path / "refused.nii.gz").exists()
    # a plain state_dict (official weights have no box embeddings): refused, or seeded with the explicit flag
    plain = tmp_path / "plain.pt"
    weights = load_checkpoint(runs["general"] / "checkpoint.pt")["model"]
    save_checkpoint(plain, **{k: v for k, v in weights.items() if "box_corner" not in k})
    with pytest.raises(InputError, match="plain state_dict"):
        predict_box(plain, tmp_path / "refused.nii.gz", "--config", "tiny")
    first = predict_box(plain, tmp_path / "a.nii.gz", "--config", "tiny", "--allow-untrained-box")
    again = predict_box(plain, tmp_path / "b.nii.gz", "--config", "tiny", "--allow-untrained-box")
    assert np.array_equal(first, again)  # every fresh initialisation in predict is seeded


def test_converter_needs_the_trust_flag_and_writes_a_plain_state_dict(tmp_path):
    weights = build_model(config_by_name("tiny", box_prompts=False)).state_dict()
    official = tmp_path / "official.pth"
    torch.save(
        {
            "epoch": 3,
            "model_state_dict": {f"module.{k}": v for k, v in weights.items()},
            "args": argparse.Namespace(lr=8e-4),
        },
        official,
    )
    out = tmp_path / "plain.pt"
    with pytest.raises(InputError, match="--trust-pickle"):
        convert_checkpoint.main(["--input", str(official), "--output", str(out), "--config", "tiny"])
    assert not out.exists()
    convert_checkpoint.main(["--input", str(official), "--output", str(out), "--config", "tiny", "--trust-pickle"])
    plain = torch.load(out, map_location="cpu", weights_only=True)
    assert set(plain) == set(weights) and all(torch.equal(plain[k], weights[k]) for k in weights)
    with pytest.raises(InputError, match="do not fit"):
        convert_checkpoint.main(["--input", str(official), "--output", str(tmp_path / "x.pt"), "--trust-pickle"])


def test_cli_errors_are_one_sentence_and_exit_2(runs, tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "sam_med3d_moe.predict",
        "--model",
        str(runs["moe"] / "checkpoint.pt"),
        "--image",
        str(tmp_path / "missing.nii.gz"),
        "--output",
        str(tmp_path / "o.nii.gz"),
        "--point",
        "1",
        "2",
        "3",
    ]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 2 and res.stderr.strip().startswith("error:") and "missing.nii.gz" in res.stderr
    with pytest.raises(InputError, match="exactly one kind of prompt"):
        predict.parse_args(["--model", "m", "--image", "i", "--output", "o"])
    image = sorted(Path(runs["tumour"], "imagesTr").glob("*_0003.nii.gz"))[0]
    base = ["--model", str(runs["moe"] / "checkpoint.pt"), "--image", str(image), "--device", "cpu"]
    for prompt, flag in (
        (["--point", "12", "12", "40"], "--point 12 12 40"),
        (["--box", "0", "0", "0", "30", "5", "5"], "--box 0 0 0 30 5 5"),
    ):
        with pytest.raises(InputError, match=f"{flag} lies outside the image"):
            predict.main([*base, "--output", str(tmp_path / "outside.nii.gz"), *prompt])
    assert not (tmp_path / "outside.nii.gz").exists()
    with pytest.raises(InputError, match="already holds checkpoint.pt"):
        train_gate.main([*runs["gate_args"], "--out", str(runs["moe"])])
    with pytest.raises(InputError, match="is a sam_med3d checkpoint, expected sam_med3d_expert"):
        train_gate.main(
            [
                *runs["gate_args"][:2],
                "--experts",
                str(runs["general"] / "checkpoint.pt"),
                *runs["gate_args"][4:],
                "--out",
                str(tmp_path / "bad"),
            ]
        )


def test_predict_a_dataset_from_a_json_file_of_prompt_sets(runs, tmp_path):
    import json

    cases = ["PhantomTumour_000", "PhantomTumour_001"]
    prompts = {cases[0]: [{"name": "lesion", "points": [[12, 12, 12]], "negative": [[2, 2, 2]]},
                          {"box": [6, 6, 6, 18, 18, 18]}],
               cases[1]: [{"name": "lesion", "points": [[11, 12, 13]]}]}  # fmt: skip
    file = tmp_path / "prompts.json"
    file.write_text(json.dumps(prompts))
    out = tmp_path / "preds"
    base = ["--model", str(runs["moe"] / "checkpoint.pt"), "--input", runs["tumour"], "--split", "Tr",
            "--channel", "FLAIR", "--device", "cpu"]  # fmt: skip
    predict.main([*base, "--prompts", str(file), "--output", str(out)])
    written = sorted(p.name for p in out.iterdir())
    assert written == [f"{cases[0]}_lesion.nii.gz", f"{cases[0]}_prompt2.nii.gz", f"{cases[1]}_lesion.nii.gz"]
    ref = nib.load(Path(runs["tumour"], "imagesTr", f"{cases[0]}_0003.nii.gz"))
    assert nib.load(out / written[0]).shape == ref.shape
    # refused before any work, nothing written: a malformed set, an unknown case, a click outside the image
    for bad, message in (
        ({cases[0]: [{"points": [[1, 2]]}]}, r"\[PhantomTumour_000\]\[0\] points\[0\] must be a list of 3 numbers"),
        ({"Nobody": [{"points": [[1, 2, 3]]}]}, "names case\\(s\\) \\['Nobody'\\]"),
        (
            {cases[1]: [{"box": [0, 0, 0, 99, 5, 5]}]},
            r"\[PhantomTumour_001\]\[0\] box 0 0 0 99 5 5 lies outside the image",
        ),
        ({cases[1]: [{"points": [[1, 2, 3]], "box": [0, 0, 0, 5, 5, 5]}]}, "either points .* or a box, not both"),
    ):
        file.write_text(json.dumps(bad))
        with pytest.raises(InputError, match=message):
            predict.main([*base, "--prompts", str(file), "--output", str(tmp_path / "none")])
        assert not (tmp_path / "none").exists()
    file.write_text(json.dumps(prompts))
    with pytest.raises(InputError, match="pick the one to segment with --channel"):
        predict.main([*base[:-4], "--device", "cpu", "--prompts", str(file), "--output", str(tmp_path / "none")])


@pytest.mark.parametrize(
    "cli,flag,value",
    [
        ("train", "--lr", "0"),
        ("train", "--weight-decay", "-1"),
        ("train", "--box-prob", "2"),
        ("train", "--folds", "1"),
        ("train", "--config", "huge"),
        ("gate", "--tau", "1"),
        ("gate", "--gate-lr", "0"),
        ("gate", "--expert-lr", "-1"),
        ("predict", "--spacing", "-1.5"),
        ("predict", "--max-crops", "0"),
    ],
)
def test_bad_flags_are_refused_at_parse_time_in_one_line(runs, tmp_path, capsys, cli, flag, value):
    argv = {
        "train": ["--data", runs["anatomy"], "--out", str(tmp_path / "run")],
        "gate": [*runs["gate_args"], "--out", str(tmp_path / "run")],
        "predict": ["--model", "m.pt", "--image", "i.nii.gz", "--output", "o.nii.gz", "--point", "1", "2", "3"],
    }[cli]
    parse = {"train": train.parse_args, "gate": train_gate.parse_args, "predict": predict.parse_args}[cli]
    with pytest.raises(SystemExit) as exit_info:
        parse([*argv, flag, value])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith(f"error: {flag}: ") and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_resume_only_continues_the_same_run_and_experts_must_be_runs(runs, tmp_path):
    run = tmp_path / "gate"
    train_gate.main([*runs["gate_args"], "--out", str(run), "--stop-after", "1"])
    changed = list(runs["gate_args"])
    changed[changed.index("--gate-lr") + 1] = "1e-2"
    with pytest.raises(InputError, match="--gate-lr: 0.001 -> 0.01"):
        train_gate.main([*changed, "--out", str(run), "--resume"])
    plain = tmp_path / "plain.pt"
    save_checkpoint(plain, **load_checkpoint(runs["expert"] / "checkpoint.pt")["model"])
    with pytest.raises(InputError, match="is a plain state_dict .* pass the checkpoint.pt of a sam_med3d_moe.finetune"):
        train_gate.assemble(runs["general"] / "checkpoint.pt", [plain], "tiny", 0.5, "weighted")
    # another package's run checkpoint is refused by name where a model is expected
    other = tmp_path / "other.pt"
    save_checkpoint(other, kind="mome", model={}, config={})
    image = sorted(Path(runs["tumour"], "imagesTr").glob("*_0003.nii.gz"))[0]
    with pytest.raises(
        InputError, match="is a mome checkpoint, expected sam_med3d or sam_med3d_expert or sam_med3d_moe"
    ):
        predict.main(["--model", str(other), "--image", str(image), "--point", "12", "12", "12", "--output",
                      str(tmp_path / "m.nii.gz"), "--device", "cpu"])  # fmt: skip
