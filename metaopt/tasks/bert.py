"""A BERT-style Transformer encoder with a classification head, and BERT weights from
a Hugging Face ``safetensors`` file.

The architecture is BERT's: token + position + segment embeddings, LayerNorm; post-LN
blocks (self-attention, add & LayerNorm, GELU feed-forward, add & LayerNorm); the
``[CLS]`` hidden state through a tanh pooler; a linear classifier. Inputs are
``{"input_ids", "attention_mask"}`` (optionally ``"token_type_ids"``) int arrays of
shape [batch, length]; padded positions (mask 0) are never attended to.

Parameter names follow the Hugging Face layout, so :func:`load_bert_safetensors`
maps ``bert.encoder.layer.N.attention.self.query.weight`` and friends onto them
(HF ``Linear`` weights are [out, in], Flax kernels [in, out]: transposed).

Mixed precision: ``compute_dtype=jnp.bfloat16`` computes matmuls in bfloat16 while the
parameters (master weights) stay float32; LayerNorm, softmax and the logits stay
float32. By default (``$METAOPT_COMPUTE_DTYPE`` unset or "auto") it is on for GPU/TPU
backends and off on the CPU.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from safetensors import SafetensorError
from safetensors.flax import load_file

from metaopt.tasks.models import dropout, register_model
from metaopt.validation import check_choice, check_int

INIT = nn.initializers.normal(0.02)  # BERT's initializer_range
COMPUTE_DTYPES = ("auto", "float32", "bfloat16")
PRECISION_ENV = "METAOPT_COMPUTE_DTYPE"  # the variable the registered ResNets read too


def default_compute_dtype() -> Any:
  """bfloat16 on accelerators, float32 on the CPU (where bfloat16 is slow)."""
  return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16


def _dense(features: int, dtype, name: str) -> nn.Dense:
  return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32, kernel_init=INIT, name=name)


def _layer_norm(name: str) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=1e-12, dtype=jnp.float32, param_dtype=jnp.float32, name=name)


class BertLayer(nn.Module):
  """One post-LN encoder block, parameters named as in Hugging Face's ``BertLayer``."""

  hidden: int
  heads: int
  intermediate: int
  compute_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h, bias, dropout_rate=None):
    dt, n, length = self.compute_dtype, h.shape[0], h.shape[1]
    split = lambda t: t.reshape(n, length, self.heads, self.hidden // self.heads)
    q, k, v = (split(_dense(self.hidden, dt, name)(h)) for name in ("query", "key", "value"))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32)
    scores = scores / np.sqrt(self.hidden // self.heads) + bias
    probs = dropout(self, jax.nn.softmax(scores, axis=-1), dropout_rate).astype(dt)
    a = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(n, length, self.hidden)
    a = dropout(self, _dense(self.hidden, dt, "attention_output")(a), dropout_rate)
    h = _layer_norm("attention_LayerNorm")(h + a)
    m = nn.gelu(_dense(self.intermediate, dt, "intermediate")(h), approximate=False)
    m = dropout(self, _dense(self.hidden, dt, "output")(m), dropout_rate)
    return _layer_norm("output_LayerNorm")(h + m)


class Bert(nn.Module):
  """BERT encoder + tanh pooler on ``[CLS]`` + linear classifier; returns float32 logits."""

  vocab_size: int
  num_classes: int
  hidden: int = 768
  layers: int = 12
  heads: int = 12
  intermediate: int = 3072
  max_position: int = 512
  type_vocab_size: int = 2
  compute_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Mapping[str, jax.Array], dropout_rate=None) -> jax.Array:
    ids = jnp.asarray(x["input_ids"])
    mask = jnp.asarray(x.get("attention_mask", jnp.ones_like(ids)))
    types = jnp.asarray(x.get("token_type_ids", jnp.zeros_like(ids)))
    length = ids.shape[1]
    if length > self.max_position:
      raise ValueError(f"sequences of {length} tokens exceed the model's {self.max_position} "
                       "positions")
    embed = lambda num, name: nn.Embed(num, self.hidden, embedding_init=INIT, name=name)
    h = (embed(self.vocab_size, "word_embeddings")(ids)
         + embed(self.max_position, "position_embeddings")(jnp.arange(length))[None]
         + embed(self.type_vocab_size, "token_type_embeddings")(types))
    h = dropout(self, _layer_norm("embeddings_LayerNorm")(h), dropout_rate)
    # Padded keys get -1e9 before the softmax: exp underflows to exactly 0.
    bias = jnp.where(mask[:, None, None, :] > 0, 0.0, -1e9).astype(jnp.float32)
    for i in range(self.layers):
      h = BertLayer(self.hidden, self.heads, self.intermediate, self.compute_dtype,
                    name=f"layer_{i}")(h, bias, dropout_rate)
    pooled = jnp.tanh(_dense(self.hidden, self.compute_dtype, "pooler")(h[:, 0]))
    pooled = dropout(self, pooled, dropout_rate)
    return _dense(self.num_classes, self.compute_dtype, "classifier")(pooled).astype(jnp.float32)


