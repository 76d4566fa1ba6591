"""Datasets as uint8 arrays, splits, and resumable batch orders.

Every loader returns `{"train": (images, labels), "validation": ...,
"test": ...}` with uint8 images `[N, H, W, C]` and int32 labels `[N]`.
Validation is carved from the END of the original training set, in the
original file order (docs/SOURCES.md, Data): CIFAR 45k/5k, Tiny ImageNet
90k/10k, Fashion-MNIST 55k/5k.
"""

from __future__ import annotations

import functools
import gzip
import os
import pickle
import struct
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np

from divdistill_jax import fileio

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
Split = tuple[np.ndarray, np.ndarray]


class DatasetInfo(NamedTuple):
  num_classes: int
  image_shape: tuple[int, int, int]
  num_validation: int
  # Per-channel pixel mean / std of the training split, in [0, 1] units.
  mean: tuple[float, ...]
  std: tuple[float, ...]


# The official configs' values (45k / 90k training images). Fashion-MNIST:
# computed here on the first 55k training images.
DATASETS = {
    "fashion_mnist": DatasetInfo(10, (28, 28, 1), 5000, (0.2860,), (0.3530,)),
    "cifar10": DatasetInfo(
        10, (32, 32, 3), 5000, (0.4915, 0.4821, 0.4464),
        (0.2472, 0.2437, 0.2617)),
    "cifar100": DatasetInfo(
        100, (32, 32, 3), 5000, (0.5072, 0.4866, 0.4410),
        (0.2673, 0.2564, 0.2760)),
    "tinyimagenet": DatasetInfo(
        200, (64, 64, 3), 10000, (0.4802, 0.4481, 0.3976),
        (0.2770, 0.2691, 0.2822)),
}


class DatasetNotFoundError(FileNotFoundError):
  """Raised when no source of a dataset can be found locally."""


def dataset_info(name: str) -> DatasetInfo:
  if name not in DATASETS:
    raise ValueError(
        f"Unknown dataset {name!r}; expected one of {sorted(DATASETS)}."
    )
  return DATASETS[name]


def load_dataset(name: str, *, data_dir: str | None = None) -> dict[str, Split]:
  """Loads a dataset's train / validation / test splits into host memory.

  Args:
    name: 'fashion_mnist', 'cifar10', 'cifar100' or 'tinyimagenet'.
    data_dir: a folder with the original files (IDX `.gz`, the CIFAR
      python-pickle folder or its parent, `tiny-imagenet-200` or its
      parent) or a TFDS data directory (CIFAR). None = the default place.

  Returns:
    Dict split -> (uint8 images [N, H, W, C], int32 labels [N]).

  Raises:
    DatasetNotFoundError: saying where it looked and how to get the data.
  """
  info = dataset_info(name)
  if name == "fashion_mnist":
    train, test = _load_fashion_mnist(data_dir)
  elif name in ("cifar10", "cifar100"):
    train, test = _load_cifar(name, data_dir)
  else:
    train, test = _load_tinyimagenet(data_dir)
  splits = _split_validation(train, test, info.num_validation)
  for split, (images, labels) in splits.items():
    check_split(name, split, images, labels)
  return splits


def check_split(name: str, split: str, images, labels) -> None:
  """Raises ValueError if a split does not match the dataset's format."""
  info = dataset_info(name)
  where = f"{name} {split} split"
  if images.dtype != np.uint8:
    raise ValueError(f"{where}: images must be uint8, got {images.dtype}.")
  if images.shape[1:] != info.image_shape:
    raise ValueError(
        f"{where}: images have shape {images.shape[1:]}, expected "
        f"{info.image_shape} per image."
    )
  if len(images) != len(labels) or len(images) == 0:
    raise ValueError(
        f"{where}: {len(images)} images but {len(labels)} labels."
    )
  if labels.min() < 0 or labels.max() >= info.num_classes:
    raise ValueError(
        f"{where}: labels span [{labels.min()}, {labels.max()}], expected "
        f"[0, {info.num_classes - 1}]."
    )


def _split_validation(train: Split, test: Split, num_val: int) -> dict:
  images, labels = train
  n = len(images) - num_val
  if n <= 0:
    raise ValueError(
        f"The training set has only {len(images)} images, fewer than the "
        f"{num_val} held out for validation: the dataset files look "
        "truncated.")
  return {
      "train": (images[:n], labels[:n]),
      "validation": (images[n:], labels[n:]),
      "test": test,
  }


def subset(splits: dict[str, Split], sizes: dict[str, int]) -> dict:
  """Keeps the first `sizes[split]` examples of each split (-1 = all)."""
  out = {}
  for split, (images, labels) in splits.items():
    size = sizes.get(split, -1)
    out[split] = (images, labels) if size < 0 else (images[:size],
                                                   labels[:size])
  return out


