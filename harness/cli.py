"""The ``mimbench`` command line: pretrain, evaluate and compare masked-image-modeling encoders.

Every error caused by the user (a bad value, file, config or command line) ends in one line
``mimbench: error: ...`` on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

import downstream  # noqa: F401  (registers every task and its config schema)
from downstream.encoder_spec import encoder_from_spec, is_timm_model_name
from harness.cli_args import (
    CliParser,
    encoder_preset,
    int_at_least,
    lazy_help,
    preset_help,
    seconds,
)
from harness.core.config import (
    ConfigError,
    PretrainConfig,
    SuiteConfig,
    apply_overrides,
    dump_config,
    load_config,
    recipe_names,
    validate_config,
)
from harness.core.errors import UserError


def _log(msg: str) -> None:
    print(msg, flush=True)


def cmd_validate(args: argparse.Namespace) -> int:
    """Print the resolved config; for a sweep file (loaded as ``run`` and ``plan`` load it) the
    resolved base config, then each row's index, label and changed keys as YAML comments."""
    from harness.sweep import format_sweep, load_config_or_sweep, sweep_base

    cfg = load_config_or_sweep(args.file, args.set)
    if isinstance(cfg, list):
        base = sweep_base(args.file, args.set)
        print(dump_config(base if base is not None else cfg[0].config), end="")
        print(format_sweep(cfg, base), end="")
        return 0
    print(dump_config(cfg), end="")
    if isinstance(cfg, PretrainConfig):  # as a YAML comment: the output stays a config file
        from pretrain.avgdist import encoder_avgdist

        print(f"# {encoder_avgdist(cfg.recipe.masking, cfg.encoder).text()} (SimMIM Fig. 3)")
    return 0


def _print_report(records_dir: Path, out_dir: Path, published: Path | None = None) -> None:
    """Load the records once, name each unreadable one once on stderr, write and print the
    leaderboard (the written files also list the skipped records) with the published numbers
    of ``published`` beside ours (default: results/published.yaml) and the ablation tables."""
    from harness.core.records import RecordScan, announce_skipped, scan_records
    from harness.leaderboard import leaderboard
    from harness.published import (
        DEFAULT_PUBLISHED_RESULTS,
        format_beside_markdown,
        load_published_results,
        published_beside,
    )
    from harness.report import format_markdown, write_report

    published = published or DEFAULT_PUBLISHED_RESULTS
    scan = scan_records(records_dir) if records_dir.is_dir() else RecordScan([], [])
    announce_skipped(scan.skipped)
    paths = write_report(records_dir, out_dir, scan=scan, published=published)
    lb = leaderboard(scan.records)
    print()
    print(format_markdown(lb))
    beside = format_beside_markdown(
        published_beside(lb, scan.records, load_published_results(published)), lb)
    if beside:
        print(beside)
    print()
    print("Leaderboard written to: " + ", ".join(str(p) for p in paths.values()))
    _print_ablation(records_dir, out_dir, records=scan.records)


def _print_ablation(records_dir: Path, out_dir: Path, published: Path | None = None,
                    records: list[Any] | None = None) -> int:
    """Write and print the ablation table of every sweep in the records (``records`` when the
    caller loaded them already); returns how many."""
    from harness.ablation import DEFAULT_PUBLISHED, write_ablation_reports

    written = write_ablation_reports(records_dir if records is None else records, out_dir,
                                     published or DEFAULT_PUBLISHED)
    for paths in written.values():
        print()
        print(paths["md"].read_text())
        print("Ablation table written to: " + ", ".join(str(p) for p in paths.values()))
    return len(written)


def _load_suite_or_sweep(args: argparse.Namespace) -> Any:
    """The suite of ``args.suite``, or the rows of its sweep when the file has a ``sweep:``
    block (every row validated); ``--out`` applied."""
    from harness.sweep import load_config_or_sweep

    cfg = load_config_or_sweep(args.suite, args.set)
    if isinstance(cfg, list):  # the rows of a sweep
        for row in cfg:
            if args.out:
                row.config.output_dir = args.out
        return cfg
    if not isinstance(cfg, SuiteConfig):
        raise ConfigError(f"{args.suite} is a '{cfg.kind}' config; `mimbench {args.command}` takes "  # type: ignore[attr-defined]
                          "a suite (kind: suite). Use `mimbench pretrain` for a pretraining config.")
    if args.out:
        cfg.output_dir = args.out
    return cfg


