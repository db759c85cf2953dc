"""Text classification: WordPiece tokenization and a generated sentiment stand-in.

Token ids come from a WordPiece tokenizer of the maintained `tokenizers` package:
either BERT's own ``vocab.txt`` (:func:`load_wordpiece`) or one learned offline from a
training split (:func:`train_wordpiece`). :func:`encode` pads or truncates to a fixed
length and returns ``{"input_ids", "attention_mask"}`` int32 arrays sharing the
example axis, what the ``"bert"`` model (:mod:`metaopt.tasks.bert`) reads.

``sentiment_synth`` is the offline stand-in: short reviews built from a sentiment
lexicon whose labels need context (:func:`sentiment_label` states the rules):

- negation flips a clause ("not good" is negative);
- contrast: the main clause wins ("good but boring", "although good , boring" and
  "boring even though good" are all negative);
- "and" adds the clauses' scores, where an intensifier ("very", "extremely") doubles
  a clause ("very good and dull" is positive, "good and very dull" negative).

The test split holds out phrasings: modifier-adjective pairs ("hardly charming") and
sentence templates ("good , but dull"; "dull , even though good") that never occur in
the training or validation splits, whose words all do.
Everything is deterministic under the seed.

Real data: ``imdb_reviews`` and ``glue/sst2`` through ``tfds.data_source`` and grain
(:func:`text_split`, :func:`text_batches`, :func:`load_text_dataset`), with a validation
split carved from train (SST-2's unlabelled test split is replaced by its validation
split). Importing this module registers ``sentiment_synth``, ``imdb_reviews`` and
``glue/sst2`` with ``load_dataset`` and the ``"bert"`` model with ``make_model``.
"""

from __future__ import annotations

import collections
import functools
import os
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from metaopt.tasks import tfds_data
from metaopt.tasks.bert import Bert, load_bert_safetensors  # importing registers "bert"
from metaopt.tasks.data import Dataset, register_dataset
from metaopt.validation import check_int, check_number

# ------------------------------------------------------------------------- tokenization

PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, UNK, CLS, SEP, MASK)  # BERT's ids 0..4 when learned


def _finish(tokenizer: Tokenizer, lowercase: bool) -> Tokenizer:
  """BERT's normalization, pre-tokenization and WordPiece decoding."""
  tokenizer.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
  tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  tokenizer.decoder = decoders.WordPiece()
  return tokenizer


def _add_framing(tokenizer: Tokenizer) -> Tokenizer:
  """Special tokens kept whole, and ``[CLS] text [SEP]`` framing."""
  tokenizer.add_special_tokens([t for t in SPECIAL_TOKENS if tokenizer.token_to_id(t) is not None])
  cls, sep = tokenizer.token_to_id(CLS), tokenizer.token_to_id(SEP)
  tokenizer.post_processor = processors.TemplateProcessing(
      single=f"{CLS} $A {SEP}", pair=f"{CLS} $A {SEP} $B:1 {SEP}:1",
      special_tokens=[(CLS, cls), (SEP, sep)])
  return tokenizer


def train_wordpiece(texts: Sequence[str], *, vocab_size: int = 8000,
                    lowercase: bool = True) -> Tokenizer:
  """A WordPiece tokenizer learned from ``texts`` (a training split), BERT-style:
  special tokens first (``[PAD]`` is id 0), then every character of the split as a
  word start and as a ``##`` continuation, then the most frequent words (ties in
  alphabetical order), at most ``vocab_size`` tokens in all.

  Deterministic: ``tokenizers``' own WordPieceTrainer is not used because its merges
  break ties in hash-map order, which differs between processes (two trainings on the
  same texts give different vocabularies).
  """
  check_int("vocab_size", vocab_size, low=len(SPECIAL_TOKENS) + 1)
  normalizer = normalizers.BertNormalizer(lowercase=lowercase)
  pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  words: collections.Counter = collections.Counter()
  for t in texts:
    words.update(w for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(t)))
  chars: collections.Counter = collections.Counter()
  for w, n in words.items():
    for c in w:
      chars[c] += n
  room = vocab_size - len(SPECIAL_TOKENS)
  by_count = lambda counts: sorted(counts, key=lambda k: (-counts[k], k))
  alphabet = by_count(chars)[:room // 2]
  pieces = [p for c in alphabet for p in (c, "##" + c)]
  whole = [w for w in by_count(words) if len(w) > 1][:room - len(pieces)]
  vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + tuple(pieces) + tuple(whole))}
  return _add_framing(_finish(Tokenizer(models.WordPiece(vocab, unk_token=UNK)), lowercase))


