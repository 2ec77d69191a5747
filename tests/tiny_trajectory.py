"""The tiny trajectory-matching problem the mtt / tesla tests share: digits, width-8 ConvNet experts, 2-image IPC."""

from fastdd.distill import get_distiller
from fastdd.distill.experts import ExpertConfig, train_experts

WIDTH = 8


def tiny_experts(dataset, folder):
    """Two width-8 experts of 3 epochs trained into ``folder``; returns it."""
    train_experts(ExpertConfig(width=WIDTH, num_experts=2, epochs=3), dataset, folder, progress=False)
    return folder


def make_distiller(method, dataset, experts, **overrides):
    """A ``method`` distiller (mtt, tesla, tesla-compat) at IPC 2, 3 student steps, on ``experts``; ``overrides``
    change any option."""
    options = dict(ipc=2, iterations=2, width=WIDTH, syn_steps=3, expert_epochs=1, max_start_epoch=2, lr_img=10.0,
                   lr_lr=1e-5, experts=str(experts))
    options.update(overrides)
    cls = get_distiller(method)
    return cls(cls.config_class.from_options(options, method=method), dataset)
