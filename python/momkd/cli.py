"""The ``momkd`` command line.

Every subcommand has ``--help``. Exit codes: 0 on success, 2 on usage or data errors (a one-line
message naming the file, slide, column or key; no traceback unless ``--debug``), 130 on Ctrl-C.
Heavy modules (torch) are imported inside the commands so that ``momkd --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from momkd import __version__
from momkd.config import PRESET_NAMES

log = logging.getLogger("momkd")


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors name the command: the command's usage, then one line
    ``momkd <command>: error: ...`` (exit code 2)."""

    #: The subcommand parsers by name (set on the top-level parser by :func:`build_parser`).
    commands: dict[str, argparse.ArgumentParser]

    def parse_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> argparse.Namespace:
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            # argparse reports a subcommand's unknown options from the top-level parser; report
            # them from the subcommand, with its usage.
            command = getattr(parsed, "command", None)
            target = getattr(self, "commands", {}).get(command, self)
            target.error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed

    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


# --------------------------------------------------------------------------- commands


def _cmd_synth(args: argparse.Namespace) -> int:
    from momkd.synth import generate_cohort

    report = generate_cohort(
        args.out_dir,
        patients=args.patients,
        external=args.external,
        dim=args.dim,
        genes=args.genes,
        patches=args.patches,
        seed=args.seed,
        h5=args.h5,
        pt=args.pt,
        progress=not args.quiet,
        overwrite=args.overwrite,
    )
    print(_format_synth_report(Path(args.out_dir), report))
    return 0


def _format_synth_report(out: Path, report: dict[str, Any]) -> str:
    lines = [f"synthetic cohort written to {out}"]
    for key in ("cohort", "external"):
        part = report.get(key)
        if isinstance(part, dict):
            desc = ", ".join(f"{k} {v}" for k, v in part.items() if not isinstance(v, dict | list))
            lines.append(f"  {key}: {desc}")
    oracle = report.get("oracle_auc") or report.get("oracle")
    if isinstance(oracle, dict):
        lines.append("  oracle AUCs:")
        for task, vals in oracle.items():
            if isinstance(vals, dict):
                vals_s = ", ".join(
                    f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in vals.items()
                )
                lines.append(f"    {task}: {vals_s}")
    return "\n".join(lines)


def _cmd_ingest(args: argparse.Namespace) -> int:
    from momkd.data.ingest import ingest

    summary = ingest(
        args.src,
        args.out,
        key=args.key,
        dtype=args.dtype,
        threads=args.threads,
        chunk_rows=args.chunk_rows,
        codec=args.codec,
        shard_mb=args.shard_mb,
        skip_bad=args.skip_bad,
        overwrite=args.overwrite,
        progress=not args.quiet,
        grid_coords_ok=args.no_coords,
    )
    print(json.dumps(summary, indent=2, default=str))
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from momkd.data.info import describe, format_info

    desc = describe(args.store, check=args.check)
    print(json.dumps(desc, indent=2, default=str) if args.json else format_info(desc))
    return 0 if desc.get("valid", True) else 2