# ---------------------------------------------------------------- Fashion-MNIST


def _read_idx(path: str) -> np.ndarray:
  # A pipeline loads the splits once per stage: decompress once per file
  # version. The array is read-only (np.frombuffer), so sharing it is safe.
  stat = os.stat(path)
  return _read_idx_cached(os.path.abspath(path), stat.st_mtime_ns,
                          stat.st_size)


@functools.lru_cache(maxsize=8)
def _read_idx_cached(path: str, mtime_ns: int, size: int) -> np.ndarray:
  del mtime_ns, size  # Cache key only: a rewritten file is read again.
  with gzip.open(path, "rb") as f:
    data = f.read()
  _, dtype, ndim = struct.unpack(">HBB", data[:4])
  if dtype != 0x08:
    raise ValueError(f"{path}: IDX type {dtype:#x} is not unsigned byte.")
  shape = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
  array = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
  if array.size != int(np.prod(shape)):
    raise ValueError(
        f"{path} is truncated: header says {shape}, found {array.size} bytes."
    )
  return array.reshape(shape)


def _load_fashion_mnist(data_dir: str | None):
  folder = data_dir or FASHION_MNIST_DIR
  names = {
      "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
      "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
  }
  missing = [n for pair in names.values() for n in pair
             if not os.path.exists(os.path.join(folder, n))]
  if missing:
    raise DatasetNotFoundError(
        f"Fashion-MNIST not found: {missing} missing in {folder!r}. Install "
        "the Debian package (`apt-get install dataset-fashion-mnist`, files in "
        f"{FASHION_MNIST_DIR}) or pass --config.data.data_dir=DIR holding the "
        "original IDX .gz files."
    )
  out = []
  for images_name, labels_name in names.values():
    images = _read_idx(os.path.join(folder, images_name))[..., None]
    labels = _read_idx(os.path.join(folder, labels_name)).astype(np.int32)
    out.append((images, labels))
  return out


# ---------------------------------------------------------------------- CIFAR

_CIFAR_PICKLE = {
    "cifar10": ("cifar-10-batches-py",
                [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"],
                b"labels"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], b"fine_labels"),
}


def _find_cifar_pickle_dir(name: str, data_dir: str | None) -> str | None:
  folder_name, train_files, _, _ = _CIFAR_PICKLE[name]
  if data_dir is None:
    return None
  for candidate in (data_dir, os.path.join(data_dir, folder_name)):
    if os.path.exists(os.path.join(candidate, train_files[0])):
      return candidate
  return None


def _read_cifar_pickle(folder: str, files: list[str], label_key: bytes):
  images, labels = [], []
  for file in files:
    with open(os.path.join(folder, file), "rb") as f:
      # The official CIFAR distribution is a pickle of plain dicts of bytes
      # and lists; the unpickler below refuses every class, so no code runs.
      batch = _SafeUnpickler(f, encoding="bytes").load()
    data = np.asarray(batch[b"data"], np.uint8)
    images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    labels.append(np.asarray(batch[label_key], np.int32))
  return np.concatenate(images), np.concatenate(labels)


class _SafeUnpickler(pickle.Unpickler):
  """Unpickler that only allows builtin containers and numpy arrays."""

  _ALLOWED = {
      ("numpy.core.multiarray", "_reconstruct"),
      ("numpy._core.multiarray", "_reconstruct"),
      ("numpy", "ndarray"),
      ("numpy", "dtype"),
  }

  def find_class(self, module, name):
    if (module, name) in self._ALLOWED:
      return super().find_class(module, name)
    raise pickle.UnpicklingError(
        f"Refusing to load {module}.{name} from a CIFAR pickle file."
    )


def _load_cifar(name: str, data_dir: str | None):
  folder = _find_cifar_pickle_dir(name, data_dir)
  if folder is not None:
    _, train_files, test_files, label_key = _CIFAR_PICKLE[name]
    return (_read_cifar_pickle(folder, train_files, label_key),
            _read_cifar_pickle(folder, test_files, label_key))
  return _load_cifar_tfds(name, data_dir)