def load_wordpiece(vocab_file, *, lowercase: bool = True) -> Tokenizer:
  """The WordPiece tokenizer of a BERT ``vocab.txt`` (one token per line, the line
  number is the id), e.g. ``bert-base-uncased``'s (``lowercase=False`` for cased
  vocabularies)."""
  path = os.fspath(vocab_file)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"vocab file {path!r} does not exist; accepted: a BERT vocab.txt "
                            "with one WordPiece token per line")
  with open(path, encoding="utf-8") as f:
    tokens = [line.rstrip("\n") for line in f]
  while tokens and not tokens[-1].strip():  # a trailing empty line is not a token
    tokens.pop()
  if not tokens:
    raise ValueError(f"vocab file {path!r} is empty; accepted: a BERT vocab.txt with one "
                     "WordPiece token per line")
  missing = [t for t in (PAD, UNK, CLS, SEP) if t not in tokens]
  if missing:
    raise ValueError(f"vocab file {path!r} lacks the special token {missing[0]!r}; "
                     f"a BERT vocab.txt has {', '.join((PAD, UNK, CLS, SEP))}")
  vocab = {}
  for i, token in enumerate(tokens):
    vocab.setdefault(token, i)  # the first line of a duplicated token keeps its id
  tokenizer = _finish(Tokenizer(models.WordPiece(vocab, unk_token=UNK)), lowercase)
  return _add_framing(tokenizer)


def encoder(tokenizer: Tokenizer, max_len: int) -> Callable[[Sequence[str]], dict]:
  """``encode(texts)`` with a copy of ``tokenizer`` set up once for ``max_len``."""
  max_len = check_int("max_len", max_len, low=3)
  tokenizer = Tokenizer.from_str(tokenizer.to_str())  # padding settings stay local
  tokenizer.enable_truncation(max_length=max_len)
  tokenizer.enable_padding(length=max_len, pad_id=tokenizer.token_to_id(PAD), pad_token=PAD)

  def encode_texts(texts: Sequence[str]) -> dict[str, np.ndarray]:
    encodings = tokenizer.encode_batch(list(texts))
    shape = (len(encodings), max_len)
    ids = np.asarray([e.ids for e in encodings], np.int32).reshape(shape)
    mask = np.asarray([e.attention_mask for e in encodings], np.int32).reshape(shape)
    return {"input_ids": ids, "attention_mask": mask}

  return encode_texts


def encode(tokenizer: Tokenizer, texts: Sequence[str], max_len: int) -> dict[str, np.ndarray]:
  """``{"input_ids", "attention_mask"}``: int32 [len(texts), max_len], ``[CLS] ... [SEP]``
  truncated to ``max_len`` and padded with ``[PAD]`` (mask 0)."""
  return encoder(tokenizer, max_len)(texts)


# ------------------------------------------------------------------ the sentiment stand-in

POSITIVE: tuple[str, ...] = ("good", "great", "excellent", "wonderful", "brilliant", "charming",
                             "delightful", "superb", "enjoyable", "moving", "clever", "beautiful")
NEGATIVE: tuple[str, ...] = ("bad", "awful", "terrible", "boring", "dull", "poor", "tedious",
                             "horrible", "bland", "clumsy", "weak", "messy")
