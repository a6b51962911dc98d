"""Training data for the benchmarks: digits, CIFAR-10/100, ImageNet (ImageFolder), synthetic.

Every batch is a pure function of (seed, epoch, step, rank): the order of an epoch is a seeded
permutation and the augmentation of a batch (or, for ImageFolder, of an image) draws from a
generator seeded by its position. So a run resumed at (epoch, step) sees exactly the batches
it would have seen, whatever the number of loader workers. Nothing is ever downloaded.

Under DDP every rank computes the same permutation and takes its own slice of each global
batch; the test set is split round-robin and the counts are summed by the caller.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from bench.models import DIGITS, ImageShape

DATASETS = ("digits", "cifar10", "cifar100", "imagenet", "synthetic")
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class DataError(ValueError):
    """The data set asked for cannot be read; the message says what is missing where."""


def derive_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (stable across processes and Python versions)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> 1)


@dataclass(frozen=True)
class Shard:
    """This process's place among ``world`` data-parallel ranks."""

    rank: int = 0
    world: int = 1


class InMemoryData:
    """Images held as one tensor on the device; batches are gathered and augmented there.

    ``augment`` is CIFAR's standard augmentation: 4-pixel zero padding with a random 32x32
    crop, and a random horizontal flip.
    """

    def __init__(self, name: str, shape: ImageShape, train: tuple, test: tuple, device,
                 mean=None, std=None, augment: bool = False):
        self.name, self.shape, self.augment = name, shape, augment
        self.device = torch.device(device)
        self.train_x, self.train_y = (t.to(self.device) for t in train)
        self.test_x, self.test_y = (t.to(self.device) for t in test)
        self.mean = None if mean is None else torch.tensor(mean, device=self.device).view(1, -1, 1, 1)
        self.std = None if std is None else torch.tensor(std, device=self.device).view(1, -1, 1, 1)

    @property
    def num_train(self) -> int:
        return len(self.train_x)

    def steps_per_epoch(self, global_batch: int) -> int:
        return self.num_train // global_batch

    def train_batches(self, epoch: int, start_step: int, batch: int, seed: int,
                      shard: Shard = Shard()) -> Iterator[tuple]:
        order = epoch_order(self.num_train, seed, epoch)
        global_batch = batch * shard.world
        for step in range(start_step, self.steps_per_epoch(global_batch)):
            begin = step * global_batch + shard.rank * batch
            idx = order[begin:begin + batch].to(self.device)
            x = self.train_x[idx]
            if self.augment:
                x = random_crop_flip(x, torch.Generator().manual_seed(derive_seed(seed, 1, epoch, step, shard.rank)))
            yield self._normalise(x), self.train_y[idx]

    def test_batches(self, batch: int, shard: Shard = Shard()) -> Iterator[tuple]:
        idx_all = torch.arange(shard.rank, len(self.test_x), shard.world, device=self.device)
        for i in range(0, len(idx_all), batch):
            idx = idx_all[i:i + batch]
            yield self._normalise(self.test_x[idx]), self.test_y[idx]

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x
        return x if self.mean is None else (x - self.mean) / self.std


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(seed, 0, epoch)))


