"""The numbers of Novosad et al.'s Tables 1-3 from per-case rows: CScore, mean +- SE, Wilcoxon + Holm, gate statistics.

A row is one scored (model, configuration, case): its DSC, PPV, LTPR, LFPR, lesion volumes, ... (`evaluate.py`).
Rows of several runs under one model name (the folds of a cross-validation) are pooled before anything here is
computed, so the volume correlation Corr of the CScore, the standard errors and the tests see every case once.
"""

from collections import defaultdict

import numpy as np
import torch

from moe_missing.losses import all_codes, coefficient_of_variation
from moe_missing.model import MoEConv3d
from shared.errors import InputError
from shared.evaluate import format_table
from shared.metrics import cscore, volume_correlation
from shared.stats import holm, mean_se, wilcoxon_signed_rank

TESTED = ("dice", "cscore")  # the paper's two metrics (Tables 1-3, Wilcoxon tests)
MEANS = ("ppv", "ltpr", "lfpr", "lesion_f1", "hd95")  # also averaged in table.csv


def config_name(code, modalities) -> str:
    """ "T1+FLAIR" for the code 101 of (T1, T2, FLAIR)."""
    return "+".join(m for m, c in zip(modalities, code) if c)


def code_string(code) -> str:
    """ "101" for the code (1, 0, 1)."""
    return "".join(str(int(c)) for c in code)


# Tables 1-3 of the paper list the configurations in this order (sets of channel names)
PAPER_ROWS = ({"T1"}, {"T2"}, {"FLAIR"}, {"T1", "T2"}, {"T2", "FLAIR"}, {"T1", "FLAIR"}, {"T1", "T2", "FLAIR"})


def table_codes(modalities) -> list[tuple]:
    """The 2^K - 1 codes in the order of the table rows.

    For the paper's channels (T1, T2, FLAIR, in any channel order) its order: T1, T2, FLAIR, T1+T2, T2+FLAIR,
    T1+FLAIR, T1+T2+FLAIR. For other channels: by the number present, then in channel order (`all_codes`).
    """
    codes = [tuple(int(c) for c in code) for code in all_codes(len(modalities)).tolist()]
    if len(modalities) == 3 and set(modalities) == {"T1", "T2", "FLAIR"}:
        codes.sort(key=lambda code: PAPER_ROWS.index({m for m, c in zip(modalities, code) if c}))
    return codes


def config_order(modalities) -> list[str]:
    """The 2^K - 1 configuration names in the order of the table rows (`table_codes`)."""
    return [config_name(code, modalities) for code in table_codes(modalities)]


def pair_key(row: dict) -> tuple:
    """What makes two rows of different models comparable: the same case under the same configuration."""
    return row["config"], row.get("dataset", ""), row["case"]


def add_cscore(rows: list[dict], corr_weight: float = 1 / 4) -> list[dict]:
    """Set "corr" and "cscore" of every row, in place; returns `rows`.

    Corr is the Pearson correlation of predicted and reference lesion volumes across all the cases of one model
    and configuration (pooled over its runs), as the challenge computes it across scans; each case's CScore
    then uses that Corr: DSC/8 + PPV/8 + LTPR/4 + (1 - LFPR)/4 + Corr * corr_weight (`shared.metrics.cscore`).
    """
    groups = defaultdict(list)
    for row in rows:
        groups[(row["model"], row["config"])].append(row)
    for group in groups.values():
        corr = volume_correlation([r["volume_pred"] for r in group], [r["volume_gt"] for r in group])
        for row in group:
            row["corr"] = corr
            row["cscore"] = float(cscore(row["dice"], row["ppv"], row["ltpr"], row["lfpr"], corr, corr_weight))
    return rows


def pooled_sets(rows: list[dict], configs) -> dict[str, list[str]]:
    """The pooled rows of the tables and the configurations each pools, in `configs` order.

    "all": every configuration of `configs`; only a model that scored every one of them gets this row.
    "shared": the configurations every model scored; only when that is fewer than all (a dedicated model among
    the compared ones) and not empty. So no row of a table sets side by side means over different configurations.
    """
    served = [{r["config"] for r in rows if r["model"] == m} for m in dict.fromkeys(r["model"] for r in rows)]
    sets = {"all": list(configs)}
    shared = [c for c in configs if all(c in s for s in served)]
    if shared and len(shared) < len(configs):
        sets["shared"] = shared
    return sets


def summary_table(rows: list[dict], configs) -> list[dict]:
    """Per model, one row per configuration it scored (in `configs` order), then the pooled rows of
    `pooled_sets` it covers ("all", "shared"), each naming the configurations it pools in the column "over".

    Each row: n (configuration, case) pairs, DSC and CScore as mean and standard error, the means of `MEANS`,
    and Corr (a pooled row pools configurations, each with its own Corr: their rows' mean).
    """
    pooled = pooled_sets(rows, configs)
    table = []
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        served = {r["config"] for r in mine}
        groups = [(config, [config]) for config in configs if config in served]
        groups += [(name, over) for name, over in pooled.items() if set(over) <= served]
        for name, over in groups:
            subset = [r for r in mine if r["config"] in over]
            row = {"model": model, "config": name, "n": len(subset)}
            for key in TESTED:
                row[key], row[f"{key}_se"] = mean_se([r[key] for r in subset])
            row |= {key: float(np.mean([r[key] for r in subset])) for key in MEANS}
            row["corr"] = float(np.mean([r["corr"] for r in subset]))
            row["over"] = " ".join(over) if name in pooled else name
            table.append(row)
    return table


