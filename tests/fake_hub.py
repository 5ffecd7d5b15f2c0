"""A local stand-in for the Hugging Face Hub's HTTP API (no network).

Serves repos from folders: `FakeHub.add(repo_id, folder, revision="main")`
publishes the folder's files as a new commit on that branch. Implements what
`huggingface_hub.snapshot_download` asks of the Hub: repo info at a revision,
the recursive tree listing, and HEAD/GET of /resolve/ URLs, with the Hub's
error codes for unknown repos and revisions and for gated repos. Point
HF_ENDPOINT at `hub.url` in the process that downloads, so the files land in
the HF cache through huggingface_hub's own code, in its own layout.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import threading
import time
import urllib.parse
from typing import Dict


class FakeHub:

  def __init__(self):
    self.repos: Dict[str, Dict[str, str]] = {}    # repo -> {revision: commit}
    self.commits: Dict[str, Dict[str, bytes]] = {}  # commit -> {path: data}
    self.gated = set()
    self.requests = []
    self.delay_s = 0.0  # before each weights file: makes downloads overlap
    hub = self

    class Handler(http.server.BaseHTTPRequestHandler):
      def log_message(self, *args):
        pass

      def do_HEAD(self):
        hub._serve(self, body=False)

      def do_GET(self):
        hub._serve(self, body=True)

    self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
    threading.Thread(target=self._server.serve_forever, daemon=True).start()

  def close(self):
    self._server.shutdown()
    self._server.server_close()

  def add(self, repo_id: str, folder: str, revision: str = "main") -> str:
    """Publishes every file of `folder` as `repo_id` at `revision`; returns
    the commit hash."""
    files = {}
    for name in sorted(os.listdir(folder)):
      with open(os.path.join(folder, name), "rb") as f:
        files[name] = f.read()
    commit = hashlib.sha1(repr((repo_id, revision, sorted(
        (k, hashlib.sha1(v).hexdigest()) for k, v in files.items()))
                               ).encode()).hexdigest()
    self.commits[commit] = files
    self.repos.setdefault(repo_id, {})[revision] = commit
    return commit

  def _error(self, handler, status, code, message):
    handler.send_response(status)
    handler.send_header("X-Error-Code", code)
    handler.send_header("X-Error-Message", message)
    handler.send_header("Content-Type", "application/json")
    payload = json.dumps({"error": message}).encode()
    handler.send_header("Content-Length", str(len(payload)))
    handler.end_headers()
    handler.wfile.write(payload)

  def _json(self, handler, obj, body):
    payload = json.dumps(obj).encode()
    handler.send_response(200)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(payload)))
    handler.end_headers()
    if body:
      handler.wfile.write(payload)

  def _commit(self, handler, repo, revision):
    if repo not in self.repos:
      self._error(handler, 404, "RepoNotFound", f"Repository {repo} not found")
      return None
    if repo in self.gated:
      self._error(handler, 403, "GatedRepo",
                  f"Access to model {repo} is restricted")
      return None
    revisions = self.repos[repo]
    commit = revisions.get(revision) or (
        revision if revision in self.commits else None)
    if commit is None:
      self._error(handler, 404, "RevisionNotFound",
                  f"Invalid rev id: {revision}")
    return commit

  def _serve(self, handler, body):
    path = urllib.parse.unquote(urllib.parse.urlparse(handler.path).path)
    self.requests.append((handler.command, path))
    parts = path.strip("/").split("/")
    if parts[:2] == ["api", "models"] and len(parts) >= 6:
      repo = "/".join(parts[2:4])
      commit = self._commit(handler, repo, parts[5])
      if commit is None:
        return
      files = self.commits[commit]
      if parts[4] == "revision":
        return self._json(handler, {
            "id": repo, "modelId": repo, "sha": commit, "private": False,
            "siblings": [{"rfilename": n} for n in files]}, body)
      if parts[4] == "tree":
        return self._json(handler, [
            {"type": "file", "path": n, "size": len(d),
             "oid": hashlib.sha1(d).hexdigest()} for n, d in files.items()],
            body)
    if len(parts) >= 5 and parts[2] == "resolve":
      repo = "/".join(parts[:2])
      commit = self._commit(handler, repo, parts[3])
      if commit is None:
        return
      name = "/".join(parts[4:])
      data = self.commits[commit].get(name)
      if data is None:
        return self._error(handler, 404, "EntryNotFound",
                           f"{name} does not exist")
      handler.send_response(200)
      handler.send_header("X-Repo-Commit", commit)
      handler.send_header("ETag", f'"{hashlib.sha1(data).hexdigest()}"')
      handler.send_header("Content-Length", str(len(data)))
      handler.end_headers()
      if body:
        if name.endswith(".safetensors"):
          time.sleep(self.delay_s)
        handler.wfile.write(data)
      return
    self._error(handler, 404, "NotFound", f"no route {path}")
