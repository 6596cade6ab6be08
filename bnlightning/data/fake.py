"""A CIFAR-10-format folder with random images, written in the real on-disk format.

Used by the test suite and the benchmarks (random pixels cost the data path exactly what
real ones do), and for a manual run without the real data set.

``make_fake_cifar10(root)`` writes ``root/cifar-10-batches-py/{data_batch_1..5, test_batch,
batches.meta}``: pickles (protocol 2, as close as Python 3 gets to the Python 2 originals)
of dicts with ``data`` (uint8 numpy array (N, 3072), channel-major rows: 1024 red, 1024
green, 1024 blue values, as the real files) and ``labels`` (a list of ints), plus
``batch_label`` and ``filenames``. torchvision's own reader loads them. They are not the
official files, so their md5 sums differ: load them with ``verify_checksums=False``
(YAML: ``data.init_args.verify_checksums: false``).

Run as a module to make a folder for a manual run::

    python -m bnlightning.data.fake data/fake_cifar10 --n-train 1000 --n-test 200
"""

from __future__ import annotations

import argparse
import os
import pickle
from pathlib import Path

import numpy as np

LABEL_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def make_fake_cifar10(
    root: str | os.PathLike,
    n_train: int = 100,
    n_test: int = 40,
    seed: int = 0,
    bytes_keys: bool = False,
) -> Path:
    """Write a fake CIFAR-10 folder under ``root`` and return ``root/cifar-10-batches-py``.

    ``n_train`` images are split over the five training batches (as evenly as possible);
    labels cycle through the 10 classes so every class is present. ``bytes_keys`` writes
    ``b"data"``/``b"labels"`` keys (how Python 3 sees the originals with ``encoding="bytes"``)
    instead of str keys.
    """
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)

    def key(k: str) -> str | bytes:
        return k.encode() if bytes_keys else k

    def write(name: str, n: int, offset: int) -> None:
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = [int((offset + i) % 10) for i in range(n)]
        entry = {
            key("batch_label"): f"{name} (bnlightning fake CIFAR-10)",
            key("labels"): labels,
            key("data"): data,
            key("filenames"): [f"fake_{offset + i:05d}.png" for i in range(n)],
        }
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f, protocol=2)

    sizes = [n_train // 5 + (1 if i < n_train % 5 else 0) for i in range(5)]
    offset = 0
    for i, n in enumerate(sizes, start=1):
        write(f"data_batch_{i}", n, offset)
        offset += n
    write("test_batch", n_test, 0)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump(
            {key("num_cases_per_batch"): max(sizes), key("label_names"): LABEL_NAMES, key("num_vis"): 3072},
            f,
            protocol=2,
        )
    return folder


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root")
    p.add_argument("--n-train", type=int, default=1000)
    p.add_argument("--n-test", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    print(make_fake_cifar10(a.root, a.n_train, a.n_test, a.seed))
