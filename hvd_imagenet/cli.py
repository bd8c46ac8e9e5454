"""`hvd-imagenet`: train, schedule, make-dataset, check-data, bench-loader, bench-allreduce, bench-train,
scaling-model, study.

The train flags are built from the fields of config.TrainConfig (and the lr fields of schedule.LRPolicy), one
flag per field, so defaults and help live with the dataclass. Problems a user can fix end as one line on
stderr and exit status 2, with no traceback.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import os
import sys
from pathlib import Path

from .errors import UserError


class Parser(argparse.ArgumentParser):
    def error(self, message: str):
        """One line, no usage dump: the same shape as every other error of the tool."""
        self.exit(2, f"{self.prog}: error: {message}\n")


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(item) for item in text.split(",") if item.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_dataclass_flags(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = ()) -> None:
    """--field-name for every field of a dataclass; a nested dataclass adds its own fields' flags."""
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            add_dataclass_flags(parser, type(default), skip)
            continue
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "") + " (default: %(default)s)"
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        elif isinstance(default, tuple):
            parser.add_argument(flag, type=_int_list, default=default, metavar="N,N,...",
                                help=f.metadata.get("help", "") + f" (default: {','.join(map(str, default))})")
        else:
            parser.add_argument(flag, type=type(default), default=default, help=help_text)


def build_dataclass(cls, args: argparse.Namespace):
    """The dataclass from parsed flags (nested dataclasses included); its __post_init__ validates."""
    values = {}
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            values[f.name] = build_dataclass(type(default), args)
        elif hasattr(args, f.name):
            values[f.name] = getattr(args, f.name)
    return cls(**values)


def cmd_train(args: argparse.Namespace) -> int:
    """Every rank runs this. An error is one line that names the rank; the launcher (horovodrun, mpirun,
    srun) sees the non-zero status and ends the job. The ranks that survive a failed peer say so in one line
    each, not a traceback each from hundreds of ranks."""
    import traceback

    from .comm import PeerFailure, rank_if_started
    from .config import TrainConfig
    from .errors import Diverged
    from .train import main

    config = build_dataclass(TrainConfig, args)
    try:
        main(config)
    except PeerFailure:
        raise UserError(f"rank {rank_if_started()}: stopped: another rank failed and Horovod shut down; the "
                        "launcher's log names the rank that failed first") from None
    except Diverged as error:  # every rank stops at the same step; rank 0 says so for all
        if rank_if_started() == 0:
            print(f"hvd-imagenet train: {error}", file=sys.stderr)
        return Diverged.EXIT_STATUS
    except UserError as error:
        rank = rank_if_started()
        raise UserError(f"rank {rank}: {error}" if rank is not None else str(error)) from None
    except Exception:  # a bug or a fault we did not foresee: the whole traceback, with the rank on every line
        rank = rank_if_started()
        for line in traceback.format_exc().splitlines():
            print(f"rank {rank}: {line}", file=sys.stderr)
        return 1
    return 0