def random_crop_flip(x: torch.Tensor, gen: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Per-image random crop of the zero-padded batch and random horizontal flip."""
    n, _, h, w = x.shape
    offsets = torch.randint(0, 2 * pad + 1, (2, n), generator=gen).to(x.device)
    flips = (torch.rand(n, generator=gen) < 0.5).to(x.device)
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    rows = (offsets[0, :, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (offsets[1, :, None] + torch.arange(w, device=x.device))[:, None, None, :]
    cols = torch.where(flips[:, None, None, None], cols.flip(-1), cols)
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chans = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return padded[batch, chans, rows, cols]


class SyntheticData(InMemoryData):
    """One fixed random batch of the right shape, generated on the device: for speed only."""

    def __init__(self, shape: ImageShape, device, batch: int, steps_per_epoch: int, seed: int):
        device = torch.device(device)
        gen = torch.Generator(device=device).manual_seed(derive_seed(seed, 2))
        x = torch.randn(batch, shape.channels, shape.size, shape.size, generator=gen, device=device)
        y = torch.randint(0, shape.num_classes, (batch,), generator=gen, device=device)
        super().__init__("synthetic", shape, (x, y), (x, y), device)
        self._steps = steps_per_epoch

    @property
    def num_train(self) -> int:
        return self._steps * len(self.train_x)

    def steps_per_epoch(self, global_batch: int) -> int:
        return self._steps

    def train_batches(self, epoch, start_step, batch, seed, shard=Shard()):
        x, y = self.train_x[:batch], self.train_y[:batch]
        for _ in range(start_step, self._steps):
            yield x, y


def load_digits_data(device, seed: int) -> InMemoryData:
    """scikit-learn's bundled 8x8 digits, 80/20 split (no download)."""
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    x = torch.tensor(images, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    y = torch.tensor(labels, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    split = int(0.8 * len(x))
    return InMemoryData("digits", DIGITS, (x[:split], y[:split]), (x[split:], y[split:]), device)


_CIFAR_LAYOUT = {
    # name: (folder torchvision uses, train files, test files, label key, classes)
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"],
                "labels", 10),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "fine_labels", 100),
}


def load_cifar(name: str, root, device) -> InMemoryData:
    """CIFAR-10/100 from torchvision's on-disk format (pickled batches), never downloaded.

    ``root`` may be the folder that holds ``cifar-10-batches-py`` / ``cifar-100-python`` (what
    torchvision's ``root`` is) or that folder itself.
    """
    folder, train_files, test_files, label_key, classes = _CIFAR_LAYOUT[name]
    root = Path(root)
    base = root if (root / train_files[0]).exists() else root / folder
    missing = [f for f in train_files + test_files if not (base / f).is_file()]
    if missing:
        raise DataError(
            f"--data {name}: no {name.upper()} data in {root} (looked in {base}, missing "
            f"{', '.join(missing)}). Expected torchvision's on-disk format, {folder}/ with "
            f"{', '.join(train_files + test_files)}; this tool never downloads, so fetch it "
            f"once, e.g. torchvision.datasets.{name.upper()}('{root}', download=True)")
    train = _read_cifar_batches(base, train_files, label_key, classes)
    test = _read_cifar_batches(base, test_files, label_key, classes)
    shape = ImageShape(3, 32, classes)
    return InMemoryData(name, shape, train, test, device, CIFAR_MEAN, CIFAR_STD, augment=True)


def _read_cifar_batches(base: Path, files: list, label_key: str, classes: int) -> tuple:
    images, labels = [], []
    for f in files:
        with open(base / f, "rb") as fh:
            entry = pickle.load(fh, encoding="latin1")
        if "data" not in entry or label_key not in entry:
            raise DataError(f"{base / f} is not a CIFAR batch: it has keys {sorted(entry)}, "
                            f"expected 'data' and '{label_key}'")
        images.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.extend(entry[label_key])
    y = torch.tensor(labels, dtype=torch.long)
    if len(y) and (y.min() < 0 or y.max() >= classes):
        raise DataError(f"{base}: labels outside 0..{classes - 1}")
    return torch.from_numpy(np.concatenate(images)), y


class ImageFolderData:
    """ImageNet-style ``root/train/<class>/*`` and ``root/val/<class>/*`` through torchvision's
    ImageFolder and a DataLoader, with the standard augmentation (random-resized crop and
    flip for training; resize to size*256/224 and centre crop for validation)."""

    def __init__(self, root, device, size: int = 224, workers: int = 4):
        try:
            from torchvision import datasets, transforms
        except ImportError as err:
            raise DataError(f"--data imagenet needs torchvision ({err})") from err
        root = Path(root)
        for split in ("train", "val"):
            if not (root / split).is_dir():
                raise DataError(f"--data imagenet: {root / split} is not a directory; expected an "
                                "ImageFolder tree root/train/<class>/*.JPEG and root/val/<class>/*.JPEG")
        normalise = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
        train_tf = transforms.Compose([transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(),
                                       transforms.ToTensor(), normalise])
        test_tf = transforms.Compose([transforms.Resize(size * 256 // 224), transforms.CenterCrop(size),
                                      transforms.ToTensor(), normalise])
        try:
            self.train_set = datasets.ImageFolder(str(root / "train"))
            self.test_set = datasets.ImageFolder(str(root / "val"), transform=test_tf)
        except (FileNotFoundError, RuntimeError) as err:
            raise DataError(f"--data imagenet: cannot read the ImageFolder tree in {root}: {err}") from err
        if self.train_set.classes != self.test_set.classes:
            raise DataError(f"--data imagenet: {root}/train and {root}/val have different classes")
        self.train_tf = train_tf
        self.name, self.device, self.workers = "imagenet", torch.device(device), workers
        self.shape = ImageShape(3, size, len(self.train_set.classes))

    @property
    def num_train(self) -> int:
        return len(self.train_set)

    def steps_per_epoch(self, global_batch: int) -> int:
        return self.num_train // global_batch

    def train_batches(self, epoch, start_step, batch, seed, shard=Shard()):
        order = epoch_order(self.num_train, seed, epoch)
        global_batch = batch * shard.world
        steps = self.steps_per_epoch(global_batch)
        indices = [int(i) for step in range(start_step, steps)
                   for i in order[step * global_batch + shard.rank * batch:][:batch]]
        dataset = _SeededTransform(self.train_set, self.train_tf, derive_seed(seed, 3, epoch))
        yield from self._load(dataset, indices, batch)

    def test_batches(self, batch, shard=Shard()):
        yield from self._load(self.test_set, list(range(shard.rank, len(self.test_set), shard.world)), batch)

    def _load(self, dataset, indices, batch):
        loader = torch.utils.data.DataLoader(
            torch.utils.data.Subset(dataset, indices), batch_size=batch, num_workers=self.workers,
            pin_memory=self.device.type == "cuda", persistent_workers=False)
        for x, y in loader:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


class _SeededTransform(torch.utils.data.Dataset):
    """Applies the transform to image ``i`` under a generator seeded by (epoch seed, i), so
    augmentation does not depend on which worker loads the image or when."""

    def __init__(self, base, transform, seed: int):
        self.base, self.transform, self.seed = base, transform, seed

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        image, label = self.base[i]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.seed, i))
            return self.transform(image), label


def load_data(name: str, *, data_dir: Optional[str], device, seed: int, shape: ImageShape,
              synthetic_batch: int = 0, synthetic_steps: int = 0, workers: int = 4):
    """The data set ``name``; ``shape`` sizes the synthetic data and ImageFolder crops."""
    if name not in DATASETS:
        raise DataError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    if name in ("cifar10", "cifar100", "imagenet"):
        if not data_dir:
            raise DataError(f"--data {name} needs --data-dir DIR (the data is read from disk, never "
                            "downloaded)")
        if not Path(data_dir).is_dir():
            raise DataError(f"--data {name}: --data-dir {data_dir} does not exist or is not a directory")
    if name == "digits":
        return load_digits_data(device, seed)
    if name == "synthetic":
        return SyntheticData(shape, device, synthetic_batch, synthetic_steps, seed)
    if name == "imagenet":
        return ImageFolderData(data_dir, device, shape.size, workers)
    return load_cifar(name, data_dir, device)