def _report_unfinished(cfg: Any) -> int:
    """After a run: list the suite's (or sweep's) stages that are not done, each with its error
    and log, on stderr; returns the exit status (1 if any, else 0)."""
    from harness.plan import plan_suite, plan_sweep, unfinished

    left = unfinished(plan_sweep(cfg) if isinstance(cfg, list) else plan_suite(cfg))
    if not left:
        return 0
    print(f"\nmimbench: {len(left)} stage(s) did not finish:", file=sys.stderr)
    for s in left:
        where = f"{s.kind} of {s.encoder} seed {s.seed}" if s.kind != "pretrain" else \
            f"pretraining of {s.encoder} seed {s.seed}"
        print(f"  {s.state}: {where}" + (f" [{s.row}]" if s.row else "")
              + (f": {s.detail}" if s.detail else "") + (f" (log: {s.log})" if s.log else ""),
              file=sys.stderr)
    print("Fix the cause and run the same command again: finished stages are skipped.",
          file=sys.stderr)
    return 1


def cmd_run(args: argparse.Namespace) -> int:
    from harness.runner import run_suite, run_sweep
    from harness.stages import suite_dir

    cfg = _load_suite_or_sweep(args)
    if args.launcher == "torchrun":  # every process runs this command with --launcher inprocess
        from harness.launch import TorchrunOptions, launch_torchrun

        topts = TorchrunOptions(args.nproc_per_node, args.nnodes, args.node_rank,
                                args.master_addr, args.master_port)
        child = ["run", args.suite, "--launcher", "inprocess",
                 *(["--out", args.out] if args.out else []), *(a for s in args.set for a in ("--set", s))]
        return launch_torchrun(child, topts, log=_log)
    from harness.core import distributed

    distributed.init_from_env()  # a torchrun worker joins the group (else a no-op)
    main = distributed.is_main()  # rank 0 logs and reports
    if isinstance(cfg, list):  # a sweep: every row into one suite directory
        if args.launcher == "inprocess":
            records_dir = run_sweep(cfg, log=_log if main else _quiet)
            distributed.cleanup()
        else:  # one job per stage; rows with identical stages share them
            from harness.launch import SlurmOptions, launch_submitit_sweep

            opts = SlurmOptions(partition=args.partition, timeout_min=args.timeout_min,
                                gpus_per_node=args.gpus_per_node)
            records_dir = launch_submitit_sweep(cfg, args.launcher, opts, log=_log)
        if not main:
            return 0
        _print_report(records_dir, suite_dir(cfg[0].config))
        return _report_unfinished(cfg)
    if args.launcher == "inprocess":
        records_dir = run_suite(cfg, log=_log if main else _quiet)
        distributed.cleanup()
        if not main:
            return 0
    else:
        from harness.launch import SlurmOptions, launch_submitit

        opts = SlurmOptions(partition=args.partition, timeout_min=args.timeout_min,
                            gpus_per_node=args.gpus_per_node)
        records_dir = launch_submitit(cfg, args.launcher, opts, log=_log)
    _print_report(records_dir, suite_dir(cfg))
    return _report_unfinished(cfg)


def _quiet(msg: str) -> None:
    """The logger of ranks > 0 under torchrun."""


def cmd_plan(args: argparse.Namespace) -> int:
    from harness.plan import format_plan, plan_suite, plan_sweep

    cfg = _load_suite_or_sweep(args)
    print(format_plan(plan_sweep(cfg) if isinstance(cfg, list) else plan_suite(cfg)))
    if args.estimate:
        from harness.estimate import estimate

        print()
        print(estimate(cfg, args.bench_table, args.gpu, args.train_images, args.val_images))
    return 0