def cmd_schedule(args: argparse.Namespace) -> None:
    from .schedule import LRPolicy, lr_at

    for name in ("world_size", "batch_size", "batches_per_allreduce", "epochs", "iters_per_epoch"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, not {getattr(args, name)}")
    policy = build_dataclass(LRPolicy, args)
    policy.check_fits(args.epochs)
    global_batch = args.world_size * args.batches_per_allreduce * args.batch_size
    out = csv.writer(sys.stdout, lineterminator="\n")
    out.writerow(["iteration", "epoch", "lr"])
    for iteration in range(args.epochs * args.iters_per_epoch):
        out.writerow([iteration, f"{iteration / args.iters_per_epoch:.6f}",
                      f"{lr_at(policy, iteration, args.iters_per_epoch, global_batch):.8g}"])


def cmd_make_dataset(args: argparse.Namespace) -> None:
    from .data.make_dataset import make_dataset, make_digits

    shapes_only = {"classes": 10, "train_per_class": 100, "val_per_class": 20, "seed": 0}
    if args.kind == "digits":
        given = [f"--{name.replace('_', '-')}" for name in shapes_only if getattr(args, name) is not None]
        if given:
            raise UserError(f"--kind digits is a fixed data set (10 classes, a fixed split); drop {' '.join(given)}")
        count = make_digits(Path(args.output))
    else:
        values = {name: default if getattr(args, name) is None else getattr(args, name)
                  for name, default in shapes_only.items()}
        count = make_dataset(Path(args.output), **values, workers=args.workers)
    print(f"make-dataset: wrote {count} JPEG files to {args.output}")


def cmd_check_data(args: argparse.Namespace) -> int:
    import json

    from .data.check import per_class_counts, scan, summary, write_file_list

    data = Path(args.data)
    reports = scan(data, args.workers, progress=not args.json)
    unreadable = [r for r in reports if r.problem]
    if args.json:
        print(json.dumps({
            "data": str(data), "images": len(reports), "per_class": per_class_counts(reports),
            "odd": {r.path: r.oddity for r in reports if r.problem is None and r.oddity},
            "unreadable": {r.path: r.problem for r in unreadable},
        }, indent=1))
    else:
        print(summary(reports))
    if args.write_file_list:
        count = write_file_list(reports, Path(args.write_file_list))
        print(f"check-data: wrote {count} readable files to {args.write_file_list}; "
              f"train with --file-list {args.write_file_list}", file=sys.stderr)
        return 0
    if unreadable:
        print(f"check-data: {len(unreadable)} unreadable file(s); write a list without them with "
              "--write-file-list F and train with --file-list F", file=sys.stderr)
        return 1
    return 0


def cmd_bench_loader(args: argparse.Namespace) -> None:
    import json

    from .bench.loader import bench_loaders, format_report

    for name in ("batch_size", "epochs", "threads", "repeats", "image_size", "dali_prefetch"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, not {getattr(args, name)}")
    loaders = getattr(args, "loader", ["dali", "torchvision"])
    report = bench_loaders(Path(args.data), loaders, args.batch_size, args.epochs, args.threads, args.repeats,
                           args.image_size, args.dali_device, args.dali_prefetch)
    report["command"] = "hvd-imagenet " + " ".join(sys.argv[1:])
    print(json.dumps(report, indent=1) if args.json else format_report(report))


def _comma_list(choices: tuple[str, ...] | None = None):
    def parse(text: str) -> list[str]:
        items = [item.strip() for item in text.split(",") if item.strip()]
        wrong = [item for item in items if choices and item not in choices]
        if wrong or not items:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {', '.join(choices or ())}, "
                                             f"got {text!r}")
        return items
    return parse


def _payload_list(text: str) -> list[str]:
    items = _comma_list()(text)
    for item in items:
        if item != "resnet50":
            try:
                if float(item) < 1:
                    raise ValueError
            except ValueError:
                raise argparse.ArgumentTypeError(f"a payload is resnet50 or a number of floats, not {item!r}") from None
    return items


def _emit(report: dict, args: argparse.Namespace, format_report) -> None:
    """Rank 0's result: to --result-file for the driver that launched the ranks, else the table or JSON."""
    import json

    if getattr(args, "result_file", None):
        Path(args.result_file).write_text(json.dumps(report))
    else:
        print(json.dumps(report, indent=1) if args.json else format_report(report))


def cmd_bench_allreduce(args: argparse.Namespace) -> None:
    from .bench import launch
    from .bench.allreduce import bench_allreduce, format_report

    for name in ("np", "repeats", "powersgd_rank"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, not {getattr(args, name)}")
    if launch.under_launcher():  # one of the ranks
        if args.link != "loopback":
            raise UserError("--link starts its own ranks in a shaped network namespace; run bench-allreduce "
                            "without horovodrun/mpirun/srun")
        from . import comm

        ctx = comm.init()
        report = bench_allreduce(ctx, args.payloads, args.compression, args.repeats, args.warmup,
                                 args.powersgd_rank)
        if ctx.is_primary:
            _emit({**report, "command": "hvd-imagenet " + " ".join(sys.argv[1:])}, args, format_report)
        comm.shutdown()
        return
    forward = ["bench-allreduce", "--payloads", ",".join(args.payloads), "--compression", ",".join(args.compression),
               "--repeats", str(args.repeats), "--warmup", str(args.warmup), "--powersgd-rank", str(args.powersgd_rank)]
    with launch.shaped_namespace(args.link) as prefix:
        measured = launch.measure_link(prefix) if prefix else None
        report = launch.run_ranks(prefix, args.np, args.controller, forward)
    report["link"] = {"name": args.link, "shaped": bool(prefix), "measured_gbit_s": measured and measured / 1e9}
    report["command"] = "hvd-imagenet " + " ".join(sys.argv[1:])
    _emit(report, args, format_report)


def cmd_bench_train(args: argparse.Namespace) -> None:
    from .bench import launch
    from .bench.train import bench_train, format_report, summarize
    from .config import TrainConfig

    for name in ("steps", "repeats", "batch_size", "image_size", "powersgd_rank"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, not {getattr(args, name)}")
    if min(args.np) < 1:
        raise UserError(f"--np must be >= 1, not {min(args.np)}")
    config_fields = ("arch", "batch_size", "image_size", "loader", "data", "precision", "channels_last",
                     "powersgd_rank", "powersgd_start_step", "gradient_predivide_factor", "fusion_threshold_mb",
                     "cycle_time_ms", "hierarchical_allreduce")
    if launch.under_launcher():  # one of the ranks: one backend, one compression
        if len(args.backend) > 1 or len(args.compression) > 1 or args.link != "loopback":
            raise UserError("under a launcher, bench-train measures one --backend and one --compression on the "
                            "launcher's ranks (no --link); as a command it runs each combination itself")
        config = TrainConfig(output="(bench-train writes nothing)", val_resize=args.image_size,
                             compression=args.compression[0], workers=args.threads, dali_threads=args.threads,
                             **{name: getattr(args, name) for name in config_fields})
        run = bench_train(args.backend[0], config, args.steps, args.warmup, args.threads)
        if run:
            _emit({"runs": [run], "rows": summarize([run]), "repeats": 1,
                   "command": "hvd-imagenet " + " ".join(sys.argv[1:])}, args, format_report)
        return
    threads = args.threads or max(1, (os.cpu_count() or 1) // max(args.np))  # the same per worker at every --np
    forward = ["bench-train", "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(threads)]
    for name in config_fields:
        value = getattr(args, name)
        if isinstance(value, bool):
            forward.append(f"--{'' if value else 'no-'}{name.replace('_', '-')}")
        elif value != "":
            forward += [f"--{name.replace('_', '-')}", str(value)]
    cases = [(np, backend, compression)
             for np in args.np for backend in args.backend for compression in args.compression]
    runs = []
    from tqdm import tqdm

    with launch.shaped_namespace(args.link) as prefix:
        measured = launch.measure_link(prefix) if prefix else None
        with tqdm(total=args.repeats * len(cases), desc="bench-train", unit="run", leave=False) as progress:
            for _ in range(args.repeats):  # interleaved: a slow moment of the machine hits every case alike
                for np, backend, compression in cases:
                    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(launch.free_port())}
                    report = launch.run_ranks(prefix, np, args.controller, [*forward, "--backend", backend,
                                                                            "--compression", compression], env)
                    runs.extend(report["runs"])
                    progress.update()
    report = {"benchmark": "bench-train", "repeats": args.repeats, "rows": summarize(runs), "runs": runs,
              "link": {"name": args.link, "shaped": bool(prefix), "measured_gbit_s": measured and measured / 1e9},
              "command": "hvd-imagenet " + " ".join(sys.argv[1:])}
    _emit(report, args, format_report)


def cmd_scaling_model(args: argparse.Namespace) -> None:
    import json
    import statistics

    from .bench.scaling import Cluster, format_report, plot, scaling_table

    if args.from_bench:
        runs = [r for r in json.loads(Path(args.from_bench).read_text())["runs"] if r["ranks"] == 1]
        if not runs:
            raise UserError(f"--from-bench {args.from_bench}: no 1-rank run in it (bench-train --np 1)")
        args.step_time_ms = 1000 * statistics.median(r["step_seconds"] for r in runs)
        args.batch_size = runs[0]["batch_size"]
    cluster = build_dataclass(Cluster, args)
    for name in ("step_time_ms", "batch_size", "gpus_per_node", "nvlink_gb_s", "nic_gbit_s", "nics_per_node",
                 "hbm_gb_s", "powersgd_rank", "epochs"):
        if getattr(cluster, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be > 0, not {getattr(cluster, name)}")
    if not 0 <= cluster.overlap <= 1:
        raise UserError(f"--overlap must be in [0, 1], not {cluster.overlap}")
    if min(args.nodes) < 1:
        raise UserError(f"--nodes must be >= 1, not {min(args.nodes)}")
    report = scaling_table(cluster, list(args.nodes), args.compression)
    report["command"] = "hvd-imagenet " + " ".join(sys.argv[1:])
    if args.plot:
        plot(report, args.plot)
    print(json.dumps(report, indent=1) if args.json else format_report(report))


def cmd_study(args: argparse.Namespace) -> None:
    from .study import report, run
    from .study.grid import Scale, resolve

    if args.seeds < 1:
        raise UserError(f"--seeds must be >= 1, not {args.seeds}")
    settings, scale = resolve(args.preset, build_dataclass(Scale, args))
    output = Path(args.output)
    runs = run.plan(settings, args.seeds, output)
    command = "hvd-imagenet " + " ".join(sys.argv[1:])
    run.write_plan(runs, scale, args.preset, command, output)
    run.run_all(runs, scale, Path(args.data))
    written = report.write_report(runs, settings, scale, args.preset, command, output)
    print(f"study: wrote {', '.join(str(path) for path in written)}")


def add_launch_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of a bench command that starts its own ranks (bench/launch.py), and its output."""
    from .bench.launch import LINKS

    parser.add_argument("--controller", choices=("gloo", "mpi"), default="gloo", help="(as a command)")
    parser.add_argument("--link", choices=LINKS, default="loopback",
                        help="(as a command, root) run the ranks in a namespace whose lo is shaped to this rate")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--result-file", help=argparse.SUPPRESS)  # where rank 0 leaves its result for the driver


def build_parser() -> argparse.ArgumentParser:
    from .config import TrainConfig
    from .schedule import LRPolicy

    parser = Parser(prog="hvd-imagenet", description="ResNet-50 on ImageNet with the recipe of Goyal et al. "
                                                     "(2017), on Horovod.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    train = commands.add_parser("train", help="train (run one process per GPU/worker: horovodrun, srun, mpirun)",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_dataclass_flags(train, TrainConfig)
    train.set_defaults(run=cmd_train)

    schedule = commands.add_parser("schedule", help="print the lr of every iteration as CSV")
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    schedule.add_argument("--world-size", type=int, required=True, help="number of workers k")
    schedule.add_argument("--batch-size", type=int, default=defaults["batch_size"], help="images per worker n")
    schedule.add_argument("--batches-per-allreduce", type=int, default=defaults["batches_per_allreduce"])
    schedule.add_argument("--epochs", type=int, default=defaults["epochs"])
    schedule.add_argument("--iters-per-epoch", type=int, required=True, help="optimizer steps per epoch")
    add_dataclass_flags(schedule, LRPolicy)
    schedule.set_defaults(run=cmd_schedule)

    from .data.make_dataset import KINDS

    make = commands.add_parser("make-dataset", help="write a small learnable ImageNet-layout set of JPEG files")
    make.add_argument("--output", required=True)
    make.add_argument("--kind", choices=KINDS, default="shapes",
                      help="shapes: generated colored shapes, 200-500 px; digits: scikit-learn's 1,797 "
                           "handwritten digits (real), 20 px, a fixed train/val split")
    make.add_argument("--classes", type=int, help="shapes: classes (default 10)")
    make.add_argument("--train-per-class", type=int, help="shapes: train images per class (default 100)")
    make.add_argument("--val-per-class", type=int, help="shapes: val images per class (default 20)")
    make.add_argument("--seed", type=int, help="shapes: seed (default 0)")
    make.add_argument("--workers", type=int, default=0, help="processes (0: all cores)")
    make.set_defaults(run=cmd_make_dataset)

    check = commands.add_parser("check-data", help="decode every image once; report odd and unreadable files",
                                description="Exit status 1 when a file cannot be decoded (0 with "
                                            "--write-file-list, whose list leaves such files out).")
    check.add_argument("--data", required=True, help="DIR/train/<class>/*, DIR/val/<class>/*")
    check.add_argument("--write-file-list", metavar="F", help="write the readable files here, for train --file-list")
    check.add_argument("--workers", type=int, default=0, help="processes (0: all cores)")
    check.add_argument("--json", action="store_true", help="machine-readable report on stdout")
    check.set_defaults(run=cmd_check_data)

    from .config import DALI_DEVICES, LOADERS

    bench = commands.add_parser("bench-loader", help="input pipelines side by side: img/s, CPU-s/img, memory",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    bench.add_argument("--data", required=True, help="DIR/train/<class>/* (the train split is read)")
    bench.add_argument("--loader", action="append", choices=LOADERS[:2], default=argparse.SUPPRESS,
                       help="repeat to compare; the last is the baseline of the ratio (default: dali, torchvision)")
    bench.add_argument("--batch-size", type=int, default=32)
    bench.add_argument("--image-size", type=int, default=224)
    bench.add_argument("--epochs", type=int, default=2, help="timed epochs per repeat, after one untimed")
    bench.add_argument("--repeats", type=int, default=3, help="the table shows the median over repeats")
    bench.add_argument("--threads", type=int, default=os.cpu_count(),
                       help="DALI threads and DataLoader workers alike")
    bench.add_argument("--dali-device", choices=DALI_DEVICES, default="auto")
    bench.add_argument("--dali-prefetch", type=int, default=2)
    bench.add_argument("--json", action="store_true")
    bench.set_defaults(run=cmd_bench_loader)

    from .config import COMPRESSIONS

    launched = ("Run it as a command (it starts `horovodrun -np N` on this machine, inside a network namespace "
                "with a shaped lo for --link), or as every rank under a launcher (horovodrun, mpirun, srun).")
    bench_ar = commands.add_parser(
        "bench-allreduce", help="gradient allreduce per compressor: time, algbw, busbw, wire bytes",
        description="Times the allreduce of ResNet-50's gradients and of flat float32 tensors for each "
                    "compressor. " + launched, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    bench_ar.add_argument("--payloads", type=_payload_list, default=["resnet50", "1e6", "4e6", "25.6e6"],
                          help="resnet50 (its 161 gradient tensors, fused) and/or numbers of float32 elements")
    bench_ar.add_argument("--compression", type=_comma_list(COMPRESSIONS), default=list(COMPRESSIONS),
                          help="compressors, comma-separated (powersgd: resnet50 payload only)")
    bench_ar.add_argument("--repeats", type=int, default=10, help="timed runs; the table shows the median")
    bench_ar.add_argument("--warmup", type=int, default=2, help="untimed runs first")
    bench_ar.add_argument("--powersgd-rank", type=int, default=defaults["powersgd_rank"])
    bench_ar.add_argument("--np", type=int, default=2, help="ranks to start on this machine (as a command)")
    add_launch_flags(bench_ar)
    bench_ar.set_defaults(run=cmd_bench_allreduce)

    from .config import PRECISIONS

    bench_tr = commands.add_parser(
        "bench-train", help="training steps split into forward/backward/allreduce-wait/optimizer; Horovod vs DDP; "
                            "weak scaling", description="Times training steps of the same model and data under "
                            "Horovod and under PyTorch DDP (gloo on the CPU, NCCL on GPUs), at each --np, for each "
                            "--compression; weak-scaling efficiency is img/s per worker against the fewest ranks. "
                            + launched, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    bench_tr.add_argument("--backend", type=_comma_list(("horovod", "ddp")), default=["horovod", "ddp"])
    bench_tr.add_argument("--np", type=_int_list, default=(1, 2), metavar="N,N,...",
                          help="ranks to start on this machine, one run each (as a command)")
    bench_tr.add_argument("--compression", type=_comma_list(COMPRESSIONS), default=["none"],
                          help="Horovod: ours; DDP: PyTorch's fp16/bf16/PowerSGD comm hooks")
    bench_tr.add_argument("--arch", default="resnet50")
    bench_tr.add_argument("--batch-size", type=int, default=defaults["batch_size"], help="n, per worker")
    bench_tr.add_argument("--image-size", type=int, default=224)
    bench_tr.add_argument("--loader", choices=LOADERS, default="synthetic")
    bench_tr.add_argument("--data", default="", help="with --loader dali|torchvision")
    bench_tr.add_argument("--precision", choices=PRECISIONS, default="fp32")
    bench_tr.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=False)
    bench_tr.add_argument("--powersgd-rank", type=int, default=defaults["powersgd_rank"])
    bench_tr.add_argument("--powersgd-start-step", type=int, default=0,
                          help="0: compressed from the first step (DDP's hook needs 2 plain steps: within --warmup)")
    bench_tr.add_argument("--gradient-predivide-factor", type=float, default=defaults["gradient_predivide_factor"])
    bench_tr.add_argument("--fusion-threshold-mb", type=float, default=defaults["fusion_threshold_mb"])
    bench_tr.add_argument("--cycle-time-ms", type=float, default=defaults["cycle_time_ms"])
    bench_tr.add_argument("--hierarchical-allreduce", action=argparse.BooleanOptionalAction,
                          default=defaults["hierarchical_allreduce"])
    bench_tr.add_argument("--steps", type=int, default=10, help="timed steps per run")
    bench_tr.add_argument("--warmup", type=int, default=3, help="untimed steps first (>= 2 for DDP's PowerSGD)")
    bench_tr.add_argument("--repeats", type=int, default=3, help="runs per case (as a command); medians shown")
    bench_tr.add_argument("--threads", type=int, default=0,
                          help="CPU threads per worker (0: cores / the largest --np, the same at every --np)")
    add_launch_flags(bench_tr)
    bench_tr.set_defaults(run=cmd_bench_train)

    from .bench.scaling import Cluster

    scaling = commands.add_parser(
        "scaling-model", help="predicted step time, img/s, efficiency and 90-epoch time at 1..32 nodes x 8 GPUs",
        description="An alpha-beta model of Horovod's allreduce (ring and hierarchical) for each compressor, from "
                    "one GPU's step time; its assumptions are in hvd_imagenet/bench/scaling.py and "
                    "docs/communication.md. Defaults: H100 SXM nodes, 8 GPUs on NVLink, 8 x 200 Gb/s InfiniBand.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_dataclass_flags(scaling, Cluster)
    scaling.add_argument("--from-bench", metavar="JSON", help="take n and the 1-GPU step time from a bench-train "
                                                              "--json result's 1-rank runs")
    scaling.add_argument("--nodes", type=_int_list, default=(1, 2, 4, 8, 16, 32), metavar="N,N,...")
    scaling.add_argument("--compression", type=_comma_list(("none", "fp16", "powersgd")),
                         default=["none", "fp16", "powersgd"], help="(bf16 would be fp16 on the wire)")
    scaling.add_argument("--plot", metavar="PNG", help="efficiency vs GPUs (needs matplotlib: pip install .[study])")
    scaling.add_argument("--json", action="store_true")
    scaling.set_defaults(run=cmd_scaling_model)

    from .study.grid import PRESETS, Scale

    study = commands.add_parser(
        "study", help="the paper's Table 1 / 2a at small scale: a grid of train runs, study.md and plots",
        description="Runs a grid of `train` jobs under horovodrun (one after another; give the same command "
                    "again to resume) and writes OUTPUT/study.md with the top-1 val error of each row, mean "
                    "± std over seeds, and PNG plots. Defaults: scikit-learn's digits (make-dataset --kind "
                    "digits), cifar_resnet14, small kn = 2 ranks x n=4 = 8, large kn = 32x that by virtual "
                    "workers; see hvd_imagenet/study/grid.py and the README.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    study.add_argument("--data", required=True, help="ImageNet-layout data set (make-dataset --kind digits)")
    study.add_argument("--output", required=True, help="study directory: study.md, *.png, runs/")
    study.add_argument("--preset", choices=PRESETS, default="table1",
                       help="table1: no/constant/gradual warmup at large kn vs the small-kn baseline; table2a: "
                            "lr scaling rules; quick: baseline and gradual warmup, 3 epochs")
    study.add_argument("--seeds", type=int, default=3, help="runs per setting (seeds 0..N-1)")
    add_dataclass_flags(study, Scale)
    study.set_defaults(run=cmd_study)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    status = 0
    try:
        status = args.run(args)
    except UserError as error:
        print(f"hvd-imagenet {args.command}: error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `hvd-imagenet schedule ... | head`
        sys.stderr.close()
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
