"""Host synchronizations: the moments the CPU waits for the GPU. Each one drains the GPU's queue (no kernel of
the next step is launched while the host waits), so a training step allows itself at most one (its finite
check, step.TrainStep), beside Horovod's synchronize() and GradScaler's own inf check (SYNC_BUDGET).

Two counters, one log:
- `count_syncs()`, on any machine: a torch function mode that records each operation that synchronizes when
  its tensors live on a GPU: a value read on the host (item, bool(), int(), float(), tolist, numpy, cpu,
  f"{t}", print(t), torch.equal), a result whose size depends on the data (nonzero, masked_select, unique),
  a copy to a device without non_blocking=True (.to(device), .cuda(), called from this package: inside torch
  such a call moves a tensor to the device it is already on, which copies nothing) and a tensor built from
  Python data on a device (torch.tensor(data, device=...)). On the CPU nothing waits: the count is what a GPU
  would wait for. Not seen: copy_ between devices (on the CPU every tensor is on one device) and syncs inside
  libraries that call CUDA themselves (DALI). A new epoch's shuffle reads a CPU permutation (shards.py), which
  the count cannot tell from a device tensor: count steps within one epoch.
- `count_cuda_syncs()`, on a GPU: torch.cuda.set_sync_debug_mode("warn") reports every synchronizing CUDA
  call that torch makes; the ground truth that the first approximates.
Each sync is charged to the nearest frame of this package (its call site, e.g. "hvd_imagenet/step.py:97"),
or to GradScaler's own check or to Horovod when it happens inside them.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import importlib.util
import linecache
import os
import sys
import warnings
from dataclasses import dataclass, field

import torch
from torch.overrides import TorchFunctionMode

SYNC_BUDGET = 1  # host syncs of our own per optimizer step, in steady state
PACKAGE = os.path.dirname(os.path.abspath(__file__))
OWNERS = ("ours", "GradScaler", "Horovod")

# torch functions (by name) that wait for the device whatever their arguments
READS_ON_HOST = {
    "item",
    "tolist",
    "numpy",
    "cpu",
    "__bool__",
    "__int__",
    "__float__",
    "__index__",
    "__format__",
    "__repr__",
    "__str__",
    "equal",
    "allclose",
    "is_nonzero",
}
DATA_DEPENDENT_SHAPES = {"nonzero", "masked_select", "unique", "unique_consecutive", "repeat_interleave"}
FROM_PYTHON_DATA = {"tensor", "as_tensor", "asarray"}
BLOCKING_COPIES = ("to(device) without non_blocking", "cuda() without non_blocking")


@dataclass(frozen=True)
class Sync:
    what: str  # the operation, or (from CUDA's debug mode) the line that made it
    site: str  # "path:line (function)" of the nearest frame of this package, or of the library's
    owner: str  # one of OWNERS ("ours" counts against the budget), or "other" (no frame of this package)


@dataclass
class SyncLog:
    syncs: list[Sync] = field(default_factory=list)

    def record(self, what: str, frame) -> None:
        owner, site = _attribute(frame)
        self.syncs.append(Sync(what, site, owner))

    def count(self, owner: str = "ours") -> int:
        return sum(sync.owner == owner for sync in self.syncs)

    def sites(self, owner: str = "ours") -> dict[str, int]:
        """{'site: what': count}, most frequent first."""
        found = collections.Counter(f"{s.site}: {s.what}" for s in self.syncs if s.owner == owner)
        return dict(found.most_common())


@functools.lru_cache(maxsize=1)
def _horovod_dir() -> str | None:
    spec = importlib.util.find_spec("horovod")
    return next(iter(spec.submodule_search_locations), None) if spec and spec.submodule_search_locations else None


def _attribute(frame) -> tuple[str, str]:
    """(owner, site) for a sync made in `frame` (the innermost Python frame), walking outwards."""
    horovod = _horovod_dir()
    innermost = None
    while frame is not None:
        path, function = frame.f_code.co_filename, frame.f_code.co_name
        if path.endswith(os.path.join("amp", "grad_scaler.py")) and function == "_maybe_opt_step":
            return "GradScaler", f"torch/amp/grad_scaler.py:{frame.f_lineno} ({function})"
        if horovod and path.startswith(horovod + os.sep):
            return "Horovod", f"horovod/{os.path.relpath(path, horovod)}:{frame.f_lineno} ({function})"
        if _in_package(frame):
            return "ours", f"hvd_imagenet/{os.path.relpath(path, PACKAGE)}:{frame.f_lineno} ({function})"
        if innermost is None and "warnings" not in os.path.basename(path):
            innermost = f"{path}:{frame.f_lineno} ({function})"
        frame = frame.f_back
    return "other", innermost or "?"


def _in_package(frame) -> bool:
    path = frame.f_code.co_filename
    return path.startswith(PACKAGE + os.sep) and path != __file__


def syncing_operation(func, args: tuple, kwargs: dict) -> str | None:
    """The name of the synchronization that calling func(*args, **kwargs) makes on a GPU, or None."""
    name = getattr(func, "__name__", "")
    if name in READS_ON_HOST or name in DATA_DEPENDENT_SHAPES:
        return name
    if name in FROM_PYTHON_DATA and kwargs.get("device") is not None:
        return f"torch.{name}(..., device=...)"
    if name == "to" and args:
        options = {key: value for key, value in kwargs.items() if key != "copy"}  # _parse_to takes no copy=
        device, _, non_blocking, _ = torch._C._nn._parse_to(*args[1:], **options)
        return None if device is None or non_blocking else BLOCKING_COPIES[0]
    if name == "cuda" and not kwargs.get("non_blocking", len(args) > 2 and args[2]):
        return BLOCKING_COPIES[1]
    return None


class _CountingMode(TorchFunctionMode):
    def __init__(self, log: SyncLog):
        super().__init__()
        self.log = log

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        what = syncing_operation(func, args, kwargs)
        caller = sys._getframe(1)
        if what and (what not in BLOCKING_COPIES or _in_package(caller)):
            self.log.record(what, caller)
        return func(*args, **kwargs)


@contextlib.contextmanager
def count_syncs():
    """The torch operations within the block that would synchronize a GPU (any machine)."""
    log = SyncLog()
    with _CountingMode(log):
        yield log


@contextlib.contextmanager
def count_cuda_syncs():
    """The synchronizing CUDA calls torch makes within the block (a GPU: torch.cuda.set_sync_debug_mode).
    torch emits a warning at each; the hook sees it while the caller's frames are still on the stack."""
    log = SyncLog()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        shown = warnings.showwarning

        def hook(message, category, filename, lineno, file=None, line=None):
            if "synchronizing CUDA operation" not in str(message):
                return shown(message, category, filename, lineno, file, line)
            log.record(linecache.getline(filename, lineno).strip() or "cuda sync", sys._getframe(1))

        warnings.showwarning = hook
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield log
        finally:
            torch.cuda.set_sync_debug_mode("default")


def counter(device: torch.device):
    """CUDA's own report on a GPU, the operation count elsewhere."""
    return count_cuda_syncs() if device.type == "cuda" else count_syncs()


def report(log: SyncLog, steps: int) -> dict:
    """Per optimizer step: our syncs (against SYNC_BUDGET) by call site, and the ones the budget leaves aside."""
    return {
        "steps": steps,
        "budget_per_step": SYNC_BUDGET,
        "per_step": log.count("ours") / steps,
        "sites": {site: n / steps for site, n in log.sites("ours").items()},
        "excluded_per_step": {owner: log.count(owner) / steps for owner in OWNERS[1:]},
        "other_per_step": log.count("other") / steps,
    }
