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


COMMANDS = {
    "check": (cmd_check, "validate params.yaml"),
    "prepare": (cmd_prepare, "build the dataset named by data.dataset"),
    "extract": (cmd_extract, "extract one stream's features"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparc", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="parameters file (default: params.yaml)")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        if name == "extract":
            p.add_argument("stream", help="stream name from params.yaml `streams:`")
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
