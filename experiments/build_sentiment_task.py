r"""Builds the bundled word-sentiment comparison task from TextBlob's lexicon.

  pip install textblob==0.20.1
  python experiments/build_sentiment_task.py --out=icm_jax/tasks/data/sentiment

TextBlob ships Pattern's hand-tagged adjective lexicon (`en/en-sentiment.xml`,
PDDL, i.e. public domain) with a polarity in [-1, 1] per word sense. A word's
polarity is the mean over its senses (what TextBlob itself does). We keep
lower-case alphabetic words whose every sense has the same sign and whose
mean is at least 0.6 in size, minus a short list of slurs; split the words
into train/test words (no word is in both splits); and pair each positive
word with one negative word of the same split. Each pair is asked both ways,
two records with `word_a`/`word_b` swapped; gold `label` is 1 when word_a is
the more positive. The consistency group is the pair (`consistency_id`) and
the task takes keys from the pair's order, so nothing but `label` reads the
polarities.
"""

from __future__ import annotations

import collections
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import xml.etree.ElementTree as ET

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "icm_jax/tasks/data/sentiment", "output directory")
flags.DEFINE_integer("seed", 0, "shuffles words, splits and pair order")
flags.DEFINE_float("min_polarity", 0.6, "smallest |mean polarity| kept")
flags.DEFINE_float("test_fraction", 1 / 3, "share of words held out for test")

# Offensive slurs in the lexicon; they carry no sentiment signal we need.
EXCLUDED = ("retard", "retards", "retarded", "idiots", "morons")


def lexicon_path() -> str:
  # Located, not imported: importing textblob needs nltk, which we do not.
  spec = importlib.util.find_spec("textblob")
  if spec is None:
    raise SystemExit("textblob is not installed: pip install textblob==0.20.1")
  return os.path.join(os.path.dirname(spec.origin), "en", "en-sentiment.xml")


def word_polarities(path: str) -> dict[str, list[float]]:
  senses = collections.defaultdict(list)
  for entry in ET.parse(path).getroot().iter("word"):
    senses[entry.get("form")].append(float(entry.get("polarity")))
  return senses


def clear_words(senses, min_polarity: float) -> tuple[list, list]:
  """(positive, negative) words, sorted, with their mean polarity."""
  positive, negative = [], []
  for word, values in sorted(senses.items()):
    if not re.fullmatch(r"[a-z]{3,12}", word) or word in EXCLUDED:
      continue
    if re.search(r"(.)\1\1", word):  # "grrr", "lolol": not words
      continue
    mean = sum(values) / len(values)
    if mean >= min_polarity and min(values) > 0:
      positive.append((word, mean))
    elif mean <= -min_polarity and max(values) < 0:
      negative.append((word, mean))
  return positive, negative


def pair_records(positive, negative, split: str, rng) -> list[dict]:
  """Each positive word paired with a negative one, asked both ways."""
  rng.shuffle(positive)
  rng.shuffle(negative)
  records = []
  for k, ((good, p_good), (bad, p_bad)) in enumerate(zip(positive, negative)):
    assert p_good > p_bad
    first = (good, bad) if rng.random() < 0.5 else (bad, good)
    for order, (a, b) in enumerate((first, first[::-1])):
      records.append({"id": f"sentiment-{split}-{k:03d}{'ab'[order]}",
                      "word_a": a, "word_b": b, "label": int(a == good),
                      "consistency_id": k})
  return records


def main(argv):
  del argv
  import random
  path = lexicon_path()
  positive, negative = clear_words(word_polarities(path), FLAGS.min_polarity)
  rng = random.Random(FLAGS.seed)
  rng.shuffle(positive)
  rng.shuffle(negative)
  n_pos = round(len(positive) * FLAGS.test_fraction)
  n_neg = round(len(negative) * FLAGS.test_fraction)
  splits = {"test": (positive[:n_pos], negative[:n_neg]),
            "train": (positive[n_pos:], negative[n_neg:])}
  os.makedirs(FLAGS.out, exist_ok=True)
  for split, (pos, neg) in splits.items():
    records = pair_records(list(pos), list(neg), split, rng)
    out = os.path.join(FLAGS.out, f"{split}_sentiment.json")
    with open(out, "w") as f:
      json.dump(records, f, indent=1)
      f.write("\n")
    print(f"{out}: {len(records)} records ({len(records) // 2} pairs; "
          f"{len(pos)} positive, {len(neg)} negative words, unpaired words "
          "dropped)")
  with open(path, "rb") as f:
    digest = hashlib.sha256(f.read()).hexdigest()
  print(f"lexicon: textblob {importlib.metadata.version('textblob')} {path} sha256 {digest}; "
        f"{len(positive)} positive, {len(negative)} negative words kept")


if __name__ == "__main__":
  app.run(main)
