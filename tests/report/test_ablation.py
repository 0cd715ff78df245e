"""The ablation grid's commands, and its table read from `dvc exp show --json` output."""

from __future__ import annotations

import dataclasses

import pytest

from sparc.report.ablation import (
    ALIGNMENT_ROWS,
    README_BEGIN,
    README_END,
    ablation_table,
    block_file,
    claims,
    comparison_figure,
    each_experiment,
    group_records,
    mean_std,
    readme_markers,
    replace_block,
    verdict,
)
from sparc.report.experiments import (
    ABLATION,
    ALIGNMENT,
    experiment_commands,
    experiment_records,
    grid_of,
    grid_overrides,
    parse_sweep,
)

STREAMS = {"img": {"model": "efficientnet:lite0", "input": "image"}, "txt": {"model": "minilm:x", "input": "caption"}}


def metrics(jaccard: float, cross: float, r1: float) -> dict:
    """Headline metrics (sparc.evaluate.headline) of one run."""
    return {
        "jaccard_d0": jaccard, "jaccard_d2": jaccard / 2, "jaccard_live": jaccard, "jaccard_ps": jaccard / 4,
        "mixed": 0.0, "mixed_ps": 0.1, "alive": 0.5, "nmse_self": 0.3, "nmse_cross": cross,
        "nmse_cross_lf": cross + 0.1, "r1_cap2img": r1, "r1_img2cap": r1 / 2, "probe_logloss": 0.65,
    }


def exp(name: str, seed: int, topk: str, lam: float, m: dict) -> dict:
    data = {
        "params": {"params.yaml": {"data": {"seed": seed, "topk": topk, "lambda": lam, "streams": STREAMS}}},
        "metrics": {"reports/headline.json": {"data": m}},
    }
    return {"revs": [{"rev": f"r{name}", "name": name, "data": data, "error": None, "experiments": None}],
            "executor": None, "name": name}


def show_json() -> list:
    """The shape of `dvc exp show --json` (DVC 3): workspace, the baseline commit, its experiments."""
    exps = [
        exp("ablation-sparc-s0", 0, "global", 1.0, metrics(0.80, 0.40, 0.30)),
        exp("ablation-sparc-s1", 1, "global", 1.0, metrics(0.82, 0.42, 0.32)),
        exp("ablation-local-lam1-s0", 0, "local", 1.0, metrics(0.20, 0.50, 0.10)),
        exp("ablation-local-lam1-s1", 1, "local", 1.0, metrics(0.22, 0.52, 0.12)),
        exp("other-run", 0, "global", 0.0, metrics(0.5, 0.5, 0.5)),
    ]
    base = {"params": {"params.yaml": {"data": {"seed": 0}}}, "metrics": {"reports/headline.json": {"data": {}}}}
    return [
        {"rev": "workspace", "name": None, "data": base, "error": None, "experiments": None},
        {"rev": "abc", "name": "main", "data": base, "error": None, "experiments": exps},
    ]


def test_grid_overrides_name_each_run():
    runs = grid_overrides(ABLATION, [0, 1, 2], "ablation")
    assert len(runs) == len(ABLATION) * 3
    name, sets = runs[0]
    assert name == "ablation-sparc-s0"
    assert sets == ["topk=global", "lambda=1.0", "method=sparc", "seed=0"]
    usae = dict(grid_overrides({"usae": ABLATION["usae"]}, [2], "a"))["a-usae-s2"]
    assert "topk=local" in usae and "method=usae" in usae


def test_commands_run_in_a_temporary_copy_or_queue():
    runs = grid_overrides({"k8": {"k": 8}}, [0], "sweep")
    assert experiment_commands(runs, queue=False) == [
        ["dvc", "exp", "run", "--temp", "-n", "sweep-k8-s0", "-S", "k=8", "-S", "seed=0"]
    ]
    assert experiment_commands(runs, queue=True)[0][3] == "--queue"


def test_parse_sweep():
    assert parse_sweep("k=8,16") == {"k8": {"k": 8}, "k16": {"k": 16}}
    assert parse_sweep("train.lr=1.0e-3") == {"lr1.0e-3": {"train.lr": 1.0e-3}}
    with pytest.raises(ValueError, match="expected key=v1,v2"):
        parse_sweep("k")


