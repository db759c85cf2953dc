"""Text: the sentiment stand-in, WordPiece tokenization, the BERT encoder, its safetensors
loader and the tfds pipelines (on tfds.testing.mock_data)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tensorflow_datasets as tfds
from safetensors.numpy import save_file

import metaopt.tasks.text as text
from metaopt.tasks import TaskConfig, make_model, make_task
from metaopt.tasks.bert import load_bert_safetensors
from metaopt.train import train_grid

TINY = dict(width=16, depth=2, num_classes=2)


def reference_label(sentence: str) -> int:
  """The stand-in's rules, re-implemented on the words of the sentence."""
  def score(clause: str) -> int:
    words = clause.split()
    polarity = 1 if words[-1] in text.POSITIVE else -1
    assert polarity == 1 or words[-1] in text.NEGATIVE
    if any(w in text.NEGATORS for w in words):
      return -polarity
    return 2 * polarity if words[-2] in text.INTENSIFIERS else polarity

  if sentence.startswith("although "):
    main = sentence.split(" , ")[1]
  elif " even though " in sentence:
    main = sentence.split(" even though ")[0].removesuffix(" ,")
  elif " but " in sentence:
    main = sentence.split(" but ")[1]
  elif " and " in sentence:
    a, b = sentence.split(" and ")
    return int(score(a) + score(b) > 0)
  else:
    main = sentence
  return int(score(main) > 0)


def test_generator_is_seeded_and_labels_follow_the_rules():
  held = text.held_out_phrasings(0)
  a = text.generate_reviews(400, 0, held_out=held, test=False)
  assert a == text.generate_reviews(400, 0, held_out=held, test=False)
  assert a != text.generate_reviews(400, 1, held_out=held, test=False)
  assert held != text.held_out_phrasings(1)
  test = text.generate_reviews(200, 0, held_out=held, test=True)
  for review in a + test:
    assert text.sentiment_label(review) == reference_label(review.text()), review.text()
  labels = [text.sentiment_label(r) for r in a]
  assert 0.35 < np.mean(labels) < 0.65
  # Context decides: the same words flip with negation, contrast and intensity.
  c = lambda neg, inten, adj: text.Clause("the plot", "was", neg, inten, adj)
  assert text.sentiment_label(text.Review("single", c("not", None, "good"))) == 0
  assert text.sentiment_label(text.Review("but", c(None, None, "good"), c(None, None, "dull"))) == 0
  assert text.sentiment_label(text.Review("and", c(None, "very", "good"), c(None, None, "dull"))) == 1
  assert text.sentiment_label(text.Review("and", c(None, None, "good"), c(None, "so", "dull"))) == 0


def test_held_out_phrasings_only_in_test():
  d = text.load_sentiment_synth(seed=0, num_examples=1000)
  held = text.held_out_phrasings(0)
  texts = d.info["texts"]
  assert len(texts["train"]) == 600 and len(texts["val"]) == len(texts["test"]) == 200
  phrases = {f"{m} {adj}" for m, adj in held.pairs}
  phrases |= {f"{m} {i} {adj}" for m, adj in held.pairs for i in text.INTENSIFIERS}
  contains = lambda s: any(f" {p}" in s for p in phrases) or " , but " in s or " , even" in s
  assert not any(contains(s) for s in texts["train"] + texts["val"])
  assert all(contains(s) for s in texts["test"])
  # ... made of words training has seen: no [UNK] in the test ids.
  unk = 1  # SPECIAL_TOKENS order
  assert not (d.x_test["input_ids"] == unk).any()
  assert set(" ".join(texts["test"]).split()) <= set(" ".join(texts["train"]).split())
  # Deterministic under the seed (uncached), another seed another dataset.
  again = text._sentiment_synth.__wrapped__(0, 600, 200, 200)
  for split in ("train", "test"):
    np.testing.assert_array_equal(getattr(again, f"x_{split}")["input_ids"],
                                  getattr(d, f"x_{split}")["input_ids"])
    np.testing.assert_array_equal(getattr(again, f"y_{split}"), getattr(d, f"y_{split}"))
  other = text.load_sentiment_synth(seed=1, num_examples=1000)
  assert other.info["texts"]["train"] != texts["train"]
  # Nothing truncated at the stand-in's length; [CLS] first, [SEP] last.
  assert (d.x_train["attention_mask"][:, -1] == 0).all()
  ids, mask = d.x_train["input_ids"], d.x_train["attention_mask"]
  assert (ids[:, 0] == 2).all() and (ids[np.arange(len(ids)), mask.sum(1) - 1] == 3).all()


