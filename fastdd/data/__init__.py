"""Datasets: the registry and loaders, normalisation, ZCA whitening and per-class indexing.

>>> data = load_dataset("digits")            # embedded: no files needed
>>> data.train_images.shape                  # [N, C, H, W], model space
torch.Size([1438, 1, 8, 8])
"""

from fastdd.data.dataset import ClassIndex, ImageDataset
from fastdd.data.registry import DATASETS, load_dataset
from fastdd.data.zca import ZCA

__all__ = ["DATASETS", "ZCA", "ClassIndex", "ImageDataset", "load_dataset"]
