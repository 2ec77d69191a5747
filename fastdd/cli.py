"""The ``fastdd`` command line: distill, experts, evaluate, report, show, inspect, export, info."""

from __future__ import annotations

import errno
import functools
import os
import platform
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import typer

from fastdd.errors import FastddError, FastddWarning

app = typer.Typer(
    name="fastdd",
    help="Fast, trustworthy dataset distillation: distill a labelled image dataset into a few synthetic images per "
    "class, then evaluate networks trained on them.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

EXIT_USER_ERROR = 2


def _fail(message: str, code: int = EXIT_USER_ERROR) -> None:
    message = message.strip()
    if not message.endswith((".", "?", "!")):
        message += "."
    rank = os.environ.get("RANK", "0")
    if rank != "0" and os.environ.get("WORLD_SIZE", "1") != "1":
        message = f"rank {rank}: {message}"  # one process of a distributed run
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


# OSErrors a user causes and can fix (full disk, read-only or forbidden folder): one sentence, not a traceback.
_USER_OS_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR}


def _one_line_warnings(previous: Callable) -> Callable:
    """A ``warnings.showwarning`` that prints FastddWarning as one line ``warning: ...`` on stderr and passes other
    warnings to ``previous``."""

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        if issubclass(category, FastddWarning):
            typer.echo(f"warning: {message}", err=True)
        else:
            previous(message, category, filename, lineno, file, line)

    return show


