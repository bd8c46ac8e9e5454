"""NVIDIA DALI: decode and augment on the GPU (nvJPEG, `mixed`) on GPU machines, on CPU threads elsewhere.

Each rank reads its own shard by global rank (shards.py): the epoch's global shuffle is a list of samples this
module feeds to the pipeline, so the order is a function of (seed, epoch) alone, the same for every loader
and the same after a resume. DALI's own sharding (`shard_id`, `num_shards`) is not used: with
`shuffle_after_epoch` its permutation comes from an internal seed and an epoch counter that restarts at 0 when
a job is resumed, and uneven val shards under its PARTIAL policy hand the smaller shard empty batches.

Pipelines are built once per run (train and val; again only when an elastic job changes size) and fed each
pass by `fn.external_source` (EpochFeed): a pool of reading threads reads the pass's encoded images, from a
folder tree (one open each) or packed shards (one pread each), a batch ahead. At a pass's end the feed raises
StopIteration, DALI's end of epoch, and the pipeline is reset for the next pass, not rebuilt: at 256 H100s an
epoch is ~0.7 s of steps, and a build re-creates decoder threads and nvJPEG's buffers.

The crop and flip are not drawn by DALI's random operators (their generators live as long as the pipeline and
cannot be reseeded): each image's draws are a function of (seed, epoch, image index), fed beside its bytes,
and the pipeline turns them into torchvision's RandomResizedCrop window (crop_window). So the batches do not
depend on the pipeline's age, on the rank, or on where a resumed run started: a run resumed mid-epoch reads
and crops exactly what the uninterrupted one did.
"""

from __future__ import annotations

import math
import weakref
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import nvidia.dali.math as dmath
import torch
from nvidia.dali import Pipeline, fn, pipeline_def, types
from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type
from nvidia.dali.tensors import TensorListGPU

from ..config import TrainConfig
from ..context import DistContext
from ..errors import UserError
from .check import image_problem
from .loaders import Loaders, Samples, default_threads
from .packed import PackedSamples
from .samples import FileSamples
from .shards import train_shard, val_shard
from .torchvision_loader import MEAN, STD, unreadable_message

# DALI normalizes uint8 pixels: ImageNet's mean and std in 0..255.
MEAN_255 = [255 * m for m in MEAN]
STD_255 = [255 * s for s in STD]
# nvJPEG's buffers sized once for the largest ImageNet image (NVIDIA's DALI ResNet-50 example does the same),
# so decoding never reallocates mid-epoch; the hardware decoder (A100, H100) preallocated for 5980 x 6430 px.
NVJPEG_HINTS = dict(
    device_memory_padding=211_025_920,
    host_memory_padding=140_544_512,
    preallocate_width_hint=5980,
    preallocate_height_hint=6430,
)
# Threads that read encoded images (opens and preads: I/O, not CPU; they wait on the disk or the file system).
READ_THREADS = 8
# Per image, the uniform draws of RandomResizedCrop (torchvision's get_params): an area fraction and a log
# aspect ratio per attempt, the crop's offsets, the flip.
ATTEMPTS = 10
DRAWS = 2 * ATTEMPTS + 3
ASPECT_RATIOS = (3 / 4, 4 / 3)


def decoder_options(device: str) -> dict:
    """The decoder's backend (`mixed`: nvJPEG on the GPU) and, for it, nvJPEG's memory hints."""
    return dict(device="mixed", **NVJPEG_HINTS) if device == "gpu" else dict(device="cpu")


def choose_device(requested: str, ctx: DistContext) -> str:
    """gpu when this rank has a GPU (or asked for it), else cpu. DALI never falls back by itself: a mixed
    decoder on a machine without a GPU fails when the pipeline is built."""
    has_gpu = ctx.device.type == "cuda"
    if requested == "gpu" and not has_gpu:
        raise UserError(
            "--dali-device gpu: this rank has no GPU (torch.cuda.is_available() is False); "
            "use --dali-device cpu or auto"
        )
    if requested == "auto":
        return "gpu" if has_gpu else "cpu"
    return requested