def test_vocab_file_tokenizer_and_its_errors(tmp_path):
  vocab = tmp_path / "vocab.txt"
  vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "film",
                              "was", "not", "good", "##s"]) + "\n")
  tok = text.load_wordpiece(vocab)
  out = text.encode(tok, ["The film was NOT good", "films", "the film was not good at all"], 8)
  np.testing.assert_array_equal(out["input_ids"], [[2, 5, 6, 7, 8, 9, 3, 0],
                                                   [2, 6, 10, 3, 0, 0, 0, 0],
                                                   [2, 5, 6, 7, 8, 9, 1, 3]])  # truncated
  np.testing.assert_array_equal(out["attention_mask"].sum(1), [7, 4, 8])
  assert out["input_ids"].dtype == np.int32 and out["attention_mask"].dtype == np.int32
  with pytest.raises(FileNotFoundError, match="vocab file .*nope.txt.* does not exist"):
    text.load_wordpiece(tmp_path / "nope.txt")
  (tmp_path / "empty.txt").write_text("\n")
  with pytest.raises(ValueError, match="empty"):
    text.load_wordpiece(tmp_path / "empty.txt")
  (tmp_path / "nounk.txt").write_text("[PAD]\nthe\n")
  with pytest.raises(ValueError, match=r"lacks the special token '\[UNK\]'"):
    text.load_wordpiece(tmp_path / "nounk.txt")


def _tiny_bert(depth=2, **info):
  return make_model("bert", **dict(TINY, depth=depth),
                    info={"vocab_size": 50, "max_len": 12, **info})


def _inputs(n=3, length=12):
  ids = np.random.default_rng(0).integers(5, 50, (n, length))
  mask = (np.arange(length)[None] < np.array([12, 7, 3])[:n, None]).astype(np.int32)
  return {"input_ids": np.where(mask > 0, ids, 0).astype(np.int32), "attention_mask": mask}


def _random_params(model, x, scale=0.5):
  """Parameters of ``model`` drawn N(0, scale^2) in numpy (no init program to compile)."""
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)["params"]
  rng = np.random.default_rng(1)
  return jax.tree.map(lambda s: scale * rng.standard_normal(s.shape).astype(np.float32), shapes)


def test_bert_forward_backward_and_padding_is_masked():
  model, bf16 = _tiny_bert(1), _tiny_bert(1, compute_dtype="bfloat16")
  assert model.heads == 4 and model.intermediate == 64
  assert model.compute_dtype == jnp.float32  # bfloat16 is off on the CPU by default
  x = _inputs()
  # Larger weights than BERT's init (std 0.02), so that every input matters.
  params = _random_params(model, x)
  y = np.array([0, 1, 1])
  noise = np.random.default_rng(2).integers(5, 50, x["input_ids"].shape)
  # Other ids at padded positions must change nothing; at a real position they do.
  pad_changed = np.where(x["attention_mask"] > 0, x["input_ids"], noise)
  real_changed = x["input_ids"].copy()
  real_changed[:, 1] = noise[:, 1]
  three = {"input_ids": np.concatenate([x["input_ids"], pad_changed, real_changed]),
           "attention_mask": np.tile(x["attention_mask"], (3, 1))}

  # One program for all checks: at rate 0 the dropout path keeps every activation.
  @jax.jit
  def run(p, rate):
    def loss(p):
      out = model.apply({"params": p}, three, rate, rngs={"dropout": jax.random.PRNGKey(3)})
      return optax.softmax_cross_entropy_with_integer_labels(out[:3], y).mean(), out
    return jax.value_and_grad(loss, has_aux=True)(p)

  (loss_kept, logits3), grads = run(params, 0.0)
  (loss_dropped, _), _ = run(params, 0.1)
  logits, same, other = np.split(np.asarray(logits3), 3)
  assert logits.shape == (3, 2) and logits3.dtype == jnp.float32
  np.testing.assert_allclose(same, logits, atol=1e-5)
  assert (np.abs(other - logits).max(axis=1) > 1e-3).all()
  # Gradients reach every parameter; dropout (a traced rate) changes the loss.
  assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))
  assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))
  assert abs(float(loss_dropped) - float(loss_kept)) > 1e-4
  # bfloat16 compute: float32 master weights, matrix products in bfloat16, float32 logits.
  dtypes = lambda m: set(jax.tree.leaves(jax.tree.map(
      lambda a: str(a.dtype), jax.eval_shape(m.init, jax.random.PRNGKey(1), x))))
  assert dtypes(bf16) == dtypes(model) == {"float32"}
  products = lambda m: {str(e.outvars[0].aval.dtype) for e in jax.make_jaxpr(
      lambda p: m.apply({"params": p}, x))(params).jaxpr.eqns if e.primitive.name == "pjit"
      or e.primitive.name == "dot_general"}
  assert "bfloat16" in products(bf16) and "bfloat16" not in products(model)
  assert jax.eval_shape(lambda p: bf16.apply({"params": p}, x), params).dtype == jnp.float32
  with pytest.raises(ValueError, match="model 'bert' needs a text dataset"):
    make_model("bert", **TINY)


