"""Test data for the task stage: the shared ICM files and small synthetic sets."""

import json
import os

import pytest


def shared_icm_dir() -> str:
  """$ICM_SHARED_DATA/icm, else <repo>/../shared/data/icm, else /work/..."""
  here = os.path.dirname(os.path.abspath(__file__))
  for root in (os.environ.get("ICM_SHARED_DATA"),
               os.path.join(here, "..", "..", "shared", "data"),
               "/work/shared/data"):
    if root and os.path.isdir(os.path.join(root, "icm")):
      return os.path.join(root, "icm")
  return ""


def shared_file(name: str) -> str:
  """Path of an ICM data file, or skip the test when it is not available."""
  path = os.path.join(shared_icm_dir(), name)
  if not shared_icm_dir() or not os.path.exists(path):
    pytest.skip(f"{name} not available (set ICM_SHARED_DATA)")
  return path


def read_json(path):
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def write_json(folder, name, records):
  path = os.path.join(str(folder), name)
  with open(path, "w", encoding="utf-8") as f:
    json.dump(records, f)
  return path


def synthetic_gsm8k(n_groups=6):
  """4 solutions per question, answers partly shared, mixed label types."""
  records = []
  for g in range(n_groups):
    for s in range(4):
      answer = str(10 * g + s % 3)
      record = {
          "question": f"What is {g} + {s}?",
          "answer": answer,
          "cot": f"Adding step {s}.\nThe answer is {answer}.",
          "label": [True, False, 1, False][s],
          "difficulty": 0.25 * s,
          "consistency_id": 100 + g,
          "category": "easy" if g % 2 else "hard",
      }
      if s != 2:  # like the real file, some rows lack the reference fields
        record["ref_cot"] = f"Reference {g}."
        record["ref_answer"] = str(10 * g)
      records.append(record)
  return records


def synthetic_alpaca(n_pairs=6):
  """Each comparison twice, responses swapped; only one row has extras."""
  records = []
  for p in range(n_pairs):
    first, second = f"Answer {p}a\nwith a newline.", f"Answer {p}b."
    better = p % 2 == 0
    records.append({"question": f"Request {p}", "choice": first,
                    "choice_2": second, "label": better,
                    "candidate_label": [better, True, False, better],
                    "confidence": 0.75, "consistency_id": p,
                    "hh_type": "helpfulness"})
    records.append({"question": f"Request {p}", "choice": second,
                    "choice_2": first, "label": int(not better),
                    "consistency_id": p, "hh_type": "helpfulness"})
  return records


def normalized(record):
  """What a record looks like after TFDS storage: 0/1 label, str group."""
  return dict(record, label=int(bool(record["label"])),
              consistency_id=str(record["consistency_id"]))