def augmentation_draws(seed: int, epoch: int, indices: np.ndarray) -> np.ndarray:
    """(len(indices), DRAWS) uniforms in [0, 1), float32: SplitMix64's outputs at counters given by the image's
    index in the data set, from a key of (seed, epoch). Vectorized (microseconds a batch) and a function of
    the image and the epoch only, like torchvision_loader.EpochShard's per-image seeds."""
    key = np.uint64(np.random.SeedSequence([seed, epoch]).generate_state(1, dtype=np.uint64)[0])
    counter = indices.astype(np.uint64)[:, None] * np.uint64(DRAWS) + np.arange(1, DRAWS + 1, dtype=np.uint64)
    z = key + counter * np.uint64(0x9E3779B97F4A7C15)  # uint64 arithmetic wraps around, as SplitMix64's does
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    return ((z >> np.uint64(40)).astype(np.float32) / np.float32(1 << 24)).astype(np.float32)


def crop_window(encoded, draws, min_crop_area: float):
    """In a pipeline definition: the (x, y) anchor and (w, h) size, in pixels, of torchvision's
    RandomResizedCrop (Sec. 5.1's scale and aspect-ratio augmentation) for each image, from its header's size
    and its draws: the first of ATTEMPTS (area, ratio) pairs that fits the image, placed at random; if none
    fits, the center crop of the ratio nearest the image's. Per-image arithmetic on the CPU, vectorized over
    the attempts; torchvision computes it in float64, this in float32, so a window may differ by a pixel."""
    shape = fn.peek_image_shape(encoded, dtype=types.FLOAT)  # the header only; EXIF-rotated like the decode
    height, width = shape[0], shape[1]
    low, high = math.log(ASPECT_RATIOS[0]), math.log(ASPECT_RATIOS[1])
    area = height * width * (min_crop_area + (1.0 - min_crop_area) * draws[0:ATTEMPTS])
    ratio = dmath.exp(low + (high - low) * draws[ATTEMPTS : 2 * ATTEMPTS])
    w = dmath.floor(dmath.sqrt(area * ratio) + 0.5)
    h = dmath.floor(dmath.sqrt(area / ratio) + 0.5)
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    score = fits * types.Constant(np.arange(ATTEMPTS, 0, -1, dtype=np.float32))  # the first that fits scores highest
    best = fn.reductions.max(score)
    first, found = score == best, best > 0
    wide, tall = width > height * ASPECT_RATIOS[1], width < height * ASPECT_RATIOS[0]
    center_w = dmath.floor(wide * (height * ASPECT_RATIOS[1] + 0.5) + (1 - wide) * width)
    center_h = dmath.floor(tall * (width / ASPECT_RATIOS[0] + 0.5) + (1 - tall) * height)
    w = found * fn.reductions.sum(first * w) + (1 - found) * center_w
    h = found * fn.reductions.sum(first * h) + (1 - found) * center_h
    y = found * dmath.floor(draws[2 * ATTEMPTS] * (height - h + 1)) + (1 - found) * dmath.floor((height - h) / 2)
    x = found * dmath.floor(draws[2 * ATTEMPTS + 1] * (width - w + 1)) + (1 - found) * dmath.floor((width - w) / 2)
    return fn.cast(fn.stack(x, y), dtype=types.INT32), fn.cast(fn.stack(w, h), dtype=types.INT32)