def _cmd_init_config(args: argparse.Namespace) -> int:
    from momkd.config import preset_yaml

    text = preset_yaml(args.preset)
    if args.out:
        Path(args.out).write_text(text)
        print(f"wrote {args.out}")
    else:
        sys.stdout.write(text)
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from momkd._threads import set_torch_threads
    from momkd.config import load_config
    from momkd.train.runner import train

    cfg = load_config(args.config, overrides=args.set or [])
    threads = cfg.train.torch_threads
    if threads is None and int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1:
        # torchrun: the node's cores are shared by its ranks
        from momkd._threads import available_cores

        threads = max(1, available_cores() // int(os.environ["LOCAL_WORLD_SIZE"]))
    set_torch_threads(threads)  # validated by load_config
    if args.prepare_only:
        from momkd.train.runner import prepare_run

        run_dir, folds = prepare_run(cfg, args.out, args.resume)
        print(f"prepared {run_dir}; folds to train: {', '.join(map(str, folds)) or 'none'}")
        return 0
    if args.fold_parallel:
        from momkd.train.fold_parallel import run_fold_parallel

        summary = run_fold_parallel(cfg, args.out, args.fold_parallel, resume=args.resume)
    else:
        summary = train(cfg, out_dir=args.out, resume=args.resume)
    if os.environ.get("RANK", "0") not in ("", "0"):
        return 0  # under torchrun, rank 0 alone reports and writes
    from momkd.train.summary import format_summary

    print(format_summary(summary))
    _write_report(summary.get("run_dir") or args.out or cfg.output.dir)
    return 0


def _write_report(run_dir: object) -> None:
    """Write RUN_DIR/report.html; a failure here is logged, never fatal for the finished run."""
    if run_dir is None:
        return
    from momkd.report import write_report

    try:
        path = write_report(Path(str(run_dir)))
    except Exception as exc:  # noqa: BLE001 - the run's results are already on disk
        log.warning("could not write the run report: %s", _one_line(exc))
    else:
        print(f"report: {path}")


def _cmd_summarize(args: argparse.Namespace) -> int:
    from momkd.train.summary import format_summary, summarize

    summary = summarize(args.run_dir)
    print(format_summary(summary))
    _write_report(args.run_dir)
    return 0


def _inference_threads(source: str, given: int | None) -> None:
    """Torch threads of eval/predict: ``--torch-threads``, else the run's
    ``train.torch_threads``, else every available core."""
    from momkd._threads import set_torch_threads

    if given is not None:
        set_torch_threads(given, key="--torch-threads")
        return
    path = Path(source)
    run_dir = path if path.is_dir() else path.parent.parent
    saved = None
    try:
        import yaml

        raw = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
        saved = raw["train"]["torch_threads"]
    except Exception:  # noqa: BLE001 - no readable run config: use the default
        saved = None
    if not (isinstance(saved, int) and not isinstance(saved, bool) and saved >= 1):
        saved = None
    set_torch_threads(saved)


def _cmd_eval(args: argparse.Namespace) -> int:
    from momkd.train.evaluate import evaluate_run, format_eval

    _inference_threads(args.run_dir, args.torch_threads)
    result = evaluate_run(
        args.run_dir,
        store=args.store,
        clinical=args.clinical,
        out=args.out,
        label_column=args.label_column,
    )
    print(format_eval(result))
    _write_report(args.run_dir)
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from momkd.train.evaluate import predict

    _inference_threads(args.source, args.torch_threads)
    n = predict(args.source, store=args.store, out=args.out, slides=args.slides)
    print(f"wrote predictions for {n} slides to {args.out}")
    return 0


def _cmd_explain(args: argparse.Namespace) -> int:
    from momkd.explain import explain_run

    result = explain_run(
        args.run_dir,
        store=args.store,
        slides=args.slides,
        top_k=args.top_k,
        out=args.out,
        fold=args.fold,
        wsi_dir=args.wsi_dir,
    )
    for key, value in result.items():
        if value is None:
            continue  # an output not made (no --wsi-dir, no memory history): nothing to show
        if isinstance(value, list | tuple):
            print(f"{key}:")
            for item in value:
                print(f"  {item}")
        else:
            print(f"{key}: {value}")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from momkd.compare import format_comparison, run_compare

    result = run_compare(
        args.config,
        args.methods,
        args.out,
        overrides=args.set or [],
        train_fractions=args.train_fraction,
        resamples=args.resamples,
    )
    print(format_comparison(result))
    print(f"comparison: {Path(args.out) / 'comparison.html'}")
    return 0


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def _cmd_demo(args: argparse.Namespace) -> int:
    from momkd.demo import run_demo

    run_demo(args.out, quick=args.quick)
    return 0


# --------------------------------------------------------------------------- parser


def build_parser() -> _Parser:
    """The full ``momkd`` argument parser (exposed for documentation and tests)."""
    parser = _Parser(
        prog="momkd",
        description="MoMKD: genomics-guided training of histology-only slide classifiers.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _add_common(parser, default=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("synth", help="write a synthetic paired histology-genomics cohort")
    p.add_argument("out_dir", help="output folder")
    p.add_argument("--patients", type=_positive_int, default=300, help="internal patients (300)")
    p.add_argument("--external", type=int, default=100, help="external-cohort patients (100)")
    p.add_argument("--dim", type=_positive_int, default=512, help="feature dimension (512)")
    p.add_argument("--genes", type=_positive_int, default=2000, help="genes (2000)")
    p.add_argument("--patches", type=_positive_int, default=400, help="median patches/slide (400)")
    p.add_argument("--seed", type=int, default=0, help="random seed (0)")
    p.add_argument("--h5", action="store_true", help="also write TRIDENT-layout .h5 files")
    p.add_argument("--pt", action="store_true", help="also write CLAM-style .pt files")
    p.add_argument("--overwrite", action="store_true", help="replace earlier outputs in OUT_DIR")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_synth)

    p = sub.add_parser("ingest", help="convert a folder of .h5/.pt features into a cohort store")
    p.add_argument("src", help="folder of TRIDENT/CLAM .h5 or .pt feature files")
    p.add_argument("out", help="output store (.zarr); an interrupted ingest resumes")
    p.add_argument("--key", default="features", help="feature dataset in the .h5 (features|feats)")
    p.add_argument("--dtype", choices=["float16", "float32"], default="float16")
    p.add_argument("--threads", type=_positive_int, default=None, help="reader threads")
    p.add_argument("--chunk-rows", type=_positive_int, default=None, help="rows per chunk")
    p.add_argument(
        "--codec",
        choices=["lz4", "zstd", "none"],
        default="lz4",
        help="feature compression: blosc-lz4+shuffle+crc32c (fast, default), zstd+checksum, "
        "or none (crc32c only)",
    )
    p.add_argument(
        "--shard-mb",
        type=_positive_float,
        default=None,
        metavar="N",
        help="write a sharded store (format 1.1): shard files of about N MiB (64-256 suggested)",
    )
    p.add_argument("--skip-bad", action="store_true", help="skip (and count) unreadable files")
    p.add_argument(
        "--no-coords",
        action="store_true",
        help="accept files without 'coords': lay their rows on a grid (the k-NN graph is then "
        "arbitrary)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a complete store")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_ingest)

    p = sub.add_parser("info", help="summarise and validate a cohort store")
    p.add_argument("store", help="cohort store (.zarr)")
    p.add_argument("--check", action="store_true", help="decode every slide (slow, thorough)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("init-config", help="print a commented YAML run configuration")
    p.add_argument(
        "--preset",
        choices=list(PRESET_NAMES),
        default="default",
        help="default: the studied recipe (docs/RECIPE.md); official: the released code exactly; "
        "paper: the recipe at the paper's dimensions; demo: small, for `momkd synth` cohorts",
    )
    p.add_argument("--out", default=None, help="write to this file instead of stdout")
    p.set_defaults(func=_cmd_init_config)

    p = sub.add_parser("train", help="k-fold cross-validated training")
    p.add_argument("--config", required=True, help="YAML run configuration")
    p.add_argument("--out", default=None, help="run directory (default: output.dir)")
    p.add_argument("--resume", action="store_true", help="resume an interrupted run")
    p.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)"
    )
    p.add_argument(
        "--fold-parallel",
        type=_positive_int,
        default=None,
        metavar="N",
        help="train N folds at once, one process each (one GPU each, or a share of the cores)",
    )
    p.add_argument(
        "--prepare-only",
        action="store_true",
        help="check the inputs and write config and splits, no training (before a job array)",
    )
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("summarize", help="merge a run's finished folds into its summary and report")
    p.add_argument("run_dir", help="run directory written by `momkd train`")
    p.set_defaults(func=_cmd_summarize)

    p = sub.add_parser(
        "compare",
        help="train several methods on identical splits; paired tests, CIs, learning curve",
    )
    p.add_argument("--config", required=True, help="YAML run configuration shared by the methods")
    p.add_argument(
        "--methods",
        required=True,
        help="comma-separated METHOD[:KEY=VALUE...] entries, e.g. "
        "momkd,momkd:memory.update=momentum,abmil",
    )
    p.add_argument("--out", required=True, help="output folder (a rerun resumes it)")
    p.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="override a key for every method"
    )
    p.add_argument(
        "--train-fraction",
        default=None,
        metavar="F[,F...]",
        help="learning curve: shares of each fold's training patients, e.g. 0.25,0.5,1.0",
    )
    p.add_argument(
        "--resamples",
        type=_non_negative_int,
        default=None,
        help="bootstrap resamples of the CIs (default: train.ci_resamples; 0: off)",
    )
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser("eval", help="evaluate a run's fold models on a labelled cohort")
    p.add_argument("run_dir", help="run directory written by `momkd train`")
    p.add_argument("--store", required=True, help="cohort store (.zarr)")
    p.add_argument("--clinical", required=True, help="clinical table (CSV/TSV)")
    p.add_argument("--label-column", default=None, help="label column (default: the run's)")
    p.add_argument("--out", default=None, help="output folder (default: RUN_DIR/eval_<store>)")
    p.add_argument(
        "--torch-threads",
        type=_positive_int,
        default=None,
        help="PyTorch threads (default: the run's train.torch_threads, else all cores)",
    )
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("predict", help="histology-only predictions for every slide of a store")
    p.add_argument("source", help="run directory (fold ensemble) or a checkpoint file")
    p.add_argument("--store", required=True, help="cohort store (.zarr)")
    p.add_argument("--out", required=True, help="output CSV")
    p.add_argument("--slides", nargs="*", default=None, help="only these slide ids")
    p.add_argument(
        "--torch-threads",
        type=_positive_int,
        default=None,
        help="PyTorch threads (default: the run's train.torch_threads, else all cores)",
    )
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("explain", help="memory components, top patches and attention maps")
    p.add_argument("run_dir", help="run directory written by `momkd train`")
    p.add_argument("--store", required=True, help="cohort store (.zarr)")
    p.add_argument("--slides", nargs="*", default=None, help="slides to map (default: a few)")
    p.add_argument("--top-k", type=_positive_int, default=3, help="patches per component (3)")
    p.add_argument("--fold", type=int, default=0, help="fold model to explain (0)")
    p.add_argument("--wsi-dir", default=None, help="folder of slide images for patch crops")
    p.add_argument("--out", default=None, help="output folder (default: RUN_DIR/explain)")
    p.set_defaults(func=_cmd_explain)

    p = sub.add_parser("demo", help="synthesise a cohort, train meanpool, ABMIL and MoMKD, compare")
    p.add_argument("--out", default="demo_out", help="output folder (demo_out)")
    p.add_argument("--quick", action="store_true", help="an even smaller run (for tests)")
    p.set_defaults(func=_cmd_demo)

    # --debug and --verbose are accepted before and after the command (`momkd train ... --debug`);
    # a subcommand leaves them unset unless given, so `momkd --debug train` keeps working.
    for command in sub.choices.values():
        _add_common(command, default=argparse.SUPPRESS)
    parser.commands = dict(sub.choices)
    return parser


