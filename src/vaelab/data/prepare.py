"""Data ready for a model: loaded, checked against the likelihood's facts, binarised.

Shared by training, evaluation and inspection, so all three see the same pixels.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vaelab.data.batches import binarize_static
from vaelab.data.sources import Splits, load
from vaelab.errors import UserError
from vaelab.parts import LIKELIHOODS


def prepare_data(config, device) -> tuple[Splits, Tensor, Tensor, Tensor, int | None]:
    """Load, check that the likelihood fits the data, binarise; return the splits, the train / val /
    test tensors, and the number of pixels per image where bits/dim apply (a discrete likelihood)."""
    splits = load(config)
    likelihood = LIKELIHOODS[config.likelihood]
    if splits.levels == 256 and abs(float(splits.train.x.max()) - 1 / 255) < 1e-7:  # uint8 read as value / 255
        raise UserError(
            f"{splits.name} holds uint8 pixels of 0 and 1 alone, read as 0 and 1/255 (uint8 means 0 to 255): "
            "binary images stored as uint8 should be 0 and 255 (multiply by 255), or save them as floats 0.0 and 1.0"
        )
    if likelihood.binary_only and not config.binarized and not splits.binary:
        raise UserError(
            f"{splits.name} has grey-level pixels, and a {likelihood.name} likelihood is only a likelihood for "
            "binary data; use --binarize dynamic (or static), or --likelihood continuous-bernoulli"
        )
    if likelihood.levels is not None and splits.levels != likelihood.levels:
        raise UserError(
            f"the {likelihood.name} likelihood models {likelihood.levels} grey levels; {splits.name} has "
            f"{splits.levels or 'continuous'} levels. Use --likelihood continuous-bernoulli or gaussian"
        )
    train_x, val_x, test_x = (s.x.to(device) for s in (splits.train, splits.val, splits.test))
    if config.binarized:
        # validation and test are binarised once (fixed), so their numbers compare across epochs
        val_x = binarize_static(val_x.cpu(), config.seed, "val").to(device)
        test_x = binarize_static(test_x.cpu(), config.seed, "test").to(device)
        if not config.binarized_per_batch:
            train_x = binarize_static(train_x.cpu(), config.seed, "train").to(device)
    pixels = splits.train.x[0].numel() if likelihood.discrete else None
    return splits, train_x, val_x, test_x, pixels


def labels_for(config, split, name: str, device="cpu") -> Tensor | None:
    """The labels (N,) of one split (``ImageData``) that a conditional model is given (M2 too: it draws per
    class given the labels; it trains on ``semi_supervised`` ones); None for any other model."""
    if not config.uses_labels:
        return None
    if split.y is None:
        raise UserError(
            f"{'--labelled' if config.labelled else f'--family {config.family}'} needs labels, and {name} has none; "
            "use a data set with labels (mnist, fashion-mnist, "
            "kmnist, cifar10, digits, an .npz with key y, or an image folder with one sub-folder per class)"
        )
    if config.classes and len(split.y) and int(split.y.max()) >= config.classes:
        raise UserError(
            f"{name} has a label {int(split.y.max())}, and the model knows {config.classes} classes "
            f"(0 to {config.classes - 1}); use data with the run's labels"
        )
    return split.y.to(device)


def semi_supervised(config, y: Tensor, name: str) -> Tensor:
    """M2's training labels: ``config.labelled`` of the labels ``y`` kept, balanced over the classes (the
    first labelled % classes classes one more), drawn by the seeded stream ``labelled``; -1 elsewhere."""
    from vaelab.data.batches import seeded

    classes, wanted = config.classes, config.labelled
    if wanted < classes or wanted > len(y):
        raise UserError(
            f"--labelled {wanted}: balanced over {classes} classes it needs {classes} to {len(y)} images (the "
            f"training images of {name}); give a number in that range"
        )
    kept = torch.full_like(y, -1)
    generator = seeded(config.seed, "labelled")
    for c in range(classes):
        members = torch.nonzero(y == c).flatten()
        n = wanted // classes + (c < wanted % classes)
        if len(members) < n:
            raise UserError(
                f"--labelled {wanted} takes {n} images of class {c}, and the training images of {name} have "
                f"{len(members)}; give a smaller --labelled"
            )
        chosen = members[torch.randperm(len(members), generator=generator)[:n].to(members.device)]
        kept[chosen] = c
    return kept