def _load_cifar_tfds(name: str, data_dir: str | None):
  """Loads CIFAR from a local TFDS data directory, never downloading.

  Uses `tfds.data_source` (array_record files, no TensorFlow needed) and
  falls back to `tfds.load` (needs TensorFlow) for tfrecord-only data.
  """
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise DatasetNotFoundError(
        f"{name}: no python-pickle folder in data_dir={data_dir!r}, and "
        "tensorflow-datasets is not installed (pip install "
        "'divdistill_jax[tfds]') to read a TFDS data directory."
    ) from e
  try:
    return tuple(_tfds_split(tfds, name, split, data_dir)
                 for split in ("train", "test"))
  except DatasetNotFoundError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise DatasetNotFoundError(
        f"{name} not found: looked for the python-pickle folder "
        f"({_CIFAR_PICKLE[name][0]}) and a prepared TFDS dataset in "
        f"data_dir={data_dir!r} (the default TFDS dir if None): {e}. Point "
        "--config.data.data_dir at either; nothing is downloaded."
    ) from e


def _records_to_arrays(records):
  images = np.stack([np.asarray(r["image"], np.uint8) for r in records])
  labels = np.array([r["label"] for r in records], np.int32)
  return images, labels, [r["id"] for r in records]


def _tfds_split(tfds, name: str, split: str, data_dir):
  """One TFDS split as arrays, in the original (pickle) order."""
  try:
    source = tfds.data_source(name, split=split, data_dir=data_dir,
                              download=False)
    images, labels, ids = _records_to_arrays(
        [source[i] for i in range(len(source))])
  except Exception as source_error:  # pylint: disable=broad-except
    try:
      import tensorflow  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    except ImportError:
      raise source_error from None
    data = tfds.as_numpy(tfds.load(name, split=split, data_dir=data_dir,
                                   download=False, batch_size=-1))
    images = np.asarray(data["image"], np.uint8)
    labels = np.asarray(data["label"], np.int32)
    ids = list(data["id"])
  order = np.argsort([_tfds_index(i) for i in ids], kind="stable")
  return images[order], labels[order]


def _tfds_index(record_id) -> int:
  """TFDS CIFAR ids are 'train_01234': the index in the original files."""
  if isinstance(record_id, bytes):
    record_id = record_id.decode()
  return int(str(record_id).rsplit("_", 1)[-1])


# -------------------------------------------------------------- Tiny ImageNet


def _find_tiny_dir(data_dir: str | None) -> str | None:
  if data_dir is None:
    return None
  for candidate in (data_dir, os.path.join(data_dir, "tiny-imagenet-200")):
    if os.path.exists(os.path.join(candidate, "wnids.txt")):
      return candidate
  return None


def _load_tinyimagenet(data_dir: str | None):
  """Reads `tiny-imagenet-200`: JPEG folders, cached once as an .npz.

  The training images are listed class by class (wnids.txt order, file names
  sorted) and then put in a FIXED permuted order (seed 0), so that the last
  10k form a validation set covering all 200 classes. The official val set is
  the test split.
  """
  folder = _find_tiny_dir(data_dir)
  if folder is None:
    raise DatasetNotFoundError(
        f"tinyimagenet not found: no tiny-imagenet-200/wnids.txt in "
        f"data_dir={data_dir!r}. Unzip tiny-imagenet-200.zip and pass "
        "--config.data.data_dir=PATH/tiny-imagenet-200."
    )
  cache = os.path.join(folder, "divdistill_arrays.npz")
  if os.path.exists(cache):
    with np.load(cache) as f:
      return ((f["train_images"], f["train_labels"]),
              (f["test_images"], f["test_labels"]))
  with open(os.path.join(folder, "wnids.txt")) as f:
    wnids = [line.strip() for line in f if line.strip()]
  class_of = {w: i for i, w in enumerate(wnids)}
  paths, labels = [], []
  for wnid in wnids:
    image_dir = os.path.join(folder, "train", wnid, "images")
    for file in sorted(os.listdir(image_dir)):
      paths.append(os.path.join(image_dir, file))
      labels.append(class_of[wnid])
  order = np.random.default_rng(0).permutation(len(paths))
  train = (_read_images([paths[i] for i in order]),
           np.asarray(labels, np.int32)[order])
  test_paths, test_labels = [], []
  with open(os.path.join(folder, "val", "val_annotations.txt")) as f:
    for line in f:
      file, wnid = line.split("\t")[:2]
      test_paths.append(os.path.join(folder, "val", "images", file))
      test_labels.append(class_of[wnid])
  test = (_read_images(test_paths), np.asarray(test_labels, np.int32))
  try:
    fileio.write_npz(cache, train_images=train[0], train_labels=train[1],
                     test_images=test[0], test_labels=test[1])
  except OSError:
    pass  # Read-only dataset folder: decode again next time.
  return train, test


def _read_images(paths: list[str]) -> np.ndarray:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  out = []
  for path in paths:
    with Image.open(path) as image:
      out.append(np.asarray(image.convert("RGB"), np.uint8))
  return np.stack(out)


