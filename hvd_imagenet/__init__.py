"""hvd_imagenet: ResNet-50 on ImageNet with the large-minibatch recipe of Goyal et al. (2017) on Horovod."""

__version__ = "0.1.0"
