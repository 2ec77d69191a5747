"""Trajectory-matching hyperparameters per dataset and IPC (the MTT authors' commands) and the rule for the rest."""

from __future__ import annotations

from typing import Any

# (dataset, ipc) -> settings from the MTT authors' published commands.
PUBLISHED: dict[tuple[str, int], dict[str, Any]] = {
    ("cifar10", 1): dict(syn_steps=50, expert_epochs=2, max_start_epoch=2, lr_img=100, lr_lr=1e-7, lr_teacher=0.01, batch_syn=None, zca=True),
    ("cifar10", 10): dict(syn_steps=30, expert_epochs=2, max_start_epoch=20, lr_img=100, lr_lr=1e-5, lr_teacher=0.001, batch_syn=None, zca=True),
    ("cifar10", 50): dict(syn_steps=30, expert_epochs=2, max_start_epoch=40, lr_img=1000, lr_lr=1e-5, lr_teacher=0.001, batch_syn=None, zca=False),
    ("cifar100", 1): dict(syn_steps=20, expert_epochs=3, max_start_epoch=20, lr_img=1000, lr_lr=1e-5, lr_teacher=0.01, batch_syn=None, zca=True),
    ("cifar100", 10): dict(syn_steps=20, expert_epochs=2, max_start_epoch=20, lr_img=1000, lr_lr=1e-5, lr_teacher=0.01, batch_syn=None, zca=False),
    ("cifar100", 50): dict(syn_steps=80, expert_epochs=2, max_start_epoch=40, lr_img=1000, lr_lr=1e-5, lr_teacher=0.01, batch_syn=125, zca=True),
    ("imagefolder", 1): dict(syn_steps=10, expert_epochs=2, max_start_epoch=10, lr_img=1e4, lr_lr=1e-4, lr_teacher=0.01, batch_syn=None, zca=False),
    ("imagefolder", 10): dict(syn_steps=20, expert_epochs=2, max_start_epoch=40, lr_img=1e4, lr_lr=1e-4, lr_teacher=0.01, batch_syn=200, zca=False),
    ("imagefolder", 50): dict(syn_steps=20, expert_epochs=2, max_start_epoch=40, lr_img=1e4, lr_lr=1e-4, lr_teacher=0.01, batch_syn=300, zca=False),
}

# MTT's default number of outer iterations (the published commands do not change it).
DEFAULT_ITERATIONS = 5000

# Datasets without published commands borrow the CIFAR-10 row of the nearest IPC, with these changes: no ZCA (the
# grayscale sets are not whitened in the literature) and, for the small embedded digits set (six minibatches per
# expert epoch), 20 student steps, start epochs up to 10 and 200 iterations, so that its default run takes minutes.
BORROWED_OVERRIDES: dict[str, dict[str, Any]] = {
    "digits": dict(zca=False, max_start_epoch=10, syn_steps=20, iterations=200),
    "fashion-mnist": dict(zca=False),
    "mnist": dict(zca=False),
    "svhn": dict(zca=False),
}


def trajectory_preset(dataset: str, ipc: int) -> dict[str, Any]:
    """Settings for ``dataset`` at ``ipc``: the published row if there is one, else the CIFAR-10 row of the nearest
    published IPC (1, 10, 50; ties go to the smaller) with the dataset's overrides. ``batch_syn`` is capped by the
    synthetic set size by the caller."""
    if (dataset, ipc) in PUBLISHED:
        row, overrides = PUBLISHED[(dataset, ipc)], {}
    else:
        table_ipcs = sorted({i for d, i in PUBLISHED if d == dataset}) or [1, 10, 50]
        nearest = min(table_ipcs, key=lambda i: (abs(i - ipc), i))
        source = dataset if (dataset, nearest) in PUBLISHED else "cifar10"
        row, overrides = PUBLISHED[(source, nearest)], BORROWED_OVERRIDES.get(dataset, {})
    return {"iterations": DEFAULT_ITERATIONS, **row, **overrides}