def _hf_checkpoint(rng, *, layers=2, hidden=16, inter=64, vocab=50, positions=12, head=True):
  """A random checkpoint in the Hugging Face BertForSequenceClassification layout."""
  w = lambda *shape: rng.standard_normal(shape).astype(np.float32)
  sd = {"bert.embeddings.word_embeddings.weight": w(vocab, hidden),
        "bert.embeddings.position_embeddings.weight": w(positions, hidden),
        "bert.embeddings.token_type_embeddings.weight": w(2, hidden),
        "bert.embeddings.LayerNorm.gamma": w(hidden), "bert.embeddings.LayerNorm.beta": w(hidden),
        "bert.embeddings.position_ids": np.arange(positions)[None],
        "bert.pooler.dense.weight": w(hidden, hidden), "bert.pooler.dense.bias": w(hidden),
        "cls.predictions.bias": w(vocab)}
  for i in range(layers):
    p = f"bert.encoder.layer.{i}."
    for name, (o, n) in {"attention.self.query": (hidden, hidden),
                         "attention.self.key": (hidden, hidden),
                         "attention.self.value": (hidden, hidden),
                         "attention.output.dense": (hidden, hidden),
                         "intermediate.dense": (inter, hidden),
                         "output.dense": (hidden, inter)}.items():
      sd[p + name + ".weight"], sd[p + name + ".bias"] = w(o, n), w(o)
    for name in ("attention.output.LayerNorm", "output.LayerNorm"):
      sd[p + name + ".weight"], sd[p + name + ".bias"] = w(hidden), w(hidden)
  if head:
    sd["classifier.weight"], sd["classifier.bias"] = w(2, hidden), w(2)
  return sd


def test_safetensors_loader_maps_the_hf_layout_and_names_mismatches(tmp_path):
  fresh = _random_params(_tiny_bert(), _inputs(), scale=0.02)
  sd = _hf_checkpoint(np.random.default_rng(0))
  save_file(sd, tmp_path / "bert.safetensors")
  params = load_bert_safetensors(tmp_path / "bert.safetensors", fresh)
  assert jax.tree.structure(params) == jax.tree.structure(fresh)
  np.testing.assert_array_equal(params["layer_1"]["query"]["kernel"],
                                sd["bert.encoder.layer.1.attention.self.query.weight"].T)
  np.testing.assert_array_equal(params["layer_0"]["output"]["kernel"],
                                sd["bert.encoder.layer.0.output.dense.weight"].T)
  np.testing.assert_array_equal(params["embeddings_LayerNorm"]["scale"],
                                sd["bert.embeddings.LayerNorm.gamma"])
  np.testing.assert_array_equal(params["word_embeddings"]["embedding"],
                                sd["bert.embeddings.word_embeddings.weight"])
  np.testing.assert_array_equal(params["classifier"]["bias"], sd["classifier.bias"])
  # A pretrained encoder without a classifier keeps the fresh head.
  save_file(_hf_checkpoint(np.random.default_rng(1), head=False), tmp_path / "base.safetensors")
  base = load_bert_safetensors(tmp_path / "base.safetensors", fresh)
  np.testing.assert_array_equal(base["classifier"]["kernel"], fresh["classifier"]["kernel"])
  # Mismatches: one line naming the first offending key.
  save_file(_hf_checkpoint(np.random.default_rng(2), inter=32), tmp_path / "inter.safetensors")
  with pytest.raises(ValueError, match=r"key 'bert.encoder.layer.0.intermediate.dense.bias' "
                     r"has shape \(32,\), the model needs \(64,\)$"):
    load_bert_safetensors(tmp_path / "inter.safetensors", fresh)
  # Shapes in the file's [out, in] orientation.
  save_file(dict(sd, **{"bert.encoder.layer.1.output.dense.weight": np.zeros((16, 32), "f4")}),
            tmp_path / "out.safetensors")
  with pytest.raises(ValueError, match=r"key 'bert.encoder.layer.1.output.dense.weight' "
                     r"has shape \(16, 32\), the model needs \(16, 64\)$"):
    load_bert_safetensors(tmp_path / "out.safetensors", fresh)
  save_file(_hf_checkpoint(np.random.default_rng(3), layers=3), tmp_path / "deep.safetensors")
  with pytest.raises(ValueError, match=r"has key 'bert.encoder.layer.2\..*' that the model"):
    load_bert_safetensors(tmp_path / "deep.safetensors", fresh)
  save_file(_hf_checkpoint(np.random.default_rng(4), layers=1), tmp_path / "short.safetensors")
  with pytest.raises(ValueError, match=r"lacks key 'bert.encoder.layer.1\..*' that the model"):
    load_bert_safetensors(tmp_path / "short.safetensors", fresh)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    load_bert_safetensors(tmp_path / "none.safetensors", fresh)