def status_root(args: argparse.Namespace) -> Path:
    """The output directory ``mimbench status`` watches: a directory as it is, or a suite (or
    sweep: every row writes under the same suite directory) file's ``output_dir/name``."""
    from harness.stages import suite_dir

    if Path(args.target).is_dir():
        return Path(args.target)
    cfg = _load_suite_or_sweep(argparse.Namespace(
        suite=args.target, set=args.set, out=args.out, command="status"))  # fmt: skip
    return suite_dir(cfg[0].config if isinstance(cfg, list) else cfg)


def cmd_status(args: argparse.Namespace) -> int:
    import time

    from harness.status import format_status, stage_status

    root = status_root(args)
    while True:
        text = format_status(stage_status(root, stale_s=args.stale))
        if not args.watch:
            print(f"{root}\n{text}")
            return 0
        print(f"\033[2J\033[H{time.strftime('%H:%M:%S')}  {root}\n{text}", flush=True)
        time.sleep(args.watch)


def cmd_pretrain(args: argparse.Namespace) -> int:
    from contextlib import nullcontext

    from harness.core.fsutil import STAGE_LOCK, stage_lock
    from pretrain.engine import CHECKPOINT, pretrain

    cfg = load_config(args.config, args.set, kind="pretrain")
    assert isinstance(cfg, PretrainConfig)
    out = Path(args.out or cfg.output_dir)
    if (out / CHECKPOINT).exists() and not (args.resume or args.overwrite):
        raise ConfigError(
            f"{out} already holds a checkpoint: pass --resume to continue it, --overwrite to start "
            "over (the old checkpoint is replaced), or --out to write elsewhere"
        )
    from harness.core import distributed

    distributed.init_from_env()  # under torchrun: data-parallel (else a no-op)
    main = distributed.is_main()
    existed = out.exists()
    # one run per directory at a time: rank 0 holds the stage lock that status / plan read
    lock = stage_lock(out / STAGE_LOCK, f"pretraining {out}") if main else nullcontext()
    try:
        with lock:
            res = pretrain(cfg, out, resume=args.resume, log=_log if main else _quiet)
    finally:
        if main and not existed and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # a refused fresh run leaves nothing behind
    distributed.cleanup()
    if not main:
        return 0
    print(f"encoder: {res.encoder_path}\nreconstructions: {res.recon_path}\n"
          f"final loss {res.final_loss:.4f} after {res.steps} steps in {res.wall_s:.1f}s")
    return 0


def eval_overrides(overrides: list[str]) -> list[str]:
    """``mimbench eval`` runs a one-task suite: ``--set batch_size=64`` means the task's key
    (``tasks.0.batch_size``); keys of the suite itself (``data.num_workers``, ``seeds``, ...)
    keep their meaning."""
    top = set(SuiteConfig.model_fields)
    return [o if o.split("=", 1)[0].split(".", 1)[0] in top else f"tasks.0.{o}" for o in overrides]


def cmd_eval(args: argparse.Namespace) -> int:
    from downstream.base import get_task, resolve_task_name
    from harness.runner import run_suite
    from harness.stages import suite_dir

    task = resolve_task_name(args.task)
    if args.encoder.startswith("random:"):
        arch = args.encoder.split(":", 1)[1]
        enc: dict[str, Any] = {"name": args.name or f"random-{arch}", "encoder": {"arch": arch}}
    elif is_timm_model_name(args.encoder):
        name = args.encoder.removeprefix("timm:")
        enc = {"name": args.name or f"timm-{name}", "checkpoint": f"timm:{name}"}
    else:
        enc = {"name": args.name or re.sub(r"[^A-Za-z0-9_.\-]", "_", Path(args.encoder).stem)}
        enc["checkpoint"] = args.encoder
        if args.arch:
            enc["encoder"] = {"arch": args.arch}
        enc["format"] = args.format  # how the file is imported (see EncoderEntry)
        enc["allow_partial"] = args.allow_partial
    task_entry: dict[str, Any] = {"name": task}
    if args.strict:
        from harness.core.config import task_config_classes

        cls = task_config_classes().get(task)
        if cls is None or "strict_data" not in cls.model_fields:
            raise ConfigError(f"--strict: task '{task}' has no strict_data option")
        task_entry["strict_data"] = True
    raw = {
        "kind": "suite", "name": args.suite_name, "output_dir": args.out,
        "seeds": [args.seed], "data": {"source": args.data}, "encoders": [enc],
        "tasks": [task_entry],
    }
    raw = apply_overrides(raw, eval_overrides(args.set))
    cfg = validate_config(raw, source="mimbench eval")
    assert isinstance(cfg, SuiteConfig)
    needs = get_task(task).inputs(cfg.tasks[0])  # e.g. robustness: the task of its classifier
    if needs:
        raw["tasks"] = [{"name": n} for n in needs] + raw["tasks"]
        cfg = validate_config(raw, source="mimbench eval")
        assert isinstance(cfg, SuiteConfig)
    records_dir = run_suite(cfg, log=_log)
    _print_report(records_dir, suite_dir(cfg))
    return _report_unfinished(cfg)