def test_records_and_groups_from_exp_show():
    records = experiment_records(show_json())
    assert {r.name for r in records} == {  # the baseline without metrics is not a record
        "ablation-sparc-s0", "ablation-sparc-s1", "ablation-local-lam1-s0", "ablation-local-lam1-s1", "other-run",
    }
    groups = group_records(records, "ablation")
    assert list(groups) == ["sparc", "local-lam1"]
    assert [r.params["seed"] for r in groups["sparc"]] == [0, 1]
    assert groups["sparc"][0].metrics["jaccard_d0"] == 0.80
    # another block's grid under a longer prefix (localise-q240) is not a configuration of this one
    sub = [dataclasses.replace(r, name=r.name.replace("ablation-", "ablation-q240-")) for r in records]
    assert list(group_records(records + sub, "ablation")) == ["sparc", "local-lam1"]
    assert list(group_records(records + sub, "ablation-q240")) == ["sparc", "local-lam1"]


def test_table_reports_mean_and_std_over_seeds():
    table = ablation_table(group_records(experiment_records(show_json()), "ablation"))
    head, rule, *rows = table.strip().splitlines()
    assert "Global, λ=1 (SPARC) (n=2)" in head and "Local, λ=1 (n=2)" in head
    row = next(r for r in rows if r.startswith("| Jaccard depth 0, all latents (joint)"))
    assert "0.810 ± 0.014" in row and "0.210 ± 0.014" in row
    deepest = next(r for r in rows if r.startswith("| Jaccard deepest level, all latents (joint)"))
    assert "0.405 ± 0.007" in deepest  # depth 2 is the deepest here
    r1 = next(r for r in rows if r.startswith("| retrieval R@1 caption→image"))
    assert "0.310 ± 0.014" in r1
    mixed = next(r for r in rows if r.startswith("| mixed latents (per-stream)"))
    assert "10.0 ± 0.0%" in mixed


def test_claims_verdicts():
    assert verdict([0.8, 0.82], [0.2, 0.22]) == "holds"
    assert verdict([0.2, 0.22], [0.8, 0.82]) == "reversed"
    assert verdict([0.5, 0.6], [0.55, 0.5]) == "within noise"
    assert verdict([], [0.1]) == "n/a"
    text = claims(group_records(experiment_records(show_json()), "ablation"))
    assert "- Global TopK aligns more than Local TopK (Jaccard, λ=1): **holds**" in text


def test_mean_std():
    assert mean_std([1.0]) == (1.0, 0.0)
    assert mean_std([1.0, 3.0]) == pytest.approx((2.0, 2**0.5))


def test_replace_block():
    text = f"intro\n{README_BEGIN}\nold table\n{README_END}\nrest\n"
    assert replace_block(text, "new\n") == f"intro\n{README_BEGIN}\nnew\n{README_END}\nrest\n"
    with pytest.raises(ValueError, match="markers"):
        replace_block("no markers", "x")