class EpochFeed:
    """fn.external_source's callable: the current pass's batches, in order (encoded images, labels, and for
    training each image's draws), then StopIteration. Reads run on a thread pool, and batch i + 1's start
    when batch i is handed over, so that DALI's call (on the thread that schedules the pipeline) mostly finds
    its bytes read."""

    def __init__(
        self, samples: FileSamples | PackedSamples, batch_size: int, pool: ThreadPoolExecutor, seed: int | None
    ):
        self.samples, self.batch_size, self.pool, self.seed = samples, batch_size, pool, seed
        self.start([], 0)

    def start(self, indices, epoch: int) -> None:
        """Feed `indices` (into the samples), a batch at a time, from the next call on."""
        self.indices, self.epoch, self.next = np.asarray(indices, dtype=np.int64), epoch, 0
        self.batches = math.ceil(len(self.indices) / self.batch_size)
        self.reads: dict[int, list[Future]] = {}

    def stop(self) -> None:
        """End the pass early: the next call raises StopIteration."""
        self.start([], self.epoch)

    def batch_indices(self, batch: int) -> np.ndarray:
        return self.indices[batch * self.batch_size : (batch + 1) * self.batch_size]

    def submit(self, batch: int) -> list[Future]:
        return [self.pool.submit(self.samples.read, int(i)) for i in self.batch_indices(batch)]

    def __call__(self):
        batch = self.next
        if batch >= self.batches:  # DALI schedules ahead past the pass's end: this ends its epoch
            raise StopIteration
        self.next += 1
        reads = self.reads.pop(batch, None) or self.submit(batch)
        if batch + 1 < self.batches:
            self.reads[batch + 1] = self.submit(batch + 1)
        indices = self.batch_indices(batch)
        encoded = [np.frombuffer(read.result(), dtype=np.uint8) for read in reads]
        labels = [np.array([self.samples.label(int(i))], dtype=np.int32) for i in indices]
        if self.seed is None:
            return encoded, labels
        return encoded, labels, list(augmentation_draws(self.seed, self.epoch, indices))


@pipeline_def
def train_pipeline(feed: EpochFeed, device: str, image_size: int, min_crop_area: float, channels_last: bool):
    encoded, label, draws = fn.external_source(
        source=feed, num_outputs=3, batch=True, dtype=[types.UINT8, types.INT32, types.FLOAT]
    )
    # Scale and aspect-ratio augmentation (Sec. 5.1), as torchvision's RandomResizedCrop draws it, decoding
    # only the crop's region of the JPEG.
    anchor, size = crop_window(encoded, draws, min_crop_area)
    images = fn.decoders.image_slice(
        encoded,
        anchor,
        size,
        normalized_anchor=False,
        normalized_shape=False,
        output_type=types.RGB,
        **decoder_options(device),
    )
    images = fn.resize(
        images, resize_x=image_size, resize_y=image_size, interp_type=types.INTERP_LINEAR, antialias=True
    )
    images = fn.crop_mirror_normalize(
        images,
        dtype=types.FLOAT,
        output_layout="HWC" if channels_last else "CHW",
        mean=MEAN_255,
        std=STD_255,
        mirror=fn.cast(draws[2 * ATTEMPTS + 2] < 0.5, dtype=types.INT32),
    )
    return images, label.gpu() if device == "gpu" else label  # labels beside the images: no copy in the step


@pipeline_def
def val_pipeline(feed: EpochFeed, device: str, image_size: int, val_resize: int, channels_last: bool):
    encoded, label = fn.external_source(source=feed, num_outputs=2, batch=True, dtype=[types.UINT8, types.INT32])
    images = fn.decoders.image(encoded, output_type=types.RGB, **decoder_options(device))
    # A single center crop of the image resized to val_resize on its shorter side (Sec. 5.1).
    images = fn.resize(images, resize_shorter=val_resize, interp_type=types.INTERP_LINEAR, antialias=True)
    images = fn.crop_mirror_normalize(
        images,
        dtype=types.FLOAT,
        output_layout="HWC" if channels_last else "CHW",
        crop=(image_size, image_size),
        mean=MEAN_255,
        std=STD_255,
    )
    return images, label.gpu() if device == "gpu" else label


