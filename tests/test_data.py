"""Dataset loaders on real files and small fixtures in the real formats."""

import gzip
import os
import pickle
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_config

from divdistill_jax import augment, data, parallel


def test_fashion_mnist_real_files():
  if not os.path.isdir(data.FASHION_MNIST_DIR):
    pytest.skip("dataset-fashion-mnist is not installed")
  splits = data.load_dataset("fashion_mnist")
  assert splits["train"][0].shape == (55000, 28, 28, 1)
  assert splits["validation"][0].shape == (5000, 28, 28, 1)
  assert splits["test"][0].shape == (10000, 28, 28, 1)
  assert splits["train"][0].dtype == np.uint8
  assert sorted(np.unique(splits["test"][1])) == list(range(10))
  # The training mean used for normalisation (DATASETS) matches the data.
  mean = splits["train"][0].mean() / 255
  assert abs(mean - data.DATASETS["fashion_mnist"].mean[0]) < 1e-3


def _write_idx(path, array):
  header = struct.pack(">HBB", 0, 0x08, array.ndim)
  header += struct.pack(">" + "I" * array.ndim, *array.shape)
  with gzip.open(path, "wb") as f:
    f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_idx_fixture_and_truncation(tmp_path):
  rng = np.random.default_rng(0)
  train = rng.integers(0, 256, (5010, 28, 28), dtype=np.uint8)
  train_labels = rng.integers(0, 10, 5010)
  _write_idx(tmp_path / "train-images-idx3-ubyte.gz", train)
  _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", train_labels)
  _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", train[:7])
  _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", train_labels[:7])
  splits = data.load_dataset("fashion_mnist", data_dir=str(tmp_path))
  np.testing.assert_array_equal(splits["train"][0][..., 0], train[:10])
  np.testing.assert_array_equal(splits["validation"][1], train_labels[10:])
  # A truncated file names the problem.
  with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "rb") as f:
    raw = f.read()
  with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "wb") as f:
    f.write(raw[:-100])
  with pytest.raises(ValueError, match="truncated"):
    data.load_dataset("fashion_mnist", data_dir=str(tmp_path))


def test_missing_dataset_says_where_it_looked(tmp_path):
  with pytest.raises(data.DatasetNotFoundError, match=str(tmp_path)):
    data.load_dataset("fashion_mnist", data_dir=str(tmp_path))
  with pytest.raises(data.DatasetNotFoundError, match="tiny-imagenet-200"):
    data.load_dataset("tinyimagenet", data_dir=str(tmp_path))


def _cifar_fixture(root, name, n_train_per_file, n_test, classes):
  rng = np.random.default_rng(1)
  folder_name, train_files, test_files, label_key = data._CIFAR_PICKLE[name]
  folder = root / folder_name
  folder.mkdir()
  written = {}
  for file, n in ([(f, n_train_per_file) for f in train_files]
                  + [(f, n_test) for f in test_files]):
    images = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
    labels = rng.integers(0, classes, n).tolist()
    with open(folder / file, "wb") as f:
      pickle.dump({b"data": images.reshape(n, -1), label_key: labels,
                   b"filenames": [b"x"] * n}, f)
    written[file] = (images.transpose(0, 2, 3, 1), np.array(labels))
  return written


@pytest.mark.parametrize("name,classes", [("cifar10", 10), ("cifar100", 100)])
def test_cifar_pickle_order_and_validation_split(tmp_path, name, classes,
                                                 monkeypatch):
  per_file = 1100 if name == "cifar10" else 5500
  written = _cifar_fixture(tmp_path, name, per_file, 30, classes)
  info = data.DATASETS[name]
  monkeypatch.setitem(data.DATASETS, name, info._replace(num_validation=500))
  splits = data.load_dataset(name, data_dir=str(tmp_path))
  train_files = data._CIFAR_PICKLE[name][1]
  all_images = np.concatenate([written[f][0] for f in train_files])
  all_labels = np.concatenate([written[f][1] for f in train_files])
  # Validation = the LAST images in the original file order.
  np.testing.assert_array_equal(splits["validation"][0], all_images[-500:])
  np.testing.assert_array_equal(splits["train"][1], all_labels[:-500])
  assert splits["test"][0].shape == (30, 32, 32, 3)


def test_cifar_pickle_refuses_code(tmp_path):
  folder = tmp_path / "cifar-100-python"
  folder.mkdir()

  class Evil:
    def __reduce__(self):
      return (os.system, ("echo pwned",))

  with open(folder / "train", "wb") as f:
    pickle.dump({b"data": Evil()}, f)
  with pytest.raises(pickle.UnpicklingError, match="Refusing"):
    data.load_dataset("cifar100", data_dir=str(tmp_path))