def default_heads(hidden: int) -> int:
  """BERT's 64-wide heads when the width allows it, else the most of 4, 2, 1 that divide it."""
  if hidden % 64 == 0:
    return hidden // 64
  return next(h for h in (4, 2, 1) if hidden % h == 0)


def _compute_dtype(name: str) -> Any:
  check_choice("compute_dtype", name, COMPUTE_DTYPES)
  if name == "auto":
    return default_compute_dtype()
  return jnp.bfloat16 if name == "bfloat16" else jnp.float32


def build_bert(*, width: int, depth: int, num_classes: int, image_shape=None,
               info: Mapping[str, Any] | None = None) -> Bert:
  """The registered ``"bert"`` model: hidden size ``width``, ``depth`` layers. ``info``
  (the dataset's) gives ``vocab_size`` and ``max_len``, and may set ``heads``,
  ``intermediate`` (default 4 x width), ``max_position`` (default max_len),
  ``type_vocab_size`` (2) and ``compute_dtype`` (default ``$METAOPT_COMPUTE_DTYPE`` or
  "auto": bfloat16 on a GPU or TPU, float32 on the CPU; or "float32", "bfloat16")."""
  if not info or "vocab_size" not in info or "max_len" not in info:
    raise ValueError("model 'bert' needs a text dataset (info with vocab_size and max_len), "
                     f"got info {None if info is None else sorted(info)!r}")
  heads = check_int("heads", info.get("heads", default_heads(width)))
  if width % heads:
    raise ValueError(f"model 'bert' needs a width divisible by its {heads} heads, got {width}")
  return Bert(
      vocab_size=check_int("vocab_size", info["vocab_size"]), num_classes=num_classes,
      hidden=width, layers=depth, heads=heads,
      intermediate=check_int("intermediate", info.get("intermediate", 4 * width)),
      max_position=check_int("max_position", info.get("max_position", info["max_len"])),
      type_vocab_size=check_int("type_vocab_size", info.get("type_vocab_size", 2)),
      compute_dtype=_compute_dtype(info.get("compute_dtype",
                                            os.environ.get(PRECISION_ENV) or "auto")))


register_model("bert", build_bert)


# ------------------------------------------------------------------ safetensors weights

_LN = {"weight": "scale", "bias": "bias", "gamma": "scale", "beta": "bias"}
_LAYER = {  # Hugging Face BertLayer submodule -> ours
    "attention.self.query": "query", "attention.self.key": "key",
    "attention.self.value": "value", "attention.output.dense": "attention_output",
    "attention.output.LayerNorm": "attention_LayerNorm", "intermediate.dense": "intermediate",
    "output.dense": "output", "output.LayerNorm": "output_LayerNorm",
}
# Keys of a BERT checkpoint the classifier does not use: pretraining heads, buffers.
_IGNORED = ("cls.", "bert.embeddings.position_ids", "embeddings.position_ids")


