"""Command line: one subcommand per DVC stage (``python -m sparc <stage>``), plus ``check``.

Every subcommand reads ``params.yaml`` (``--params`` to choose another file) through
:func:`sparc.params.load_params`. Expected failures (bad parameters, missing or misaligned inputs)
print one ``error:`` line and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys

from sparc import paths
from sparc.params import Params, load_params


def cmd_check(params: Params, args: argparse.Namespace) -> None:
    """Validate params.yaml and print the configured streams."""
    print(f"params OK: dataset={params.data.dataset} k={params.k} L={params.L} "
          f"lambda={params.lam} topk={params.topk} method={params.method}")
    for name, s in params.streams.items():
        print(f"  stream {name}: {s.model} ({s.input})")


def cmd_prepare(params: Params, args: argparse.Namespace) -> None:
    from sparc.data.prepared import prepare_dataset

    out = prepare_dataset(params.data, paths.prepared_dir(params.data.dataset))
    print(f"prepared {params.data.dataset} -> {out}")


def cmd_extract(params: Params, args: argparse.Namespace) -> None:
    from sparc.features.extract import run_extract

    ds = params.data.dataset
    out = run_extract(params, args.stream, paths.prepared_dir(ds), paths.features_dir(ds, args.stream))
    print(f"extracted {args.stream} -> {out}")


def cmd_train(params: Params, args: argparse.Namespace) -> None:
    from sparc.train.stage import run_train

    print(f"trained SAE -> {run_train(params)}")


def cmd_encode(params: Params, args: argparse.Namespace) -> None:
    from sparc.evaluate.stage import run_encode

    print(f"sparse codes -> {run_encode(params)}")


def cmd_concepts(params: Params, args: argparse.Namespace) -> None:
    from sparc.evaluate.stage import run_concepts

    print(f"concepts -> {run_concepts(params)}")


def cmd_evaluate(params: Params, args: argparse.Namespace) -> None:
    from sparc.evaluate.stage import run_evaluate

    print(f"metrics -> {run_evaluate(params)}")


def cmd_paper(params: Params, args: argparse.Namespace) -> None:
    """Run the paper setting as the DVC experiment ``paper`` (see sparc.presets)."""
    import shlex
    import subprocess
    from pathlib import Path

    from sparc.presets import paper_command

    for path in (args.csv, args.hierarchy):
        if path and not Path(path).is_file():
            raise FileNotFoundError(f"{path}: no such file")
    cmd = paper_command(args.csv, args.hierarchy or "")
    print(shlex.join(cmd))
    if not args.dry:
        subprocess.run(cmd, check=True)


COMMANDS = {
    "check": (cmd_check, "validate params.yaml"),
    "prepare": (cmd_prepare, "build the dataset named by data.dataset"),
    "extract": (cmd_extract, "extract one stream's features"),
    "train": (cmd_train, "train the multi-stream SAE on the extracted features"),
    "encode": (cmd_encode, "sparse codes of every sample (joint and per-stream inference)"),
    "concepts": (cmd_concepts, "name every latent per stream from its top activating samples"),
    "paper": (cmd_paper, "run the paper setting (DINOv2 + OpenCLIP, L=8192, k=64) as a DVC experiment"),
    "evaluate": (cmd_evaluate, "Jaccard, patterns, reconstruction, probes, retrieval, universality"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparc", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="parameters file (default: params.yaml)")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        if name == "extract":
            p.add_argument("stream", help="stream name from params.yaml `streams:`")
        if name == "paper":
            p.add_argument("--csv", required=True, help="image-caption CSV in the folder format")
            p.add_argument("--hierarchy", default="", help="optional label hierarchy JSON")
            p.add_argument("--dry", action="store_true", help="print the dvc command, do not run it")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from sparc.features.store import FeatureStoreError
    from sparc.params import ParamsError

    try:
        params = load_params(args.params)
        COMMANDS[args.command][0](params, args)
    except (ParamsError, FeatureStoreError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