# ------------------------------------------------------------------- batching


@functools.lru_cache(maxsize=16)
def epoch_permutation(seed: int, epoch: int, n: int, stream: int = 0):
  """The shuffled order of epoch `epoch` (0-indexed); a pure function.

  Cached (read-only arrays): every step of an epoch slices the same
  permutation, and drawing it costs about a millisecond per stream at
  CIFAR size (experiments/benchmark.py --input_path).

  Args:
    seed: the run's seed.
    epoch: 0-indexed epoch.
    n: number of training examples.
    stream: an independent order per stream (e.g. per teacher member).

  Returns:
    int64 permutation [n].
  """
  perm = np.random.default_rng([seed, stream, epoch]).permutation(n)
  perm.flags.writeable = False
  return perm


def steps_per_epoch(n: int, batch_size: int, field: str = "batch size", *,
                    replicas: int = 1, drop_remainder: bool = True) -> int:
  """Steps per epoch.

  With `drop_remainder` the `n // batch_size` full batches (every step one
  shape). Without it, as PyTorch's DistributedSampler over `replicas` GPUs
  with `drop_last=False` (the official NeurIPS 2021 runs): each replica
  gets ceil(n / replicas) indices and takes batches of batch_size /
  replicas, the last one partial: ceil(ceil(n / R) / (batch_size / R))
  steps.

  Raises:
    ValueError: naming `field` when the batch exceeds the `n` examples or
      the replicas do not divide it.
  """
  if drop_remainder:
    steps = n // batch_size
    if steps == 0:
      raise ValueError(
          f"{field}={batch_size} exceeds the {n} training images.")
    return steps
  if replicas < 1 or batch_size % replicas:
    raise ValueError(f"{field}={batch_size} is not divisible by the "
                     f"{replicas} sampler replicas.")
  per_replica = -(-n // replicas)
  return -(-per_replica // (batch_size // replicas))


def last_batch_size(n: int, batch_size: int, *, replicas: int = 1,
                    drop_remainder: bool = True) -> int:
  """Images in an epoch's last step (`batch_size` unless it is partial)."""
  if drop_remainder:
    return batch_size
  per_replica = -(-n // replicas)
  local = batch_size // replicas
  steps = steps_per_epoch(n, batch_size, replicas=replicas,
                          drop_remainder=False)
  return replicas * (per_replica - (steps - 1) * local)


def batch_indices(seed: int, step: int, n: int, batch_size: int,
                  stream: int = 0, *, replicas: int = 1,
                  drop_remainder: bool = True) -> np.ndarray:
  """Indices of the global batch at `step` (0-indexed); resumable anywhere.

  With `drop_remainder` each epoch uses `n // batch_size` full batches of a
  fresh permutation. Without it the epoch's permutation is split as
  PyTorch's DistributedSampler does: padded with its own first indices to a
  multiple of `replicas`, replica r takes every R-th index from r, and the
  global batch is the replicas' batches in order (replica r's images are
  the r-th contiguous block: its BatchNorm group); the last one is partial.
  """
  steps = steps_per_epoch(n, batch_size, replicas=replicas,
                          drop_remainder=drop_remainder)
  epoch, i = divmod(step, steps)
  perm = epoch_permutation(seed, epoch, n, stream)
  if drop_remainder:
    return perm[i * batch_size:(i + 1) * batch_size]
  total = -(-n // replicas) * replicas
  padded = np.concatenate([perm, perm[:total - n]])
  local = batch_size // replicas
  return np.concatenate([padded[r::replicas][i * local:(i + 1) * local]
                         for r in range(replicas)])


def process_slice(indices: np.ndarray, process_index: int,
                  process_count: int) -> np.ndarray:
  """This process's contiguous share of a global batch's indices."""
  per_process = len(indices) // process_count
  return indices[process_index * per_process:(process_index + 1) * per_process]


class EvalBatch(NamedTuple):
  images: np.ndarray  # uint8 [B, H, W, C], zero-padded at the end.
  labels: np.ndarray  # int32 [B].
  mask: np.ndarray  # bool [B]: False on padding.


def eval_batches(images: np.ndarray, labels: np.ndarray,
                 batch_size: int) -> Iterator[EvalBatch]:
  """Fixed-size batches over a whole split; the last one padded and masked."""
  for start in range(0, len(images), batch_size):
    x, y = images[start:start + batch_size], labels[start:start + batch_size]
    pad = batch_size - len(x)
    mask = np.arange(batch_size) < len(x)
    if pad:
      x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
      y = np.concatenate([y, np.zeros((pad,), y.dtype)])
    yield EvalBatch(x, y, mask)