INTENSIFIERS: tuple[str, ...] = ("very", "extremely", "really", "truly", "incredibly", "so")
NEGATORS: tuple[str, ...] = ("not", "never", "hardly")
SUBJECTS: tuple[str, ...] = ("the movie", "this film", "the plot", "the acting", "the story",
                             "the ending", "the script", "the cast", "the music", "the direction")
VERBS: tuple[str, ...] = ("was", "is", "felt", "seemed")
# Sentence templates; {a} and {b} are clauses. The label rule of each: see sentiment_label.
TEMPLATES: dict[str, str] = {
    "single": "{a}",
    "but": "{a} but {b}",             # contrast: b wins
    "although": "although {a} , {b}",  # concession: the main clause b wins
    "even_though": "{b} even though {a}",  # concession, main clause first: b wins
    "and": "{a} and {b}",             # the clause scores add up (never a tie)
    "comma_but": "{a} , but {b}",       # as "but"
    "comma_even_though": "{b} , even though {a}",  # as "even_though"
}
# Templates only the test split uses: known words in a new order.
HELD_OUT_TEMPLATES: tuple[str, ...] = ("comma_but", "comma_even_though")
SENTIMENT_SYNTH_EXAMPLES = 6000
SENTIMENT_SYNTH_MAX_LEN = 24
HELD_OUT_PAIR_FRACTION = 0.25  # of each modifier's adjectives, seen only in test


class Clause(NamedTuple):
  """``subject verb [negator] [intensifier] adjective``."""
  subject: str
  verb: str
  negator: str | None
  intensifier: str | None
  adjective: str

  def text(self) -> str:
    words = (self.subject, self.verb, self.negator, self.intensifier, self.adjective)
    return " ".join(w for w in words if w)

  def score(self) -> int:
    """+1/-1 by the adjective's polarity, doubled by an intensifier; a negator flips
    the sign and cancels the intensity ("not very good" is -1)."""
    polarity = 1 if self.adjective in POSITIVE else -1
    if self.negator:
      return -polarity
    return 2 * polarity if self.intensifier else polarity


class Review(NamedTuple):
  """One generated review: a template over one or two clauses (``b`` is the main one)."""
  template: str
  a: Clause
  b: Clause | None = None

  def text(self) -> str:
    return TEMPLATES[self.template].format(a=self.a.text(), b=self.b.text() if self.b else "")


def sentiment_label(review: Review) -> int:
  """1 (positive) or 0 (negative): the single clause's sign; for "but", "although" and
  "even though" (with or without a comma) the main clause's sign; for "and" the sign
  of the summed scores."""
  if review.template == "single":
    score = review.a.score()
  elif review.template == "and":
    score = review.a.score() + review.b.score()
  else:
    score = review.b.score()
  if score == 0:
    raise ValueError(f"review {review.text()!r} has no sentiment (scores cancel)")
  return int(score > 0)


class HeldOut(NamedTuple):
  """The phrasings only the test split contains."""
  pairs: frozenset  # (modifier, adjective): "hardly charming", "incredibly dull"
  templates: tuple[str, ...]  # whole sentence templates

  def contains(self, review: Review) -> bool:
    if review.template in self.templates:
      return True
    for c in (review.a, review.b):
      # "not very good" holds the phrasing "not ... good" too.
      if c is not None and any(m and (m, c.adjective) in self.pairs
                               for m in (c.negator, c.intensifier)):
        return True
    return False


def held_out_phrasings(seed: int) -> HeldOut:
  """For every modifier, a seeded quarter of the adjectives (half from each polarity)."""
  rng = np.random.default_rng([seed, 1])
  pairs = set()
  per_polarity = max(1, round(HELD_OUT_PAIR_FRACTION * len(POSITIVE)))
  for i, modifier in enumerate(NEGATORS + INTENSIFIERS):
    for lexicon in (POSITIVE, NEGATIVE):
      # Rotate through the lexicon so every adjective also keeps seen modifiers.
      start = (int(rng.integers(len(lexicon))) + i * per_polarity) % len(lexicon)
      for k in range(per_polarity):
        pairs.add((modifier, lexicon[(start + k) % len(lexicon)]))
  return HeldOut(frozenset(pairs), HELD_OUT_TEMPLATES)


