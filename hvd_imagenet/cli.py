"""`hvd-imagenet COMMAND`: the subcommands, each defined beside the code it drives (a `COMMAND` in its module:
an options dataclass whose fields are the flags, and the function that runs it). This file only assembles them.

Only the chosen command's module is imported, so `hvd-imagenet schedule` does not wait for Horovod. Problems a
user can fix end as one line on stderr and exit status 2, with no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from . import flags
from .errors import UserError
from .recipes import RECIPES

COMMANDS = {  # name: (module holding COMMAND, one line of help)
    "train": ("hvd_imagenet.train", "train (run one process per GPU/worker: horovodrun, srun, mpirun)"),
    "schedule": ("hvd_imagenet.schedule", "print the lr of every iteration as CSV"),
    "make-dataset": ("hvd_imagenet.data.make_dataset", "write a small learnable ImageNet-layout set of JPEG files"),
    "prepare-imagenet": (
        "hvd_imagenet.data.prepare",
        "the official ImageNet archives into the train/<wnid>/, val/<wnid>/ tree, checked",
    ),
    "check-data": ("hvd_imagenet.data.check", "decode every image once; report odd and unreadable files"),
    "pack": ("hvd_imagenet.data.pack", "a folder tree into large tar shards and an index (fewer file opens)"),
    "stage": ("hvd_imagenet.data.stage", "copy packed shards to a node-local directory, unless already there"),
    "bench-loader": ("hvd_imagenet.bench.loader", "input pipelines side by side: img/s, CPU-s/img, memory"),
    "bench-epoch": (
        "hvd_imagenet.bench.epoch",
        "an epoch boundary's cost beyond its steps, part by part, before/after",
    ),
    "bench-allreduce": (
        "hvd_imagenet.bench.allreduce",
        "gradient allreduce per compressor: time, algbw, busbw, wire bytes",
    ),
    "bench-train": (
        "hvd_imagenet.bench.train",
        "training steps split into forward/backward/allreduce-wait/optimizer; Horovod vs DDP; weak scaling",
    ),
    "scaling-model": (
        "hvd_imagenet.bench.scaling",
        "predicted step time, img/s, efficiency and 90-epoch time at 1..32 nodes x 8 GPUs",
    ),
    "study": (
        "hvd_imagenet.study.run",
        "the paper's Table 1 / 2a at small scale: a grid of train runs, study.md and plots",
    ),
}


class Parser(argparse.ArgumentParser):
    def error(self, message: str):
        """One line, no usage dump: the same shape as every other error of the tool."""
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser(chosen: str | None) -> argparse.ArgumentParser:
    """Every command's name and help; the flags of the chosen one only (its module is imported here)."""
    parser = Parser(
        prog="hvd-imagenet", description="ResNet-50 on ImageNet with the recipe of Goyal et al. (2017), on Horovod."
    )
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for name, (module, help_text) in COMMANDS.items():
        if name != chosen:
            commands.add_parser(name, help=help_text)
            continue
        command = importlib.import_module(module).COMMAND
        sub = commands.add_parser(
            name,
            help=help_text,
            description=command.description or help_text,
            epilog=command.epilog() if command.epilog else None,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        flags.add_flags(sub, command.options)
        sub.set_defaults(command_spec=command, command_parser=sub)
    return parser


def parse(argv: list[str]) -> argparse.Namespace:
    """The chosen command's flags; a --recipe (recipes.py) fills the defaults of the flags not given."""
    chosen = next((arg for arg in argv if not arg.startswith("-")), None)
    parser = build_parser(chosen if chosen in COMMANDS else None)
    args = parser.parse_args(argv)
    if getattr(args, "recipe", None):
        args.command_parser.set_defaults(**{k: v for k, v in RECIPES[args.recipe].items() if hasattr(args, k)})
        args = parser.parse_args(argv)
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    status = 0
    try:
        command = args.command_spec
        status = command.run(flags.from_args(command.options, args))
    except UserError as error:
        print(f"hvd-imagenet {args.command}: error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `hvd-imagenet schedule ... | head`
        sys.stderr.close()
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
