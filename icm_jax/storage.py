"""Where a run's files live: local paths and URLs (gs://...) through one layer.

Every file a run writes or reads back from its workdir goes through here, so
`--workdir=gs://bucket/run` works as a local folder does. Paths stay plain
strings in every interface; `etils.epath` (orbax's own path library; gs://
needs gcsfs) does the I/O.

Object stores have no rename and no append: a write there is one whole
object, which readers see whole or not at all, so `write_text` is atomic on
both kinds of storage; appending logs (`LineLog`) rewrite their object.
"""

from __future__ import annotations

import glob as pyglob
import io
import os
import posixpath
import tempfile
import threading
import time
from typing import List, Optional

from etils import epath

# How long the workdir probe may take before the run is refused: a gs://
# workdir without credentials or network otherwise retries for minutes.
PROBE_TIMEOUT_S = 10.0
_PROBE_FILE = ".icm_jax_write_probe"


class StorageError(ValueError):
  """A path that cannot be used; the message names it."""


def is_url(path: str) -> bool:
  """gs://..., s3://... (anything with a scheme) rather than a local path."""
  return "://" in str(path)


def join(base: str, *parts: str) -> str:
  if is_url(base):
    return posixpath.join(str(base), *parts)
  return os.path.join(base, *parts)


def dirname(path: str) -> str:
  return posixpath.dirname(path) if is_url(path) else os.path.dirname(
      os.path.abspath(path))


def basename(path: str) -> str:
  return posixpath.basename(str(path).rstrip("/"))


def relpath(path: str, start: str) -> str:
  if is_url(path):
    return posixpath.relpath(path.split("://", 1)[1],
                             start.split("://", 1)[1])
  return os.path.relpath(path, start)


def as_epath(path: str) -> epath.Path:
  """The epath of `path` (absolute when local): orbax takes these."""
  return epath.Path(path if is_url(path) else os.path.abspath(path))


def exists(path: str) -> bool:
  return as_epath(path).exists()


def makedirs(path: str) -> None:
  as_epath(path).mkdir(parents=True, exist_ok=True)


def read_text(path: str) -> str:
  return as_epath(path).read_text()


def read_bytes(path: str) -> bytes:
  return as_epath(path).read_bytes()


def write_text(path: str, text: str) -> None:
  write_bytes(path, text.encode("utf-8"))


def write_bytes(path: str, data: bytes) -> None:
  """Writes `path` atomically (a kill leaves the old or the new content)."""
  if is_url(path):
    as_epath(path).write_bytes(data)  # one object: whole or absent
    return
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp_")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def find(base: str, name: str) -> List[str]:
  """Every file called `name` at any depth under `base`, sorted."""
  if not is_url(base):
    return sorted(pyglob.glob(os.path.join(pyglob.escape(base), "**", name),
                              recursive=True))
  found, pending = [], [as_epath(base)]
  while pending:  # object stores: a listing per folder (epath has no "**")
    folder = pending.pop()
    if not folder.is_dir():
      continue
    for child in folder.iterdir():
      if child.is_dir():
        pending.append(child)
      elif child.name == name:
        found.append(str(child))
  return sorted(found)


def copy_tree(local_dir: str, destination: str) -> None:
  """Copies the files of a local folder (one level deep) to `destination`."""
  makedirs(destination)
  for name in sorted(os.listdir(local_dir)):
    source = os.path.join(local_dir, name)
    if os.path.isfile(source):
      with open(source, "rb") as f:
        as_epath(join(destination, name)).write_bytes(f.read())


def check_writable(workdir: str, timeout_s: float = PROBE_TIMEOUT_S) -> None:
  """Creates `workdir` and writes/deletes a probe file in it, or raises
  StorageError naming it; called before any model or data is loaded."""
  outcome: dict = {}

  def probe():
    try:
      makedirs(workdir)
      path = join(workdir, _PROBE_FILE)
      as_epath(path).write_text("ok")
      as_epath(path).unlink()
      outcome["ok"] = True
    except BaseException as e:  # reported below, in the caller's thread
      outcome["error"] = e

  if is_url(workdir) and workdir.startswith("gs://"):
    try:
      import gcsfs  # noqa: F401  (epath's gs:// backend)
    except ImportError:
      raise StorageError(f"workdir {workdir}: gs:// needs the gcsfs package "
                         "(pip install gcsfs)") from None
  if not is_url(workdir):
    probe()
  else:
    # Daemon thread: a stalled object store must not hold the run hostage.
    thread = threading.Thread(target=probe, daemon=True)
    start = time.monotonic()
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
      raise StorageError(
          f"workdir {workdir}: could not write a file there within "
          f"{time.monotonic() - start:.0f} s (no network or no credentials?)")
  if "error" in outcome:
    e = outcome["error"]
    reason = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise StorageError(f"workdir {workdir} is not writable: {reason}")


class LineLog:
  """A text file grown one line at a time, on local disk or an object store.

  Local: appended and flushed line by line. URL: object stores cannot append,
  so the lines are kept and the whole object is rewritten at most every
  `upload_every_s` seconds, on `flush()` and on `close()`.
  """

  def __init__(self, path: str, initial_lines: Optional[List[str]] = None,
               upload_every_s: float = 30.0):
    self.path = path
    self._lines = list(initial_lines or [])
    self._upload_every_s = upload_every_s
    write_text(path, "".join(self._lines))
    self._last_upload = time.monotonic()
    self._file: Optional[io.TextIOBase] = (
        None if is_url(path) else open(path, "a", encoding="utf-8"))

  def write(self, line: str) -> None:
    if self._file is not None:
      self._file.write(line)
      self._file.flush()
      return
    self._lines.append(line)
    if time.monotonic() - self._last_upload >= self._upload_every_s:
      self.flush()

  def flush(self) -> None:
    if self._file is not None:
      self._file.flush()
    else:
      write_text(self.path, "".join(self._lines))
      self._last_upload = time.monotonic()

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
    else:
      self.flush()