def _clause(rng: np.random.Generator) -> Clause:
  lexicon = POSITIVE if rng.random() < 0.5 else NEGATIVE
  u = rng.random()  # a third plain, a third intensified, a third negated (some both)
  negator = NEGATORS[rng.integers(len(NEGATORS))] if u < 1 / 3 else None
  intensify = u >= 2 / 3 or (negator is not None and rng.random() < 0.3)
  return Clause(SUBJECTS[rng.integers(len(SUBJECTS))], VERBS[rng.integers(len(VERBS))],
                negator, INTENSIFIERS[rng.integers(len(INTENSIFIERS))] if intensify else None,
                lexicon[rng.integers(len(lexicon))])


def _review(rng: np.random.Generator) -> Review:
  names = tuple(TEMPLATES)
  template = names[rng.integers(len(names))]
  if template == "single":
    return Review(template, _clause(rng))
  a, b = _clause(rng), _clause(rng)
  while template == "and" and a.score() + b.score() == 0:  # "and" never ties
    b = _clause(rng)
  return Review(template, a, b)


def generate_reviews(n: int, seed: int, *, held_out: HeldOut, test: bool) -> list[Review]:
  """``n`` reviews that contain a held-out phrasing (``test``) or none of them."""
  check_int("n", n, low=0)
  rng = np.random.default_rng([seed, 2 if test else 3])
  out = []
  while len(out) < n:
    review = _review(rng)
    if held_out.contains(review) == test:
      out.append(review)
  return out


@functools.lru_cache(maxsize=8)
def _sentiment_synth(seed: int, n_train: int, n_val: int, n_test: int) -> Dataset:
  held_out = held_out_phrasings(seed)
  seen = generate_reviews(n_train + n_val, seed, held_out=held_out, test=False)
  test = generate_reviews(n_test, seed, held_out=held_out, test=True)
  texts = [r.text() for r in seen + test]
  labels = np.asarray([sentiment_label(r) for r in seen + test], np.int32)
  tokenizer = train_wordpiece(texts[:n_train], vocab_size=1000)
  x = encode(tokenizer, texts, SENTIMENT_SYNTH_MAX_LEN)
  for a in (*x.values(), labels):
    a.flags.writeable = False  # cached: shared by every caller
  cut = lambda a, lo, hi: a[lo:hi]
  bounds = ((0, n_train), (n_train, n_train + n_val), (n_train + n_val, len(texts)))
  xs = [{k: cut(v, lo, hi) for k, v in x.items()} for lo, hi in bounds]
  ys = [cut(labels, lo, hi) for lo, hi in bounds]
  return Dataset(
      name="sentiment_synth", x_train=xs[0], y_train=ys[0], x_val=xs[1], y_val=ys[1],
      x_test=xs[2], y_test=ys[2], num_classes=2, image_shape=None,
      info={"vocab_size": tokenizer.get_vocab_size(), "max_len": SENTIMENT_SYNTH_MAX_LEN,
            "texts": {"train": tuple(texts[:n_train]),
                      "val": tuple(texts[n_train:n_train + n_val]),
                      "test": tuple(texts[n_train + n_val:])}})


def load_sentiment_synth(*, seed: int = 0, val_fraction: float = 0.2,
                         test_fraction: float = 0.2,
                         num_examples: int = SENTIMENT_SYNTH_EXAMPLES) -> Dataset:
  """The generated sentiment task, tokenized with a WordPiece vocabulary learned from
  its training split. Test: ``test_fraction`` of the examples, each with a held-out
  phrasing; validation: ``val_fraction``, phrasings seen in training. ``info`` holds
  ``vocab_size``, ``max_len`` and the raw ``texts`` of each split."""
  n = check_int("num_examples", num_examples, low=10)
  n_test, n_val = round(n * test_fraction), round(n * val_fraction)
  return _sentiment_synth(int(seed), n - n_test - n_val, n_val, n_test)