def cmd_export(args: argparse.Namespace) -> int:
    from downstream.checkpoints import export_encoder

    enc = encoder_from_spec(args.encoder, args.format, args.allow_partial, args.arch, args.img_size,
                            args.seed)
    formats = tuple(f.strip() for f in args.formats.split(",") if f.strip())
    sources = (args.encoder,) if Path(args.encoder).is_file() else ()
    paths = export_encoder(enc, args.out, formats, extra_meta={"exported_from": args.encoder},
                           overwrite=args.overwrite, sources=sources)
    name, kwargs = enc.timm_architecture()
    print("wrote " + ", ".join(str(p) for p in paths))
    print(f"load with: timm.create_model('{name}', pretrained=False, checkpoint_path='{paths[0]}', "
          + ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) + ")")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from downstream.checkpoints import import_checkpoint

    given = None
    if args.arch:
        from harness.core.config import EncoderConfig

        given = EncoderConfig(arch=args.arch, **({"img_size": args.img_size} if args.img_size else {}))
    report = import_checkpoint(args.checkpoint, args.out, given, args.format, args.allow_partial, args.img_size,
                               overwrite=args.overwrite)
    print(report.format())
    print(f"wrote {args.out} (a mimbench encoder file: use it as a suite's 'checkpoint')")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    records = Path(args.records)
    out = Path(args.out) if args.out else records.parent
    _print_report(records, out, Path(args.published) if args.published else None)
    if args.with_time:
        _print_wall_time(records, out)
    return 0


def _print_wall_time(records_dir: Path, out_dir: Path) -> None:
    """Write ``wall_time.{md,csv}`` (top-1 beside wall seconds per encoder and task) and print
    the markdown."""
    from harness.core.fsutil import atomic_write_text
    from harness.core.records import scan_records
    from harness.wall_time import format_wall_time_csv, format_wall_time_markdown, wall_time_frame

    frame = wall_time_frame(scan_records(records_dir).records)
    md = format_wall_time_markdown(frame)
    atomic_write_text(out_dir / "wall_time.md", md)
    atomic_write_text(out_dir / "wall_time.csv", format_wall_time_csv(frame))
    print()
    print(md)
    print(f"Wall times written to: {out_dir / 'wall_time.md'}, {out_dir / 'wall_time.csv'}")


def cmd_ablation(args: argparse.Namespace) -> int:
    records = Path(args.records)
    out = Path(args.out) if args.out else records.parent
    if not _print_ablation(records, out, Path(args.published) if args.published else None):
        raise ConfigError(f"no record under {records} belongs to a sweep: run a sweep file "
                          "(one with a 'sweep:' block) with `mimbench run` first")
    return 0


def cmd_data_synth(args: argparse.Namespace) -> int:
    import time

    from harness.core.data.shapes import ShapesSpec, generate_shapes

    spec = ShapesSpec(image_size=args.image_size, train_per_class=args.train_per_class,
                      val_per_class=args.val_per_class, seed=args.seed)
    t0 = time.time()
    root = generate_shapes(args.out, spec)
    if args.depth:
        from harness.core.data.shapes_depth import write_nyu_depth

        write_nyu_depth(root / "nyu_depth_v2", spec)
    print(f"wrote the shapes dataset to {root} in {time.time() - t0:.1f}s "
          f"(imagefolder/, coco/, ade20k/, {'nyu_depth_v2/, ' if args.depth else ''}manifest.json)")
    if args.robust:
        from harness.core.data.shapes_robust import generate_shapes_robust

        t0 = time.time()
        rob = generate_shapes_robust(root / "robust", spec)
        print(f"wrote its robustness copies to {rob} in {time.time() - t0:.1f}s (use it as the "
              "robustness task's root)")
    return 0