def paper_table(table: list[dict], models, configs) -> str:
    """Tables 2-3 of the paper: per configuration, DSC then CScore (x100, mean +- SE), one column per model,
    then the pooled rows of `summary_table`, with a line saying which configurations each pools.

    A model that does not serve a configuration (a dedicated model of another code), or not all the
    configurations a pooled row pools, shows "-".
    """
    by_key = {(r["model"], r["config"]): r for r in table}
    pooled = {r["config"]: r["over"] for r in table if r["config"] in ("all", "shared")}
    lines = []
    for config in [*configs, *[p for p in ("all", "shared") if p in pooled]]:
        row = {"configuration": config}
        for metric, label in (("dice", "DSC"), ("cscore", "CScore")):
            for model in models:
                r = by_key.get((model, config))
                row[f"{label} {model}"] = f"{100 * r[metric]:.2f}+-{100 * r[metric + '_se']:.2f}" if r else "-"
        if any(by_key.get((m, config)) for m in models):
            lines.append(row)
    who = {"all": " (only the models that serve all of them)", "shared": " (the configurations every model serves)"}
    notes = [f"{name}: pooled over {pooled[name].replace(' ', ', ')}" for name in ("all", "shared") if name in pooled]
    if "shared" in pooled:
        notes = [note + who[note.split(":")[0]] for note in notes]
    return "\n".join([format_table(lines), *notes])


def paired_tests(rows: list[dict], ours: str, others) -> list[dict]:
    """Wilcoxon signed-rank tests of `ours` against each other model, Holm-corrected, for DSC and CScore.

    Each test pairs the (configuration, case) rows that both models scored (a dedicated model only its own
    configuration). The Holm correction runs over every test of the returned table (models x metrics): with MD
    and DM and two metrics a family of 4, larger than the paper's single comparison against modality dropout, so
    p_holm is conservative there; the raw p is returned (and printed) beside it.

    Returns:
        one dict per (other model, metric): pairs, mean and median difference ours - other, W, p, p_holm.
    """
    mine = {pair_key(r): r for r in rows if r["model"] == ours}
    if not mine:
        raise InputError(f"--ours {ours}: no scored row of that model.")
    out = []
    for other in others:
        theirs = {pair_key(r): r for r in rows if r["model"] == other}
        keys = sorted(set(mine) & set(theirs))
        for metric in TESTED:
            if not keys:
                out.append({"ours": ours, "other": other, "metric": metric, "pairs": 0, "mean_diff": float("nan"),
                            "median_diff": float("nan"), "statistic": float("nan"), "p": 1.0})  # fmt: skip
                continue
            a = [mine[k][metric] for k in keys]
            b = [theirs[k][metric] for k in keys]
            test = wilcoxon_signed_rank(a, b)
            out.append({"ours": ours, "other": other, "metric": metric, "pairs": len(keys),
                        "mean_diff": float(np.mean(np.subtract(a, b))), "median_diff": test["median_difference"],
                        "statistic": test["statistic"], "p": test["p"]})  # fmt: skip
    for row, adjusted in zip(out, holm([r["p"] for r in out])):
        row["p_holm"] = adjusted
    return out


@torch.no_grad()
def gate_table(model, modalities) -> list[dict]:
    """phi(m) of every MoE layer for every code (noise-free): one row per (layer, code), one column per expert."""
    codes = torch.tensor(table_codes(modalities), dtype=torch.float32)
    table = []
    for name, layer in model.named_modules():
        if not isinstance(layer, MoEConv3d):
            continue
        phi = layer.gate_weights(codes.to(layer.gate.weight.device), noise=False).cpu()
        for code, weights in zip(codes.tolist(), phi.tolist()):
            row = {"layer": name, "config": config_name(code, modalities)}
            row |= {f"expert_{n}": w for n, w in enumerate(weights)}
            table.append(row)
    return table


def gate_specialisation(gates: list[dict]) -> list[dict]:
    """Per MoE layer, how specialised its gates are (the two terms of Eq. (4), on the clean gates).

    specialisation = mean over codes of cv(phi(m)) (0 for uniform gates, sqrt(N - 1) when each code picks one
    expert); balance = cv(mean over codes of phi(m)) (0 when the experts are used equally on average);
    argmax = the expert each code weights most, as "config:expert".
    """
    layers = defaultdict(list)
    for row in gates:
        layers[row["layer"]].append(row)
    out = []
    for layer, rows in layers.items():
        experts = sorted((k for k in rows[0] if k.startswith("expert_")), key=lambda k: int(k.split("_")[1]))
        phi = torch.tensor([[r[k] for k in experts] for r in rows], dtype=torch.float64)  # (codes, N)
        out.append({
            "layer": layer,
            "specialisation": float(coefficient_of_variation(phi, dim=1).mean()),
            "max": float(np.sqrt(len(experts) - 1)),
            "balance": float(coefficient_of_variation(phi.mean(0))),
            "argmax": " ".join(f"{r['config']}:{int(np.argmax([r[k] for k in experts]))}" for r in rows),
        })  # fmt: skip
    return out
