"""Command line: one subcommand per DVC stage (``python -m sparc <stage>``), plus ``check``.

Every subcommand reads ``params.yaml`` (``--params`` to choose another file) through
:func:`sparc.params.load_params`. Expected failures (bad parameters, missing or misaligned inputs)
print one ``error:`` line and exit with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys

from sparc import paths
from sparc.params import Params, load_params


def cmd_check(params: Params, args: argparse.Namespace) -> None:
    """Validate params.yaml (values, then devices, data files and training memory on this
    machine: sparc.preflight) and print the configured streams."""
    from sparc.preflight import preflight

    print(f"params OK: dataset={params.data.dataset} k={params.k} L={params.L} "
          f"lambda={params.lam} topk={params.topk} method={params.method}")
    for name, s in params.streams.items():
        print(f"  stream {name}: {s.model} ({s.input})")
    for line in preflight(params):
        print(f"  {line}")


def cmd_download(params: Params, args: argparse.Namespace) -> None:
    """Fetch the raw files of data.dataset into data/raw/<dataset> (sparc.data.download); Ctrl-C
    ends it with one error line, keeping what is verified."""
    from sparc.data.download import DownloadError, run_download

    dataset, d = params.data.dataset, params.download
    try:
        out = run_download(dataset, base_url=d.base_url, workers=d.workers, options=getattr(params.data, dataset, None),
                           cache=d.cache, checksums=d.checksums)
    except KeyboardInterrupt:
        raise DownloadError(f"{dataset}: interrupted; the files already verified are kept, run again to resume") from None
    print(f"downloaded {dataset} -> {out}")


def cmd_prepare(params: Params, args: argparse.Namespace) -> None:
    from sparc.data.prepared import prepare_dataset

    out = prepare_dataset(params.data, paths.prepared_dir(params.data.dataset))
    print(f"prepared {params.data.dataset} -> {out}")


def relaunched(nproc: int, argv: list[str]) -> bool:
    """With ``nproc > 1`` (or several machines) and not yet under torchrun: run ``python -m sparc
    *argv`` as ``nproc`` processes under torchrun, wait, and return True (sparc.distributed)."""
    from sparc.distributed import launch, needs_launch

    if not needs_launch(nproc):
        return False
    launch(nproc, argv)
    return True


def stage_stream(address: str | None) -> str | None:
    """The stream of DVC stage address ``extract@<stream>`` (what DVC puts in ``DVC_STAGE`` for
    the command it runs; ``<dir>/dvc.yaml:`` in front for a dvc.yaml in a subdirectory), else None.

    dvc.yaml's ``extract`` command names no stream: a name from params.yaml written into the
    command would reach the shell that runs it (``x;touch /tmp/PWNED``), while the environment
    variable reaches this process as data."""
    stage, _, stream = (address or "").rpartition(":")[2].partition("@")
    return stream if stage == "extract" and stream else None


def cmd_extract(params: Params, args: argparse.Namespace) -> None:
    """Extract one stream's features: the one named, or that of DVC stage ``extract@<stream>``."""
    from sparc.distributed import World
    from sparc.features.extract import run_extract

    stream = args.stream or stage_stream(os.environ.get("DVC_STAGE"))
    if stream is None:
        raise ValueError("extract: name a stream (python -m sparc extract <stream>); "
                         "under DVC the stage extract@<stream> names it")
    if relaunched(params.extract.nproc, ["--params", args.params, "extract", stream]):
        return
    ds = params.data.dataset
    out = run_extract(params, stream, paths.prepared_dir(ds), paths.features_dir(ds, stream))
    if World.from_env().main:
        print(f"extracted {stream} -> {out}")


def cmd_train(params: Params, args: argparse.Namespace) -> None:
    from sparc.distributed import World
    from sparc.train.stage import run_train

    if relaunched(params.train.nproc, ["--params", args.params, "train"]):
        return
    out = run_train(params)
    if World.from_env().main:
        print(f"trained SAE -> {out}")


