"""TPU chips (HBM, peak FLOP/s, bandwidth) and slice topologies from libtpu.

`get_topology("v5e:4x4")` describes the 16 chips of a slice on any host (no
TPU needed); `topology_mesh` lays the run's mesh over those devices.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Tuple

from icm_jax import sharding
from icm_jax.aot.errors import AotError

GiB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Chip:
  """Per-chip HBM capacity, peak dense bf16 FLOP/s and HBM bandwidth."""

  name: str
  device_kind: str
  hbm_bytes: int
  peak_flops: float
  hbm_bandwidth: float


CHIPS: Tuple[Chip, ...] = (
    Chip("v5e", "TPU v5 lite", 16 * GiB, 197e12, 819e9),
    Chip("v5p", "TPU v5", 95 * GiB, 459e12, 2765e9),
    Chip("v6e", "TPU v6 lite", 32 * GiB, 918e12, 1640e9),
)
_CHIP_BY_KIND = {c.device_kind: c for c in CHIPS}
_TOPOLOGY_RE = re.compile(r"^([A-Za-z0-9_ ]+)[=_:]([0-9]+(x[0-9]+)*)"
                          r"(_twisted|_untwisted)?$")
TOPOLOGY_EXAMPLES = "v5e:2x2, v5e:4x4, v5p:2x2x2, v5p:2x4x4, v6e:4x4"


@dataclasses.dataclass(frozen=True)
class Topology:
  name: str
  devices: Tuple[Any, ...]
  chip: Chip

  @property
  def num_chips(self) -> int:
    return len(self.devices)


def get_topology(name: str, arg: str = "--topology") -> Topology:
  """The devices of a TPU slice such as "v5e:4x4" (libtpu, any host)."""
  if not isinstance(name, str) or not _TOPOLOGY_RE.match(name.strip()):
    raise AotError(f"{arg}={name!r}: expected CHIP:AxB or CHIP:AxBxC, e.g. "
                   f"{TOPOLOGY_EXAMPLES}")
  name = name.strip()
  # Compiling touches no chip, so several processes may load libtpu at once
  # (libtpu otherwise takes /tmp/libtpu_lockfile for the process lifetime).
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  import importlib.util
  if importlib.util.find_spec("libtpu") is None:  # the `tpu` extra's compiler
    raise AotError(f"{arg}={name!r}: compiling for TPU needs libtpu: "
                   "pip install -e '.[tpu]'")
  try:
    from jax.experimental import topologies
    topo = topologies.get_topology_desc(platform="tpu", topology_name=name)
  except Exception as e:  # JaxRuntimeError / RuntimeError from libtpu
    message = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
    if "lockfile" in message:
      raise AotError(f"{arg}={name!r}: another process holds libtpu "
                     f"({message}); set ALLOW_MULTIPLE_LIBTPU_LOAD=1 before "
                     "JAX loads libtpu") from None
    raise AotError(f"{arg}={name!r}: not a TPU topology libtpu knows "
                   f"({message}); examples: {TOPOLOGY_EXAMPLES}") from None
  devices = tuple(topo.devices)
  kind = devices[0].device_kind
  if kind not in _CHIP_BY_KIND:
    raise AotError(f"{arg}={name!r}: chip kind {kind!r} has no HBM/peak "
                   f"entry; supported: {[c.name for c in CHIPS]}")
  return Topology(name, devices, _CHIP_BY_KIND[kind])


def topology_mesh(topology: Topology, mesh_config: Any = None):
  """The ('data', 'fsdp', 'tensor') mesh over the topology's chips."""
  return sharding.create_mesh(sharding.MeshConfig.from_any(mesh_config),
                              devices=topology.devices)