def _user_errors(command: Callable) -> Callable:
    """Turn a FastddError (or a full disk / permission OSError) into one sentence on stderr and exit status 2 (no
    traceback); print FastddWarnings as one line each."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("always", FastddWarning)
            warnings.showwarning = _one_line_warnings(warnings.showwarning)
            try:
                return command(*args, **kwargs)
            except FastddError as exc:
                _fail(str(exc))
            except KeyboardInterrupt:
                _fail("interrupted; outputs written so far are kept (continue a distillation with --resume)", 130)
            except OSError as exc:
                if exc.errno not in _USER_OS_ERRORS:
                    raise
                where = f" {exc.filename}" if exc.filename else ""
                _fail(f"could not write or read{where} ({exc.strerror or exc}); free some space or fix the "
                      "permissions, then run the command again")

    return wrapper


# Commands that can run as several processes (`--nproc N`, or under torchrun).
DISTRIBUTED_COMMANDS = ("distill", "experts")


@app.callback()
def _global_options(
    ctx: typer.Context,
    threads: Optional[int] = typer.Option(
        None,
        "--threads",
        help="Torch CPU threads for the command (default: torch's, one per core); fewer when other jobs share the "
        "cores, as threads that wait for a descheduled peer slow every step.",
    ),
    nproc: Optional[int] = typer.Option(
        None,
        "--nproc",
        help="distill and experts: run as N local processes with torch.distributed (Gloo on CPU, NCCL with "
        "--device cuda, one GPU each), as `torchrun --nproc_per_node N` would; same result as one process.",
    ),
) -> None:
    if threads is not None:
        if threads < 1:
            _fail(f"--threads must be at least 1, got {threads}")
        import torch

        torch.set_num_threads(threads)
    if nproc is not None and nproc != 1 and ctx.invoked_subcommand not in DISTRIBUTED_COMMANDS:
        _fail(f"--nproc applies to {' and '.join(DISTRIBUTED_COMMANDS)}, not to {ctx.invoked_subcommand}")
    _GLOBAL_OPTIONS.clear()
    _GLOBAL_OPTIONS.update(threads=threads, nproc=nproc)


# The options given before the command in this invocation (set by _global_options; empty in a process started by
# --nproc, which calls the command function directly).
_GLOBAL_OPTIONS: dict[str, Any] = {}


def _global_option(name: str) -> Any:
    """A value given before the command (``fastdd --nproc 2 distill``), or None."""
    return _GLOBAL_OPTIONS.get(name)


def _launch_processes(command: str, arguments: dict[str, Any], nproc: Optional[int]) -> bool:
    """Start ``nproc`` processes that each run ``command`` with ``arguments`` and wait for them; False (nothing
    started) when this command should run here: one process, or already one process of a distributed run."""
    from fastdd.distill import distributed

    if nproc is None:
        nproc = _global_option("nproc")
    launched = distributed.launched_world_size()
    if launched is not None:
        if nproc is not None and nproc != launched:
            raise FastddError(
                f"--nproc {nproc} was given but this process is one of {launched} started by torchrun; drop --nproc "
                "under torchrun."
            )
        return False
    if nproc is None or nproc == 1:
        return False
    if nproc < 1:
        raise FastddError(f"--nproc must be at least 1, got {nproc}.")
    threads = _global_option("threads")
    if threads is None and "OMP_NUM_THREADS" not in os.environ:
        threads = max(1, (os.cpu_count() or 1) // nproc)  # share the cores, as torchrun does
    try:
        distributed.launch(_run_launched, (command, {**arguments, "nproc": None}), nproc=nproc, threads=threads)
    except distributed.LaunchFailed as exc:
        if exc.exit_code == 1:  # not a reported user error: show what failed
            typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(exc.exit_code)
    return True


def _run_launched(command: str, arguments: dict[str, Any]) -> None:
    """The body of a process started by ``--nproc``: run the command, exit with its status."""
    try:
        _LAUNCHABLE[command](**arguments)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)


def _read_preset(path: Optional[Path]) -> dict[str, Any]:
    if path is None:
        return {}
    import yaml

    if not path.is_file():
        raise FastddError(f"the config file {path} does not exist.")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise FastddError(f"the config file {path} is not valid YAML ({exc.__class__.__name__}).") from exc
    if not isinstance(data, dict):
        raise FastddError(f"the config file {path} must be a mapping of option names to values.")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def _default_out(method: str, dataset: str, ipc: int) -> Path:
    return Path("runs") / f"{method}-{dataset}-ipc{ipc}"


@app.command()
@_user_errors
def distill(
    method: Optional[str] = typer.Option(
        None, help="Distillation method: dc, dsa, dm, mtt, tesla or tesla-compat (default dsa)."
    ),
    dataset: Optional[str] = typer.Option(None, help="Dataset name (default digits, embedded)."),
    ipc: Optional[int] = typer.Option(None, help="Synthetic images per class (default 10)."),
    out: Optional[Path] = typer.Option(None, help="Output folder (default runs/METHOD-DATASET-ipcIPC)."),
    iterations: Optional[int] = typer.Option(
        None,
        help="Outer iterations (default: the method's; 1000 for dc/dsa, 20000 for dm, 5000 for mtt/tesla, 200 for "
        "mtt/tesla on digits).",
    ),
    seed: Optional[int] = typer.Option(None, help="Seed of the run's generator (default 0)."),
    data_root: Optional[str] = typer.Option(None, help="Folder holding the dataset files."),
    image_size: Optional[int] = typer.Option(None, help="Image side for imagefolder datasets."),
    model: Optional[str] = typer.Option(None, help="Network used for matching (default convnet)."),
    width: Optional[int] = typer.Option(None, help="ConvNet width (default 128)."),
    depth: Optional[int] = typer.Option(None, help="ConvNet depth (default by image size)."),
    norm: Optional[str] = typer.Option(None, help="instancenorm, batchnorm or none (default instancenorm)."),
    zca: Optional[bool] = typer.Option(None, "--zca/--no-zca", help="ZCA-whiten the data (kornia, eps 0.1)."),
    init: Optional[str] = typer.Option(None, help="Initialise from 'real' images or 'noise' (default real)."),
    lr_img: Optional[float] = typer.Option(
        None, help="Learning rate of the images (dc/dsa 0.1, dm 1.0, mtt/tesla: the preset)."
    ),
    momentum_img: Optional[float] = typer.Option(None, help="Momentum of the image optimiser (default 0.5)."),
    batch_real: Optional[int] = typer.Option(None, help="Real images per class per step (default 256)."),
    dsa: Optional[bool] = typer.Option(None, "--dsa/--no-dsa", help="Differentiable siamese augmentation."),
    dsa_strategy: Optional[str] = typer.Option(None, help="DSA families joined by '_' (default: the dataset's)."),
    outer_loop: Optional[int] = typer.Option(None, help="dc/dsa: image updates per iteration (default by IPC)."),
    inner_loop: Optional[int] = typer.Option(None, help="dc/dsa: network epochs between image updates (default by IPC)."),
    lr_net: Optional[float] = typer.Option(
        None, help="dc/dsa/dm: learning rate of the network trained between image updates (0.01)."
    ),
    batch_train: Optional[int] = typer.Option(None, help="dc/dsa: inner-loop batch size (256)."),
    dis_metric: Optional[str] = typer.Option(None, help="dc/dsa: gradient distance ours, mse or cos."),
    experts: Optional[str] = typer.Option(
        None, help="mtt/tesla: folder of expert trajectories (default: train and cache them beside --out)."
    ),
    syn_steps: Optional[int] = typer.Option(None, help="mtt/tesla: student steps per iteration (preset)."),
    expert_epochs: Optional[int] = typer.Option(None, help="mtt/tesla: expert epochs to match (preset)."),
    max_start_epoch: Optional[int] = typer.Option(None, help="mtt/tesla: start epochs are drawn below it (preset)."),
    lr_lr: Optional[float] = typer.Option(None, help="mtt/tesla: learning rate of the student lr (preset)."),
    lr_teacher: Optional[float] = typer.Option(None, help="mtt/tesla: initial student lr (preset)."),
    batch_syn: Optional[int] = typer.Option(None, help="mtt/tesla: student minibatch (default all images)."),
    soft_labels: Optional[bool] = typer.Option(
        None, "--soft-labels/--hard-labels", help="mtt/tesla: targets from the target expert's softmax."
    ),
    students: Optional[int] = typer.Option(
        None, help="mtt/tesla: independent students per iteration (1); split over the processes of --nproc."
    ),
    keep_graphs: Optional[int] = typer.Option(
        None, help="tesla/tesla-compat: final student steps whose graphs the forward sweep keeps (1): each saves a "
        "forward and a backward per iteration at the memory of one step's graph.",
    ),
    num_experts: Optional[int] = typer.Option(None, help="mtt/tesla: experts to train when --experts is not given (5)."),
    expert_train_epochs: Optional[int] = typer.Option(
        None, help="mtt/tesla: epochs per auto-trained expert (default max_start_epoch + expert_epochs)."
    ),
    expert_seed: Optional[int] = typer.Option(None, help="mtt/tesla: seed of auto-trained experts (0)."),
    outliers: Optional[str] = typer.Option(
        None,
        help="TrustDD: also distill unlabelled outlier images against real outliers: none, oe (from --outlier-data) "
        "or poe (pseudo-outliers: jigsaw, invert, mosaic, speckle corruptions of the training images). Default none.",
    ),
    outlier_data: Optional[str] = typer.Option(
        None, help="oe: a registered dataset name or a folder of images, converted to the dataset's shape."
    ),
    outlier_ratio: Optional[float] = typer.Option(None, help="Outlier images per synthetic image (default 1)."),
    outlier_weight: Optional[float] = typer.Option(
        None, help="lambda of the integrated loss CE(in) + lambda * H(U; f(out)) (default 0.5)."
    ),
    robust: Optional[bool] = typer.Option(
        None, "--robust/--no-robust",
        help="Group-robust distillation (dc, dsa, dm): the matching network trains on real images with CE + mean and "
        "max over clusters of CVaR, the clusters formed around the synthetic images of each class.",
    ),
    cvar_alpha: Optional[float] = typer.Option(
        None, help="--robust: CVaR level, the share of each cluster's worst losses averaged (default 0.8)."
    ),
    clusters: Optional[int] = typer.Option(
        None, help="--robust: clusters per class (default IPC up to 10, else 10 chosen by farthest-point selection)."
    ),
    cluster_space: Optional[str] = typer.Option(
        None, help="--robust: distances for the clusters, 'embed' (the current network's features) or 'pixel'."
    ),
    robust_batch: Optional[int] = typer.Option(
        None, help="Real images per class in each network step on real data (default 256)."
    ),
    net_data: Optional[str] = typer.Option(
        None,
        help="What the matching network trains on: dc/dsa 'synthetic' (default) or 'real'; dm 'random' (a fresh "
        "untrained network per iteration, default) or 'real' (a kept network trained on real data, as in IDM). "
        "'real' is the default with --robust.",
    ),
    net_steps: Optional[int] = typer.Option(
        None,
        help="Network steps on real data: dc/dsa per image update (default: the image budget of --inner-loop epochs "
        "on the synthetic set), dm per iteration (default 1).",
    ),
    net_refresh: Optional[int] = typer.Option(
        None, help="dm with --net-data real: re-initialise the kept network every K iterations (default 100)."
    ),
    mdt: Optional[bool] = typer.Option(
        None, "--mdt/--no-mdt",
        help="Masked distillation training (dc, dsa, mtt, tesla, tesla-compat; not dm, whose networks never train on "
        "the synthetic images): a fresh random mask zeroes --mask-ratio of the pixels of every synthetic image a "
        "network trained by the matching objective sees, after augmentation; a masked pixel is set to 0 (the "
        "dataset mean) in all channels. mtt/tesla: the student's minibatch at every step. dc/dsa: the synthetic "
        "batch in the gradient-matching loss (real images stay unmasked) and the inner-loop epochs on the "
        "synthetic set. Default off.",
    ),
    mask_ratio: Optional[float] = typer.Option(
        None, help="--mdt: share of each image's pixels zeroed, in [0, 1) (default 0.3, as --mask-ratio of MTS)."
    ),
    device: Optional[str] = typer.Option(None, help="Torch device (default cpu)."),
    checkpoint_every: int = typer.Option(100, help="Write checkpoint.pt and the synthetic set every K iterations."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run saved in --out."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier run saved in --out."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML preset of these options (command line wins)."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
    tensorboard: bool = typer.Option(
        False, "--tensorboard", help="Also write TensorBoard event files (into --tensorboard-dir): every numeric field "
        "of the metrics.jsonl records as a scalar (step = iteration) and the image grids every --log-images-every "
        "iterations. Needs `pip install tensorboard`.",
    ),
    tensorboard_dir: Optional[Path] = typer.Option(
        None, "--tensorboard-dir", help="Folder of the TensorBoard event files (default OUT/tensorboard); implies "
        "--tensorboard.",
    ),
    wandb: bool = typer.Option(
        False, "--wandb", help="Also log the same scalars and image grids to Weights & Biases (needs the wandb package; "
        "WANDB_MODE sets the mode, default offline: files in OUT/wandb, upload later with `wandb sync`).",
    ),
    log_images_every: int = typer.Option(
        50, "--log-images-every", help="With --tensorboard or --wandb: log the synthetic-image grid (and the outlier "
        "grid) every K iterations and at the end.",
    ),
    nproc: Optional[int] = typer.Option(
        None,
        "--nproc",
        help="Run as N local processes with torch.distributed (Gloo on CPU, NCCL with --device cuda): dc/dsa/dm "
        "split the classes, mtt/tesla the --students; same synthetic set as one process (to float rounding).",
    ),
) -> None:
    """Distill a dataset into IPC synthetic images per class and save them in OUT."""
    arguments = dict(locals())  # first: the options as given, for the processes --nproc starts
    from fastdd.data import load_dataset
    from fastdd.distill import distributed, get_distiller, run_distillation

    tensorboard_target = _check_logging_options(tensorboard, tensorboard_dir, wandb, log_images_every)
    preset = _read_preset(config)
    given = {
        k: v
        for k, v in dict(
            method=method, dataset=dataset, ipc=ipc, iterations=iterations, seed=seed, data_root=data_root,
            image_size=image_size, model=model, width=width, depth=depth, norm=norm, zca=zca, init=init,
            lr_img=lr_img, momentum_img=momentum_img, batch_real=batch_real, dsa=dsa, dsa_strategy=dsa_strategy,
            outer_loop=outer_loop, inner_loop=inner_loop, lr_net=lr_net, batch_train=batch_train,
            dis_metric=dis_metric, device=device, experts=experts, syn_steps=syn_steps, expert_epochs=expert_epochs,
            max_start_epoch=max_start_epoch, lr_lr=lr_lr, lr_teacher=lr_teacher, batch_syn=batch_syn,
            soft_labels=soft_labels, students=students, keep_graphs=keep_graphs, num_experts=num_experts,
            expert_train_epochs=expert_train_epochs, expert_seed=expert_seed, outliers=outliers,
            outlier_data=outlier_data, outlier_ratio=outlier_ratio, outlier_weight=outlier_weight, robust=robust,
            cvar_alpha=cvar_alpha, clusters=clusters, cluster_space=cluster_space, robust_batch=robust_batch,
            net_data=net_data, net_steps=net_steps, net_refresh=net_refresh, mdt=mdt, mask_ratio=mask_ratio,
        ).items()
        if v is not None
    }
    options = {**preset, **given}
    if options.get("mask_ratio") is not None and not options.get("mdt"):
        raise FastddError("--mask-ratio sets the masking of --mdt; add --mdt or drop --mask-ratio.")
    method_name = str(options.pop("method", "dsa"))
    distiller_class = get_distiller(method_name)
    cfg = distiller_class.config_class.from_options(options, method=method_name).resolved()
    out = out if out is not None else _default_out(method_name, cfg.dataset, cfg.ipc)
    from fastdd.distill.runner import check_output_folder

    if distributed.launched_rank() == 0:  # one process probes the folder: its probe may create and remove it
        check_output_folder(out, resume=resume, overwrite=overwrite)  # before the (possibly slow) data loading
    if _launch_processes("distill", arguments, nproc):
        return
    with distributed.session(cfg.device):
        data = load_dataset(cfg.dataset, data_root=cfg.data_root, image_size=cfg.image_size, zca=bool(cfg.zca))
        distiller = distiller_class(cfg, data)
        run_distillation(
            distiller, out, checkpoint_every=checkpoint_every, resume=resume, overwrite=overwrite, progress=not quiet,
            tensorboard=tensorboard_target, wandb=wandb, log_images_every=log_images_every,
        )
        if distributed.is_main():
            typer.echo(f"synthetic set written to {out}")


def _check_logging_options(
    tensorboard: bool, tensorboard_dir: Optional[Path], wandb: bool, log_images_every: Optional[int] = None
) -> Path | bool | None:
    """Check --tensorboard/--tensorboard-dir/--wandb/--log-images-every before any work; returns the TensorBoard
    target: a folder, True for the default one, or None."""
    from fastdd.observability import check_sinks_available

    if log_images_every is not None and log_images_every < 1:
        raise FastddError(f"--log-images-every must be at least 1, got {log_images_every}.")
    target = tensorboard_dir if tensorboard_dir is not None else (True if tensorboard else None)
    check_sinks_available(tensorboard=target is not None, wandb=wandb)
    return target


@app.command("experts")
@_user_errors
def experts_command(
    dataset: str = typer.Option("digits", help="Dataset name."),
    model: str = typer.Option("convnet", help="Network architecture."),
    num_experts: int = typer.Option(10, help="Number of experts the folder should hold."),
    epochs: int = typer.Option(50, help="Epochs per expert (snapshots = epochs + 1)."),
    out: Optional[Path] = typer.Option(None, help="Output folder (default runs/experts-DATASET-MODEL-HASH)."),
    data_root: Optional[str] = typer.Option(None, help="Folder holding the dataset files."),
    image_size: Optional[int] = typer.Option(None, help="Image side for imagefolder datasets."),
    zca: bool = typer.Option(False, "--zca/--no-zca", help="ZCA-whiten the data."),
    width: int = typer.Option(128, help="ConvNet width."),
    depth: Optional[int] = typer.Option(None, help="ConvNet depth (default by image size)."),
    norm: str = typer.Option("instancenorm", help="instancenorm, batchnorm or none."),
    lr_teacher: float = typer.Option(0.01, help="SGD learning rate."),
    momentum: float = typer.Option(0.0, help="SGD momentum."),
    weight_decay: float = typer.Option(0.0, help="SGD weight decay."),
    batch_size: int = typer.Option(256, help="Minibatch size."),
    dsa: bool = typer.Option(True, "--dsa/--no-dsa", help="Augment every minibatch (one transform per image)."),
    dsa_strategy: Optional[str] = typer.Option(None, help="DSA families joined by '_' (default: the dataset's)."),
    seed: int = typer.Option(0, help="Base seed; expert k uses a seed derived from (seed, k)."),
    keep_snapshots: Optional[int] = typer.Option(None, help="Keep only the first K snapshots (and train K-1 epochs)."),
    outliers: str = typer.Option(
        "none", help="TrustDD: train on real outliers too (integrated loss): none, oe (--outlier-data) or poe."
    ),
    outlier_data: Optional[str] = typer.Option(None, help="oe: a registered dataset name or a folder of images."),
    outlier_ratio: float = typer.Option(1.0, help="Fresh outliers per training image and epoch."),
    outlier_weight: float = typer.Option(0.5, help="lambda of CE(in) + lambda * H(U; f(out))."),
    device: str = typer.Option("cpu", help="Torch device."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
    tensorboard: bool = typer.Option(
        False, "--tensorboard", help="Also write TensorBoard event files, one run per expert trained "
        "(--tensorboard-dir/expert_KKKK): loss and seconds per epoch, test_accuracy at the last epoch. Needs `pip "
        "install tensorboard`.",
    ),
    tensorboard_dir: Optional[Path] = typer.Option(
        None, "--tensorboard-dir", help="Folder of the TensorBoard runs (default OUT/tensorboard); implies "
        "--tensorboard.",
    ),
    wandb: bool = typer.Option(
        False, "--wandb", help="Also log the same scalars to Weights & Biases, one run per expert trained, grouped by "
        "the folder (needs the wandb package; WANDB_MODE sets the mode, default offline).",
    ),
    nproc: Optional[int] = typer.Option(
        None,
        "--nproc",
        help="Train the experts in N local processes with torch.distributed (Gloo on CPU, NCCL with --device "
        "cuda), the experts dealt out in turn; the files equal those of one process.",
    ),
) -> None:
    """Train expert trajectories for mtt/tesla: one file of snapshots (init + every epoch) per expert.

    Run the same command again to continue an interrupted training or to add experts to the folder.
    """
    arguments = dict(locals())  # first: the options as given, for the processes --nproc starts
    from fastdd.data import load_dataset
    from fastdd.distill import distributed
    from fastdd.distill.experts import ExpertConfig, default_expert_folder, missing_experts, train_experts
    from fastdd.io import check_writable_folder

    tensorboard_target = _check_logging_options(tensorboard, tensorboard_dir, wandb)
    cfg = ExpertConfig(
        dataset=dataset, data_root=data_root, image_size=image_size, zca=zca, model=model, width=width, depth=depth,
        norm=norm, num_experts=num_experts, epochs=epochs, lr_teacher=lr_teacher, momentum=momentum,
        weight_decay=weight_decay, batch_size=batch_size, dsa=dsa, dsa_strategy=dsa_strategy, seed=seed,
        keep_snapshots=keep_snapshots, device=device, outliers=outliers, outlier_data=outlier_data,
        outlier_ratio=outlier_ratio, outlier_weight=outlier_weight,
    )
    if _launch_processes("experts", arguments, nproc):
        return
    folder = out if out is not None else default_expert_folder(cfg, "runs")
    # A complete folder is only read (it may be a read-only cache); one process probes (the probe may create and
    # remove the folder).
    if missing_experts(folder, cfg.num_experts) and distributed.launched_rank() == 0:
        check_writable_folder(folder)  # before the (possibly slow) data loading

    def report(index: int, acc: float) -> None:
        typer.echo(f"expert {index}: test accuracy {100 * acc:.2f} %")

    with distributed.session(device):
        data = load_dataset(dataset, data_root=data_root, image_size=image_size, zca=zca)
        try:
            result = train_experts(
                cfg, data, folder, progress=not quiet, on_expert=report, tensorboard=tensorboard_target, wandb=wandb
            )
        except KeyboardInterrupt:
            _fail("interrupted; finished experts are kept: run the same command again to continue", 130)
        main = distributed.is_main()
    if main:
        accs = result.test_accuracies
        mean = 100 * sum(accs) / len(accs)
        typer.echo(f"{result.num_experts} experts with {result.num_snapshots} snapshots in {folder} "
                   f"(mean test accuracy {mean:.2f} %)")


def _split_models(models: list[str]) -> list[str]:
    names = [name.strip() for item in models for name in item.split(",") if name.strip()]
    from fastdd.models import MODELS

    unknown = [n for n in names if n not in MODELS]
    if unknown:
        raise FastddError(f"unknown model {unknown[0]!r}; choose from {', '.join(MODELS)}.")
    return names


@app.command()
@_user_errors
def evaluate(
    synset_dir: Path = typer.Argument(..., help="Folder written by `fastdd distill`."),
    models: list[str] = typer.Option(["convnet"], "--models", help="Models to train, comma separated or repeated."),
    runs: int = typer.Option(5, help="Fresh networks per model."),
    epochs: Optional[int] = typer.Option(None, help="Training epochs (default 1000 with DSA, 300 without)."),
    lr: Optional[float] = typer.Option(None, help="Learning rate (default: the set's learned lr, else 0.01)."),
    dsa: bool = typer.Option(True, "--dsa/--no-dsa", help="Augment while training on the synthetic set."),
    seed: int = typer.Option(0, help="Seed of the evaluation generator."),
    data_root: Optional[str] = typer.Option(None, help="Dataset folder (default: the one used to distill)."),
    device: str = typer.Option("cpu", help="Torch device."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the results to this JSON file."),
    ood: Optional[list[str]] = typer.Option(
        None,
        "--ood",
        help="OOD test sets, comma separated or repeated: gaussian, uniform, a dataset name (its test split), a folder "
        "of images, or holdout:K (train on classes < K, the other classes are OOD).",
    ),
    score: Optional[list[str]] = typer.Option(
        None, "--score", help="OOD scores, comma separated or repeated: msp, mls, energy, gen (default msp, TrustDD's)."
    ),
    plots: Optional[Path] = typer.Option(
        None, "--plots", help="Folder for PNGs: histograms of the ID vs OOD scores (ood_MODEL_SCORE.png) with --ood; "
        "reliability diagrams (calibration_MODEL_METHOD.png) and max-logit histograms (max_logits_MODEL.png) with "
        "--calibration.",
    ),
    ood_size: Optional[int] = typer.Option(
        None, "--ood-size", help="At most N images per side and OOD set (default: ID:OOD 1:1, all of the smaller side)."
    ),
    use_outliers: bool = typer.Option(
        True, "--use-outliers/--ignore-outliers", help="Train on the set's outlier images too, when it has them."
    ),
    robustness: bool = typer.Option(
        False, "--robustness", help="Also report cluster_min, cluster_mean (10 KMeans test clusters), and the accuracy "
        "under noise (Gaussian, std 0.0707), blur (Gaussian, radius 2) and invert (1 - x).",
    ),
    robustness_sets: Optional[list[str]] = typer.Option(
        None, "--robustness-sets", help="Only these robustness measures, comma separated or repeated (implies "
        "--robustness): cluster_min, cluster_mean, noise, blur, invert.",
    ),
    calibration: Optional[list[str]] = typer.Option(
        None, "--calibration", help="Calibration methods, comma separated or repeated: none (raw networks), ts (one "
        "more network per run trained on 90 % of S per class, temperature fitted on the other 10 %), mts (masked "
        "temperature scaling: temperature fitted on all of S, each image under 10 random pixel masks). Reports ECE "
        "(15 bins), NLL, "
        "temperature and accuracy.",
    ),
    mask_ratio: Optional[float] = typer.Option(
        None, "--mask-ratio", help="Fraction of pixels MTS masks (0 = temperature scaling on S; default 0.3).",
        show_default=False,
    ),
    train_loss: str = typer.Option(
        "ce", "--train-loss", help="Loss of the evaluation networks: ce, ls (label smoothing 0.1), mixup, focal."
    ),
    train_plugin: Optional[str] = typer.Option(
        None, "--train-plugin", help="oal: train with OAL (CE + distillation from --teacher + MICL on boundary "
        "outliers); its default OOD score is energy.",
    ),
    teacher: Optional[str] = typer.Option(
        None, "--teacher", help="OAL's teacher: 'expert' (the experts folder the set was distilled from), an experts "
        "folder, an expert file or a model checkpoint (.safetensors, .pt).",
    ),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Train fresh networks on a synthetic set and report their test accuracy (mean ± std over runs), with --ood
    their OOD detection (AUROC, AUPR-IN/OUT, FPR95 in TrustDD's and OpenOOD's conventions), with --robustness
    their worst-cluster and shifted-input accuracies, and with --calibration their ECE / NLL raw, after TS and after
    MTS."""
    from fastdd.evaluate import EvalConfig, dataset_for_synset, evaluate_synthetic_set
    from fastdd.evaluate.calibration_runs import parse_calibrations
    from fastdd.evaluate.robustness import ROBUSTNESS_SETS, parse_robustness_sets
    from fastdd.io import SyntheticSet, write_json

    names = _split_models(models)
    chosen_robustness = (
        parse_robustness_sets(robustness_sets) if robustness_sets else (ROBUSTNESS_SETS if robustness else None)
    )
    synset = SyntheticSet.load(synset_dir)
    data = dataset_for_synset(synset, data_root=data_root)
    config = EvalConfig(runs=runs, epochs=epochs, lr=lr, dsa=dsa, seed=seed, device=device)
    calibrations = parse_calibrations(calibration) if calibration else None
    networks_per_run = 2 if calibrations and "ts" in calibrations else 1
    total = len(names) * runs * networks_per_run * config.epochs_or_default()
    ood_options = dict(
        ood=ood or None, scores=score or None, plots=plots, ood_size=ood_size, use_outliers=use_outliers,
        data_root=data_root, robustness=chosen_robustness, calibration=calibrations, mask_ratio=mask_ratio,
        train_loss=train_loss.strip().lower(), train_plugin=train_plugin.strip().lower() if train_plugin else None,
        teacher=teacher,
    )
    if quiet:
        result = evaluate_synthetic_set(synset, data, models=names, config=config, **ood_options)
    else:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        with Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("ETA"),
            TimeRemainingColumn(),
        ) as progress:
            task = progress.add_task("evaluate", total=total)

            def on_epoch(model: str, run: int, epoch: int) -> None:
                progress.update(task, advance=1, description=f"evaluate {model} run {run + 1}/{runs}")

            result = evaluate_synthetic_set(
                synset, data, models=names, config=config, on_epoch=on_epoch, **ood_options
            )
    trained_on = []
    if result["holdout"] is not None:
        trained_on.append(f"classes < {result['holdout']}")
    if result["outliers"]:
        trained_on.append(f"{result['outliers']} outlier images")
    if result["train_plugin"] is not None:
        trained_on.append(f"{result['train_plugin']} with teacher {result['teacher']}")
    elif result["train_loss"] != "ce":
        trained_on.append(f"{result['train_loss']} loss")
    for name, res in result["models"].items():
        acc = res["acc"]
        typer.echo(f"{name}: acc {acc['mean']:.2f} ± {acc['std']:.2f} % over {runs} runs "
                   f"({result['dataset']}, {result['method']}, IPC {result['ipc']}, {result['epochs']} epochs"
                   + "".join(f", {t}" for t in trained_on) + ")")
        for score_name, sets in res.get("ood", {}).items():
            typer.echo(f"  OOD score {score_name} (%, mean ± std over {runs} runs; images per side: "
                       + ", ".join(f"{k} {v}" for k, v in result["ood_sets"].items()) + ")")
            columns = ("auroc", "aupr_in", "aupr_out", "fpr95", "fpr95_openood")
            label_width = max(len(s) for s in ["set", *sets])
            typer.echo(f"  {'set':<{label_width}}" + "".join(f"  {c:>15}" for c in columns))
            for set_name, metrics in sets.items():
                cells = [f"{metrics[c]['mean']:.2f} ± {metrics[c]['std']:.2f}" for c in columns]
                typer.echo(f"  {set_name:<{label_width}}" + "".join(f"  {cell:>15}" for cell in cells))
        if "robustness" in res:
            sizes = " ".join(map(str, result.get("cluster_sizes", [])))
            typer.echo(f"  robustness (accuracy %, mean ± std over {runs} runs"
                       + (f"; test images per cluster: {sizes}" if sizes else "") + ")")
            columns = list(res["robustness"])
            widths = [max(15, len(c)) for c in columns]
            typer.echo("  " + "  ".join(f"{c:>{w}}" for c, w in zip(columns, widths)))
            cells = [f"{res['robustness'][c]['mean']:.2f} ± {res['robustness'][c]['std']:.2f}" for c in columns]
            typer.echo("  " + "  ".join(f"{cell:>{w}}" for cell, w in zip(cells, widths)))
        if "calibration" in res:
            typer.echo(f"  calibration on the test set (mean ± std over {runs} runs; MTS mask ratio "
                       f"{result['mask_ratio']}; TS networks train on 90 % of S)")
            columns = ("acc", "ece", "nll", "temperature")
            typer.echo(f"  {'method':<8}" + "".join(f"  {c + (' %' if c in ('acc', 'ece') else ''):>17}"
                                                    for c in columns))
            for method, metrics in res["calibration"].items():
                cells = [f"{metrics[c]['mean']:.{2 if c in ('acc', 'ece') else 3}f} ± "
                         f"{metrics[c]['std']:.{2 if c in ('acc', 'ece') else 3}f}" for c in columns]
                extra = (f"  (before scaling: ece {metrics['ece_before']['mean']:.2f} %, nll "
                         f"{metrics['nll_before']['mean']:.3f})" if "ece_before" in metrics else "")
                typer.echo(f"  {method:<8}" + "".join(f"  {cell:>17}" for cell in cells) + extra)
    for path in result.get("plots", []):
        typer.echo(f"plot written to {path}")
    if json_out is not None:
        write_json(json_out, result)
        typer.echo(f"results written to {json_out}")