class DaliPass:
    """Passes over a list of samples, one per iteration, through one pipeline built at the first pass and
    reset, not rebuilt, after each: yields (images, labels) on the rank's device, and turns a decode failure
    into a UserError that names the image. `builds` counts the pipelines built (one per run).
    start() begins a pass's decoding before it is iterated (train's next epoch, while this one is evaluated).

    The pass drives the pipeline itself rather than through DALI's iterator: it schedules the batches of the
    pass, `prefetch` ahead of the one in use, and the feed's StopIteration ends DALI's epoch. A partial last
    batch (val) is cut to the samples that belong to the pass. A pass left before its end
    (--max-steps-per-epoch, a stop signal) is drained when it is closed: the feed stops, the batches in flight
    (at most `prefetch`) are decoded and dropped, and the pipeline is reset.

    Nothing here waits for the GPU: outputs on the GPU are bound to torch's current stream (share_outputs'
    cuda_stream) and copied out on it; CPU outputs (--dali-device cpu) go to the GPU from pinned memory
    without blocking."""

    def __init__(self, feed: EpochFeed, build, ctx: DistContext, batch_size: int, prefetch: int, channels_last: bool):
        self.feed, self.build, self.ctx = feed, build, ctx
        self.batch_size, self.prefetch, self.channels_last = batch_size, prefetch, channels_last
        self.indices, self.epoch = [], 0
        self.pipeline, self.builds, self.active, self.started = None, 0, None, False

    def select(self, indices, epoch: int = 0) -> None:
        """What the next pass reads: `indices` into the feed's samples, with the epoch's augmentation draws."""
        self.close_active()
        if self.started:  # started, never iterated
            self.end_pass(self.pipeline)
        self.indices, self.epoch, self.started = indices, epoch, False

    def start(self) -> None:
        """Feed the pass and schedule its first `prefetch` batches now (a no-op if already started)."""
        if self.started or not len(self.indices):
            return
        pipeline = self.ready_pipeline()
        self.feed.start(self.indices, self.epoch)
        pipeline.schedule_run()  # after a build or a reset, DALI schedules `prefetch` batches at once
        self.started = True

    def close_active(self) -> None:
        active = self.active() if self.active else None
        if active is not None:  # a pass still open (not run to its end, not yet collected): drained
            active.close()

    def __iter__(self):
        self.close_active()
        batches = self.run_pass()
        self.active = weakref.ref(batches)
        return batches

    def run_pass(self):
        if not len(self.indices):
            return
        self.start()
        pipeline, self.started = self.pipeline, False  # this pass takes what start() scheduled
        try:
            for index in range(self.feed.batches):
                try:
                    images, labels = pipeline.share_outputs(cuda_stream=self.stream)
                except RuntimeError as error:
                    self.pipeline = None  # a pipeline that failed is not reused
                    raise UserError(self.decode_failure(error, index)) from None
                keep = min(self.batch_size, len(self.indices) - index * self.batch_size)
                images, labels = self.to_torch(images)[:keep], self.to_torch(labels)[:keep]
                pipeline.release_outputs()
                pipeline.schedule_run()  # the next batch; past the pass's end the feed ends DALI's epoch
                if self.channels_last:  # NHWC from DALI is NCHW in channels_last memory format, no copy
                    images = images.permute(0, 3, 1, 2)
                yield (
                    images.to(self.ctx.device, non_blocking=True),  # no-ops when DALI decoded on this GPU
                    labels.to(self.ctx.device, non_blocking=True).squeeze(-1).long(),
                )
        finally:
            if self.pipeline is pipeline:
                self.end_pass(pipeline)

    def ready_pipeline(self) -> Pipeline:
        if self.pipeline is None:
            self.pipeline = self.build(self.feed)
            self.pipeline.build()
            self.builds += 1
        return self.pipeline

    def end_pass(self, pipeline: Pipeline) -> None:
        """Stop the feed, drop the batches still in flight (none after a whole pass), reset DALI's epoch."""
        self.feed.stop()
        pipeline.schedule_run()  # reaches the stopped feed: DALI's epoch ends (a no-op if it had ended)
        try:
            while True:
                pipeline.share_outputs(cuda_stream=self.stream)
                pipeline.release_outputs()
        except StopIteration:
            pipeline.reset()

    @property
    def stream(self):
        """torch's current stream on a GPU rank (DALI's outputs are bound to it, the host does not wait)."""
        return torch.cuda.current_stream(self.ctx.device) if self.ctx.device.type == "cuda" else None

    def to_torch(self, batch) -> torch.Tensor:
        """A copy of a DALI batch in a torch tensor on the batch's device (DALI reuses its buffers); a CPU
        batch for a GPU rank in pinned memory, so that its copy to the GPU does not block the host."""
        on_gpu = isinstance(batch, TensorListGPU)
        dense = batch.as_tensor()  # one (batch, ...) tensor: every sample has the same shape here
        tensor = torch.empty(
            dense.shape(),
            dtype=to_torch_type[dense.dtype],
            device=self.ctx.device if on_gpu else "cpu",
            pin_memory=not on_gpu and self.ctx.device.type == "cuda",
        )
        feed_ndarray(dense, tensor, cuda_stream=self.stream if on_gpu else None)
        return tensor

    def decode_failure(self, error: RuntimeError, batch_index: int) -> str:
        """DALI does not name the image (its bytes came from the feed). The culprit is in a batch in flight:
        the one asked for or one decoded ahead of it; check those images with PIL."""
        samples, text = self.feed.samples, str(error)
        first = batch_index * self.batch_size
        in_flight = self.indices[first : first + (self.prefetch + 2) * self.batch_size]
        for index in in_flight:
            problem = image_problem(samples.read(int(index)))
            if problem:
                return unreadable_message(samples.name(int(index)), problem)
        reason = text.split("encountered:", 1)[-1].strip().splitlines()[0] if "encountered:" in text else text
        return (
            f"DALI failed in batch {batch_index} ({samples.name(int(in_flight[0]))} ... "
            f"{samples.name(int(in_flight[-1]))}): {reason}"
        )