def test_each_grid_block_lives_in_one_file_of_the_front_page_or_docs():
    """`compare --readme` without a path writes the file that holds the grid's markers."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    expected = {
        "ablation": "README.md",
        "alignment": "docs/alignment.md",
        "alignment-clipart": "docs/alignment.md",
        "localise": "docs/localisation.md",
        "localise-q240": "docs/localisation.md",
    }
    for prefix, name in expected.items():
        assert block_file(prefix, root) == root / name
    with pytest.raises(ValueError, match="sweepL:begin"):
        block_file("sweepL", root)


def test_each_experiment_table_has_one_column_per_run_without_std():
    table = ablation_table(each_experiment(experiment_records(show_json())))
    head = table.splitlines()[0]
    assert "ablation-sparc-s0" in head and "other-run" in head and "(n=" not in head
    row = next(r for r in table.splitlines() if r.startswith("| Jaccard depth 0, all latents (joint)"))
    assert "0.800" in row and "±" not in row


def test_comparison_figure(tmp_path):
    groups = group_records(experiment_records(show_json()), "ablation")
    path = comparison_figure(groups, tmp_path / "compare.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_newest_experiment_of_a_name_wins():
    old = exp("ablation-sparc-s0", 0, "global", 1.0, metrics(0.1, 0.4, 0.3))
    new = exp("ablation-sparc-s0", 0, "global", 1.0, metrics(0.9, 0.4, 0.3))
    old["revs"][0]["data"]["timestamp"] = "2026-11-25T10:00:00"
    new["revs"][0]["data"]["timestamp"] = "2026-11-25T12:00:00"
    records = experiment_records([{"name": "a", "experiments": [new]}, {"name": "b", "experiments": [old]}])
    assert [r.metrics["jaccard_d0"] for r in records] == [0.9]


def test_exp_show_view_keeps_the_name_and_the_chosen_columns():
    import re

    from sparc.report.experiments import SHOW_COLUMNS, exp_show_command

    cmd = exp_show_command(["-A"])
    assert cmd[:4] == ["dvc", "exp", "show", "--no-pager"] and cmd[-1] == "-A"
    drop, keep = cmd[cmd.index("--drop") + 1], cmd[cmd.index("--keep") + 1]
    assert not re.match(drop, "Experiment") and re.match(drop, "Created") and re.match(drop, "jaccard_d1")
    assert all(re.match(keep, c) for c in SHOW_COLUMNS) and not re.match(keep, "jaccard_d1")


def test_alignment_grid_runs_options_on_any_dataset_and_answers_its_questions():
    runs = dict(grid_overrides(ALIGNMENT, [0], "alignment-clipart", extra=["data.dataset=clipart"]))
    assert runs["alignment-clipart-subset-0.5-s0"] == [
        "train.subset_keep=0.5", "train.consistency=0.0", "data.dataset=clipart", "seed=0"]
    assert runs["alignment-clipart-sparc-s0"][:2] == ["train.subset_keep=1.0", "train.consistency=0.0"]
    assert grid_of("alignment-clipart") == "alignment" and grid_of("alignment") == "alignment"
    assert grid_of("ablation") == "ablation" and grid_of("sweep") == "ablation"
    assert readme_markers("alignment-clipart") == ("<!-- alignment-clipart:begin -->", "<!-- alignment-clipart:end -->")

    def run(name: str, seed: int, ps_live: float, self_ps: float) -> dict:
        m = metrics(0.8, 0.4, 0.3) | {"jaccard_ps_live": ps_live, "nmse_self_ps": self_ps}
        return exp(name, seed, "global", 1.0, m)

    shown = [{"rev": "abc", "name": "main", "data": {}, "error": None, "experiments": [
        run("alignment-sparc-s0", 0, 0.20, 0.34), run("alignment-sparc-s1", 1, 0.21, 0.35),
        run("alignment-subset-0.5-s0", 0, 0.25, 0.34), run("alignment-subset-0.5-s1", 1, 0.26, 0.36),
    ]}]
    groups = group_records(experiment_records(shown), "alignment")
    assert list(groups) == ["sparc", "subset-0.5"]
    table = ablation_table(groups, ALIGNMENT_ROWS)
    assert "| self NMSE (per-stream) | 0.345 ± 0.007 | 0.350 ± 0.014 |" in table
    text = claims(groups, "alignment")
    assert "- subset, keep 0.5 raises per-stream Jaccard (live latents): **holds**" in text
    assert "- subset, keep 0.5 lowers per-stream self NMSE (within noise = kept): **within noise**" in text


def test_localise_grid_tabulates_every_scored_method_and_compares_sparc_with_its_ablations():
    from sparc.report.ablation import localise_methods, rows_for
    from sparc.report.experiments import LOCALISE

    runs = dict(grid_overrides(LOCALISE, [0], "localise"))
    assert sorted(runs) == ["localise-global-lam0-s0", "localise-local-lam1-s0", "localise-sparc-s0"]
    assert grid_of("localise") == "localise"

    def run(name: str, seed: int, topk: str, lam: float, ap: float) -> dict:
        m = metrics(0.8, 0.4, 0.3) | {"ap_vit": ap, "miou_vit": ap / 2, "ap_chance": 0.0, "miou_chance": 0.07}
        return exp(name, seed, topk, lam, m)

    shown = [{"rev": "abc", "name": "main", "data": {}, "error": None, "experiments": [
        run("localise-sparc-s0", 0, "global", 1.0, 0.20), run("localise-sparc-s1", 1, "global", 1.0, 0.22),
        run("localise-local-lam1-s0", 0, "local", 1.0, 0.05), run("localise-local-lam1-s1", 1, "local", 1.0, 0.06),
        run("localise-global-lam0-s0", 0, "global", 0.0, 0.21), run("localise-global-lam0-s1", 1, "global", 0.0, 0.19),
    ]}]
    groups = group_records(experiment_records(shown), "localise")
    assert list(groups) == ["sparc", "local-lam1", "global-lam0"]
    assert localise_methods(r for recs in groups.values() for r in recs) == ["vit", "chance"]
    table = ablation_table(groups, rows_for("localise", groups))
    assert "| localisation AP@0.2, vit | 0.210 ± 0.014 | 0.055 ± 0.007 | 0.200 ± 0.014 |" in table
    assert "| localisation mIoU, chance | 0.070 | 0.070 | 0.070 |" not in table  # averaged: mean ± std
    assert "| localisation mIoU, chance | 0.070 ± 0.000 | 0.070 ± 0.000 | 0.070 ± 0.000 |" in table
    text = claims(groups, "localise")
    assert "- SPARC localises better than Local, λ=1 (vit, AP@0.2): **holds**" in text
    assert "- SPARC localises better than Global, λ=0 (vit, AP@0.2): **within noise**" in text
    assert "chance (" not in text  # the chance map is a row, not a claim