@app.command()
@_user_errors
def report(
    synset_dirs: list[Path] = typer.Argument(..., help="Folders written by `fastdd distill`, all of one dataset."),
    out: Path = typer.Option(..., "--out", help="Report folder: report.md, report.json, summary_MODEL.png, plots/."),
    models: list[str] = typer.Option(
        ["convnet"], "--models", help="Models to train, comma separated or repeated (several: cross-architecture)."
    ),
    runs: int = typer.Option(5, help="Fresh networks per set and model."),
    epochs: Optional[int] = typer.Option(None, help="Training epochs (default 1000 with DSA, 300 without)."),
    lr: Optional[float] = typer.Option(None, help="Learning rate (default: each set's learned lr, else 0.01)."),
    dsa: bool = typer.Option(True, "--dsa/--no-dsa", help="Augment while training on the synthetic sets."),
    seed: int = typer.Option(0, help="Seed of the evaluation generator (the same for every set)."),
    ood: Optional[list[str]] = typer.Option(
        None, "--ood", help="OOD test sets, comma separated or repeated, as in `fastdd evaluate` (default gaussian,"
        "uniform).",
    ),
    score: Optional[list[str]] = typer.Option(
        None, "--score", help="OOD scores, comma separated or repeated: msp, mls, energy, gen (default msp,energy)."
    ),
    ood_size: Optional[int] = typer.Option(None, "--ood-size", help="At most N images per side and OOD set."),
    robustness: bool = typer.Option(
        True, "--robustness/--no-robustness", help="Measure cluster_min, cluster_mean, noise, blur and invert."
    ),
    calibration: Optional[list[str]] = typer.Option(
        None, "--calibration", help="Calibration methods, comma separated or repeated (default none,ts,mts); ts is "
        "skipped, with a note, for a set with a single image in a class.",
    ),
    mask_ratio: Optional[float] = typer.Option(
        None, "--mask-ratio", help="Fraction of pixels MTS masks (default 0.3).", show_default=False
    ),
    use_outliers: bool = typer.Option(
        True, "--use-outliers/--ignore-outliers", help="Train on the outlier images of TrustDD sets too."
    ),
    data_root: Optional[str] = typer.Option(None, help="Dataset folder (default: the one used to distill)."),
    device: str = typer.Option("cpu", help="Torch device."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier report in --out."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Evaluate synthetic sets of one dataset under one protocol and write a side-by-side trust report: accuracy,
    OOD detection (AUROC / FPR95 per OOD set and mean), robustness (cluster_min, noise, blur, invert), calibration
    (ECE raw / TS / MTS), size and distillation time, mean ± std over runs."""
    from fastdd.evaluate import EvalConfig
    from fastdd.evaluate.report import DEFAULT_REPORT_OOD, DEFAULT_REPORT_SCORES, REPORT_MD, prepare_report
    from fastdd.evaluate.robustness import ROBUSTNESS_SETS

    config = EvalConfig(runs=runs, epochs=epochs, lr=lr, dsa=dsa, seed=seed, device=device)
    plan = prepare_report(
        [str(folder) for folder in synset_dirs], out=out, models=models, config=config,
        ood=ood or DEFAULT_REPORT_OOD, scores=score or DEFAULT_REPORT_SCORES,
        robustness=ROBUSTNESS_SETS if robustness else None, calibration=calibration or "none,ts,mts",
        mask_ratio=mask_ratio, ood_size=ood_size, data_root=data_root, use_outliers=use_outliers,
        overwrite=overwrite,
    )
    for report_set in plan.sets:
        for note in report_set.info["notes"]:
            typer.echo(f"note: {report_set.name}: {note}")
    if quiet:
        result = plan.run()
    else:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        with Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("ETA"),
            TimeRemainingColumn(),
        ) as progress:
            task = progress.add_task("report", total=plan.total_epochs)

            def on_epoch(name: str, model: str, run: int, epoch: int) -> None:
                progress.update(task, advance=1, description=f"report {name} {model} run {run + 1}/{runs}")

            result = plan.run(on_epoch)
    for entry in result["sets"]:
        for model, res in entry["results"]["models"].items():
            typer.echo(f"{entry['name']} ({model}): acc {res['acc']['mean']:.2f} ± {res['acc']['std']:.2f} %")
    typer.echo(f"report written to {out / REPORT_MD} ({len(result['plots'])} plots)")


@app.command()
@_user_errors
def show(
    synset_dir: Path = typer.Argument(..., help="Folder written by `fastdd distill`."),
    out: Optional[Path] = typer.Option(None, help="PNG to write (default SYNSET_DIR/synset.png)."),
) -> None:
    """Write the synthetic images as a PNG grid (one row per class, de-normalised or inverse-ZCA'd), and the outlier
    images of a TrustDD set as a second grid beside it (NAME_outliers.png)."""
    from fastdd.io import SYNSET_GRID, SyntheticSet, save_image_grid, synset_unit_images

    synset = SyntheticSet.load(synset_dir)
    target = out if out is not None else Path(synset_dir) / SYNSET_GRID
    save_image_grid(synset_unit_images(synset), target, nrow=synset.meta.get("ipc"))
    typer.echo(f"image grid written to {target}")
    if synset.outlier_images is not None:
        outlier_target = target.with_name(f"{target.stem}_outliers{target.suffix}")
        save_image_grid(synset_unit_images(synset, outliers=True), outlier_target, nrow=synset.meta.get("ipc"))
        typer.echo(f"outlier grid written to {outlier_target}")


@app.command("inspect")
@_user_errors
def inspect_command(
    synset_dirs: list[Path] = typer.Argument(..., help="Folders written by `fastdd distill`."),
    plots: Optional[Path] = typer.Option(
        None, "--plots", help="Folder for svd.png (the SVD curves of all sets, with the diagonal) and max_logits.png "
        "(histograms of their max logits; not with --no-train).",
    ),
    no_train: bool = typer.Option(False, "--no-train", help="Only the SVD curves: train no networks."),
    model: Optional[str] = typer.Option(
        None, help="Architecture to train (default: the one the set was distilled with, else convnet)."
    ),
    runs: int = typer.Option(1, help="Fresh networks per set; their test-set max logits are pooled."),
    epochs: Optional[int] = typer.Option(None, help="Training epochs (default 1000 with DSA, 300 without)."),
    lr: Optional[float] = typer.Option(None, help="Learning rate (default: the set's learned lr, else 0.01)."),
    dsa: bool = typer.Option(True, "--dsa/--no-dsa", help="Augment while training on the synthetic set."),
    seed: int = typer.Option(0, help="Seed of the training generator."),
    data_root: Optional[str] = typer.Option(None, help="Dataset folder (default: the one used to distill)."),
    device: str = typer.Option("cpu", help="Torch device."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the results (and full curves) to this "
                                            "JSON file."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Print two diagnostics of synthetic sets from "Do Not Overlook Calibration": the SVD curve (cumulative sum of
    the singular values of the flattened, uncentred images over their total; near the diagonal = evenly spread
    information) at a few fractions of the components, with the components needed for 50/90/99 %; and the max-logit
    spread (mean, std, percentiles) on the real test set of networks trained on each set, the networks of `fastdd
    evaluate --models MODEL --ignore-outliers` with the same options (cross-entropy)."""
    import torch

    from fastdd.evaluate import EvalConfig, dataset_for_synset
    from fastdd.evaluate.diagnostics import (
        explained_variance_curve,
        max_logit_summary,
        save_explained_variance_plot,
        svd_summary,
        trained_test_logits,
    )
    from fastdd.io import SyntheticSet, write_json

    if runs < 1:
        raise FastddError(f"--runs must be at least 1, got {runs}.")
    if epochs is not None and epochs < 1:
        raise FastddError(f"--epochs must be at least 1, got {epochs}.")
    chosen_model = _split_models([model])[0] if model is not None else None
    # Read every set (and its dataset) before any training, so bad input fails at once.
    synsets = [(str(folder), SyntheticSet.load(folder)) for folder in synset_dirs]
    datasets = {} if no_train else {name: dataset_for_synset(s, data_root=data_root) for name, s in synsets}
    config = EvalConfig(runs=runs, epochs=epochs, lr=lr, dsa=dsa, seed=seed, device=device)

    def model_of(synset: SyntheticSet) -> str:
        return chosen_model or synset.meta.get("model") or "convnet"

    logits: dict[str, torch.Tensor] = {}

    def train_all(on_epoch: Callable[[str, int], None]) -> None:
        for name, synset in synsets:
            logits[name] = trained_test_logits(
                synset, datasets[name], model=model_of(synset), config=config,
                on_epoch=lambda run, epoch, n=name: on_epoch(n, run),
            )
            if not bool(torch.isfinite(logits[name]).all()):
                raise FastddError(
                    f"the networks trained on {name} give non-finite test logits (training diverged); try a lower --lr."
                )

    if not no_train:
        if quiet:
            train_all(lambda name, run: None)
        else:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            with Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("ETA"),
                TimeRemainingColumn(),
            ) as progress:
                task = progress.add_task("inspect", total=len(synsets) * runs * config.epochs_or_default())
                train_all(lambda name, run: progress.update(
                    task, advance=1, description=f"inspect {name} run {run + 1}/{runs}"
                ))

    curves: dict[str, torch.Tensor] = {}
    report: dict[str, Any] = {"sets": []}
    for name, synset in synsets:
        meta = synset.meta
        curves[name] = curve = explained_variance_curve(synset.images)
        svd = svd_summary(curve)
        entry: dict[str, Any] = {
            "synset": name, "dataset": meta.get("dataset"), "method": meta.get("method"), "ipc": meta.get("ipc"),
            "images": int(synset.images.shape[0]), "center": False, "svd": {**svd, "curve": curve.tolist()},
        }
        shape = "x".join(str(s) for s in synset.images.shape[1:])
        typer.echo(f"{name} ({meta.get('dataset')}, {meta.get('method')}, IPC {meta.get('ipc')}): "
                   f"{synset.images.shape[0]} images of {shape}, {svd['components']} singular values")
        points = svd["ratio_at"]
        typer.echo("  top components     " + "".join(f"{100 * p['fraction']:>7g}%" for p in points))
        typer.echo("  k                  " + "".join(f"{p['k']:>8d}" for p in points))
        typer.echo("  cumulative ratio   " + "".join(f"{p['ratio']:>8.3f}" for p in points)
                   + "   (diagonal: k / n)")
        reach = svd["components_for"]
        typer.echo(f"  components reaching {' / '.join(reach)} % of the singular-value sum: "
                   f"{' / '.join(str(k) for k in reach.values())} of {svd['components']}")
        if name in logits:
            dataset = datasets[name]
            pooled = logits[name].reshape(-1, logits[name].shape[-1])
            summary = max_logit_summary(pooled)
            accs = [100.0 * float((run.argmax(dim=1) == dataset.test_labels).float().mean()) for run in logits[name]]
            acc = torch.tensor(accs, dtype=torch.float64)
            entry.update(
                model=model_of(synset), runs=runs, epochs=config.epochs_or_default(), seed=seed, max_logit=summary,
                acc={"mean": float(acc.mean()), "std": float(acc.std(unbiased=False)), "runs": accs},
            )
            typer.echo(f"  max logit on the {dataset.name} test set ({model_of(synset)}, {runs} run(s) of "
                       f"{config.epochs_or_default()} epochs, pooled): "
                       + ", ".join(f"{k} {v:.2f}" for k, v in summary.items())
                       + f"; acc {float(acc.mean()):.2f} ± {float(acc.std(unbiased=False)):.2f} %")
        report["sets"].append(entry)
    if plots is not None:
        from fastdd.evaluate.calibration import save_max_logit_histogram

        paths = [plots / "svd.png"]
        save_explained_variance_plot(curves, paths[0], title="SVD curves of the synthetic sets")
        if logits:
            paths.append(plots / "max_logits.png")
            save_max_logit_histogram(
                {name: values.reshape(-1, values.shape[-1]).max(dim=1).values for name, values in logits.items()},
                paths[1], title=f"max logits on the test set, {runs} run(s) pooled",
            )
        report["plots"] = [str(p) for p in paths]
        for path in paths:
            typer.echo(f"plot written to {path}")
    if json_out is not None:
        write_json(json_out, report)
        typer.echo(f"results written to {json_out}")


@app.command()
@_user_errors
def export(
    synset_dir: Path = typer.Argument(..., help="Folder written by `fastdd distill`."),
    out: Optional[Path] = typer.Option(None, help="Folder to write into (default SYNSET_DIR)."),
) -> None:
    """Write images_best.pt, labels_best.pt and lr_best.pt so other dataset-distillation tools can read the set."""
    import torch

    from fastdd.io import SyntheticSet, atomic_write

    synset = SyntheticSet.load(synset_dir)
    target = out if out is not None else Path(synset_dir)
    lr = synset.syn_lr if synset.syn_lr is not None else torch.tensor(0.01)
    labels = synset.soft_labels if synset.soft_labels is not None else synset.labels
    for name, tensor in (("images_best.pt", synset.images), ("labels_best.pt", labels), ("lr_best.pt", lr)):
        atomic_write(target / name, lambda tmp, t=tensor: torch.save(t.clone(), tmp))
    typer.echo(f"images_best.pt, labels_best.pt and lr_best.pt written to {target}")


@app.command()
def info() -> None:
    """Versions, compiled backends and threads of this installation."""
    import torch

    import fastdd
    from fastdd import _extension

    rows: list[tuple[str, str]] = [
        ("fastdd", fastdd.__version__),
        ("python", platform.python_version()),
        ("torch", torch.__version__),
    ]
    for module in ("torchvision", "triton", "kornia"):
        try:
            rows.append((module, __import__(module).__version__))
        except Exception as exc:  # optional pieces: report rather than fail
            rows.append((module, f"unavailable ({exc.__class__.__name__})"))
    rows.append(("cuda available", f"{torch.cuda.is_available()} ({torch.cuda.device_count()} devices)"))
    cpp = "loaded" if _extension.has_cpp() else f"not loaded: {_extension.load_error()}"
    rows.append(("C++ extension fastdd._C", cpp))
    rows.append(("CUDA kernels compiled", str(_extension.has_cuda_kernels())))
    rows.append(("torch threads", str(torch.get_num_threads())))
    rows.append(("platform", f"{platform.platform()} ({platform.machine()})"))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        typer.echo(f"{key:<{width}}  {value}")


# The commands `--nproc` can start in several processes (the functions behind `fastdd distill` / `fastdd experts`).
_LAUNCHABLE: dict[str, Callable[..., None]] = {"distill": distill, "experts": experts_command}


def main() -> None:
    """Entry point of the ``fastdd`` script."""
    from fastdd.runtime import keep_freed_memory

    keep_freed_memory()
    app()


if __name__ == "__main__":
    sys.exit(main())
