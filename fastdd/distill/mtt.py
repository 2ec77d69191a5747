"""Trajectory matching distillers: ``mtt`` (full unroll), ``tesla`` (exact, constant memory), ``tesla-compat``.

The three differ only in how :func:`fastdd.distill.trajectory.match_gradients` computes the gradient; sampling,
optimisers, soft labels and students are shared, so the same seed gives the same experts, start epochs, minibatches
and augmentations in every mode (and ``mtt`` and ``tesla`` the same synthetic set, up to floating-point rounding).

A process computes its students one after another or together as one grouped network (``--student-batching``,
:meth:`TrajectoryMatching.student_batching`).

The plug-ins (:mod:`fastdd.trust.plugins`) may add unlabelled synthetic images that the students train on, change
the student's step loss and inputs (``student_options``) and how the experts train (``expert_options``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from fastdd.config import TeslaCompatConfig, TeslaConfig, TrajectoryConfig, check_config
from fastdd.config.experts import ExpertConfig
from fastdd.distill import distributed
from fastdd.distill.base import Distiller
from fastdd.distill.batched_students import batched_match_gradients
from fastdd.distill.experts import default_expert_folder, ensure_experts, expected_metadata
from fastdd.distill.trajectory import match_gradients
from fastdd.errors import FastddError
from fastdd.expert_files import load_experts
from fastdd.io import SyntheticSet
from fastdd.models import functional_forward
from fastdd.models.batched import supports_batched_students


class TrajectoryMatching(Distiller):
    """Learns the images and the student learning rate so that ``syn_steps`` student steps on them from an expert's
    epoch-``s`` snapshot land near its epoch-``s + expert_epochs`` snapshot."""

    name: ClassVar[str] = "mtt"
    mode: ClassVar[str] = "unrolled"
    config_class = TrajectoryConfig
    trains_on_synthetic = True

    def __init__(self, config: TrajectoryConfig, dataset) -> None:
        config = check_config(config).resolved()
        self._check(config, dataset)
        if config.keep_graphs > 1 and self.mode == "unrolled":
            raise FastddError(f"--keep-graphs applies to tesla and tesla-compat; {self.name} keeps every step's graph.")
        super().__init__(config, dataset)
        total = self.num_student_images
        if config.batch_syn is not None and not 1 <= config.batch_syn <= total:
            raise FastddError(
                f"--batch-syn must be between 1 and the {total} synthetic images, got {config.batch_syn}."
            )
        self.syn_lr = torch.tensor(float(config.lr_teacher), device=self.device).requires_grad_(True)
        self.lr_optimizer = torch.optim.SGD([self.syn_lr], lr=config.lr_lr, momentum=config.momentum_lr)
        self.net = self.new_network(self.draws("network", "student"))  # only its architecture is used
        self.experts = None

    @staticmethod
    def _check(config: TrajectoryConfig, dataset) -> None:
        if bool(config.zca) != (dataset.zca is not None):
            raise FastddError(
                f"the preset for {config.dataset} at IPC {config.ipc} uses zca={bool(config.zca)} but the dataset was "
                f"loaded with zca={dataset.zca is not None}; load it with zca={bool(config.zca)} or pass "
                "--zca/--no-zca."
            )

    # -- experts ------------------------------------------------------------------------------------------------
    @property
    def snapshots_needed(self) -> int:
        return self.config.max_start_epoch + self.config.expert_epochs + 1

    def expert_config(self) -> ExpertConfig:
        cfg = self.config
        return ExpertConfig(
            dataset=cfg.dataset,
            data_root=cfg.data_root,
            image_size=cfg.image_size,
            zca=bool(cfg.zca),
            model=cfg.model,
            width=cfg.width,
            depth=cfg.depth,
            norm=cfg.norm,
            num_experts=cfg.num_experts,
            epochs=cfg.expert_train_epochs or self.snapshots_needed - 1,
            lr_teacher=0.01,
            batch_size=cfg.expert_batch,
            dsa=cfg.dsa,
            dsa_strategy=cfg.dsa_strategy,
            seed=cfg.expert_seed,
            device=cfg.device,
            **self.plugins.expert_options(),
        )

    def prepare(self, out: Path, *, progress: bool) -> None:
        """Load the experts from ``config.experts``, or train (once) and cache them in ``out``'s parent folder."""
        expert_cfg = self.expert_config()
        if self.config.experts is not None:
            self.experts = load_experts(
                self.config.experts,
                expect=expected_metadata(expert_cfg, self.dataset),
                max_snapshots=self.snapshots_needed,
            )
        else:
            folder = default_expert_folder(expert_cfg, Path(out).parent / "experts")
            self.experts = ensure_experts(expert_cfg, self.dataset, folder, progress=progress)

    # -- one iteration ------------------------------------------------------------------------------------------
    @property
    def num_student_images(self) -> int:
        """Images a student trains on: the synthetic images plus the plug-ins' unlabelled ones (TrustDD's S_out)."""
        return sum(t.shape[0] for t in self.synthetic_tensors())

    def student_images(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``([S; unlabelled] detached, unlabelled-row mask)``, or ``(S detached, None)`` without unlabelled rows."""
        tensors = self.synthetic_tensors()
        if len(tensors) == 1:
            return self.images.detach(), None
        images = torch.cat([t.detach() for t in tensors])
        unlabelled = torch.zeros(images.shape[0], dtype=torch.bool, device=self.device)
        unlabelled[self.images.shape[0] :] = True
        return images, unlabelled

    def soft_targets(self, params: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """Softmax of the network with flat ``params`` on ``images`` ``[n, C, H, W]``: ``[n, classes]``."""
        with torch.no_grad():
            self.net.eval()
            probs = torch.softmax(functional_forward(self.net, params, images), dim=1)
            self.net.train()
        return probs

    def splits_rows(self) -> bool:
        """True when this run splits every student's minibatch rows over the processes instead of the students:
        with N > 1 processes, fewer than N students (``--students 1`` always) and the ``exact`` or ``compat`` mode
        (``tesla``, ``tesla-compat``). ``mtt``'s unrolled autograd always splits by students."""
        world = distributed.world_size()
        return world > 1 and self.config.students < world and self.mode != "unrolled"

    def student_batching(self) -> str:
        """How :meth:`step` computes this process's students: ``"grouped"`` (one grouped network,
        :func:`~fastdd.distill.batched_students.batched_match_gradients`) or ``"sequential"`` (one
        :func:`~fastdd.distill.trajectory.match_gradients` call each). ``--student-batching auto`` picks grouped on
        CUDA when the student network allows it, rows are not split over the processes and this process has
        several students; sequential otherwise (on the CPU grouping measured slower: benchmarks/batched_students.py)."""
        choice = self.config.student_batching
        if choice != "auto":
            return choice
        owned = sum(1 for student in range(self.config.students) if distributed.owns(student))
        if (self.device.type == "cuda" and owned > 1 and supports_batched_students(self.net)
                and not self.splits_rows()):
            return "grouped"
        return "sequential"

    def step(self, iteration: int) -> dict[str, float]:
        """One image and step-size update from ``students`` students (their gradients averaged).

        Student ``i`` draws its expert and start epoch from ``("student", iteration, i)`` and its minibatches,
        augmentations and masks from ``("plan", iteration, i)``. With several processes, student ``i`` is trained by
        rank ``i % world`` only. When :meth:`splits_rows`, every rank trains every student instead, on its share of
        each minibatch's rows (see :func:`match_gradients`' ``row_shard``). A rank computes its students one after
        another or together as one grouped network (:meth:`student_batching`; the same numbers up to rounding). The
        image and step-size gradients and the losses are summed over the ranks (one all-reduce), and every rank
        applies the same update."""
        split_rows = self.splits_rows()
        if split_rows and any(isinstance(m, _BatchNorm) for m in self.net.modules()):
            raise FastddError(
                f"{self.name} with fewer students than processes splits each student's minibatch rows over the "
                "processes, but a batchnorm student normalises its rows together; use --norm instancenorm (the "
                f"default), at least {distributed.world_size()} students (--students), or one process."
            )
        if split_rows and self.config.keep_graphs > 1:
            raise FastddError(
                f"--keep-graphs does not combine with splitting each student's rows over the processes; use "
                f"--keep-graphs 1, at least {distributed.world_size()} students (--students), or one process."
            )
        if split_rows and self.config.student_batching == "grouped":
            raise FastddError(
                f"--student-batching grouped does not combine with splitting each student's rows over the processes "
                f"(fewer students than processes); use --student-batching auto or sequential, at least "
                f"{distributed.world_size()} students (--students), or one process."
            )
        if self.experts is None:
            raise RuntimeError("call prepare() before step(): the experts are not loaded")
        cfg = self.config
        grad_images = torch.zeros(self.num_student_images, *self.images.shape[1:], dtype=self.images.dtype,
                                  device=self.device)
        grad_lr = torch.zeros_like(self.syn_lr)
        losses = []
        images, unlabelled = self.student_images()
        # This process's students: every student when rows are split, else those it owns.
        students = [s for s in range(cfg.students) if split_rows or distributed.owns(s)]
        pairs = [self._student_pair(iteration, student, images, unlabelled) for student in students]
        arguments = dict(
            syn_steps=cfg.syn_steps,
            batch_syn=cfg.batch_syn,
            mode=self.mode,
            augment=self.dsa_strategy if cfg.dsa else None,
            unlabelled=unlabelled,
            **self.plugins.student_options(),
            keep_graphs=cfg.keep_graphs if self.mode != "unrolled" else 1,
            precision=cfg.precision,
        )
        if students and self.student_batching() == "grouped":
            student_losses, grad_images_, grad_lr_ = batched_match_gradients(
                self.net,
                images,
                [targets for _, _, targets in pairs],
                torch.stack([theta0 for theta0, _, _ in pairs]),
                torch.stack([target for _, target, _ in pairs]),
                self.syn_lr.detach(),
                generators=[self.draws("plan", iteration, student) for student in students],
                **arguments,
            )
            grad_images += grad_images_
            grad_lr += grad_lr_
            losses += student_losses.tolist()
        else:
            for student, (theta0, target, targets) in zip(students, pairs):
                loss, g_img, g_lr = match_gradients(
                    self.net,
                    images,
                    targets,
                    theta0,
                    target,
                    self.syn_lr.detach(),
                    generator=self.draws("plan", iteration, student),
                    row_shard=(distributed.rank(), distributed.world_size()) if split_rows else None,
                    **arguments,
                )
                grad_images += g_img
                grad_lr += g_lr
                # Split rows: every rank holds the student's whole loss; rank 0 alone adds it to the sum over ranks.
                losses.append(float(loss) if not split_rows or distributed.is_main() else 0.0)
        if distributed.world_size() == 1:
            loss = sum(losses) / len(losses)
        else:
            loss_sum = torch.tensor([sum(losses)], dtype=torch.float64, device=self.device)
            distributed.all_reduce_sum_([grad_images, grad_lr, loss_sum])
            loss = float(loss_sum) / cfg.students
        if not math.isfinite(loss):
            return {"loss": loss, "syn_lr": self.syn_lr.item()}
        self.optimizer.zero_grad(set_to_none=True)
        self.lr_optimizer.zero_grad(set_to_none=True)
        grad_images /= cfg.students
        tensors = self.synthetic_tensors()
        for t, grad in zip(tensors, grad_images.split([t.shape[0] for t in tensors])):
            t.grad = grad
        self.syn_lr.grad = grad_lr / cfg.students
        self.optimizer.step()
        self.lr_optimizer.step()
        lr = self.syn_lr.item()
        if not math.isfinite(lr) or lr <= 0:
            raise FastddError(
                f"the learned student learning rate became {lr:.3g} at iteration {iteration + 1}; the run stopped and "
                "the last checkpoint was kept (lower --lr-lr or --lr-img)."
            )
        return {"loss": loss, "syn_lr": lr}

    def _student_pair(self, iteration: int, student: int, images: torch.Tensor, unlabelled: torch.Tensor | None):
        """``(theta0, target, targets)`` of a student: its expert's snapshots (drawn from ``("student", iteration,
        student)``) on the run's device and what its steps' losses compare with."""
        cfg = self.config
        generator = self.draws("student", iteration, student)
        expert = int(torch.randint(self.experts.num_experts, (), generator=generator))
        start = int(torch.randint(cfg.max_start_epoch, (), generator=generator))
        theta0, target = self.experts.pair(expert, start, cfg.expert_epochs)
        # In the images' dtype (soft labels run the target on the images).
        theta0, target = theta0.to(self.device, self.images.dtype), target.to(self.device, self.images.dtype)
        targets = self.labels
        if cfg.soft_labels:
            targets = SoftTargets(self, target, self.images.detach())
        elif unlabelled is not None:
            targets = torch.cat([self.labels, self.labels.new_zeros(images.shape[0] - self.labels.shape[0])])
        return theta0, target, targets

    # -- persistence --------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["syn_lr"] = self.syn_lr.detach().cpu()
        state["lr_optimizer"] = self.lr_optimizer.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        with torch.no_grad():
            self.syn_lr.copy_(state["syn_lr"].to(self.device))
        self.lr_optimizer.load_state_dict(state["lr_optimizer"])

    def synthetic_set(self) -> SyntheticSet:
        synset = super().synthetic_set()
        synset.syn_lr = self.syn_lr.detach().cpu().clone()
        synset.meta["mode"] = self.mode
        synset.meta["experts"] = str(self.experts.folder) if self.experts is not None else self.config.experts
        if self.config.soft_labels and self.experts is not None:
            # Evaluation targets: the last usable snapshot of expert 0, on the final images.
            final = self.experts.snapshot(0, self.snapshots_needed - 1).to(self.device)
            synset.soft_labels = self.soft_targets(final, self.images.detach()).cpu()
        return synset


class SoftTargets:
    """Soft labels from the target expert, computed only for the images a student step uses (and cached)."""

    def __init__(self, distiller: TrajectoryMatching, params: torch.Tensor, images: torch.Tensor) -> None:
        self.distiller, self.params, self.images = distiller, params, images
        self.shape = (images.shape[0], distiller.dataset.num_classes)
        self._cache: dict[int, torch.Tensor] = {}

    def __call__(self, idx: torch.Tensor) -> torch.Tensor:
        missing = [i for i in idx.tolist() if i not in self._cache]
        if missing:
            rows = self.distiller.soft_targets(self.params, self.images[missing])
            self._cache.update(zip(missing, rows))
        return torch.stack([self._cache[i] for i in idx.tolist()])


class MTT(TrajectoryMatching):
    """MTT: autograd through the whole student unroll (memory grows with ``syn_steps``)."""

    name = "mtt"
    mode = "unrolled"


class TESLA(TrajectoryMatching):
    """fastdd's TESLA: the exact MTT gradient by reverse accumulation, memory flat in ``syn_steps``."""

    name = "tesla"
    config_class = TeslaConfig
    mode = "exact"


class TESLACompat(TrajectoryMatching):
    """The published TESLA gradient (a stop-gradient unroll, without the shipped factor-2 defect)."""

    name = "tesla-compat"
    config_class = TeslaCompatConfig
    mode = "compat"
