"""NVIDIA DALI: decode and augment on the GPU (nvJPEG, `mixed`) on GPU machines, on CPU threads elsewhere.

Each rank reads its own shard by global rank (shards.py): the epoch's global shuffle is a list of samples this
module hands to the pipeline, so the order is a function of (seed, epoch) alone, the same for every loader
and the same after a resume. DALI's own sharding (`shard_id`, `num_shards`) is not used: with
`shuffle_after_epoch` its permutation comes from an internal seed and an epoch counter that restarts at 0 when
a job is resumed, and uneven val shards under its PARTIAL policy hand the smaller shard empty batches.

A folder tree is read by `fn.readers.file` (one open per image). Packed shards are read by offset
(`fn.external_source` fed by ShardBatches: encoded bytes from a pool of reading threads, a batch ahead), into
the same decoders: DALI's own tar reader (`fn.readers.webdataset`) only shuffles within a buffer.

A pipeline is built for each pass over the data (one epoch of training, one evaluation): building one takes
about 10 ms, and a fresh pipeline cannot continue a pass that `--max-steps-per-epoch` cut short.
"""
from __future__ import annotations

import math
import re
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch
from nvidia.dali import Pipeline, fn, pipeline_def, types
from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type
from nvidia.dali.tensors import TensorListGPU

from ..context import DistContext
from ..config import TrainConfig
from ..errors import UserError
from . import Loaders, Samples, default_threads
from .check import image_problem
from .packed import PackedSamples
from .samples import FileSamples
from .shards import train_shard, val_shard
from .torchvision_loader import MEAN, STD, unreadable_message

# DALI normalizes uint8 pixels: ImageNet's mean and std in 0..255.
MEAN_255 = [255 * m for m in MEAN]
STD_255 = [255 * s for s in STD]
# nvJPEG's buffers sized once for the largest ImageNet image (NVIDIA's DALI ResNet-50 example does the same),
# so decoding never reallocates mid-epoch; the hardware decoder (A100, H100) preallocated for 5980 x 6430 px.
NVJPEG_HINTS = dict(device_memory_padding=211_025_920, host_memory_padding=140_544_512,
                    preallocate_width_hint=5980, preallocate_height_hint=6430)
# Threads that read packed images (preads: I/O, not CPU; they wait on the disk or the network file system).
READ_THREADS = 8


def decoder_options(device: str) -> dict:
    """The decoder's backend (`mixed`: nvJPEG on the GPU) and, for it, nvJPEG's memory hints."""
    return dict(device="mixed", **NVJPEG_HINTS) if device == "gpu" else dict(device="cpu")


def choose_device(requested: str, ctx: DistContext) -> str:
    """gpu when this rank has a GPU (or asked for it), else cpu. DALI never falls back by itself: a mixed
    decoder on a machine without a GPU fails when the pipeline is built."""
    has_gpu = ctx.device.type == "cuda"
    if requested == "gpu" and not has_gpu:
        raise UserError("--dali-device gpu: this rank has no GPU (torch.cuda.is_available() is False); "
                        "use --dali-device cpu or auto")
    if requested == "auto":
        return "gpu" if has_gpu else "cpu"
    return requested


class ShardBatches:
    """fn.external_source's callable for packed samples: batch i's encoded images and labels, in order. Reads
    run on a thread pool, and batch i + 1's start when batch i is handed over, so that DALI's call (on the
    thread that schedules the pipeline) mostly finds its bytes read."""

    def __init__(self, samples: PackedSamples, batch_size: int, pool: ThreadPoolExecutor):
        self.samples, self.batch_size, self.pool = samples, batch_size, pool
        self.batches = math.ceil(len(samples) / batch_size)
        self.reads: dict[int, list[Future]] = {}

    def submit(self, batch: int) -> list[Future]:
        first = batch * self.batch_size
        indices = range(first, min(first + self.batch_size, len(self.samples)))
        return [self.pool.submit(self.samples.read, i) for i in indices]

    def __call__(self, batch: int):
        if batch >= self.batches:  # DALI schedules ahead past the pass's end
            raise StopIteration
        reads = self.reads.pop(batch, None) or self.submit(batch)
        if batch + 1 < self.batches and batch + 1 not in self.reads:
            self.reads[batch + 1] = self.submit(batch + 1)
        first = batch * self.batch_size
        encoded = [np.frombuffer(read.result(), dtype=np.uint8) for read in reads]
        labels = [np.array([self.samples.label(first + i)], dtype=np.int32) for i in range(len(reads))]
        return encoded, labels