def hf_key(path: tuple[str, ...]) -> str:
  """The Hugging Face key of one of our parameters (path as in ``params``)."""
  module, leaf = path[:-1], path[-1]
  ln = any("LayerNorm" in m for m in module)
  suffix = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}[leaf]
  if module[0] == "classifier":
    return f"classifier.{suffix}"
  if module[0] == "pooler":
    return f"bert.pooler.dense.{suffix}"
  if module[0].startswith("layer_"):
    inverse = {ours: theirs for theirs, ours in _LAYER.items()}
    return f"bert.encoder.layer.{module[0][6:]}.{inverse[module[1]]}.{suffix}"
  name = "LayerNorm" if ln else module[0]
  return f"bert.embeddings.{name}.{suffix}"


def _normalized(key: str) -> str:
  """A checkpoint key in the ``bert.``-prefixed layout with ``weight``/``bias`` leaves
  (``BertModel`` files lack the prefix; old ones name LayerNorm leaves gamma/beta)."""
  if not key.startswith(("bert.", "classifier.", "cls.")):
    key = "bert." + key
  head, _, leaf = key.rpartition(".")
  if "LayerNorm" in head and leaf in _LN:
    leaf = "weight" if _LN[leaf] == "scale" else "bias"
  return f"{head}.{leaf}"


def to_hf_state_dict(params: Mapping) -> dict[str, np.ndarray]:
  """Our parameters as a Hugging Face ``BertForSequenceClassification`` state dict
  (what :func:`load_bert_safetensors` reads; write it with ``safetensors.numpy.save_file``)."""
  out = {}
  for path, value in traverse_util.flatten_dict(jax.device_get(params)).items():
    value = np.asarray(value, np.float32)
    out[hf_key(path)] = np.ascontiguousarray(value.T if path[-1] == "kernel" else value)
  return out


def load_bert_safetensors(path, params: Mapping, *, head: str = "auto") -> dict:
  """``params`` (a ``"bert"`` model's) with the weights of a Hugging Face BERT
  ``safetensors`` file (``bert.embeddings.word_embeddings.weight``, ...).

  ``head``: "auto" loads ``classifier.*`` when the file has it and keeps the given
  (fresh) head otherwise; "keep" always keeps the given head; "load" requires it.
  Pretraining heads (``cls.*``) are ignored. A missing, unexpected or mis-shaped key
  raises ValueError naming the first one; parameters keep their dtype.
  """
  check_choice("head", head, ("auto", "keep", "load"))
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"safetensors file {path!r} does not exist")
  try:
    raw = load_file(path)
  except (SafetensorError, OSError, ValueError) as e:
    raise ValueError(f"{path!r} is not a readable safetensors file: {e}") from None
  state = {}
  for key, value in raw.items():
    if not key.startswith(_IGNORED):
      state[_normalized(key)] = value
  flat = traverse_util.flatten_dict(params)
  has_head = any(k.startswith("classifier.") for k in state)
  load_head = head == "load" or (head == "auto" and has_head)
  expected = {hf_key(p): p for p in flat if load_head or p[0] != "classifier"}
  for key in state:
    if key not in expected and not (key.startswith("classifier.") and not load_head):
      raise ValueError(f"{path!r} has key {key!r} that the model does not have "
                       f"(a model of another depth or architecture?)")
  out = dict(flat)
  for key, p in expected.items():
    if key not in state:
      raise ValueError(f"{path!r} lacks key {key!r} that the model needs")
    value = state[key].T if p[-1] == "kernel" else state[key]
    want = tuple(np.shape(flat[p]))
    if tuple(value.shape) != want:
      raise ValueError(f"{path!r} key {key!r} has shape {tuple(state[key].shape)}, the model "
                       f"needs {want[::-1] if p[-1] == 'kernel' else want}")
    out[p] = jnp.asarray(value, dtype=jnp.asarray(flat[p]).dtype)
  return traverse_util.unflatten_dict(out)


__all__ = ["Bert", "BertLayer", "build_bert", "default_heads", "default_compute_dtype",
           "load_bert_safetensors", "to_hf_state_dict", "hf_key"]