def test_cifar_tfds_restores_original_order(monkeypatch):
  tfds = pytest.importorskip("tensorflow_datasets")
  rng = np.random.default_rng(2)
  n = {"train": 5200, "test": 40}
  originals = {s: (rng.integers(0, 256, (k, 32, 32, 3), dtype=np.uint8),
                   rng.integers(0, 10, k)) for s, k in n.items()}

  def as_data_source(self, split, *args, **kwargs):
    images, labels = originals[split]
    order = np.random.default_rng(3).permutation(len(images))  # TFDS shuffle
    return [{"id": f"{split}_{i:05d}", "image": images[i], "label": labels[i]}
            for i in order]

  info = data.DATASETS["cifar10"]
  monkeypatch.setitem(data.DATASETS, "cifar10",
                      info._replace(num_validation=200))
  with tfds.testing.mock_data(as_data_source_fn=as_data_source):
    splits = data.load_dataset("cifar10", data_dir=None)
  np.testing.assert_array_equal(splits["validation"][0],
                                originals["train"][0][-200:])
  np.testing.assert_array_equal(splits["train"][1],
                                originals["train"][1][:-200])
  np.testing.assert_array_equal(splits["test"][0], originals["test"][0])


def test_tinyimagenet_folder(tmp_path, monkeypatch):
  from PIL import Image
  root = tmp_path / "tiny-imagenet-200"
  wnids = ["n01", "n02", "n03"]
  (root / "val" / "images").mkdir(parents=True)
  (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
  rng = np.random.default_rng(4)
  for wnid in wnids:
    d = root / "train" / wnid / "images"
    d.mkdir(parents=True)
    for i in range(4):
      # Flat colours survive JPEG compression closely.
      Image.fromarray(np.full((64, 64, 3), 40 * i + 10, np.uint8)).save(
          d / f"{wnid}_{i}.JPEG")
  lines = []
  for i in range(5):
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), np.uint8)).save(
        root / "val" / "images" / f"val_{i}.JPEG")
    lines.append(f"val_{i}.JPEG\t{wnids[i % 3]}\t0\t0\t63\t63")
  (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
  info = data.DATASETS["tinyimagenet"]
  monkeypatch.setitem(data.DATASETS, "tinyimagenet",
                      info._replace(num_validation=3))
  splits = data.load_dataset("tinyimagenet", data_dir=str(tmp_path))
  assert splits["train"][0].shape == (9, 64, 64, 3)
  assert splits["validation"][0].shape == (3, 64, 64, 3)
  np.testing.assert_array_equal(splits["test"][1], [0, 1, 2, 0, 1])
  # The fixed order is the same on every load (cached or not).
  again = data.load_dataset("tinyimagenet", data_dir=str(root))
  np.testing.assert_array_equal(again["train"][1], splits["train"][1])
  assert os.path.exists(root / "divdistill_arrays.npz")


def test_wrong_image_shape_and_labels_are_rejected():
  images = np.zeros((4, 32, 32, 3), np.uint8)
  with pytest.raises(ValueError, match="expected \\(28, 28, 1\\)"):
    data.check_split("fashion_mnist", "train", images, np.zeros(4, int))
  with pytest.raises(ValueError, match="labels span"):
    data.check_split("cifar10", "train", images, np.array([0, 1, 2, 10]))


def test_batch_order_is_resumable_and_covers_each_epoch():
  n, b = 103, 10
  first_epoch = np.concatenate([data.batch_indices(7, s, n, b)
                                for s in range(10)])
  assert len(set(first_epoch.tolist())) == 100  # No repeats within an epoch.
  # Any step can be recomputed alone, in any order.
  np.testing.assert_array_equal(data.batch_indices(7, 13, n, b),
                                data.batch_indices(7, 13, n, b))
  assert not np.array_equal(data.batch_indices(7, 3, n, b),
                            data.batch_indices(7, 13, n, b))
  assert not np.array_equal(data.batch_indices(7, 3, n, b, stream=1),
                            data.batch_indices(7, 3, n, b, stream=0))
  parts = [data.process_slice(np.arange(8), p, 4) for p in range(4)]
  np.testing.assert_array_equal(np.concatenate(parts), np.arange(8))


def test_eval_batches_count_each_example_once():
  images = np.arange(23, dtype=np.uint8).reshape(23, 1, 1, 1)
  labels = np.arange(23)
  batches = list(data.eval_batches(images, labels, 10))
  assert [len(b.images) for b in batches] == [10, 10, 10]
  kept = np.concatenate([b.labels[b.mask] for b in batches])
  np.testing.assert_array_equal(kept, labels)


def test_augment_crop_is_a_window_of_the_padded_image():
  rng = np.random.default_rng(5)
  images = rng.integers(1, 256, (16, 8, 8, 3), dtype=np.uint8)
  out = np.asarray(augment.augment(jax.random.key(0), jnp.asarray(images),
                                   padding=2, flip=True)) * 255
  assert out.shape == images.shape
  assert out.dtype == np.float32
  for x, y in zip(images, np.round(out).astype(np.uint8)):
    padded = np.pad(x, ((2, 2), (2, 2), (0, 0)))
    windows = [padded[i:i + 8, j:j + 8] for i in range(5) for j in range(5)]
    windows += [w[:, ::-1] for w in windows]
    assert any(np.array_equal(w, y) for w in windows)


def test_augment_flip_is_exact_and_keys_matter():
  rng = np.random.default_rng(6)
  images = jnp.asarray(rng.integers(0, 256, (64, 4, 4, 1), dtype=np.uint8))
  out = np.asarray(augment.augment(jax.random.key(1), images, padding=0,
                                   flip=True))
  x = np.asarray(images) / 255
  flipped = [np.allclose(o, xi[:, ::-1]) and not np.allclose(o, xi)
             for o, xi in zip(out, x)]
  same = [np.allclose(o, xi) for o, xi in zip(out, x)]
  assert all(f or s for f, s in zip(flipped, same))
  assert 10 < sum(flipped) < 54  # About half flipped.
  other = np.asarray(augment.augment(jax.random.key(2), images, padding=0,
                                     flip=True))
  assert not np.allclose(out, other)
  # Leading member axes are kept.
  stacked = augment.augment(jax.random.key(1), images.reshape(4, 16, 4, 4, 1))
  assert stacked.shape == (4, 16, 4, 4, 1)


def _official_epoch(perm, batch_size, replicas):
  """PyTorch's DistributedSampler (drop_last=False) + DataLoader
  (drop_last=False), transcribed: the index list padded with its own head
  to a multiple of the replicas, replica r takes indices r, r + R, ...,
  then batches of batch_size / R; global step i = replica batches i."""
  n = len(perm)
  num_samples = -(-n // replicas)
  total = num_samples * replicas
  indices = list(perm) + list(perm[:total - n])
  local = batch_size // replicas
  per_replica = [indices[r:total:replicas] for r in range(replicas)]
  batches = [[sub[i:i + local] for i in range(0, num_samples, local)]
             for sub in per_replica]
  return [sum((batches[r][i] for r in range(replicas)), [])
          for i in range(len(batches[0]))]


@pytest.mark.parametrize("n,batch,replicas", [
    (10, 4, 1), (11, 8, 4), (45, 16, 4), (13, 6, 2), (16, 8, 4)])
def test_partial_last_batch_follows_the_official_sampler(n, batch, replicas):
  perm = data.epoch_permutation(3, 0, n)
  want = _official_epoch(perm, batch, replicas)
  kw = dict(replicas=replicas, drop_remainder=False)
  assert data.steps_per_epoch(n, batch, **kw) == len(want)
  assert data.last_batch_size(n, batch, **kw) == len(want[-1])
  for i, indices in enumerate(want):
    np.testing.assert_array_equal(data.batch_indices(3, i, n, batch, **kw),
                                  indices)
  # The next epoch starts a fresh permutation at step len(want).
  np.testing.assert_array_equal(
      data.batch_indices(3, len(want), n, batch, **kw),
      _official_epoch(data.epoch_permutation(3, 1, n), batch, replicas)[0])


def test_paper_epochs_take_the_official_step_counts():
  """ceil(N / B) steps (and each GPU's last batch) of the official runs:
  CIFAR-100 on 4 GPUs, CIFAR-10 on one; 45,000 training images."""
  def shape(batch, replicas):
    kw = dict(replicas=replicas, drop_remainder=False)
    return (data.steps_per_epoch(45000, batch, **kw),
            data.last_batch_size(45000, batch, **kw))
  assert shape(256, 4) == (176, 4 * 50)   # C100 teacher: 11250 per GPU.
  assert shape(64, 4) == (704, 4 * 2)     # C100 student.
  assert shape(512, 1) == (88, 456)       # C10 teacher.
  assert shape(128, 1) == (352, 72)       # C10 student.
  for name, replicas in (("cifar100_wrn28x10", 4), ("cifar10_resnet32", 1)):
    config = load_config(name)
    assert not config.data.drop_remainder
    assert config.data.sampler_replicas == replicas
  # Dropping the remainder (the default elsewhere) keeps full batches.
  assert data.steps_per_epoch(45000, 64) == 703


def test_batches_gathered_on_the_devices_equal_the_host_gather():
  """Both input paths give the same global arrays and shardings, for the
  students' [B] and the teachers' [M, B] indices on a 2-device mesh."""
  mesh = parallel.make_mesh(2)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (40, 4, 4, 3), dtype=np.uint8)
  labels = rng.integers(0, 10, 40).astype(np.int32)
  for indices, axis in ((rng.permutation(40)[:8], 0),
                        (np.stack([rng.permutation(40)[:6]
                                   for _ in range(3)]), 1)):
    got = [parallel.BatchGatherer(images, labels, mesh, on_device=d,
                                  axis=axis)(indices) for d in (True, False)]
    for (a, b), want in zip(zip(*got), (images[indices], labels[indices])):
      np.testing.assert_array_equal(a, want)
      np.testing.assert_array_equal(b, want)
      assert a.sharding.is_equivalent_to(b.sharding, a.ndim)
      assert a.sharding.spec[axis] == "data"


def test_epoch_permutation_is_cached_and_read_only():
  a = data.epoch_permutation(3, 2, 50, 1)
  assert data.epoch_permutation(3, 2, 50, 1) is a
  assert not a.flags.writeable
  assert not np.array_equal(a, data.epoch_permutation(3, 2, 50, 0))