def cmd_encode(params: Params, args: argparse.Namespace) -> None:
    from sparc.evaluate.encode_stage import run_encode

    print(f"sparse codes -> {run_encode(params)}")


def cmd_concepts(params: Params, args: argparse.Namespace) -> None:
    from sparc.evaluate.concepts_stage import run_concepts

    print(f"concepts -> {run_concepts(params)}")


def cmd_evaluate(params: Params, args: argparse.Namespace) -> None:
    from sparc.evaluate.evaluate_stage import run_evaluate

    print(f"metrics -> {run_evaluate(params)}")


def cmd_localise(params: Params, args: argparse.Namespace) -> None:
    from sparc.localise.stage import run_localise

    print(f"localisation -> {run_localise(params)}")


def cmd_figures(params: Params, args: argparse.Namespace) -> None:
    from sparc.report.figures_stage import run_figures

    print(f"figures -> {run_figures(params)}")


def cmd_browser(params: Params, args: argparse.Namespace) -> None:
    from sparc.report.browser import build_browser

    out = build_browser(params)
    print(f"concept browser -> {out / 'index.html'}")


def cmd_paper(params: Params, args: argparse.Namespace) -> None:
    """Run the paper setting as the DVC experiment ``paper`` (see sparc.presets): on Open Images,
    or on a folder-format CSV with --csv."""
    from sparc.presets import paper_command

    _check_preset_files(args)
    _run_preset(paper_command(args.csv or "", args.hierarchy or "", max_images=args.max_images,
                              subset_keep=args.subset_keep, weights=args.weights, base_url=args.base_url), args.dry)


def cmd_usae(params: Params, args: argparse.Namespace) -> None:
    """Run the USAE paper's setting as the DVC experiment ``usae`` (see sparc.presets): on Open
    Images, or on a folder-format CSV with --csv."""
    from sparc.presets import usae_command

    _check_preset_files(args)
    _run_preset(usae_command(args.csv or "", args.hierarchy or "", max_images=args.max_images,
                             weights=args.weights, base_url=args.base_url), args.dry)


def _check_preset_files(args: argparse.Namespace) -> None:
    """--csv and --hierarchy of a preset name existing files; --hierarchy only with --csv,
    --max-images only without it."""
    from pathlib import Path

    if args.hierarchy and not args.csv:
        raise ValueError("--hierarchy goes with --csv (Open Images brings its own hierarchy)")
    if args.max_images and args.csv:
        raise ValueError("--max-images goes with Open Images (for a CSV, set data.max_samples)")
    for path in (args.csv, args.hierarchy):
        if path and not Path(path).is_file():
            raise FileNotFoundError(f"{path}: no such file")


def cmd_coco(params: Params, args: argparse.Namespace) -> None:
    """Run the COCO setting as the DVC experiment ``coco`` (see sparc.presets)."""
    from sparc.presets import coco_command

    _run_preset(coco_command(max_images=args.max_images, subset_keep=args.subset_keep, weights=args.weights,
                             base_url=args.base_url), args.dry)


def _check_workspace_free() -> None:
    """ValueError when DVC is running in this workspace (sparc.report.experiments.dvc_busy): a DVC
    experiment started now would change params.yaml under it and then fail on DVC's lock."""
    from sparc.report.experiments import dvc_busy

    busy = dvc_busy()
    if busy:
        raise ValueError(
            f"{busy} is running in this workspace: starting experiments now would write their -S values "
            "into params.yaml and then fail on DVC's lock; wait for it to finish, or queue them "
            "(--queue, then `dvc queue start` once it has finished)"
        )


def _run_preset(cmd: list[str], dry: bool) -> None:
    import shlex
    import subprocess

    print(shlex.join(cmd))
    if not dry:
        _check_workspace_free()
        subprocess.run(cmd, check=True)