def test_sentiment_stand_in_trains_with_make_task_and_train_grid():
  task = make_task(TaskConfig("sentiment_synth", "bert", 16, 1, 32, 100, 0))
  assert task.data.info["max_len"] == text.SENTIMENT_SYNTH_MAX_LEN
  make_tx = lambda h: optax.adam(h["lr"])
  result, _ = train_grid(task, make_tx, {"lr": jnp.array([1e-2])}, jax.random.PRNGKey(0)[None],
                         steps=100, eval_every=50)
  assert result.train_loss.shape == (1, 100) and np.isfinite(result.train_loss).all()
  assert result.val_loss[0, -1] < result.val_loss[0, 0] - 0.02


@pytest.fixture
def mock_tfds():
  with tfds.testing.mock_data(num_examples=40):
    yield


@pytest.mark.parametrize("name", ["imdb_reviews", "glue/sst2"])
def test_tfds_text_pipeline_on_mock_data(mock_tfds, name):
  d = text.load_text_dataset(name, vocab_size=80, max_len=16, seed=0)
  assert d.info == {"vocab_size": 80, "max_len": 16}
  assert [d.num_examples(s) for s in ("train", "val", "test")] == [32, 8, 40]
  for split in ("train", "val", "test"):
    x, y = getattr(d, f"x_{split}"), getattr(d, f"y_{split}")
    assert set(x) == {"input_ids", "attention_mask"}
    assert x["input_ids"].shape == x["attention_mask"].shape == (len(y), 16)
    assert x["input_ids"].dtype == x["attention_mask"].dtype == y.dtype == np.int32
    assert set(np.unique(y)) <= {0, 1} and x["input_ids"].max() < 80
  # The carved validation split: disjoint from train, together the tfds train split.
  train = text.text_split(name, "train", seed=0)
  val = text.text_split(name, "val", seed=0)
  assert sorted(np.concatenate([train.indices, val.indices]).tolist()) == list(range(40))
  assert not set(val.indices) & set(text.text_split(name, "train", seed=0).indices)
  assert set(val.indices) != set(text.text_split(name, "val", seed=1).indices)
  # Seeded shuffled batches: the same seed gives the same batches, another seed another order.
  tok = text.train_wordpiece(train.texts(range(32)), vocab_size=60)
  run = lambda seed: list(text.text_batches(train, tok, max_len=16, batch_size=8, seed=seed))
  first, again, other = run(0), run(0), run(1)
  assert len(first) == 4 and first[0]["x"]["input_ids"].shape == (8, 16)
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a["x"]["input_ids"], b["x"]["input_ids"])
  assert any(not np.array_equal(a["x"]["input_ids"], b["x"]["input_ids"])
             for a, b in zip(first, other))
  # Every training example exactly once per epoch.
  unshuffled = list(text.text_batches(train, tok, max_len=16, batch_size=8, shuffle=False))
  rows = lambda bs: sorted(map(tuple, np.concatenate([b["x"]["input_ids"] for b in bs])))
  assert rows(first) == rows(unshuffled)


def test_tfds_text_bad_input(tmp_path):
  with pytest.raises(ValueError, match="unknown text dataset 'imdb'; accepted: imdb_reviews"):
    text.text_split("imdb", "train")
  with pytest.raises(ValueError, match="unknown split 'validation' of 'glue/sst2'; accepted"):
    text.text_split("glue/sst2", "validation")
  with pytest.raises(FileNotFoundError, match="tfds build glue/sst2 --data_dir"):
    text.text_split("glue/sst2", "train", data_dir=tmp_path)
  with pytest.raises(FileNotFoundError, match="vocab file"):
    text.load_text_dataset("imdb_reviews", data_dir=tmp_path, vocab_file=tmp_path / "v.txt")