def cmd_data_shard(args: argparse.Namespace) -> int:
    import time

    from harness.core.data.shards import write_shards

    t0 = time.time()
    manifest = write_shards(Path(args.imagefolder), Path(args.out), args.shard_size, args.seed)
    print(f"wrote {manifest} in {time.time() - t0:.1f}s (use {args.out} as data.source)")
    return 0


def cmd_viz_masks(args: argparse.Namespace) -> int:
    from pretrain.viz import mask_avgdists, save_mask_picture

    path = save_mask_picture(args.out, arch=args.arch, strategies=args.strategy,
                             samples=args.samples, ratio=args.ratio, seed=args.seed)
    print(f"wrote {path}")
    for name, avg in mask_avgdists(args.arch, args.strategy, args.ratio, args.seed,
                                   args.avgdist_draws):
        print(f"  {name}: {avg.text()}")
    return 0


def _task_help() -> str:
    from downstream.base import TASK_ALIASES, all_tasks

    aliases = ", ".join(f"{a} ({t})" for a, t in TASK_ALIASES.items())
    return f"a registered task: {', '.join(sorted(all_tasks()))}; or an alias: {aliases}"


def _format_help(default: str) -> str:
    from harness.core.config import checkpoint_format_names

    return (f"checkpoint family: auto (detect from the keys; default {default}) or one of "
            f"{', '.join(checkpoint_format_names())}")


def _export_formats_help() -> str:
    from downstream.checkpoints import EXPORT_FORMATS

    return f"comma-separated, any of: {', '.join(EXPORT_FORMATS)} (default: all)"


def _strategies_help() -> str:
    from pretrain.masking import MASKERS

    return f"a strategy to draw (repeatable; default: all): {', '.join(MASKERS.names())}"


def _pretrain_description() -> str:
    return (f"Pretrain one encoder from a config file (kind: pretrain). Recipes ('recipe.name'): "
            f"{', '.join(recipe_names())}; examples in configs/pretrain/.")


