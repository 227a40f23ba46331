"""k-NN over 1M training features: time and peak memory of the chunked search.

    python bench/knn_large.py [--train 1000000] [--test 1000] [--dim 384]

The train features alone take train x dim x 4 bytes; the search adds a bounded working set
(test_chunk x (train_chunk + k) similarities) instead of a full test x train matrix.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from dinollama.dinov2.eval import knn_predict


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", type=int, default=1_000_000)
    p.add_argument("--test", type=int, default=1000)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--classes", type=int, default=1000)
    args = p.parse_args()
    g = torch.Generator().manual_seed(0)
    train = torch.randn(args.train, args.dim, generator=g)
    labels = torch.randint(0, args.classes, (args.train,), generator=g)
    test = torch.randn(args.test, args.dim, generator=g)
    before = rss_mb()
    t = time.perf_counter()
    preds = knn_predict(train, labels, test)
    dt = time.perf_counter() - t
    print(f"k-NN {args.train:,} train x {args.test:,} test x {args.dim} dims, ks {sorted(preds)}: {dt:.1f} s "
          f"({args.test / dt:.0f} queries/s); features {train.numel() * 4 / 2**20:.0f} MB, "
          f"peak RSS {before:.0f} MB before search -> {rss_mb():.0f} MB after")


if __name__ == "__main__":
    main()
