"""What only a GPU can show (`pytest -m gpu`; scripts/gpu_check.sh runs it on a GPU machine: docs/gpu-check.md).
On a machine without a CUDA GPU every test here skips with the reason, so `make test` stays green there.

Checked: the CUDA stack this build needs; DALI's `mixed` decode (nvJPEG) against its CPU decode, landing on
cuda:local_rank, and the same batches from packed shards (external_source) as from the folder tree; Horovod's
NCCL collectives on NHWC tensors; amp-fp16 and amp-bf16 training steps of `train` with NHWC weights; the step's
host syncs in CUDA's own sync debug mode against host_sync.SYNC_BUDGET; one-pass virtual workers (BN per group)
against passes one after another, on cuDNN; the memory loader's batches on the GPU against the CPU's; a
background checkpoint (checkpoint.AsyncWriter) of a model on the GPU."""

import functools
import json

import pytest
import torch
from conftest import checkpoint_state, run_horovod
from test_channels_last import check_collectives, run_collectives
from test_host_syncs import step_syncs
from test_model import relative_error, virtual_worker_gradients

from hvd_imagenet import gpu, host_sync
from hvd_imagenet.config import TrainConfig
from hvd_imagenet.context import DistContext
from hvd_imagenet.data.loaders import build_loaders
from hvd_imagenet.metrics import read_metrics

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(),
        reason="no CUDA GPU here (torch.cuda.is_available() is False); "
        "scripts/gpu_check.sh runs these on a GPU machine",
    ),
]


@pytest.mark.unit
def test_the_cuda_stack_is_one_this_build_supports():
    device = gpu.rank_device(0)
    assert device == torch.device("cuda", 0) and torch.backends.cudnn.benchmark
    assert torch.cuda.get_device_capability(device) >= gpu.MIN_CAPABILITY
    assert gpu.driver_cuda() >= gpu.MIN_DRIVER_CUDA
    print(gpu.describe(device))  # in the log of make gpu-check


def needs_dali() -> None:
    pytest.importorskip(
        "nvidia.dali", reason="DALI is not installed (scripts/gpu_check.sh setup: its wheels in the bundle)"
    )


def dali_batches(data, device: str, split: str, channels_last: bool = False) -> list:
    config = TrainConfig(
        data=str(data),
        output="(test)",
        loader="dali",
        dali_device=device,
        batch_size=4,
        image_size=32,
        val_resize=36,
        dali_threads=2,
        channels_last=channels_last,
    )
    ctx = DistContext(rank=0, local_rank=0, size=1, local_size=1, device=torch.device("cuda", 0))
    loaders = build_loaders(config, ctx)
    return list(loaders.val if split == "val" else loaders.train)


@pytest.mark.unit
def test_dali_mixed_decode_matches_cpu_decode_and_lands_on_the_gpu(tiny_data):
    """Val (no randomness): nvJPEG on the GPU and libjpeg-turbo on the CPU decode within rounding, then the same
    resize, crop and normalization. Both arrive on cuda:0."""
    needs_dali()
    gpu_batches, cpu_batches = dali_batches(tiny_data, "gpu", "val"), dali_batches(tiny_data, "cpu", "val")
    assert len(gpu_batches) == len(cpu_batches) == 5  # 20 val images, n=4
    for (gpu_images, gpu_labels), (cpu_images, cpu_labels) in zip(gpu_batches, cpu_batches):
        assert gpu_images.device == cpu_images.device == gpu_labels.device == torch.device("cuda", 0)
        assert gpu_images.shape == cpu_images.shape == (4, 3, 32, 32) and gpu_images.dtype == torch.float32
        assert torch.equal(gpu_labels, cpu_labels)
        difference = (gpu_images - cpu_images).abs()
        # Normalized units (one level of 255 is 1/255/0.225 = 0.017): a mean of ~3 levels allows the decoders'
        # IDCT and chroma upsampling; a wrong channel order or a shifted crop is far above it.
        assert difference.mean() < 0.05 and difference.max() < 0.5
    images, labels = dali_batches(tiny_data, "gpu", "train", channels_last=True)[0]
    assert images.device == labels.device == torch.device("cuda", 0)
    assert images.is_contiguous(memory_format=torch.channels_last) and labels.dtype == torch.int64
    # Training: the crop windows come from the same draws on both (issue 28), so the crops match too.
    for (gpu_images, gpu_labels), (cpu_images, cpu_labels) in zip(
        dali_batches(tiny_data, "gpu", "train"), dali_batches(tiny_data, "cpu", "train")
    ):
        assert torch.equal(gpu_labels, cpu_labels)
        assert (gpu_images - cpu_images).abs().mean() < 0.05


@pytest.mark.unit
def test_dali_mixed_decode_reads_packed_shards_as_the_tree(tiny_data, tiny_shards):
    """Packed shards feed nvJPEG through fn.external_source (bytes read on the host): the same train and val
    batches, bit for bit, as fn.readers.file on the folder tree, random crops included (explicit seeds)."""
    needs_dali()
    for split in ("train", "val"):
        tree, shards = dali_batches(tiny_data, "gpu", split), dali_batches(tiny_shards, "gpu", split)
        assert len(tree) == len(shards) > 0
        for (tree_images, tree_labels), (shard_images, shard_labels) in zip(tree, shards):
            assert shard_images.device == shard_labels.device == torch.device("cuda", 0)
            assert torch.equal(tree_labels, shard_labels) and torch.equal(tree_images, shard_images)


@pytest.mark.horovod
def test_nccl_collectives_on_nhwc_tensors(tmp_path):
    found = run_collectives(tmp_path, 1, "--gloo")
    assert found["device"] == "cuda:0" and found["nccl_built"]
    check_collectives(found)


