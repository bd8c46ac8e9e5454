"""The paper's model choices: zero-init residual gamma and no weight decay on BN/bias (Sec. 5.1); BN per virtual
worker in one pass (Sec. 2.3)."""

import functools

import pytest
import torch
import torchvision.models.resnet as tv

from hvd_imagenet.model import GroupedBatchNorm2d, build_model, parameter_groups, weights_digest

pytestmark = pytest.mark.unit


def last_bns(model):
    return [
        block.bn3 if isinstance(block, tv.Bottleneck) else block.bn2
        for block in model.modules()
        if isinstance(block, (tv.Bottleneck, tv.BasicBlock))
    ]


def test_zero_init_residual_sets_last_gamma_of_every_block_to_zero():
    model = build_model("resnet50", 10, zero_init_residual=True)
    bns = last_bns(model)
    assert len(bns) == 16  # ResNet-50: 3 + 4 + 6 + 3 bottlenecks
    assert all(torch.count_nonzero(bn.weight) == 0 for bn in bns)
    assert torch.all(model.bn1.weight == 1)  # other BN gammas keep 1
    plain = build_model("resnet50", 10, zero_init_residual=False)
    assert all(torch.all(bn.weight == 1) for bn in last_bns(plain))


def test_block_starts_as_identity():
    model = build_model("resnet18", 10, zero_init_residual=True).eval()
    block = model.layer1[0]  # BasicBlock without downsample: out = relu(x + 0)
    x = torch.rand(2, 64, 8, 8)
    assert torch.equal(block(x), torch.relu(x))


def test_no_weight_decay_on_bn_and_bias():
    model = build_model("resnet50", 10, zero_init_residual=True)
    decay, no_decay = parameter_groups(model, 1e-4, bn_weight_decay=False)
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    bn_params = {
        f"{m}.{p}"
        for m, mod in model.named_modules()
        if isinstance(mod, torch.nn.BatchNorm2d)
        for p in ("weight", "bias")
    }
    assert no_decay_names == bn_params | {"fc.bias"}
    assert {names[id(p)] for p in decay["params"]} == set(names.values()) - no_decay_names
    decay_all, none = parameter_groups(model, 1e-4, bn_weight_decay=True)
    assert len(decay_all["params"]) == len(names) and not none["params"]


def test_weights_digest_sees_any_change():
    model = build_model("resnet18", 10, zero_init_residual=True)
    before = weights_digest(model)
    assert weights_digest(model) == before
    with torch.no_grad():
        model.layer3[1].conv2.weight[0, 0, 0, 0] += 1e-3
    assert weights_digest(model) != before


def test_channels_last_model_keeps_weights_and_gradients_in_nhwc():
    """--channels-last puts the model in NHWC (as train.build_training does): every 4-D weight and its gradient
    are dense in channels_last, which our Horovod patch allreduces and broadcasts; 1-D ones are unchanged."""
    model = build_model("resnet18", num_classes=4, zero_init_residual=True).to(memory_format=torch.channels_last)
    images = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    assert model.layer1(model.maxpool(model.conv1(images))).is_contiguous(memory_format=torch.channels_last)
    model(images).sum().backward()
    weights = [p for p in model.parameters() if p.dim() == 4]
    assert weights and all(
        p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
        for p in weights
        if p.shape[2:] != (1, 1)
    )  # a 1x1 kernel is both layouts at once
    assert all(p.grad.is_contiguous(memory_format=torch.channels_last) for p in weights)
    assert all(p.is_contiguous() for p in model.parameters() if p.dim() < 4)


def test_small_image_resnets_have_he_et_al_sizes_and_zero_init():
    """He et al. (2016, Table 6): ResNet-20 for CIFAR has 0.27M parameters (ours uses 1x1-conv shortcuts where
    the shape changes, +0.003M); 6m+2 layers; each block's last BN gamma starts at 0 (Sec. 5.1)."""
    model = build_model("cifar_resnet20", 10, zero_init_residual=True)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 2) == 0.27
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(convs) + 1 == 20  # + the linear layer
    bns = last_bns(model)
    assert len(bns) == 9 and all(torch.count_nonzero(bn.weight) == 0 for bn in bns)
    assert build_model("cifar_resnet8", 10, True)(torch.rand(2, 3, 16, 16)).shape == (2, 10)