register_dataset("sentiment_synth", load_sentiment_synth,
                 num_examples=SENTIMENT_SYNTH_EXAMPLES, modality="text")


# ------------------------------------------------------------- tfds: imdb_reviews, glue/sst2

class TextSource(NamedTuple):
  """How a tfds text dataset becomes train/val/test: ``train`` is split into train and
  a carved validation set; ``test`` is the labelled split used as test."""
  text_key: str
  train: str
  test: str
  max_len: int  # default sequence length
  num_examples: int  # labelled examples in train + test
  note: str = ""


TEXT_TFDS: dict[str, TextSource] = {
    "imdb_reviews": TextSource("text", "train", "test", 256, 50000),
    # SST-2's test labels are -1 (hidden): its validation split is the test set here.
    "glue/sst2": TextSource("sentence", "train", "validation", 64, 67349 + 872,
                            note="its test split has no labels: validation is used as test"),
}
TEXT_SPLITS: tuple[str, ...] = ("train", "val", "test")


def _check_text_dataset(name: str, split: str | None = None) -> TextSource:
  if name not in TEXT_TFDS:
    raise ValueError(f"unknown text dataset {name!r}; accepted: {', '.join(TEXT_TFDS)} "
                     "(the offline stand-in 'sentiment_synth' loads with load_dataset)")
  if split is not None and split not in TEXT_SPLITS:
    spec = TEXT_TFDS[name]
    raise ValueError(
        f"unknown split {split!r} of {name!r}; accepted: {', '.join(TEXT_SPLITS)} "
        f"(train and val from its tfds split {spec.train!r}, test from {spec.test!r})")
  return TEXT_TFDS[name]


def _as_text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class TextSplit(NamedTuple):
  """A random-access split: ``source[indices[i]]`` is its example ``i``."""
  source: Any
  indices: np.ndarray
  text_key: str

  def texts(self, rows: Sequence[int]) -> list[str]:
    return [_as_text(self.source[int(self.indices[i])][self.text_key]) for i in rows]

  def example(self, i: int) -> tuple[str, int]:
    ex = self.source[int(self.indices[i])]
    return _as_text(ex[self.text_key]), int(ex["label"])


def text_split(name: str, split: str, *, data_dir=None, seed: int = 0,
               val_fraction: float = 0.2) -> TextSplit:
  """Split ``split`` ("train", "val" or "test") of a tfds text dataset. "val" is a
  seeded ``val_fraction`` of the tfds train split and "train" the rest (in dataset
  order); "test" is the dataset's labelled test split."""
  spec = _check_text_dataset(name, split)
  check_number("val_fraction", val_fraction, low=0.0, high=1.0, low_open=True, high_open=True)
  source = tfds_data.open_source(name, split=spec.test if split == "test" else spec.train,
                                 data_dir=data_dir)
  n = len(source)
  if split == "test":
    return TextSplit(source, np.arange(n), spec.text_key)
  order = np.random.default_rng([int(seed), 4]).permutation(n)
  n_val = int(round(val_fraction * n))
  chosen = order[:n_val] if split == "val" else order[n_val:]
  if not len(chosen):
    raise ValueError(f"split {split!r} of {name!r} is empty ({n} examples in "
                     f"{spec.train!r}, val_fraction {val_fraction})")
  return TextSplit(source, np.sort(chosen), spec.text_key)