@pytest.mark.horovod
@pytest.mark.parametrize("precision", ["amp-fp16", "amp-bf16"])
def test_amp_training_steps_with_nhwc_weights(tmp_path, precision):
    """`train` on one GPU: ResNet-50, synthetic batches of 64 at 224 px, 6 steps, NHWC weights."""
    output = tmp_path / "run"
    result = run_horovod(
        "--loader",
        "synthetic",
        "--output",
        output,
        "--arch",
        "resnet50",
        "--batch-size",
        "64",
        "--epochs",
        "1",
        "--max-steps-per-epoch",
        "6",
        "--precision",
        precision,
        "--channels-last",
        np=1,
        timeout=600,
    )
    assert "GPU: " in result.stdout
    record = read_metrics(output)[0]
    assert record["train_loss"] == record["train_loss"] and record["skipped_steps"] <= 3  # fp16's first scales
    weights = torch.load(output / "checkpoints" / "epoch-0001.pt", weights_only=True)["model"]
    assert weights["conv1.weight"].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.horovod
@pytest.mark.parametrize("precision", ["fp32", "amp-bf16", "amp-fp16"])
@pytest.mark.parametrize("loader", ["synthetic", "dali"])
def test_host_syncs_on_the_gpu(tiny_data, precision, loader):
    """CUDA's sync debug mode over steady-state steps (as tests/test_host_syncs.py on the CPU): within budget."""
    if loader == "dali":
        needs_dali()
    syncs = step_syncs(tiny_data, precision, loader, "none", 1)
    print(json.dumps(syncs))  # in the log of make gpu-check
    assert syncs["per_step"] <= host_sync.SYNC_BUDGET, f"over budget: {syncs['sites']}"


@pytest.mark.unit
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_one_pass_virtual_workers_equal_sequential_micro_batches_on_cudnn(layout):
    """tests/test_model.py's check on the GPU: 4 groups of 3 in one pass (our BN in float32 on the device)
    against 4 passes of 3 (cuDNN's BN), both float32, each measured against float64 on the CPU. cuDNN's
    convolutions may use TF32, so the measure is the sequential run's own error, not a fixed tolerance."""
    torch.manual_seed(0)
    images, labels = torch.randn(12, 3, 64, 64, dtype=torch.float64), torch.randint(0, 5, (12,))
    reference, _ = virtual_worker_gradients("resnet18", 1, torch.float64, layout, images, labels, one_pass=False)
    on_gpu = functools.partial(
        virtual_worker_gradients,
        "resnet18",
        dtype=torch.float32,
        layout=layout,
        images=images,
        labels=labels,
        device="cuda",
    )
    sequential, sequential_buffers = on_gpu(1, one_pass=False)
    one_pass, one_pass_buffers = on_gpu(4, one_pass=True)
    assert relative_error(one_pass, reference) < 3 * relative_error(sequential, reference) + 1e-6
    assert relative_error(one_pass_buffers, sequential_buffers) < 1e-4


@pytest.mark.unit
def test_memory_loader_augments_on_the_gpu_as_on_the_cpu(tiny_data):
    """--loader memory on cuda:0: pinned, asynchronous copies, crops by roi_align on the device; the same
    batches as on the CPU (the draws are made on the host from the same seeds), to float rounding."""

    def batches(device: str):
        config = TrainConfig(
            data=str(tiny_data),
            output="(test)",
            loader="memory",
            batch_size=4,
            image_size=32,
            val_resize=36,
            channels_last=True,
        )
        loaders = build_loaders(
            config, DistContext(rank=0, local_rank=0, size=1, local_size=1, device=torch.device(device))
        )
        loaders.set_epoch(1)
        return list(loaders.train) + list(loaders.val)

    on_gpu, on_cpu = batches("cuda:0"), batches("cpu")
    assert len(on_gpu) == len(on_cpu) == 12 + 5
    for (gpu_images, gpu_labels), (cpu_images, cpu_labels) in zip(on_gpu, on_cpu):
        assert gpu_images.device == gpu_labels.device == torch.device("cuda", 0)
        assert gpu_images.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(gpu_labels.cpu(), cpu_labels)
        torch.testing.assert_close(gpu_images.cpu(), cpu_images, rtol=0, atol=1e-3)


@pytest.mark.unit
def test_a_background_checkpoint_of_a_gpu_model_holds_the_state_it_was_given(tmp_path):
    """checkpoint.AsyncWriter on cuda:0: the state copied into pinned host buffers (reused by the next
    checkpoint); the file holds the state at submit(), not the live weights' next step."""
    from hvd_imagenet import checkpoint

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8)).cuda()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(2):
        model(torch.randn(4, 3, 16, 16, device="cuda")).square().mean().backward()
        optimizer.step()
        state = checkpoint_state(model=model.state_dict(), optimizer=optimizer.state_dict(), step=1)
    expected = {key: value.cpu().clone() for key, value in state["model"].items()}
    writer = checkpoint.AsyncWriter(tmp_path / "async", keep=1)
    writer.submit(state)
    buffers = list(writer.copy.buffers)
    assert buffers and all(buffer.is_pinned() for buffer in buffers)
    optimizer.step()  # the next step, while the file is written
    writer.wait()
    written = torch.load(tmp_path / "async" / "epoch-0001.pt", weights_only=True)
    assert all(torch.equal(written["model"][key], value) for key, value in expected.items())
    assert not torch.equal(written["model"]["0.weight"], model.state_dict()["0.weight"].cpu())
    writer.submit({**state, "epoch": 2})
    assert all(a is b for a, b in zip(buffers, writer.copy.buffers))  # the pinned buffers reused
    writer.wait()
