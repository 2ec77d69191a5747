"""Randomness by position: every random draw of a distillation run comes from a generator derived from the run's seed
and the draw's position, never from one generator shared by the whole run.

A position names what is drawn and where: a kind of draw (a short tag such as ``"real"``) followed by the numbers
that locate it (iteration, class or student, step). Any process can therefore compute any share of an iteration
(a class, a student) without replaying the draws of the shares it leaves to others, a new draw in one place cannot
shift the draws anywhere else, and a resumed run draws what the uninterrupted run would have drawn with no generator
state in its checkpoint.

Derivation: the seed of position ``(kind, p_1, ..., p_k)`` is the first 63 bits of
``SHA-256("fastdd-<kind>:<seed>:<p_1>:...:<p_k>")``. The text is an injective encoding of the position (the kind is
checked to hold no ``:``, and every ``p_i`` is a decimal integer or a ``:``-free tag), so two positions never share
an input; SHA-256 then makes two positions share a seed only by a 64-bit-hash collision, about ``n**2 / 2**64`` for
``n`` positions (below 1e-7 for the million draws of a long run). This is the derivation of
:func:`fastdd.distill.experts.expert_seed`, which is kind ``"expert"``: ``draw_seed(seed, "expert", k) ==
expert_seed(seed, k)``.

Kinds used by the distillers (one stream per kind of draw, so adding a draw of one kind leaves the others as they
were):

- ``("init_images",)``, ``("init_plugins",)``: the initial synthetic images; the plug-ins' initial tensors (S_out).
- ``("network", iteration)``: the weights of the iteration's fresh (or re-initialised kept) matching network;
  ``("network", "student")``: trajectory matching's student network (its weights are never used).
- ``("real", iteration, [outer,] group)``, ``("augment", iteration, [outer,] group)``,
  ``("mask", iteration, outer, group)``: a matched group's real batch, its shared augmentation, MDT's mask.
- ``("batchnorm", iteration, outer)``: dc's real images that set the batchnorm statistics.
- ``("inner", iteration, outer, epoch)``: an inner-loop epoch on the synthetic set (order, augmentation, masks).
- ``("net_real", iteration, [update,] step)``, ``("net_extra", ...)``: a network step's real batch, and the rows the
  plug-ins add to it (TrustDD's real outliers); with dc's ``--robust-schedule official``: ``("net_real", iteration,
  outer, class)`` the fresh real batch of a class, ``("net_order", iteration, outer, epoch)`` an epoch's order,
  ``("net_augment" | "net_extra", iteration, outer, epoch, batch)`` a minibatch's augmentation and extra rows.
- ``("student", iteration, student)``: a student's expert and start epoch; ``("plan", iteration, student)``: its
  minibatches, augmentations and masks.
"""

from __future__ import annotations

import hashlib

import torch

SEED_BITS = 63


def _part(value: int | str) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise TypeError(f"a draw position holds integers and tags, got {value!r}")
    text = str(int(value)) if isinstance(value, int) else value
    if ":" in text or not text:
        raise ValueError(f"a draw tag must be a non-empty string without ':', got {value!r}")
    return text


def draw_seed(seed: int, kind: str, *position: int | str) -> int:
    """The 63-bit seed of the draws of ``kind`` at ``position`` in a run seeded ``seed`` (see the module docstring)."""
    text = ":".join([f"fastdd-{_part(kind)}", str(int(seed)), *map(_part, position)])
    digest = hashlib.sha256(text.encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**SEED_BITS - 1)


def draw_generator(seed: int, kind: str, *position: int | str) -> torch.Generator:
    """A fresh CPU generator seeded with :func:`draw_seed` (draws on another device are moved there)."""
    generator = torch.Generator()
    generator.manual_seed(draw_seed(seed, kind, *position))
    return generator