def read_encoded(samples: FileSamples | PackedSamples, batch_size: int, pool: ThreadPoolExecutor | None):
    """In a pipeline definition: each sample's encoded bytes and label, in the list's order."""
    if isinstance(samples, FileSamples):
        return fn.readers.file(files=samples.paths, labels=samples.labels, random_shuffle=False, name="reader")
    return fn.external_source(source=ShardBatches(samples, batch_size, pool), num_outputs=2, batch=True,
                              dtype=[types.UINT8, types.INT32])


@pipeline_def
def train_pipeline(samples, pool, device: str, image_size: int, min_crop_area: float, channels_last: bool):
    pipeline = Pipeline.current()
    encoded, label = read_encoded(samples, pipeline.max_batch_size, pool)
    # Scale and aspect-ratio augmentation (Sec. 5.1), as torchvision's RandomResizedCrop draws it, decoding
    # only the crop's region of the JPEG. The random operators' seeds are explicit: DALI would otherwise give
    # them seeds in the order operators are created, which differs between readers (files, shards).
    images = fn.decoders.image_random_crop(
        encoded, output_type=types.RGB, random_area=[min_crop_area, 1.0], random_aspect_ratio=[3 / 4, 4 / 3],
        num_attempts=10, seed=pipeline.seed, **decoder_options(device),
    )
    images = fn.resize(images, resize_x=image_size, resize_y=image_size, interp_type=types.INTERP_LINEAR,
                       antialias=True)
    images = fn.crop_mirror_normalize(
        images, dtype=types.FLOAT, output_layout="HWC" if channels_last else "CHW",
        mean=MEAN_255, std=STD_255, mirror=fn.random.coin_flip(probability=0.5, seed=pipeline.seed + 1),
    )
    return images, label.gpu() if device == "gpu" else label  # labels beside the images: no copy in the step


@pipeline_def
def val_pipeline(samples, pool, device: str, image_size: int, val_resize: int, channels_last: bool):
    encoded, label = read_encoded(samples, Pipeline.current().max_batch_size, pool)
    images = fn.decoders.image(encoded, output_type=types.RGB, **decoder_options(device))
    # A single center crop of the image resized to val_resize on its shorter side (Sec. 5.1).
    images = fn.resize(images, resize_shorter=val_resize, interp_type=types.INTERP_LINEAR, antialias=True)
    images = fn.crop_mirror_normalize(
        images, dtype=types.FLOAT, output_layout="HWC" if channels_last else "CHW",
        crop=(image_size, image_size), mean=MEAN_255, std=STD_255,
    )
    return images, label.gpu() if device == "gpu" else label


