"""Models named by Hugging Face Hub id (`meta-llama/Llama-3.1-8B`).

`resolve_hub_model` turns an id into the folder of its snapshot in the
standard HF cache (HF_HOME / HF_HUB_CACHE, as transformers uses), through
`huggingface_hub.snapshot_download`. Only what `load_model` reads is
fetched: config, tokenizer files and safetensors (never *.bin / *.pth: they
are pickles, which can run code when loaded). HF_HUB_OFFLINE=1 reads the
cache only. Every failure is a `HubError`, one line naming the id and what to
do.

Multi-host runs: every process resolves the id itself, into its own
HF_HUB_CACHE. Hosts whose caches are one shared folder (NFS, Filestore) are
serialised by a file lock per repo in that cache, so one downloads and the
others then find the snapshot complete; huggingface_hub itself writes each
file as `*.incomplete` and renames it into place, so nobody reads a
half-written file. (A bucket mounted with gcsfuse has no file locks: give
each host its own cache there, or use a gs:// model folder.)
"""

from __future__ import annotations

import os
import re
from typing import Optional

from icm_jax.checkpoints.common import CheckpointError

# What load_model reads from a checkpoint folder; nothing else is fetched.
# The metadata come first, so a run checks its config, tokenizer and prompts
# before the weights download.
METADATA_FILES = ("config.json", "generation_config.json", "tokenizer.json",
                  "tokenizer_config.json", "tokenizer.model",
                  "special_tokens_map.json", "added_tokens.json",
                  "vocab.json", "merges.txt", "chat_template.jinja",
                  "model.safetensors.index.json")
WEIGHT_FILES = ("*.safetensors",)
# owner/name as the Hub spells repo ids (no leading "." or "/", one "/").
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


class HubError(CheckpointError):
  """A Hub model id that cannot be resolved; the message names it."""


def is_hub_id(path: str) -> bool:
  """`owner/name` that is not a local path (a local folder always wins)."""
  path = os.fspath(path)
  return (bool(_HUB_ID.fullmatch(path)) and not os.path.exists(path)
          and not path.endswith((".gguf", ".json")))


def hub_cache_dir() -> str:
  from huggingface_hub import constants
  return constants.HF_HUB_CACHE


def resolve_hub_model(repo_id: str, revision: Optional[str] = None,
                      weights: bool = True) -> str:
  """The local snapshot folder of `repo_id` at `revision` (branch, tag or
  commit; None = main), downloaded into the HF cache unless it is there;
  `weights=False` fetches the metadata files only (config, tokenizer)."""
  import filelock
  import huggingface_hub
  from huggingface_hub import constants, errors

  where = repo_id + (f" (revision {revision})" if revision else "")
  cache = hub_cache_dir()
  offline = constants.HF_HUB_OFFLINE
  lock_dir = os.path.join(cache, ".locks", "icm_jax")
  try:
    os.makedirs(lock_dir, exist_ok=True)
  except OSError as e:
    raise HubError(f"{where}: the HF cache {cache} is not writable ({e}); "
                   "set HF_HUB_CACHE to a writable folder") from None
  lock = filelock.FileLock(os.path.join(
      lock_dir, repo_id.replace("/", "--") + ".lock"))
  try:
    with lock:
      patterns = METADATA_FILES + (WEIGHT_FILES if weights else ())
      folder = huggingface_hub.snapshot_download(
          repo_id, revision=revision, allow_patterns=list(patterns))
      # The repo's file list, as the download saw it (None: not known, e.g.
      # offline with an older cache): lets a metadata-only call already
      # refuse a repo without safetensors.
      try:
        listed = [f.path for f in huggingface_hub.get_cached_repo_tree(
            repo_id, revision=revision)]
      except Exception:  # no cached listing: judge by the files themselves
        listed = None
  except errors.GatedRepoError:
    raise HubError(
        f"{where}: a gated repo; accept its licence on "
        f"https://huggingface.co/{repo_id} and set HF_TOKEN (or run "
        "`hf auth login`)") from None
  except errors.RevisionNotFoundError:
    raise HubError(f"{where}: the repo has no revision {revision!r} "
                   "(model.revision: a branch, tag or commit)") from None
  except errors.RepositoryNotFoundError:
    raise HubError(
        f"{where}: no such repo on the Hub, or a private one and no token: "
        "check the id, or set HF_TOKEN; a local folder must exist") from None
  except errors.IncompleteSnapshotError:
    raise HubError(
        f"{where}: the cached snapshot in {cache} is incomplete and the Hub "
        "cannot be reached to finish it: rerun online (without "
        "HF_HUB_OFFLINE=1)") from None
  except errors.LocalEntryNotFoundError:
    if offline:
      raise HubError(
          f"{where}: not in the HF cache {cache} and HF_HUB_OFFLINE=1: "
          f"download it once online (`hf download {repo_id}`) or unset "
          "HF_HUB_OFFLINE") from None
    raise HubError(
        f"{where}: the Hub cannot be reached and the model is not in the HF "
        f"cache {cache}: check the network, or download it where there is "
        "one and point HF_HUB_CACHE at that cache") from None
  except errors.HfHubHTTPError as e:
    status = getattr(getattr(e, "response", None), "status_code", "?")
    raise HubError(f"{where}: the Hub answered HTTP {status}: "
                   f"{str(e).splitlines()[0]}") from None
  except OSError as e:
    raise HubError(f"{where}: cannot write the HF cache {cache}: {e}"
                   ) from None
  names = os.listdir(folder)
  if "config.json" not in names:
    raise HubError(f"{where}: the repo has no config.json; it is not a "
                   "transformers checkpoint")
  if not any(n.endswith(".safetensors") for n in
             (names if weights or listed is None else listed)):
    raise HubError(
        f"{where}: the repo has no *.safetensors weights (only *.bin / *.pth "
        "files are never loaded: they are pickles); convert them to "
        "safetensors or use a repo that has them")
  return folder