def _seeds(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--seeds: expected comma-separated integers, got {text!r}") from None


def _run_grid(configs: dict, args: argparse.Namespace) -> None:
    import shlex

    from sparc.report.experiments import experiment_commands, grid_overrides, run_experiments

    prefix = args.prefix or getattr(args, "grid", "") or "sweep"
    runs = grid_overrides(configs, _seeds(args.seeds), prefix, extra=args.set)
    cmds = experiment_commands(runs, queue=args.queue)
    if args.dry or args.queue:
        for cmd in cmds:
            print(shlex.join(cmd))
    if args.dry:
        return
    if args.queue:
        import subprocess

        for cmd in cmds:
            subprocess.run(cmd, check=True)
        print(f"queued {len(cmds)} experiments: start them with `dvc queue start -j N`")
        return
    _check_workspace_free()
    failed = run_experiments(cmds)
    if failed:
        raise ValueError(f"{len(failed)} of {len(cmds)} experiments failed: {', '.join(failed)}")
    print(f"{len(cmds)} experiments done; `python -m sparc compare --grid {prefix}` tabulates them")


def cmd_ablation(params: Params, args: argparse.Namespace) -> None:
    """A grid of sparc.report.experiments.GRIDS (the paper's ablation, or the per-stream alignment
    options) over --seeds, as DVC experiments."""
    from sparc.report.experiments import GRIDS

    if args.grid not in GRIDS:
        raise ValueError(f"--grid: unknown grid {args.grid!r} (known: {', '.join(GRIDS)})")
    grid = GRIDS[args.grid]
    only = [c.strip() for c in args.only.split(",") if c.strip()] or list(grid)
    unknown = [c for c in only if c not in grid]
    if unknown:
        raise ValueError(f"--only: unknown configuration {unknown[0]!r} (known: {', '.join(grid)})")
    _run_grid({c: grid[c] for c in only}, args)


def cmd_sweep(params: Params, args: argparse.Namespace) -> None:
    """A sweep over one parameter (``k=8,16,32``) over --seeds, as DVC experiments."""
    from sparc.report.experiments import parse_sweep

    _run_grid(parse_sweep(args.spec), args)


def cmd_compare(params: Params, args: argparse.Namespace) -> None:
    """Headline metrics of every experiment (or a grid's mean +- std and claim checks) from
    `dvc exp show --json`, as a markdown table and a comparison figure."""
    from pathlib import Path

    from sparc.report import ablation as ab
    from sparc.report import experiments as ex

    records = ex.dvc_experiments(all_commits=args.all_commits)
    groups = ab.group_records(records, args.grid) if args.grid else ab.each_experiment(records)
    grid = ex.grid_of(args.grid) if args.grid else "ablation"
    block = ab.ablation_table(groups, ab.rows_for(grid, groups)) + ("\n" + ab.claims(groups, grid) if args.grid else "")
    print(block)
    if groups and args.figure:
        print(f"figure -> {ab.comparison_figure(groups, args.figure)}")
    if args.readme:
        prefix = args.grid or "ablation"
        path = ab.block_file(prefix) if args.readme == "auto" else Path(args.readme)
        text = ab.replace_block(path.read_text(), block, *ab.readme_markers(prefix), name=str(path))
        path.write_text(text)
        print(f"updated {path}")


def cmd_show(params: Params, args: argparse.Namespace) -> None:
    """`dvc exp show` with the headline columns that fit a terminal (sparc.report.experiments)."""
    import subprocess

    from sparc.report.experiments import exp_show_command

    proc = subprocess.run(exp_show_command(args.dvc_args))
    if proc.returncode:
        raise ValueError(f"dvc exp show failed with status {proc.returncode}")


def cmd_export(params: Params, args: argparse.Namespace) -> None:
    """Write the trained SAE (``--sae``, default data/sae) in the SPARC reference code's format:
    ``msae_checkpoint.pth`` and ``run_config.json`` in ``--reference OUT`` (sparc.model.reference)."""
    from sparc.model.io import load_sae
    from sparc.model.reference import export_reference

    out = export_reference(load_sae(args.sae), args.reference)
    print(f"exported {args.sae} -> {out} (reference format: msae_checkpoint.pth, run_config.json)")


def cmd_validate_text(params: Params, args: argparse.Namespace) -> None:
    """Validate the label-free tools on a dataset that has labels (docs/unlabeled.md): ``--part
    names`` compares the latents' names from captions with their names from labels in the run of
    ``--data-root`` against a shuffled baseline (sparc.report.name_agreement); ``--part
    hierarchy`` trains the ablation grid in this process and compares its hierarchical Jaccard
    under the real labels, WordNet pseudo-labels and those shuffled across samples (a control;
    sparc.report.pseudo_label_grid)."""
    from pathlib import Path

    if args.part == "names":
        from sparc.report.name_agreement import validate_names

        print(validate_names(Path(args.data_root), permutations=args.permutations))
    if args.part == "hierarchy":
        from sparc.report.pseudo_label_grid import validate_hierarchy

        print(validate_hierarchy(params, root=Path(args.data_root)))


COMMANDS = {
    "check": (cmd_check, "validate params.yaml"),
    "download": (cmd_download, "fetch the raw files of data.dataset (openimages, coco) into data/raw"),
    "prepare": (cmd_prepare, "build the dataset named by data.dataset"),
    "extract": (cmd_extract, "extract one stream's features"),
    "train": (cmd_train, "train the multi-stream SAE on the extracted features"),
    "encode": (cmd_encode, "sparse codes of every sample (joint and per-stream inference)"),
    "concepts": (cmd_concepts, "name every latent per stream from its top activating samples"),
    "paper": (cmd_paper, "run the paper setting (DINOv2 + OpenCLIP, L=8192, k=64) on Open Images as a DVC experiment"),
    "coco": (cmd_coco, "run the COCO setting (the paper's models and sizes on MS-COCO 2017) as a DVC experiment"),
    "usae": (cmd_usae, "run the USAE paper's setting (ViT-B/16, DINOv2-S/14-reg, SigLIP-B/16, L=6144, k=32) as a DVC experiment"),
    "evaluate": (cmd_evaluate, "Jaccard, patterns, reconstruction, probes, retrieval, universality"),
    "localise": (cmd_localise, "text-guided localisation against known masks: composite canvases, or COCO's instance masks (reports/localise)"),
    "figures": (cmd_figures, "PNG figures of the evaluation under reports/figures/"),
    "browser": (cmd_browser, "the static HTML concept browser under reports/browser/"),
    "ablation": (cmd_ablation, "run the ablation grid (Global/Local x lambda 0/1, USAE) over seeds as DVC experiments"),
    "sweep": (cmd_sweep, "run a sweep over one parameter (e.g. k=8,16,32) over seeds as DVC experiments"),
    "show": (cmd_show, "dvc exp show with the headline columns that fit a 200-column terminal"),
    "compare": (cmd_compare, "table and figure of the experiments' headline metrics (dvc exp show --json)"),
    "validate-text": (cmd_validate_text, "validate the label-free tools against a dataset's real labels "
                      "(--part names: names from captions vs from labels; --part hierarchy: WordNet "
                      "pseudo-labels over the ablation grid; docs/unlabeled.md)"),
    "export": (cmd_export, "write the trained SAE as the SPARC reference code's msae_checkpoint.pth + run_config.json"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparc", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="parameters file (default: params.yaml)")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        if name == "extract":
            p.add_argument("stream", nargs="?", help="stream name from params.yaml `streams:` "
                           "(default: the stream of DVC stage extract@<stream>, from DVC_STAGE)")
        if name in ("paper", "usae"):
            p.add_argument("--csv", default="", help="image-caption CSV in the folder format (default: Open Images)")
            p.add_argument("--hierarchy", default="", help="optional label hierarchy JSON (with --csv)")
        if name in ("paper", "coco", "usae"):
            p.add_argument("--max-images", type=int, default=0,
                           help="a quick look: only the first N images of each split (experiment <name>-N)")
        if name in ("paper", "coco", "usae"):
            p.add_argument("--dry", action="store_true", help="print the dvc command, do not run it")
            p.add_argument("--weights", choices=("pretrained", "random"), default="pretrained",
                           help="random: the models' real architectures with random weights, no download "
                           "(experiment <name>-random; its outputs say they are no result)")
            p.add_argument("--base-url", default="",
                           help="download from this mirror of data/raw (download.base_url), e.g. a local server")
        if name in ("paper", "coco"):
            p.add_argument("--subset-keep", type=float, default=1.0,
                           help="train with the stream-subset rule at this keep probability (experiment "
                           "<name>-subset<p>; default 1.0: the paper's SPARC; docs/alignment.md)")
        if name in ("ablation", "sweep"):
            if name == "sweep":
                p.add_argument("spec", help="parameter and values, e.g. k=8,16,32 or L=256,512,1024")
            p.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds (default 0,1,2)")
            p.add_argument("--prefix", default="", help="experiment name prefix (default: the grid's name, or sweep)")
            p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                           help="override for every run, e.g. --set data.dataset=clipart (repeatable)")
            p.add_argument("--queue", action="store_true", help="only queue the runs (then `dvc queue start -j N`)")
            p.add_argument("--dry", action="store_true", help="print the dvc commands, do not run them")
            if name == "ablation":
                p.add_argument("--grid", default="ablation", help="ablation (the paper's: sparc, global-lam0, "
                               "local-lam1, local-lam0, usae, usae-paper), alignment (SPARC's per-stream "
                               "alignment options) or localise (text-guided localisation: sparc, local-lam1, global-lam0)")
                p.add_argument("--only", default="", help="comma-separated configurations of the grid (default: all)")
        if name == "validate-text":
            p.add_argument("--part", required=True, choices=("names", "hierarchy"),
                           help="names: do the latents' names from captions hold their label names (reports/concepts); "
                           "hierarchy: does Jaccard with WordNet pseudo-labels order the ablation grid as the real labels do")
            p.add_argument("--permutations", type=int, default=20,
                           help="names: shuffles of the latent-to-text-names mapping for the baseline (default 20)")
            p.add_argument("--data-root", default=".", help="repository whose outputs are read (names: params.yaml, "
                           "reports/concepts; hierarchy: data/prepared, data/features; default: this one); "
                           "the docs page written is this one's")
        if name == "export":
            p.add_argument("--reference", required=True, metavar="OUT",
                           help="folder for msae_checkpoint.pth and run_config.json (the reference code's format)")
            p.add_argument("--sae", default=str(paths.sae_dir()), help="the SAE folder to export (default data/sae)")
        if name == "compare":
            p.add_argument("--grid", default="", help="average the seeds of the grid with this name prefix (e.g. ablation)")
            p.add_argument("--figure", default="reports/compare.png", help="comparison figure (default reports/compare.png; '' = none)")
            p.add_argument("--readme", nargs="?", const="auto", default="",
                           help="also rewrite the block between this grid's markers (<!-- GRID:begin --> "
                           "... <!-- GRID:end -->): of the file named, or without a name of the one that "
                           "holds them (README.md, docs/alignment.md, docs/localisation.md)")
            p.add_argument("--all-commits", action="store_true",
                           help="experiments run from any commit, not only the current one (the newest of each name)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "show":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.dvc_args = extra  # `show` passes them on to `dvc exp show` (e.g. -A, --rev)
    from sparc.data.download import DownloadError
    from sparc.features.store import FeatureStoreError
    from sparc.params import ParamsError

    try:
        params = load_params(args.params)
        COMMANDS[args.command][0](params, args)
    except (ParamsError, FeatureStoreError, FileNotFoundError, ValueError, DownloadError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