class DaliPass:
    """One pass over a list of samples per iteration: builds the pipeline, yields (images, labels) on the
    rank's device, and turns a decode failure into a UserError that names the image.

    The pass drives the pipeline itself rather than through DALI's iterator: it schedules exactly the batches
    of the pass, `prefetch` ahead of the one in use. DALI's iterator keeps scheduling past the end (it expects
    the same pipeline to carry on into the next epoch), which here would decode batches that are thrown away.
    A partial last batch (val) is cut to the samples that belong to the pass.

    Nothing here waits for the GPU: outputs on the GPU are bound to torch's current stream (share_outputs'
    cuda_stream) and copied out on it; CPU outputs (--dali-device cpu) go to the GPU from pinned memory
    without blocking."""

    def __init__(self, samples: FileSamples | PackedSamples, build, ctx: DistContext, batch_size: int,
                 prefetch: int, channels_last: bool):
        self.samples, self.build, self.ctx = samples, build, ctx
        self.batch_size, self.prefetch, self.channels_last = batch_size, prefetch, channels_last

    def __iter__(self):
        if not len(self.samples):
            return
        batches = math.ceil(len(self.samples) / self.batch_size)
        pipeline = self.build(self.samples)
        pipeline.build()
        scheduled = min(self.prefetch, batches)
        for _ in range(scheduled):
            pipeline.schedule_run()
        try:
            for index in range(batches):
                try:
                    images, labels = pipeline.share_outputs(cuda_stream=self.stream)
                except RuntimeError as error:
                    raise UserError(self.decode_failure(error, index)) from None
                keep = min(self.batch_size, len(self.samples) - index * self.batch_size)
                images, labels = self.to_torch(images)[:keep], self.to_torch(labels)[:keep]
                pipeline.release_outputs()
                if scheduled < batches:
                    pipeline.schedule_run()
                    scheduled += 1
                if self.channels_last:  # NHWC from DALI is NCHW in channels_last memory format, no copy
                    images = images.permute(0, 3, 1, 2)
                yield (images.to(self.ctx.device, non_blocking=True),  # no-ops when DALI decoded on this GPU
                       labels.to(self.ctx.device, non_blocking=True).squeeze(-1).long())
        finally:
            del pipeline  # its threads and buffers go with the pass

    @property
    def stream(self):
        """torch's current stream on a GPU rank (DALI's outputs are bound to it, the host does not wait)."""
        return torch.cuda.current_stream(self.ctx.device) if self.ctx.device.type == "cuda" else None

    def to_torch(self, batch) -> torch.Tensor:
        """A copy of a DALI batch in a torch tensor on the batch's device (DALI reuses its buffers); a CPU
        batch for a GPU rank in pinned memory, so that its copy to the GPU does not block the host."""
        on_gpu = isinstance(batch, TensorListGPU)
        dense = batch.as_tensor()  # one (batch, ...) tensor: every sample has the same shape here
        tensor = torch.empty(dense.shape(), dtype=to_torch_type[dense.dtype],
                             device=self.ctx.device if on_gpu else "cpu",
                             pin_memory=not on_gpu and self.ctx.device.type == "cuda")
        feed_ndarray(dense, tensor, cuda_stream=self.stream if on_gpu else None)
        return tensor

    def decode_failure(self, error: RuntimeError, batch_index: int) -> str:
        """DALI names the file for some failures ("Failed to decode sample #3 : <path>"), not for all
        ("nvImageCodec failure: '#4'"), and never for bytes from an external source. Then the culprit is in a
        batch in flight: the one asked for or one decoded ahead of it; check those images with PIL."""
        text = str(error)
        named = re.search(r"Failed to decode sample #\d+ : (.+)", text)
        if named:
            return unreadable_message(named.group(1).strip(), "DALI could not decode it")
        first = batch_index * self.batch_size
        in_flight = range(first, min(first + (self.prefetch + 2) * self.batch_size, len(self.samples)))
        for index in in_flight:
            problem = image_problem(self.samples.read(index))
            if problem:
                return unreadable_message(self.samples.name(index), problem)
        reason = text.split("encountered:", 1)[-1].strip().splitlines()[0] if "encountered:" in text else text
        return (f"DALI failed in batch {batch_index} ({self.samples.name(in_flight[0])} ... "
                f"{self.samples.name(in_flight[-1])}): {reason}")


def dali_loaders(config: TrainConfig, ctx: DistContext, samples: Samples) -> Loaders:
    device = choose_device(config.dali_device, ctx)
    threads = config.dali_threads or default_threads(ctx)
    options = dict(batch_size=config.pass_batch, num_threads=threads, prefetch_queue_depth=config.dali_prefetch,
                   device_id=ctx.local_rank if device == "gpu" else None)
    size, layout = config.image_size, config.channels_last
    packed = isinstance(samples.train, PackedSamples)
    pool = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="shard-read") if packed else None
    position = [0, 0]  # (epoch, images done before it) of the pass set_epoch selected

    def build_train(pass_samples):
        # Augmentation draws from (seed, epoch, images done, rank): a run resumed at an epoch boundary crops
        # what the uninterrupted one did; one resumed within an epoch reads the same images, cropped afresh
        # (DALI's generators cannot skip ahead).
        seed = int(np.random.SeedSequence([config.seed, *position, ctx.rank]).generate_state(1)[0] >> 1)
        return train_pipeline(pass_samples, pool, device, size, config.min_crop_area, layout, seed=seed, **options)

    def build_val(pass_samples):
        return val_pipeline(pass_samples, pool, device, size, config.val_resize, layout, seed=config.seed,
                            **options)

    train = DaliPass(samples.train.subset([]), build_train, ctx, config.pass_batch, config.dali_prefetch, layout)

    def set_epoch(epoch: int, images_done: int = 0) -> None:
        indices = train_shard(len(samples.train), config.seed, epoch, ctx.rank, ctx.size, images_done)
        usable = len(indices) // config.pass_batch * config.pass_batch  # full batches only
        train.samples = samples.train.subset(indices[:usable])
        position[:] = [epoch, images_done]

    set_epoch(0)
    val = DaliPass(samples.val.subset(val_shard(len(samples.val), ctx.rank, ctx.size)), build_val, ctx,
                   config.pass_batch, config.dali_prefetch, layout)
    where = "GPU (nvJPEG, mixed)" if device == "gpu" else f"CPU, {threads} threads per rank"
    source = f", read from packed shards by {READ_THREADS} threads" if packed else ""
    return Loaders(
        train=train,
        val=val,
        train_batches=len(samples.train) // ctx.size // config.pass_batch,
        num_classes=samples.num_classes,
        set_epoch=set_epoch,
        description=f"DALI, decoding on the {where}{source}",
    )
