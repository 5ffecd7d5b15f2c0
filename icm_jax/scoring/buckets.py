"""Shape buckets: a growing labelled set compiles a bounded number of times.

A size is rounded up to the next of {2^k, 3·2^(k-1)} (at most two buckets per
power of two), then up to a multiple of `multiple` (e.g. the mesh's batch
divisor or the micro-batch size).
"""

from __future__ import annotations


def bucket(n: int, minimum: int = 1, multiple: int = 1) -> int:
  if n < 0 or minimum < 1 or multiple < 1:
    raise ValueError(f"bad bucket request n={n} minimum={minimum} "
                     f"multiple={multiple}")
  target = max(n, minimum)
  power = 1
  while power < target:
    if power >= 2 and power * 3 // 2 >= target:
      power = power * 3 // 2
      break
    power *= 2
  return -(-power // multiple) * multiple