def _add_common(parser: argparse.ArgumentParser, default: Any) -> None:
    parser.add_argument(
        "--debug", action="store_true", default=default, help="show tracebacks on errors"
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", default=default, help="log at INFO level"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``momkd`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    func: Callable[[argparse.Namespace], int] = args.func
    if args.debug:
        return func(args)
    from momkd.errors import MomkdError

    try:
        return func(args)
    except MomkdError as exc:
        print(f"momkd {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError) as exc:
        print(f"momkd {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        # `pip install momkd` carries what inference needs; training-side modules come with extras.
        needed = _EXTRA_OF.get((exc.name or "").partition(".")[0])
        if needed is None:
            raise
        package, extra = needed
        print(
            f"momkd {args.command}: error: needs {package}: pip install 'momkd[{extra}]'",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print(f"momkd {args.command}: interrupted", file=sys.stderr)
        return 130


# Optional modules: the package and the extra that install each (see pyproject.toml).
_EXTRA_OF = {
    "sklearn": ("scikit-learn", "train"),
    "matplotlib": ("matplotlib", "train"),
    "xgboost": ("xgboost", "xgboost"),
    "pyarrow": ("pyarrow", "parquet"),
}


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    if isinstance(exc, KeyError) and len(exc.args) == 1 and isinstance(exc.args[0], str):
        text = exc.args[0]  # KeyError's str() adds quotes
    return " ".join(text.split()) or type(exc).__name__


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