def dali_loaders(config: TrainConfig, ctx: DistContext, samples: Samples) -> Loaders:
    device = choose_device(config.dali_device, ctx)
    threads = config.dali_threads or default_threads(ctx)
    options = dict(
        batch_size=config.pass_batch,
        num_threads=threads,
        prefetch_queue_depth=config.dali_prefetch,
        device_id=ctx.local_rank if device == "gpu" else None,
    )
    size, layout, batch, prefetch = config.image_size, config.channels_last, config.pass_batch, config.dali_prefetch
    pool = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="image-read")
    train = DaliPass(
        EpochFeed(samples.train, batch, pool, seed=config.seed),
        lambda feed: train_pipeline(feed, device, size, config.min_crop_area, layout, **options),
        ctx,
        batch,
        prefetch,
        layout,
    )
    val = DaliPass(
        EpochFeed(samples.val, batch, pool, seed=None),
        lambda feed: val_pipeline(feed, device, size, config.val_resize, layout, **options),
        ctx,
        batch,
        prefetch,
        layout,
    )
    val.select(val_shard(len(samples.val), ctx.rank, ctx.size))

    selected = [(0, 0)]

    def epoch_indices(epoch: int, images_done: int) -> list[int]:
        indices = train_shard(len(samples.train), config.seed, epoch, ctx.rank, ctx.size, images_done)
        return indices[: len(indices) // batch * batch]  # full batches only

    def set_epoch(epoch: int, images_done: int = 0) -> None:
        """Select the epoch's pass and start decoding it. train calls it early for the next epoch, so that
        its first batches decode during the evaluation and the checkpoint, then again at the epoch: a no-op."""
        if selected[0] == (epoch, images_done) and train.started:
            return
        train.select(epoch_indices(epoch, images_done), epoch)
        selected[0] = (epoch, images_done)
        train.start()

    train.select(epoch_indices(0, 0), 0)
    where = "GPU (nvJPEG, mixed)" if device == "gpu" else f"CPU, {threads} threads per rank"
    source = f", read from packed shards by {READ_THREADS} threads" if isinstance(samples.train, PackedSamples) else ""
    return Loaders(
        train=train,
        val=val,
        train_batches=len(samples.train) // ctx.size // batch,
        num_classes=samples.num_classes,
        set_epoch=set_epoch,
        description=f"DALI, decoding on the {where}{source}",
    )