def virtual_worker_gradients(
    arch: str, virtual_workers: int, dtype, layout, images, labels, one_pass: bool, device: str = "cpu"
):
    """Gradients and BN buffers (float64, on the CPU) after one minibatch of V x n: V passes of n (loss / V
    each, as TrainStep's micro-batches) or one pass of V x n through a model built with `virtual_workers` BN
    groups. tests/test_gpu.py runs it on CUDA."""
    torch.manual_seed(1)
    model = build_model(arch, 5, zero_init_residual=False, virtual_workers=virtual_workers)
    model = model.to(device, dtype).to(memory_format=layout)
    images, labels = images.to(device, dtype).to(memory_format=layout), labels.to(device)
    criterion, parts = torch.nn.CrossEntropyLoss(), 4
    if one_pass:
        criterion(model(images), labels).backward()
    else:
        for chunk, chunk_labels in zip(images.chunk(parts), labels.chunk(parts)):
            (criterion(model(chunk), chunk_labels) / parts).backward()
    return [p.grad.cpu().double() for p in model.parameters()], [b.cpu().double() for b in model.buffers()]


def relative_error(values, reference) -> float:
    return max(((v - r).norm() / r.norm()).item() for v, r in zip(values, reference))


@pytest.mark.parametrize("arch", ["resnet18", "cifar_resnet8"])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_one_pass_virtual_workers_equal_sequential_micro_batches(arch, layout):
    """4 virtual workers of n=3 in one pass (BN over each group of 3, Sec. 2.3) give the gradients and the BN
    running statistics of 4 passes of 3 images: to float64 round-off in float64, and in float32 within
    float32's own error (sequential float32 against float64 is the measure: the two are equally far)."""
    torch.manual_seed(0)
    images, labels = torch.randn(12, 3, 64, 64, dtype=torch.float64), torch.randint(0, 5, (12,))
    run = functools.partial(virtual_worker_gradients, arch, layout=layout, images=images, labels=labels)
    grads, buffers = run(1, torch.float64, one_pass=False)  # the reference: 4 passes of 3
    one_grads, one_buffers = run(4, torch.float64, one_pass=True)
    assert relative_error(one_grads, grads) < 1e-12
    assert relative_error(one_buffers, buffers) < 1e-12  # running mean/var and num_batches_tracked (4)
    sequential_32, _ = run(1, torch.float32, one_pass=False)
    one_pass_32, one_buffers_32 = run(4, torch.float32, one_pass=True)
    assert relative_error(one_pass_32, grads) < 3 * relative_error(sequential_32, grads) + 1e-6
    assert relative_error(one_buffers_32, buffers) < 1e-5


def test_grouped_batch_norm_is_batch_norm_in_eval_and_refuses_uneven_groups():
    plain, grouped = build_model("cifar_resnet8", 5, True), build_model("cifar_resnet8", 5, True, virtual_workers=2)
    grouped.load_state_dict(plain.state_dict())  # the same parameters and buffers: checkpoints interchange
    images = torch.randn(6, 3, 16, 16)
    assert torch.equal(plain.eval()(images), grouped.eval()(images))
    with pytest.raises(ValueError, match="a batch of 6 does not split into 4 equal groups"):
        build_model("cifar_resnet8", 5, True, virtual_workers=4)(images)
    bn = GroupedBatchNorm2d(8, groups=2)
    assert bn(torch.randn(4, 8, 5, 5).to(memory_format=torch.channels_last)).is_contiguous(
        memory_format=torch.channels_last
    )  # the layout goes on: no conversion before the next convolution
