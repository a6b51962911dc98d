"""The benchmark data readers on small fake data sets in the real on-disk formats."""

import pickle

import numpy as np
import pytest
import torch

from bench.data import (DataError, ImageFolderData, Shard, load_cifar, load_data, random_crop_flip)
from bench.models import ImageShape


def write_fake_cifar(root, name: str, per_file: int = 6, seed: int = 0):
    """torchvision's layout and pickles: a dict with 'data' (N x 3072 uint8, channel-major
    rows) and 'labels' (CIFAR-10) or 'fine_labels' (CIFAR-100). Returns (images, labels)
    of train and test as the files hold them."""
    rng = np.random.default_rng(seed)
    if name == "cifar10":
        folder, train, test, key, classes = "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "labels", 10
    else:
        folder, train, test, key, classes = "cifar-100-python", ["train"], ["test"], "fine_labels", 100
    base = root / folder
    base.mkdir(parents=True)
    out = {}
    for split, files in (("train", train), ("test", test)):
        data = rng.integers(0, 256, (per_file * len(files), 3072), dtype=np.uint8)
        labels = rng.integers(0, classes, per_file * len(files)).tolist()
        for i, f in enumerate(files):
            rows = slice(i * per_file, (i + 1) * per_file)
            entry = {"data": data[rows], key: labels[rows], "batch_label": f"fake {f}",
                     "filenames": [f"img{j}.png" for j in range(per_file)]}
            with open(base / f, "wb") as fh:
                pickle.dump(entry, fh, protocol=2)
        out[split] = (data, labels)
    return out


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
@pytest.mark.parametrize("inner", [False, True], ids=["root", "batches-folder"])
def test_cifar_pickled_batches_are_read_in_order_and_layout(tmp_path, name, inner):
    written = write_fake_cifar(tmp_path, name)
    root = next(tmp_path.iterdir()) if inner else tmp_path
    data = load_cifar(name, root, "cpu")
    for split, x, y in (("train", data.train_x, data.train_y), ("test", data.test_x, data.test_y)):
        raw, labels = written[split]
        assert x.shape == (len(raw), 3, 32, 32) and x.dtype == torch.uint8
        # Rows are 1024 red, 1024 green, 1024 blue values, each row-major 32x32.
        assert x[3, 1, 5, 7] == raw[3, 1024 + 5 * 32 + 7]
        assert torch.equal(x.reshape(len(raw), -1), torch.from_numpy(raw))
        assert y.tolist() == labels
    assert data.shape == ImageShape(3, 32, 10 if name == "cifar10" else 100)


def test_missing_cifar_files_name_what_is_missing(tmp_path):
    write_fake_cifar(tmp_path, "cifar10")
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DataError, match="data_batch_3.*never downloads"):
        load_cifar("cifar10", tmp_path, "cpu")
    with pytest.raises(DataError, match="cifar-100-python"):
        load_cifar("cifar100", tmp_path, "cpu")


@pytest.mark.parametrize("data_dir, message", [(None, "needs --data-dir"),
                                               ("/nonexistent/cifar", "does not exist")])
def test_data_dir_errors(data_dir, message):
    with pytest.raises(DataError, match=message):
        load_data("cifar10", data_dir=data_dir, device="cpu", seed=0, shape=ImageShape(3, 32, 10))


def test_cifar_batches_are_augmented_deterministically_and_cover_the_epoch(tmp_path):
    write_fake_cifar(tmp_path, "cifar10", per_file=8)  # 40 training images
    data = load_cifar("cifar10", tmp_path, "cpu")
    first = list(data.train_batches(epoch=1, start_step=0, batch=4, seed=3, shard=Shard(0, 2)))
    again = list(data.train_batches(epoch=1, start_step=2, batch=4, seed=3, shard=Shard(0, 2)))
    other_rank = list(data.train_batches(epoch=1, start_step=0, batch=4, seed=3, shard=Shard(1, 2)))
    assert len(first) == 5 and len(again) == 3
    for (x1, y1), (x2, y2) in zip(first[2:], again):  # a resumed epoch sees the same batches
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    labels = torch.cat([y for _, y in first] + [y for _, y in other_rank])
    assert sorted(labels.tolist()) == sorted(data.train_y.tolist())  # ranks split the epoch
    assert first[0][0].shape == (4, 3, 32, 32) and first[0][0].dtype == torch.float32


def test_random_crop_flip_moves_pixels_as_a_crop_and_a_mirror():
    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.float32).reshape(2, 1, 6, 6) + 1
    gen = torch.Generator().manual_seed(0)
    out = random_crop_flip(x, gen, pad=2)
    gen = torch.Generator().manual_seed(0)
    offsets = torch.randint(0, 5, (2, 2), generator=gen)
    flips = torch.rand(2, generator=gen) < 0.5
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(2):
        oy, ox = offsets[0, i], offsets[1, i]
        crop = padded[i, :, oy:oy + 6, ox:ox + 6]
        assert torch.equal(out[i], crop.flip(-1) if flips[i] else crop)


def write_image_folder(root, classes=("cat", "dog", "emu"), per_class=(3, 2)):
    from PIL import Image

    for split, count in zip(("train", "val"), per_class):
        for c, name in enumerate(classes):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                colour = (40 * c + i, 255 - 40 * c, 7 * i)
                Image.new("RGB", (20 + i, 17), colour).save(root / split / name / f"{i}.png")


def test_image_folder_tree_is_read_with_classes_and_crops(tmp_path):
    pytest.importorskip("torchvision")
    write_image_folder(tmp_path)
    data = ImageFolderData(tmp_path, "cpu", size=16, workers=0)
    assert data.shape == ImageShape(3, 16, 3) and data.num_train == 9
    batches = list(data.train_batches(epoch=0, start_step=0, batch=4, seed=0))
    assert len(batches) == 2 and batches[0][0].shape == (4, 3, 16, 16)
    resumed = list(data.train_batches(epoch=0, start_step=1, batch=4, seed=0))
    assert torch.equal(resumed[0][0], batches[1][0]) and torch.equal(resumed[0][1], batches[1][1])
    xs, ys = zip(*data.test_batches(batch=4))
    x, y = torch.cat(xs), torch.cat(ys)
    assert y.tolist() == [0, 0, 1, 1, 2, 2]
    # Uniform images: the centre crop, normalised, gives back each class's colour.
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    red = (x[:, 0, 8, 8] * std[0] + mean[0]) * 255
    assert torch.allclose(red, torch.tensor([0.0, 1, 40, 41, 80, 81]), atol=0.6)


def test_image_folder_without_val_is_a_clear_error(tmp_path):
    pytest.importorskip("torchvision")
    write_image_folder(tmp_path)
    import shutil

    shutil.rmtree(tmp_path / "val")
    with pytest.raises(DataError, match="val is not a directory"):
        ImageFolderData(tmp_path, "cpu", size=16, workers=0)