def package_version() -> str:
    """The installed mimbench version (``importlib.metadata``)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mimbench")
    except PackageNotFoundError:
        return "unknown (not installed: pip install -e .)"


#: Each command's ``--set`` example: one that works for that command (tested).
SET_EXAMPLES: dict[str, str] = {
    "validate": "--set seeds=[0,1] (a suite) or --set train.epochs=5 (a pretraining config)",
    "run": "--set seeds=[0,1] or --set data.num_workers=2",
    "plan": "--set seeds=[0,1] or --set data.num_workers=2",
    "status": "--set seeds=[0,1] or --set output_dir=elsewhere",
    "pretrain": "--set train.epochs=5 or --set recipe.masking.ratio=0.5",
    "eval": "--set epochs=5 (a bare key is the task's option, here tasks.0.epochs: for tasks "
            "that have it, e.g. linear) or --set data.num_workers=2 (a suite key keeps its place)",
}


def build_parser() -> argparse.ArgumentParser:
    p = CliParser(prog="mimbench", description=__doc__.split("\n\n")[0].replace("``", "`"),
                epilog="`mimbench COMMAND --help` shows a command's options.")
    p.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", title="commands")

    def add_set(sp: argparse.ArgumentParser) -> None:
        example = SET_EXAMPLES[sp.prog.split()[-1]]
        sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override a config value (repeatable), e.g. {example}")

    sp = sub.add_parser("validate", help="print the fully resolved config of a file (of a sweep "
                        "file: its base config and each row's changes)")
    sp.add_argument("file", help="a suite, sweep or pretraining config")
    add_set(sp)
    sp.set_defaults(func=cmd_validate)

    sp = sub.add_parser("run", help="run a suite: pretrain, evaluate, collate a leaderboard")
    sp.add_argument("suite")
    sp.add_argument("--out", help="output directory (overrides the suite's output_dir)")
    sp.add_argument("--launcher", default="inprocess",
                    choices=["inprocess", "torchrun", "submitit-local", "slurm"],
                    help="where stages run: this process, torchrun processes (data-parallel "
                    "pretraining), local submitit jobs, or SLURM jobs")
    sp.add_argument("--nproc-per-node", type=int_at_least(1), default=1,
                    help="torchrun: processes per machine")
    sp.add_argument("--nnodes", type=int_at_least(1), default=1, help="torchrun: machines")
    sp.add_argument("--node-rank", type=int_at_least(0), default=0,
                    help="torchrun: this machine's index")
    sp.add_argument("--master-addr", help="torchrun: address of the node with --node-rank 0")
    sp.add_argument("--master-port", type=int_at_least(1, 65535), default=29500,
                    help="torchrun: a free port there")
    sp.add_argument("--partition", help="SLURM partition")
    sp.add_argument("--gpus-per-node", type=int_at_least(0), default=0)
    sp.add_argument("--timeout-min", type=int_at_least(1), default=24 * 60)
    add_set(sp)
    sp.set_defaults(func=cmd_run)

    sp = sub.add_parser("plan", help="list a suite's stages and which are done / pending / failed")
    sp.add_argument("suite")
    sp.add_argument("--out", help="output directory (overrides the suite's output_dir)")
    sp.add_argument("--estimate", action="store_true",
                    help="also print each stage's steps x step time and the total device-hours")
    sp.add_argument("--bench-table", metavar="FILE",
                    help="a `mimbench bench --csv` file measured on the target hardware "
                         "(default: the shipped estimates, results/bench/estimates.csv)")
    sp.add_argument("--gpu", help="the device of the table's rows to use (default with the "
                                  "shipped table: H100; it also has A100)")
    sp.add_argument("--train-images", type=int_at_least(1), metavar="N",
                    help="train split size (default: counted in data.source)")
    sp.add_argument("--val-images", type=int_at_least(1), metavar="N",
                    help="val split size (default: counted in data.source)")
    add_set(sp)
    sp.set_defaults(func=cmd_plan)

    sp = sub.add_parser("status", help="live progress of a suite's stages (bars, ETA, state)")
    sp.add_argument("target", help="a suite or sweep file, or its output directory")
    sp.add_argument("--out", help="output directory (overrides the suite's output_dir)")
    sp.add_argument("--watch", type=seconds, default=0, metavar="SECONDS",
                    help="refresh every SECONDS until interrupted")
    sp.add_argument("--stale", type=seconds, default=300.0, metavar="SECONDS",
                    help="a stage locked by a process on another host whose lock heartbeat is "
                    "older than this (or, without a lock, whose files are) is 'interrupted'")
    add_set(sp)
    sp.set_defaults(func=cmd_status)

    sp = sub.add_parser("pretrain", help="run one pretraining config")
    sp.description = _pretrain_description()
    sp.add_argument("config")
    sp.add_argument("--out", help="stage directory (default: the config's output_dir)")
    sp.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    sp.add_argument("--overwrite", action="store_true", help="start over even if a checkpoint exists")
    add_set(sp)
    sp.set_defaults(func=cmd_pretrain)

    sp = sub.add_parser("eval", help="evaluate one encoder on one task")
    lazy_help(sp.add_argument("task"), _task_help)
    sp.add_argument("--encoder", required=True,
                    help="a checkpoint (mimbench, timm, MAE, BEiT, SimMIM, mmpretrain, safetensors), "
                    "random:<preset>, or a timm model name (random init)")
    sp.add_argument("--arch", type=encoder_preset, help=preset_help(
        "encoder preset the checkpoint fits (default: inferred from its weights)"))
    sp.add_argument("--format", default="auto", help=_format_help("auto"))
    sp.add_argument("--allow-partial", action="store_true",
                    help="load a checkpoint whose keys do not all match (they are listed)")
    sp.add_argument("--strict", action="store_true",
                    help="unreadable image files are fatal (default: skipped and counted in the record)")
    sp.add_argument("--data", default="shapes", help="the task's dataset root (an ImageFolder with train/ and val/; "
                    "COCO, ADE20K or NYU-Depth v2 for the dense tasks), or 'shapes'")
    sp.add_argument("--name", help="encoder name in the leaderboard")
    sp.add_argument("--seed", type=int_at_least(0), default=0)
    sp.add_argument("--out", default="runs", help="output directory")
    sp.add_argument("--suite-name", default="eval")
    add_set(sp)
    sp.set_defaults(func=cmd_eval)

    for cmd, helptext in (("export", "write an encoder as a timm state dict (.pth) and .safetensors"),
                          ("import", "convert a checkpoint of a known family into a mimbench encoder file")):
        sp = sub.add_parser(cmd, help=helptext)
        if cmd == "export":
            sp.add_argument("encoder", help="checkpoint file, random:<preset>, or a timm model name")
            sp.add_argument("--out", required=True, help="output path without suffix (.pth/.safetensors/.json)")
            formats = sp.add_argument("--formats", default="timm,safetensors")
            lazy_help(formats, _export_formats_help)
            sp.add_argument("--seed", type=int_at_least(0), default=0,
                            help="seed of a random init")
        else:
            sp.add_argument("checkpoint")
            sp.add_argument("--out", required=True, help="the mimbench encoder file to write")
        sp.add_argument("--format", default="auto", help=_format_help("auto"))
        sp.add_argument("--allow-partial", action="store_true", help="accept missing / unused keys")
        sp.add_argument("--arch", type=encoder_preset, help=preset_help(
            "encoder preset the checkpoint was trained as (default: the file's metadata; "
            "required where the file does not say, e.g. the heads)"))
        sp.add_argument("--img-size", type=int_at_least(1),
                        help="target resolution (position embeddings are resized)")
        sp.add_argument("--overwrite", action="store_true",
                        help="replace existing output files (never the file being read)")
        sp.set_defaults(func=cmd_export if cmd == "export" else cmd_import)

    sp = sub.add_parser("report", help="collate records into a leaderboard (md, csv, tex, and an "
                        "HTML page) and each sweep's ablation table (md, csv, tex, png)")
    sp.add_argument("records", help="a records directory")
    sp.add_argument("--out", help="where leaderboard.{md,csv,tex,html} and ablation/<sweep>."
                    "{md,csv,tex,png} go (default: beside records)")
    sp.add_argument("--published", help="published numbers put beside ours in the md and html "
                    "leaderboards where a row's recipe (or imported checkpoint format) and "
                    "encoder match (default: results/published.yaml)")
    sp.add_argument("--with-time", action="store_true",
                    help="also write wall_time.{md,csv}: each encoder's top-1 metrics beside the "
                    "wall seconds of the runs behind them, task by task")
    sp.set_defaults(func=cmd_report)

    sp = sub.add_parser("ablation", help="collate a sweep's records into its ablation table "
                        "(md, csv, tex, png) with the published numbers beside ours")
    sp.add_argument("records", help="a records directory")
    sp.add_argument("--out", help="where ablation/<sweep>.* go (default: beside records)")
    sp.add_argument("--published", help="published numbers (default: results/published_ablations.yaml)")
    sp.set_defaults(func=cmd_ablation)

    sp = sub.add_parser("data", help="datasets: synth (write the synthetic shapes dataset), "
                        "shard (an ImageFolder as WebDataset tar shards)")
    dsub = sp.add_subparsers(dest="data_command", required=True, metavar="COMMAND")
    ds = dsub.add_parser("synth", help="write the synthetic shapes dataset")
    ds.add_argument("--out", required=True, help="a new or empty directory (or an earlier output)")
    ds.add_argument("--seed", type=int, default=0, help="seed everything derives from (>= 0)")
    ds.add_argument("--image-size", type=int, default=32, help="side of the images in px (>= 8)")
    ds.add_argument("--train-per-class", type=int, default=100,
                    help="train images per class (>= 1)")
    ds.add_argument("--val-per-class", type=int, default=25, help="val images per class (>= 1)")
    ds.add_argument("--depth", action="store_true",
                    help="also write the scenes' depth maps in NYU-Depth v2's layout (nyu_depth_v2/)")
    ds.add_argument("--robust", action="store_true", help="also write the robustness copies of "
                    "val (ImageNet-A/-R/-Sketch/-V2/-C layouts and real.json) into OUT/robust")
    ds.set_defaults(func=cmd_data_synth)
    ds = dsub.add_parser("shard", help="write an ImageFolder root (train/, val/) as WebDataset tar "
                         "shards with a manifest; every task and pretraining read it as data.source")
    ds.add_argument("imagefolder", help="ImageFolder root holding train/<class>/* and val/<class>/*")
    ds.add_argument("--out", required=True, help="a new or empty directory (or an earlier output)")
    ds.add_argument("--shard-size", type=int_at_least(1), default=1000,
                    help="images per shard (default 1000)")
    ds.add_argument("--seed", type=int, default=0,
                    help="seed of the order in which images are spread over the shards")
    ds.set_defaults(func=cmd_data_shard)

    sp = sub.add_parser("viz", help="pictures: masks (each masking strategy's masks)")
    vsub = sp.add_subparsers(dest="viz_command", required=True, metavar="COMMAND")
    vm = vsub.add_parser("masks", help="a PNG of each masking strategy's masks")
    vm.add_argument("--out", default="masks.png")
    vm.add_argument("--arch", default="vit_base_16",
                    help=preset_help("encoder preset whose patch grid is masked"))
    lazy_help(vm.add_argument("--strategy", action="append"), _strategies_help)
    vm.add_argument("--ratio", type=float,
                    help="one mask ratio in (0, 1) for all (default: each paper's)")
    vm.add_argument("--samples", type=int, default=6, help="columns of masks (>= 1)")
    vm.add_argument("--seed", type=int, default=0)
    vm.add_argument("--avgdist-draws", type=int, default=256,
                    help="masks drawn per strategy for its AvgDist (SimMIM Fig. 3; >= 1)")
    vm.set_defaults(func=cmd_viz_masks)

    from harness import bench as bench_mod

    sp = sub.add_parser("bench", help="img/s, peak memory and FLOPs of each recipe's and task's "
                        "step; `mimbench bench data`: the input pipeline's img/s per worker")
    bench_mod.build_parser(sp)
    sp.set_defaults(func=bench_mod.main)

    # listed for --help; main() hands its arguments to downstream.bench_probe unparsed
    sub.add_parser("bench-probe", add_help=False,
                   help="the fast and the faithful (MAE) linear probe side by side on one encoder: "
                   "accuracy and wall time (options: mimbench bench-probe --help)")
    for listed in sub._choices_actions:  # a command's own --help starts with what it does
        command = sub.choices[listed.dest]
        command.description = command.description or listed.help
    return p


#: User errors, and OS errors about a path the user gave (missing, a directory, not writable):
#: one message, exit 2.
USER_ERRORS: tuple[type[Exception], ...] = (
    UserError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError,
)


def main(argv: list[str] | None = None) -> int:
    """Entry point; user errors print one clear message and exit with status 2."""
    from pydantic import ValidationError

    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv[:1] == ["bench-probe"]:
            from downstream.bench_probe import main as bench_probe_main

            args = argparse.Namespace(func=lambda _: bench_probe_main(argv[1:]))
        elif argv[:2] == ["bench", "data"]:  # the input pipeline's benchmark: its own options
            from harness.bench_data import main as bench_data_main

            args = argparse.Namespace(func=lambda _: bench_data_main(argv[2:]))
        else:
            try:
                args = build_parser().parse_args(argv)
            except SystemExit as exc:  # --help, --version
                return int(exc.code or 0)
        return int(args.func(args))
    except USER_ERRORS as exc:
        print(f"mimbench: error: {exc}", file=sys.stderr)
        return 2
    except ValidationError as exc:  # a schema built from command-line values
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'value'}: "
                             f"{e['msg'].removeprefix('Value error, ')}" for e in exc.errors())
        print(f"mimbench: error: {problems}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mimbench: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