def text_batches(split: TextSplit, tokenizer: Tokenizer, *, max_len: int, batch_size: int,
                 seed: int = 0, shuffle: bool = True, num_epochs: int = 1,
                 drop_remainder: bool = False, num_threads: int = 2, prefetch: int = 4):
  """A grain pipeline of ``{"x": {"input_ids", "attention_mask"}, "y": labels}`` batches:
  a ``seed``-ed shuffle (per epoch), reading, tokenization and padding to ``max_len``
  in ``num_threads`` threads, ``prefetch`` batches ahead."""
  import grain  # the optional `data` extra; 0.5 s to import

  batch_size = check_int("batch_size", batch_size)
  encode_texts = encoder(tokenizer, max_len)

  def make_batch(rows) -> dict:
    pairs = [split.example(int(i)) for i in rows]
    labels = np.asarray([label for _, label in pairs], np.int32)
    return {"x": encode_texts([text for text, _ in pairs]), "y": labels}

  ds = grain.MapDataset.range(len(split.indices))
  ds = ds.repeat(check_int("num_epochs", num_epochs))
  if shuffle:
    ds = ds.shuffle(seed=int(seed))
  ds = ds.batch(batch_size, drop_remainder=drop_remainder).map(make_batch)
  return ds.to_iter_dataset(grain.ReadOptions(num_threads=check_int("num_threads", num_threads),
                                              prefetch_buffer_size=check_int("prefetch",
                                                                             prefetch)))


def load_text_dataset(name: str, *, data_dir=None, seed: int = 0, val_fraction: float = 0.2,
                      vocab_file=None, vocab_size: int = 8000, max_len: int | None = None,
                      lowercase: bool = True, batch_size: int = 256) -> Dataset:
  """A tfds text dataset ("imdb_reviews", "glue/sst2") tokenized into memory.

  Train and a carved validation split come from the tfds train split (see
  :func:`text_split`), test from the labelled test split (SST-2: validation).
  Tokens: the WordPiece vocabulary of ``vocab_file`` (BERT's ``vocab.txt``), or one of
  at most ``vocab_size`` tokens learned from the training split. ``max_len``: default
  256 for IMDB, 64 for SST-2. ``info``: ``vocab_size`` and ``max_len``.
  """
  spec = _check_text_dataset(name)
  max_len = spec.max_len if max_len is None else check_int("max_len", max_len, low=3)
  tokenizer = None if vocab_file is None else load_wordpiece(vocab_file, lowercase=lowercase)
  splits = {s: text_split(name, s, data_dir=data_dir, seed=seed, val_fraction=val_fraction)
            for s in TEXT_SPLITS}
  if tokenizer is None:
    tokenizer = train_wordpiece(splits["train"].texts(range(len(splits["train"].indices))),
                                vocab_size=vocab_size, lowercase=lowercase)
  arrays = {}
  for s, split in splits.items():
    batches = list(text_batches(split, tokenizer, max_len=max_len, batch_size=batch_size,
                                shuffle=False))
    arrays[s] = ({k: np.concatenate([b["x"][k] for b in batches]) for k in batches[0]["x"]},
                 np.concatenate([b["y"] for b in batches]))
  return Dataset(
      name=name, x_train=arrays["train"][0], y_train=arrays["train"][1],
      x_val=arrays["val"][0], y_val=arrays["val"][1],
      x_test=arrays["test"][0], y_test=arrays["test"][1], num_classes=2, image_shape=None,
      info={"vocab_size": tokenizer.get_vocab_size(), "max_len": max_len})


def _registered_loader(name: str):
  def load(*, seed: int = 0, val_fraction: float = 0.2, test_fraction: float = 0.2) -> Dataset:
    # The dataset's own test split is the test set (test_fraction does not apply); data
    # from $TFDS_DATA_DIR or ~/tensorflow_datasets.
    return load_text_dataset(name, seed=seed, val_fraction=val_fraction)
  return load


for _name, _spec in TEXT_TFDS.items():
  register_dataset(_name, _registered_loader(_name), num_examples=_spec.num_examples,
                   modality="text")

__all__ = ["train_wordpiece", "load_wordpiece", "encode", "encoder", "load_sentiment_synth",
           "sentiment_label", "held_out_phrasings", "generate_reviews", "Review", "Clause",
           "SPECIAL_TOKENS", "Bert", "load_bert_safetensors", "TEXT_TFDS", "text_split",
           "text_batches", "load_text_dataset"]
