"""Speech recognition: log-mel features, CTC with word error rate, a recognizer, and data.

Importing this module registers

- the datasets ``spoken_words`` (2,000 utterances) and ``spoken_words_small`` (240):
  short spoken-word utterances (digits and a few dozen words, one to three words each)
  with character transcripts. ``spoken_words`` is synthesized with espeak-ng when the
  ``espeak-ng`` binary is installed and otherwise, like ``spoken_words_small`` always,
  by a procedural formant synthesizer in numpy (no system package needed). The test
  split holds out speakers (voices, pitches, speeds) and word pairs never seen in
  training;
- the objective ``ctc``: per-utterance ``optax.ctc_loss`` divided by the transcript
  length (a per-character loss), and as metrics the word error rate of greedy decoding
  (``wer``, corpus level: word edits / reference words, computed inside jit) and
  ``accuracy`` = max(0, 1 - wer);
- the models ``speech_ctc`` (float32, or bfloat16 compute off the CPU) and
  ``speech_ctc_bf16`` (always bfloat16 compute, float32 weights): a strided convolutional
  front end (4x time subsampling) and pre-LayerNorm Transformer layers with a per-frame
  character head. The model returns ``(logits, logit_paddings)`` so the loss masks
  padded frames.

Inputs are ``{"features": [N, T, n_mels] float32, "lengths": [N] int32}`` (log-mel
frames, zero-padded to a fixed T), labels ``{"labels": [N, L] int32, "label_lengths":
[N] int32}`` (character ids, 0-padded). Character ids: 0 is the CTC blank, then
:data:`VOCAB`. LibriSpeech is read through ``tfds.data_source`` and grain
(:func:`speech_batches`, :func:`load_librispeech`).

Features are computed per batch from raw audio in one jitted call (:func:`batch_log_mel`)
over each utterance's real frames only: the batch's audio is packed back to back,
transformed, and the frames are scattered into the fixed padded layout inside that call,
so a batch costs in proportion to its audio, not to its padding (a ``spoken_words``
batch is about half padding). The batch keeps its fixed shape, so the training step
compiles once; the packed size is rounded to one of a few sizes, so the feature call
compiles a few times. Features are not cached per utterance: a streamed corpus is read in
a new order every epoch and its features would have to be held for the whole corpus;
the in-memory datasets (:func:`load_spoken_words`, :func:`load_librispeech`) compute
them once, when they are built.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import importlib.util
import io
import math
import os
import pathlib
import shutil
import subprocess
import types
import wave
from typing import Any, Iterator, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util
from safetensors.numpy import load_file, save_file

from metaopt.tasks import objectives, tfds_data
from metaopt.tasks.data import Dataset, register_dataset
from metaopt.tasks.models import dropout, register_model
from metaopt.validation import check_choice, check_int

# --- characters -------------------------------------------------------------------------

BLANK = 0  # the CTC blank id
SPACE = 1
VOCAB: tuple[str, ...] = ("<blank>", " ", *"abcdefghijklmnopqrstuvwxyz", "'")
CHAR_IDS: dict[str, int] = {c: i for i, c in enumerate(VOCAB) if i != BLANK}


def encode_text(text: str) -> np.ndarray:
  """Character ids (int32) of a transcript: lower-cased, runs of whitespace become one
  space, characters outside :data:`VOCAB` are dropped."""
  words = "".join(c for c in text.lower().replace("\t", " ").replace("\n", " ")
                  if c in CHAR_IDS).split()
  return np.asarray([CHAR_IDS[c] for c in " ".join(words)], np.int32)


def decode_ids(ids: Sequence[int]) -> str:
  """The transcript of character ids (blanks skipped)."""
  return "".join(VOCAB[int(i)] for i in ids if int(i) != BLANK)


def _round_up(n: int, multiple: int) -> int:
  return int(math.ceil(n / multiple) * multiple)


# --- log-mel features -------------------------------------------------------------------

SAMPLE_RATE = 16000


class LogMelConfig(NamedTuple):
  """Log-mel spectrogram settings: 25 ms Hann frames every 10 ms, 40 mel bands."""
  sample_rate: int = SAMPLE_RATE
  n_mels: int = 40
  frame_length: int = 400   # samples (25 ms at 16 kHz)
  hop_length: int = 160     # samples (10 ms)
  n_fft: int = 400           # = frame_length: no zero-padding (as Whisper's features)
  f_min: float = 20.0
  f_max: float | None = None  # None: sample_rate / 2
  normalize: bool = True      # per utterance and band: zero mean, unit variance over time


def _hz_to_mel(f):
  return 2595.0 * np.log10(1.0 + np.asarray(f, np.float64) / 700.0)


def _mel_to_hz(m):
  return 700.0 * (10.0 ** (np.asarray(m, np.float64) / 2595.0) - 1.0)


@functools.lru_cache(maxsize=8)
def mel_filterbank(config: LogMelConfig = LogMelConfig()) -> np.ndarray:
  """[n_fft // 2 + 1, n_mels] triangular HTK-mel filters (float32)."""
  f_max = config.sample_rate / 2 if config.f_max is None else config.f_max
  edges = _mel_to_hz(np.linspace(_hz_to_mel(config.f_min), _hz_to_mel(f_max), config.n_mels + 2))
  freqs = np.linspace(0.0, config.sample_rate / 2, config.n_fft // 2 + 1)
  lo, mid, hi = edges[:-2], edges[1:-1], edges[2:]
  up = (freqs[:, None] - lo) / (mid - lo)
  down = (hi - freqs[:, None]) / (hi - mid)
  bank = np.maximum(0.0, np.minimum(up, down)).astype(np.float32)
  bank.flags.writeable = False
  return bank


def num_frames(num_samples: int, config: LogMelConfig = LogMelConfig()) -> int:
  """Frames :func:`log_mel` gives for ``num_samples`` samples (at least 1)."""
  return 1 + max(0, int(num_samples) - config.frame_length) // config.hop_length


def check_sample_rate(sample_rate: int, config: LogMelConfig = LogMelConfig()) -> None:
  """ValueError when audio's sample rate differs from the feature extractor's."""
  if int(sample_rate) != config.sample_rate:
    raise ValueError(f"audio sample rate {sample_rate} Hz does not match the feature "
                     f"extractor's {config.sample_rate} Hz; resample the audio first")


def _as_float(audio) -> np.ndarray:
  a = np.asarray(audio)
  if a.ndim == 2:  # (samples, channels) -> mono
    a = a.mean(axis=1)
  if a.ndim != 1:
    raise ValueError(f"audio must be 1-D samples (or samples x channels), got shape {a.shape}")
  if np.issubdtype(a.dtype, np.integer):
    return a.astype(np.float32) / np.float32(32768.0)
  return a.astype(np.float32)


def _frame_bucket(n: int) -> int:
  """``n`` rounded up to a multiple of an eighth of its leading power of two (at most
  12.5% more, 8 sizes per doubling), so batches of varying total length share a few
  compiled shapes."""
  shift = max(0, n.bit_length() - 4)
  return -(-n >> shift) << shift


@functools.partial(jax.jit, static_argnames=("config", "frames"))
def _log_mel_packed(blocks: jax.Array, starts: jax.Array, lengths: jax.Array,
                    config: LogMelConfig, frames: int) -> tuple[jax.Array, jax.Array]:
  """Log-mel features of utterances packed back to back, computed for their real frames
  only: ``blocks`` [P + k - 1, hop] holds each utterance's samples in ``lengths[i] + k -
  1`` hop-sized blocks from block ``starts[i]`` on (k = ceil(frame_length / hop), zeros
  after the samples). A frame starts at every block, so utterance i's frame j is frame
  ``starts[i] + j``; the k - 1 frames straddling two utterances and the frames past the
  last one are computed and dropped. Returns ([B, frames, n_mels] features, zero past
  each utterance's ``lengths``, and ``lengths``)."""
  window = jnp.asarray(np.hanning(config.frame_length + 1)[:-1], jnp.float32)
  # Frames from hop-sized blocks (k slices, cheaper than a gather).
  k = -(-config.frame_length // config.hop_length)
  positions = blocks.shape[0] - k + 1
  framed = jnp.concatenate([blocks[j:j + positions] for j in range(k)], axis=-1)
  spectrum = jnp.fft.rfft(framed[:, :config.frame_length] * window, n=config.n_fft)
  power = spectrum.real ** 2 + spectrum.imag ** 2
  mel = jnp.log(power @ jnp.asarray(mel_filterbank(config)) + 1e-6)  # [positions, n_mels]
  t = jnp.arange(frames)[None, :]
  mel = mel[starts[:, None] + jnp.minimum(t, lengths[:, None] - 1)]  # [B, frames, n_mels]
  valid = (t < lengths[:, None])[..., None]
  if config.normalize:
    count = lengths[:, None, None].astype(jnp.float32)
    mean = jnp.sum(jnp.where(valid, mel, 0.0), axis=1, keepdims=True) / count
    var = jnp.sum(jnp.where(valid, jnp.square(mel - mean), 0.0), axis=1, keepdims=True) / count
    mel = (mel - mean) / (jnp.sqrt(var) + 1e-3)
  return jnp.where(valid, mel, 0.0), lengths


def batch_log_mel(audios: Sequence[Any], sample_rate: int, *,
                  config: LogMelConfig = LogMelConfig(),
                  max_frames: int | None = None) -> dict[str, np.ndarray]:
  """Log-mel features of a batch of utterances in one jitted call: ``{"features": [N,
  max_frames, n_mels] float32 zero-padded, "lengths": [N] int32}``. ``max_frames``
  None: the longest utterance's count rounded up to a multiple of 8. Integer audio
  is read as 16-bit PCM.

  Only the utterances' real frames are transformed: the audio is packed back to back
  (:func:`_log_mel_packed`, the total frame count rounded up to one of a few sizes)
  and the features are scattered into the padded ``[N, max_frames]`` layout inside
  the same call, so the cost follows the audio's length, not the padding's."""
  check_sample_rate(sample_rate, config)
  floats = [_as_float(a) for a in audios]
  counts = [num_frames(len(a), config) for a in floats]
  frames = _round_up(max(counts), 8) if max_frames is None else check_int("max_frames",
                                                                           max_frames)
  if max(counts) > frames:
    i = int(np.argmax(counts))
    raise ValueError(f"utterance {i} has {counts[i]} frames, more than max_frames={frames}")
  hop, k = config.hop_length, -(-config.frame_length // config.hop_length)
  sizes = np.asarray(counts, np.int64) + (k - 1)  # blocks per utterance
  starts = np.concatenate([[0], np.cumsum(sizes[:-1])])
  # Frames computed: the real ones, k - 1 between utterances, rounded up; never more
  # than padding every utterance to `frames` would give.
  positions = min(_frame_bucket(int(sizes.sum()) - (k - 1)),
                  len(floats) * (frames + k - 1) - (k - 1))
  buf = np.zeros((positions + k - 1) * hop, np.float32)
  for a, start, size in zip(floats, starts, sizes):  # samples past the last whole frame
    n = min(len(a), int(size) * hop)                  # are not needed
    buf[int(start) * hop:int(start) * hop + n] = a[:n]
  features, lengths = _log_mel_packed(buf.reshape(-1, hop), starts.astype(np.int32),
                                      np.asarray(counts, np.int32), config, frames)
  return {"features": np.asarray(features), "lengths": np.asarray(lengths)}


def log_mels(audios: Sequence[Any], sample_rate: int, config: LogMelConfig = LogMelConfig(),
             chunk: int = 64) -> list[np.ndarray]:
  """[frames_i, n_mels] float32 log-mel spectrograms of several utterances (computed
  ``chunk`` at a time by :func:`batch_log_mel`)."""
  out = []
  for i in range(0, len(audios), chunk):
    batch = batch_log_mel(audios[i:i + chunk], sample_rate, config=config)
    out += [f[:n] for f, n in zip(batch["features"], batch["lengths"])]
  return out


def log_mel(audio, sample_rate: int, config: LogMelConfig = LogMelConfig()) -> np.ndarray:
  """[frames, n_mels] float32 log-mel spectrogram of one utterance."""
  return log_mels([audio], sample_rate, config)[0]


def pad_features(mels: Sequence[np.ndarray], max_frames: int) -> dict[str, np.ndarray]:
  """{"features": [N, max_frames, n_mels] zero-padded, "lengths": [N] int32}."""
  n_mels = mels[0].shape[1]
  out = np.zeros((len(mels), max_frames, n_mels), np.float32)
  lengths = np.zeros(len(mels), np.int32)
  for i, m in enumerate(mels):
    if len(m) > max_frames:
      raise ValueError(f"utterance {i} has {len(m)} frames, more than max_frames={max_frames}")
    out[i, :len(m)] = m
    lengths[i] = len(m)
  return {"features": out, "lengths": lengths}


def pad_labels(ids: Sequence[np.ndarray], max_length: int) -> dict[str, np.ndarray]:
  """{"labels": [N, max_length] int32 0-padded, "label_lengths": [N] int32}."""
  out = np.zeros((len(ids), max_length), np.int32)
  lengths = np.zeros(len(ids), np.int32)
  for i, t in enumerate(ids):
    if len(t) > max_length:
      raise ValueError(f"transcript {i} has {len(t)} characters, more than "
                       f"max_label_length={max_length}")
    out[i, :len(t)] = t
    lengths[i] = len(t)
  return {"labels": out, "label_lengths": lengths}


# --- CTC, greedy decoding and word error rate (inside jit) -------------------------------

def label_paddings(labels: jax.Array, label_lengths: jax.Array) -> jax.Array:
  return (jnp.arange(labels.shape[1])[None, :] >= label_lengths[:, None]).astype(jnp.float32)


def ctc_losses(outputs, y) -> jax.Array:
  """[batch] CTC loss per utterance divided by its transcript length (per character)."""
  logits, paddings = outputs
  loss = optax.ctc_loss(logits.astype(jnp.float32), paddings, y["labels"],
                        label_paddings(y["labels"], y["label_lengths"]), blank_id=BLANK)
  return loss / jnp.maximum(y["label_lengths"], 1).astype(jnp.float32)


def greedy_decode(logits: jax.Array, paddings: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Best path: argmax per frame, repeats collapsed, blanks dropped. Returns ``(ids
  [batch, frames] 0-padded, lengths [batch])``."""
  best = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  prev = jnp.pad(best[:, :-1], ((0, 0), (1, 0)), constant_values=-1)
  keep = (best != prev) & (best != BLANK) & (paddings == 0)
  pos = jnp.where(keep, jnp.cumsum(keep, axis=1) - 1, best.shape[1])  # dropped: out of range
  rows = jnp.arange(best.shape[0])[:, None]
  ids = jnp.zeros_like(best).at[rows, pos].set(best, mode="drop")
  return ids, keep.sum(axis=1).astype(jnp.int32)


def _word_hashes(ids: jax.Array, length: jax.Array) -> tuple[jax.Array, jax.Array]:
  """One uint32 hash per word of a 0-padded character sequence: ([max_words], count)."""
  size = ids.shape[0]
  pos = jnp.arange(size)
  letter = (ids != SPACE) & (ids != BLANK) & (pos < length)
  prev = jnp.pad(letter[:-1], (1, 0))
  start = letter & ~prev
  word = jnp.cumsum(start) - 1
  offset = pos - jax.lax.cummax(jnp.where(start, pos, 0))  # position inside the word
  powers = jnp.asarray(np.asarray([pow(16777619, k, 2**32) for k in range(size)], np.uint32))
  contrib = jnp.where(letter, (ids.astype(jnp.uint32) + 1) * powers[offset], 0)
  max_words = (size + 1) // 2
  hashes = jax.ops.segment_sum(contrib, jnp.where(letter, word, max_words),
                               num_segments=max_words + 1)[:max_words]
  return hashes, start.sum().astype(jnp.int32)


def _edit_distance(ref: jax.Array, n_ref: jax.Array, hyp: jax.Array, n_hyp: jax.Array):
  """Levenshtein distance between ref[:n_ref] and hyp[:n_hyp] (padded arrays)."""
  cols = jnp.arange(hyp.shape[0] + 1)
  valid = cols <= n_hyp

  def row(i, carry):
    prev, answer = carry
    sub = prev[:-1] + (ref[i] != hyp).astype(jnp.int32)
    cand = jnp.concatenate([prev[:1] + 1, jnp.minimum(sub, prev[1:] + 1)])
    # Insertions within the row: new[j] = min_k<=j cand[k] + (j - k).
    new = jax.lax.cummin(cand - cols) + cols
    answer = jnp.where(i + 1 == n_ref, new, answer)
    return new, answer

  first = cols
  _, last = jax.lax.fori_loop(0, ref.shape[0], row, (first, first))
  final = jnp.where(n_ref == 0, first, last)
  return jnp.sum(jnp.where(cols == n_hyp, final, 0) * valid)


def word_errors(ref_ids: jax.Array, ref_lengths: jax.Array, hyp_ids: jax.Array,
                hyp_lengths: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per utterance ``(word edits, reference words)`` between 0-padded character-id
  sequences (words split at spaces); jit- and vmap-able."""
  def one(r, nr, h, nh):
    rw, rn = _word_hashes(r, nr)
    hw, hn = _word_hashes(h, nh)
    return _edit_distance(rw, rn, hw, hn), rn
  return jax.vmap(one)(ref_ids, ref_lengths, hyp_ids, hyp_lengths)


def ctc_metrics(outputs, y, weight=None) -> dict[str, jax.Array]:
  """Corpus word error rate of greedy decoding and accuracy = max(0, 1 - WER); ``weight``:
  per-utterance 0/1 (only the utterances weighted 1 count)."""
  logits, paddings = outputs
  hyp, hyp_len = greedy_decode(logits, paddings)
  errors, words = word_errors(y["labels"], y["label_lengths"], hyp, hyp_len)
  if weight is not None:
    errors, words = errors * weight, words * weight
  wer = errors.sum() / jnp.maximum(words.sum(), 1)
  return {"accuracy": jnp.maximum(0.0, 1.0 - wer), "wer": wer}


CTC = objectives.Objective(ctc_losses, ctc_metrics)
objectives.register("ctc", CTC)


def _levenshtein(a: Sequence, b: Sequence) -> int:
  prev = list(range(len(b) + 1))
  for i, x in enumerate(a, 1):
    cur = [i]
    for j, z in enumerate(b, 1):
      cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != z)))
    prev = cur
  return prev[-1]


def word_error_rate(refs: Sequence[str], hyps: Sequence[str]) -> float:
  """Corpus WER on the host: total word edits / total reference words."""
  if len(refs) != len(hyps):
    raise ValueError(f"got {len(refs)} references but {len(hyps)} hypotheses")
  edits = sum(_levenshtein(r.split(), h.split()) for r, h in zip(refs, hyps))
  return edits / max(1, sum(len(r.split()) for r in refs))


def transcribe(logits, paddings) -> list[str]:
  """Greedy transcripts of a batch of model outputs."""
  ids, lengths = jax.device_get(jax.jit(greedy_decode)(logits, paddings))
  return [decode_ids(i[:n]) for i, n in zip(ids, lengths)]


# --- the recognizer ---------------------------------------------------------------------

SUBSAMPLING = 4  # two stride-2 convolutions


def default_compute_dtype():
  """bfloat16 on accelerators, float32 on the CPU (where bfloat16 is slow)."""
  return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16


def _sinusoids(length: int, width: int) -> np.ndarray:
  pos = np.arange(length)[:, None]
  freq = np.exp(-np.log(10000.0) * np.arange(0, width, 2) / width)[None, :]
  table = np.zeros((length, width), np.float32)
  table[:, 0::2] = np.sin(pos * freq)
  table[:, 1::2] = np.cos(pos * freq[:, : width // 2])
  return table


class SpeechCTC(nn.Module):
  """Conv front end (two stride-2 1-D convolutions over time, GELU), sinusoidal
  positions, ``depth`` pre-LayerNorm Transformer layers, a per-frame character head.

  ``__call__(x, dropout_rate=None) -> (logits [B, T/4, vocab], paddings [B, T/4])``;
  paddings are 1.0 at frames past each utterance's subsampled length. Parameters are
  float32; ``dtype`` is the compute dtype (bfloat16 halves activation memory on
  accelerators); logits come out float32.
  """

  vocab_size: int
  width: int
  depth: int
  heads: int = 2
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, dropout_rate=None):
    h, lengths = x["features"].astype(self.dtype), x["lengths"]
    for i in range(2):
      # Zero the padded frames first, so nothing past an utterance leaks into its frames.
      valid = jnp.arange(h.shape[1])[None, :] < lengths[:, None]
      h = jnp.where(valid[..., None], h, 0)
      h = nn.gelu(nn.Conv(self.width, (3,), strides=(2,), padding="SAME", dtype=self.dtype,
                          name=f"conv{i}")(h))
      lengths = (lengths + 1) // 2
    frames = h.shape[1]
    valid = jnp.arange(frames)[None, :] < lengths[:, None]
    h = h + jnp.asarray(_sinusoids(frames, self.width), self.dtype)
    h = jnp.where(valid[..., None], h, 0)
    mask = nn.make_attention_mask(valid, valid)
    for i in range(self.depth):
      y = nn.LayerNorm(dtype=self.dtype, name=f"layer{i}_ln1")(h)
      y = nn.MultiHeadDotProductAttention(num_heads=self.heads, dtype=self.dtype,
                                          name=f"layer{i}_attention")(y, y, mask=mask)
      h = h + dropout(self, y, dropout_rate)
      y = nn.LayerNorm(dtype=self.dtype, name=f"layer{i}_ln2")(h)
      y = nn.Dense(4 * self.width, dtype=self.dtype, name=f"layer{i}_mlp_in")(y)
      y = nn.Dense(self.width, dtype=self.dtype, name=f"layer{i}_mlp_out")(nn.gelu(y))
      h = h + dropout(self, y, dropout_rate)
    h = nn.LayerNorm(dtype=self.dtype, name="final_ln")(h)
    logits = nn.Dense(self.vocab_size, dtype=self.dtype, name="head")(h).astype(jnp.float32)
    return logits, (~valid).astype(jnp.float32)


def make_speech_model(*, width: int, depth: int, vocab_size: int = len(VOCAB),
                      compute_dtype: Any = None) -> SpeechCTC:
  """A :class:`SpeechCTC` of ``width`` (even; heads: width // 32, at least 2) and
  ``depth`` layers; ``compute_dtype`` None picks :func:`default_compute_dtype`."""
  width, depth = check_int("width", width), check_int("depth", depth, low=0)
  if width % 2:
    raise ValueError(f"model 'speech_ctc' needs an even width, got {width}")
  heads = max(2, width // 32)
  while width % heads:
    heads -= 1
  dtype = default_compute_dtype() if compute_dtype is None else jnp.dtype(compute_dtype)
  return SpeechCTC(vocab_size=vocab_size, width=width, depth=depth, heads=heads, dtype=dtype)


def _build(compute_dtype):
  def build(*, width, depth, num_classes, image_shape=None, info=None):
    if not info or "vocab" not in info:
      raise ValueError("model 'speech_ctc' needs a speech dataset (spoken_words, "
                       "spoken_words_small, librispeech)")
    return make_speech_model(width=width, depth=depth, vocab_size=len(info["vocab"]),
                             compute_dtype=compute_dtype)
  return build


register_model("speech_ctc", _build(None))
register_model("speech_ctc_bf16", _build(jnp.bfloat16))


# --- checkpoints ------------------------------------------------------------------------

def _flat_params(params) -> dict[str, Any]:
  return traverse_util.flatten_dict(params, sep="/")


def save_speech_checkpoint(path, params) -> pathlib.Path:
  """Writes ``params`` as .safetensors or .npz (by suffix), keys ``"/"``-joined paths."""
  path = pathlib.Path(path)
  flat = {k: np.asarray(v, np.float32) for k, v in _flat_params(jax.device_get(params)).items()}
  path.parent.mkdir(parents=True, exist_ok=True)
  if path.suffix == ".safetensors":
    save_file(flat, str(path))
  elif path.suffix == ".npz":
    np.savez(path, **flat)
  else:
    raise ValueError(f"checkpoint path {str(path)!r} must end in .safetensors or .npz")
  return path


def load_speech_checkpoint(path, params):
  """``params`` with every leaf replaced by the checkpoint's array of the same key.

  The file (.safetensors or .npz) holds one float array per parameter under its Flax
  path joined with ``"/"`` (``conv0/kernel``, ``layer0_attention/query/kernel``, ...,
  ``head/bias``; :func:`checkpoint_layout` lists them for a model). A missing key, an
  extra key or a shape that differs raises one ValueError naming the first one.
  """
  path = pathlib.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
  if path.suffix == ".safetensors":
    stored = load_file(str(path))
  elif path.suffix == ".npz":
    with np.load(path) as f:
      stored = {k: f[k] for k in f.files}
  else:
    raise ValueError(f"checkpoint path {str(path)!r} must end in .safetensors or .npz")
  target = _flat_params(params)
  where = f"checkpoint {str(path)!r} does not match the model"
  for key in sorted(target):
    if key not in stored:
      raise ValueError(f"{where}: missing key {key!r} (shape {tuple(target[key].shape)})")
    if tuple(stored[key].shape) != tuple(target[key].shape):
      raise ValueError(f"{where}: key {key!r} has shape {tuple(stored[key].shape)}, the "
                       f"model expects {tuple(target[key].shape)}")
  extra = sorted(set(stored) - set(target))
  if extra:
    raise ValueError(f"{where}: unexpected key {extra[0]!r} ({len(extra)} extra in all)")
  loaded = {k: jnp.asarray(stored[k], target[k].dtype) for k in target}
  return traverse_util.unflatten_dict(loaded, sep="/")


def checkpoint_layout(params) -> dict[str, tuple[int, ...]]:
  """Key -> shape a checkpoint for these parameters must hold."""
  return {k: tuple(v.shape) for k, v in _flat_params(params).items()}


# --- the spoken-word stand-in -----------------------------------------------------------

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
WORDS: tuple[str, ...] = DIGITS + (
    "yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go", "start", "end",
    "play", "pause", "next", "back", "open", "close", "red", "green", "blue", "black",
    "white", "call", "home", "help", "time", "light", "music", "volume",
)
MAX_WORDS = 3
NUM_SPEAKERS = 40
TEST_SPEAKERS = 8  # the last 8 speakers speak only test utterances

ESPEAK_VOICES = ("en-us", "en-gb", "en-us+f2", "en-us+m3", "en-gb+f4", "en-us+m7",
                 "en-gb+f1", "en-sc")

# Formant synthesizer: each letter is a 3-formant pattern. Letters take distinct
# combinations of a first- and second-formant level and a kind (steady vowel-like,
# gliding, or noise), so the character sequence can be read back from the sound.
_F1 = (300.0, 520.0, 800.0)
_F2 = (950.0, 1500.0, 2300.0)
_KINDS = ("steady", "glide", "noise")


def _letter_table() -> dict[str, tuple[str, float, float, float]]:
  table = {}
  for i, c in enumerate("abcdefghijklmnopqrstuvwxyz"):
    kind, f1, f2 = _KINDS[i % 3], _F1[(i // 3) % 3], _F2[(i // 9) % 3]
    table[c] = (kind, f1, f2, 2500.0 + 250.0 * (i % 4))
  return table


LETTERS = _letter_table()


class Speaker(NamedTuple):
  """The voice of one synthesized speaker."""
  pitch: float         # Hz (formant) or espeak -p 0..99
  formant_scale: float  # vocal tract length factor
  speed: float         # letters per second factor (formant) or espeak words per minute
  noise: float         # background noise amplitude
  voice: str           # espeak voice


def _speaker(index: int, seed: int) -> Speaker:
  rng = np.random.default_rng([seed, 1, index])
  return Speaker(pitch=float(rng.uniform(90, 240)), formant_scale=float(rng.uniform(0.9, 1.1)),
                 speed=float(rng.uniform(0.85, 1.2)), noise=float(rng.uniform(0.002, 0.02)),
                 voice=ESPEAK_VOICES[index % len(ESPEAK_VOICES)])


def _envelope(freqs: np.ndarray, formants: np.ndarray, bandwidths=(90.0, 120.0, 180.0),
              gains=(1.0, 0.6, 0.3)) -> np.ndarray:
  """[frames, bins] spectral envelope: a sum of resonance peaks at ``formants`` [frames, 3]."""
  f = freqs.astype(np.float32)[None, :]
  out = np.zeros((len(formants), len(freqs)), np.float32)
  for k in range(3):
    d = (f - formants[:, k:k + 1].astype(np.float32)) / np.float32(bandwidths[k])
    out += np.float32(gains[k]) / (1.0 + d * d)
  return out


LETTER_SECONDS = 0.09
GAP_SECONDS = 0.11


def formant_audio(text: str, speaker: Speaker, rng: np.random.Generator,
                  sample_rate: int = SAMPLE_RATE) -> np.ndarray:
  """float32 audio of ``text`` (letters a-z and spaces) by the procedural formant
  synthesizer: a glottal pulse train (or noise) shaped frame by frame by each letter's
  formants, with a short dip between letters and silence between words."""
  hop, n_fft = 128, 512
  # Per synthesis frame: formants [3], voicing, amplitude.
  seg_formants, seg_voiced, seg_amp = [], [], []

  def add_silence(seconds):
    n = max(1, int(round(seconds * sample_rate / hop)))
    seg_formants.append(np.full((n, 3), 500.0))
    seg_voiced.append(np.zeros(n))
    seg_amp.append(np.zeros(n))

  add_silence(rng.uniform(0.04, 0.12))
  for w, word in enumerate(text.split()):
    if w:
      add_silence(GAP_SECONDS / speaker.speed * rng.uniform(0.8, 1.25))
    for c in word:
      kind, f1, f2, f3 = LETTERS[c]
      n = max(3, int(round(LETTER_SECONDS / speaker.speed * rng.uniform(0.85, 1.2)
                           * sample_rate / hop)))
      t = np.linspace(0.0, 1.0, n)
      scale = speaker.formant_scale * rng.uniform(0.97, 1.03)
      if kind == "glide":  # the second formant moves up by ~60% across the letter
        f2s = f2 * (1.0 + 0.6 * t)
      else:
        f2s = np.full(n, f2)
      if kind == "noise":  # fricative-like: higher bands
        form = np.stack([np.full(n, 1.8 * f2), np.full(n, f3 + 800.0), np.full(n, 4000.0 + f1)], 1)
      else:
        form = np.stack([np.full(n, f1), f2s, np.full(n, f3)], 1)
      seg_formants.append(form * scale)
      seg_voiced.append(np.full(n, 0.0 if kind == "noise" else 1.0))
      seg_amp.append(np.sin(np.pi * np.clip(t * 1.15, 0.0, 1.0)) ** 0.6)  # dip at boundaries
  add_silence(rng.uniform(0.04, 0.12))
  formants = np.concatenate(seg_formants)
  voiced = np.concatenate(seg_voiced)
  amp = np.concatenate(seg_amp)
  frames = len(formants)
  length = (frames - 1) * hop + n_fft

  # Source: pulses at a drifting pitch, white noise where unvoiced.
  per_sample = lambda v: np.interp(np.arange(length), np.arange(frames) * hop + n_fft // 2, v)
  f0 = speaker.pitch * (1.0 + 0.06 * np.sin(2 * np.pi * rng.uniform(0.5, 2.0)
                                            * np.arange(length) / sample_rate
                                            + rng.uniform(0, 2 * np.pi)))
  phase = np.cumsum(f0 / sample_rate)
  pulses = np.diff(np.floor(phase), prepend=0.0) * np.sqrt(speaker.pitch / 100.0)
  v = per_sample(voiced)
  source = v * pulses + (1.0 - v) * 0.08 * rng.standard_normal(length)

  # Filter frame by frame in the STFT domain and overlap-add.
  window = np.hanning(n_fft + 1)[:-1]
  idx = np.arange(frames)[:, None] * hop + np.arange(n_fft)[None, :]
  spec = np.fft.rfft(source[idx] * window, axis=1)
  freqs = np.fft.rfftfreq(n_fft, 1.0 / sample_rate)
  spec *= _envelope(freqs, formants) * amp[:, None]
  shaped = np.fft.irfft(spec, n=n_fft, axis=1) * window
  out = np.zeros(length + n_fft)
  for r in range(n_fft // hop):  # frames r, r + 4, ... do not overlap: add them as one block
    block = shaped[r::n_fft // hop].reshape(-1)
    out[r * hop:r * hop + len(block)] += block
  out = out[:length]
  out /= np.max(np.abs(out)) + 1e-9
  out = out * rng.uniform(0.3, 0.9) + speaker.noise * rng.standard_normal(length)
  return out.astype(np.float32)


def espeak_available() -> bool:
  return shutil.which("espeak-ng") is not None


def read_wav(data: bytes) -> tuple[np.ndarray, int]:
  """(float32 mono samples, sample rate) of 16-bit PCM WAV bytes (standard library)."""
  with wave.open(io.BytesIO(data)) as w:
    rate, channels, width = w.getframerate(), w.getnchannels(), w.getsampwidth()
    raw = w.readframes(w.getnframes())
  if width != 2:
    raise ValueError(f"expected 16-bit PCM WAV, got {8 * width}-bit samples")
  if not raw:  # a streamed header may give no frame count: take what follows it
    raw = data[data.find(b"data") + 8:]
  a = np.frombuffer(raw[: len(raw) // 2 * 2], "<i2").astype(np.float32) / 32768.0
  if channels > 1:
    a = a[: len(a) // channels * channels].reshape(-1, channels).mean(axis=1)
  return a, rate


def resample(audio: np.ndarray, rate: int, target: int) -> np.ndarray:
  """Band-limited resampling by FFT (zero-padding or truncating the spectrum)."""
  if rate == target:
    return audio.astype(np.float32)
  n = max(1, int(round(len(audio) * target / rate)))
  spec = np.fft.rfft(audio)
  keep = min(len(spec), n // 2 + 1)
  out = np.fft.irfft(spec[:keep], n=n) * (n / len(audio))
  return out.astype(np.float32)


def espeak_audio(text: str, speaker: Speaker, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
  """float32 audio of ``text`` spoken by ``espeak-ng --stdout`` (voice, pitch 0..99,
  speed in words per minute from ``speaker``), resampled to ``sample_rate``."""
  pitch = int(np.clip(round((speaker.pitch - 90.0) / 150.0 * 80.0 + 10.0), 0, 99))
  wpm = int(round(150 * speaker.speed))
  cmd = ["espeak-ng", "--stdout", "-v", speaker.voice, "-p", str(pitch), "-s", str(wpm), text]
  result = subprocess.run(cmd, capture_output=True, check=False, timeout=60)
  if result.returncode != 0:
    raise RuntimeError(f"{' '.join(cmd)!r} failed: {result.stderr.decode(errors='replace')}")
  audio, rate = read_wav(result.stdout)
  return resample(audio, rate, sample_rate)


def _held_out_pair(a: int, b: int) -> bool:
  """About 1 in 8 ordered word pairs never occurs in training (only in test)."""
  return (7 * a + 3 * b) % 8 == 0


def _utterance_words(rng: np.random.Generator, held_out: bool) -> list[int]:
  """Word indices of one utterance; training ones avoid the held-out pairs, held-out
  ones contain at least one."""
  while True:
    n = int(rng.integers(2 if held_out else 1, MAX_WORDS + 1))
    words = [int(w) for w in rng.integers(0, len(WORDS), n)]
    pairs = [_held_out_pair(a, b) for a, b in zip(words, words[1:])]
    if any(pairs) == held_out:
      return words


class Utterances(NamedTuple):
  """Raw generated utterances of the stand-in (before features)."""
  audio: list          # float32 arrays at SAMPLE_RATE
  text: list           # transcripts
  speaker: np.ndarray  # speaker index per utterance
  split: np.ndarray    # 0 train, 1 val, 2 test


def generate_utterances(num: int, *, seed: int = 0, val_fraction: float = 0.2,
                        test_fraction: float = 0.2, synthesizer: str = "formant",
                        threads: int = 4) -> Utterances:
  """``num`` utterances: test ones by held-out speakers, half of them containing held-out
  word pairs; train and val ones by the other speakers with the other pairs.
  Deterministic under ``seed`` (each utterance has its own generator)."""
  check_int("num", num)
  check_choice("synthesizer", synthesizer, ("formant", "espeak"))
  if synthesizer == "espeak" and not espeak_available():
    raise FileNotFoundError("synthesizer 'espeak' needs the espeak-ng binary on PATH "
                            "(Debian/Ubuntu: apt-get install espeak-ng)")
  n_test = max(1, int(round(num * test_fraction)))
  n_val = max(1, int(round(num * val_fraction)))
  split = np.zeros(num, np.int32)
  split[num - n_test - n_val:num - n_test] = 1
  split[num - n_test:] = 2
  speakers = [_speaker(i, seed) for i in range(NUM_SPEAKERS)]
  texts, who, rngs = [], [], []
  for i in range(num):
    rng = np.random.default_rng([seed, 2, i])
    test = split[i] == 2
    held = bool(test and rng.random() < 0.5)
    words = _utterance_words(rng, held)
    texts.append(" ".join(WORDS[w] for w in words))
    first = NUM_SPEAKERS - TEST_SPEAKERS if test else 0
    who.append(int(rng.integers(first, NUM_SPEAKERS if test else NUM_SPEAKERS - TEST_SPEAKERS)))
    rngs.append(rng)
  if synthesizer == "formant":
    audio = [formant_audio(t, speakers[s], r) for t, s, r in zip(texts, who, rngs)]
  else:  # subprocesses: threads overlap them
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
      audio = list(pool.map(lambda ts: espeak_audio(ts[0], speakers[ts[1]]), zip(texts, who)))
  return Utterances(audio, texts, np.asarray(who, np.int32), split)


SPOKEN_WORDS: dict[str, tuple[int, str]] = {  # name -> (utterances, synthesizer)
    "spoken_words": (2000, "auto"),
    "spoken_words_small": (240, "formant"),
}


@functools.lru_cache(maxsize=8)
def load_spoken_words(name: str = "spoken_words", *, seed: int = 0, val_fraction: float = 0.2,
                      test_fraction: float = 0.2, synthesizer: str | None = None,
                      features: LogMelConfig = LogMelConfig()) -> Dataset:
  """The spoken-word stand-in as a :class:`Dataset` (objective ``ctc``), features padded to
  one frame count (a multiple of 8) for all splits; cached per process."""
  num, default = SPOKEN_WORDS[check_choice("dataset", name, SPOKEN_WORDS)]
  synth = synthesizer or default
  if synth == "auto":
    synth = "espeak" if espeak_available() else "formant"
  utt = generate_utterances(num, seed=seed, val_fraction=val_fraction,
                            test_fraction=test_fraction, synthesizer=synth)
  labels = [encode_text(t) for t in utt.text]
  max_frames = _round_up(max(num_frames(len(a), features) for a in utt.audio), 8)
  max_label = _round_up(max(len(t) for t in labels), 4)
  chunks = [batch_log_mel(utt.audio[i:i + 64], SAMPLE_RATE, config=features,
                          max_frames=max_frames) for i in range(0, num, 64)]
  x = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
  y = pad_labels(labels, max_label)
  parts = {}
  for code, split in enumerate(("train", "val", "test")):
    idx = np.flatnonzero(utt.split == code)
    parts[f"x_{split}"] = {k: v[idx] for k, v in x.items()}
    parts[f"y_{split}"] = {k: v[idx] for k, v in y.items()}
  info = dict(vocab=VOCAB, blank=BLANK, n_mels=features.n_mels, max_frames=max_frames,
              max_label_length=max_label, sample_rate=SAMPLE_RATE, synthesizer=synth,
              subsampling=SUBSAMPLING,
              texts={s: [utt.text[i] for i in np.flatnonzero(utt.split == c)]
                     for c, s in enumerate(("train", "val", "test"))})
  return Dataset(name=name, num_classes=len(VOCAB), image_shape=None, objective="ctc",
                 info=info, **parts)


for _name, (_num, _) in SPOKEN_WORDS.items():
  register_dataset(_name, functools.partial(load_spoken_words, _name), num_examples=_num,
                   modality="speech")


# --- LibriSpeech through tfds.data_source and grain -------------------------------------

# tfds speech datasets: name -> (audio feature, transcript feature, splits, validation split)
SPEECH_TFDS: dict[str, tuple[str, str, tuple[str, ...], str]] = {
    "librispeech": ("speech", "text", ("train_clean100", "train_clean360", "train_other500",
                                       "dev_clean", "dev_other", "test_clean", "test_other"),
                    "dev_clean"),
}


@contextlib.contextmanager
def _audio_without_tensorflow():
  """tfds 4.9.10's Audio feature calls ``tf.dtypes.as_dtype`` when it is built, so any
  dataset with audio needs TensorFlow even for ``tfds.data_source``
  (github.com/tensorflow/datasets/issues/11233). Without TensorFlow, give that one call
  numpy's dtype while the builder is constructed (the eager decoder never uses it)."""
  if importlib.util.find_spec("tensorflow") is not None:
    yield
    return
  from tensorflow_datasets.core.features import audio_feature  # the optional `data` extra

  shim = types.SimpleNamespace(dtypes=types.SimpleNamespace(as_dtype=np.dtype))
  saved = audio_feature.tf
  audio_feature.tf = shim
  try:
    yield
  finally:
    audio_feature.tf = saved


def _check_split(name: str, split: str) -> None:
  splits = SPEECH_TFDS[name][2]
  for part in str(split).split("+"):
    base = part.split("[")[0].strip()
    if base not in splits:
      raise ValueError(f"unknown split {base!r} of dataset {name!r}; accepted: "
                       f"{', '.join(splits)} (joined with '+', sliced like 'train_clean100[:10%]')")


def open_speech_source(name: str, *, split: str, data_dir=None):
  """A ``tfds.data_source`` over a prepared speech dataset; one-line errors for an unknown
  name or split, missing data (with the ``tfds build`` command) or a sample rate that
  is not :data:`SAMPLE_RATE`."""
  check_choice("speech dataset", name, SPEECH_TFDS)
  _check_split(name, split)
  data_dir = None if data_dir is None else os.path.expanduser(os.fspath(data_dir))
  with _audio_without_tensorflow():
    source = tfds_data.open_source(name, split=split, data_dir=data_dir)
  rate = source.dataset_info.features[SPEECH_TFDS[name][0]].sample_rate
  if rate is not None:
    check_sample_rate(rate)
  return source


def _batch_fn(max_frames: int, max_label: int, config: LogMelConfig):
  def batch_fn(items):
    audios, ids = zip(*items)
    return {"x": batch_log_mel(audios, config.sample_rate, config=config, max_frames=max_frames),
            "y": pad_labels(ids, max_label)}
  return batch_fn


def speech_batches(name: str = "librispeech", *, split: str, data_dir=None,
                   batch_size: int = 32, seed: int = 0, shuffle: bool = True,
                   num_epochs: int | None = 1, max_frames: int = 1600,
                   max_label_length: int = 400, features: LogMelConfig = LogMelConfig(),
                   num_threads: int = 4, prefetch: int = 2) -> Iterator[dict]:
  """Batches ``{"x": {"features", "lengths"}, "y": {"labels", "label_lengths"}}`` of a
  tfds speech dataset, read with ``tfds.data_source`` and grain: a ``seed``-ed shuffle
  (each epoch reshuffled), audio decoded and transcripts turned into character ids in
  ``num_threads`` threads, utterances longer than ``max_frames`` frames (16 s by
  default) or ``max_label_length`` characters skipped, log-mel features computed per
  batch in one jitted call and every batch zero-padded to those fixed sizes (one
  compiled training step for all batches), the last partial batch dropped, ``prefetch``
  batches read ahead in a thread. ``num_epochs`` None repeats forever. The validation
  split of LibriSpeech is ``dev_clean`` (:data:`SPEECH_TFDS`)."""
  import grain  # the optional `data` extra; 0.5 s to import

  for label, value in (("batch_size", batch_size), ("max_frames", max_frames),
                       ("max_label_length", max_label_length), ("num_threads", num_threads)):
    check_int(label, value)
  check_int("prefetch", prefetch, low=0)
  if num_epochs is not None:
    check_int("num_epochs", num_epochs)
  source = open_speech_source(name, split=split, data_dir=data_dir)
  audio_key, text_key = SPEECH_TFDS[name][:2]
  max_samples = (max_frames - 1) * features.hop_length + features.frame_length

  def prepare(example):
    audio = np.asarray(example[audio_key])
    text = example[text_key]
    ids = encode_text(text.decode() if isinstance(text, bytes) else str(text))
    if len(audio) > max_samples or len(ids) > max_label_length:
      return None
    return _as_float(audio), ids

  ds = grain.MapDataset.source(source)
  if shuffle:
    ds = ds.shuffle(seed=seed)
  ds = ds.repeat(num_epochs).map(prepare).filter(lambda item: item is not None)
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                            prefetch_buffer_size=max(1, 2 * num_threads)))
  ds = ds.batch(batch_size, drop_remainder=True,
                batch_fn=_batch_fn(max_frames, max_label_length, features))
  if prefetch:
    ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=prefetch)
  return iter(ds)


def load_librispeech(*, data_dir=None, train_split: str = "train_clean100",
                     val_split: str = "dev_clean", test_split: str = "test_clean",
                     max_examples: int | None = 2000, max_frames: int = 1600,
                     max_label_length: int = 400, seed: int = 0,
                     features: LogMelConfig = LogMelConfig()) -> Dataset:
  """LibriSpeech splits read through :func:`speech_batches` into memory as a
  :class:`Dataset` (objective ``ctc``), at most ``max_examples`` utterances per split
  (a seeded random subset), for :func:`metaopt.tasks.make_task`-style training."""
  if max_examples is not None:
    check_int("max_examples", max_examples)
  parts = {}
  for split, expr in (("train", train_split), ("val", val_split), ("test", test_split)):
    xs, ys, count = [], [], 0
    for batch in speech_batches("librispeech", split=expr, data_dir=data_dir, batch_size=1,
                                seed=seed, shuffle=max_examples is not None,
                                max_frames=max_frames, max_label_length=max_label_length,
                                features=features, prefetch=0):
      xs.append(batch["x"])
      ys.append(batch["y"])
      count += 1
      if max_examples is not None and count >= max_examples:
        break
    if not xs:
      raise ValueError(f"split {expr!r} of 'librispeech' has no utterance within "
                       f"max_frames={max_frames} and max_label_length={max_label_length}")
    parts[f"x_{split}"] = jax.tree.map(lambda *a: np.concatenate(a), *xs)
    parts[f"y_{split}"] = jax.tree.map(lambda *a: np.concatenate(a), *ys)
  info = dict(vocab=VOCAB, blank=BLANK, n_mels=features.n_mels, max_frames=max_frames,
              max_label_length=max_label_length, sample_rate=SAMPLE_RATE,
              subsampling=SUBSAMPLING)
  return Dataset(name="librispeech", num_classes=len(VOCAB), image_shape=None,
                 objective="ctc", info=info, **parts)


# `load_dataset("librispeech")` (what TaskConfig and the experiments read): a seeded
# 2,000-utterance subset of train-clean-100 in memory, dev-clean and test-clean likewise;
# the whole of it streams through speech_batches. num_examples: so that its training split
# counts the 2,000 (split sizes are derived as 60% of the count).
LIBRISPEECH_IN_MEMORY = 2000


def _load_registered_librispeech(*, seed: int = 0, val_fraction: float = 0.2,
                                 test_fraction: float = 0.2) -> Dataset:
  del val_fraction, test_fraction  # LibriSpeech's own dev and test splits
  return load_librispeech(max_examples=LIBRISPEECH_IN_MEMORY, seed=seed)


register_dataset("librispeech", _load_registered_librispeech,
                 num_examples=LIBRISPEECH_IN_MEMORY * 5 // 3 + 1, modality="speech")


__all__ = [
    "BLANK", "SPACE", "VOCAB", "encode_text", "decode_ids", "LogMelConfig", "log_mel",
    "log_mels", "pad_features", "pad_labels", "mel_filterbank", "num_frames",
    "ctc_losses", "ctc_metrics", "greedy_decode", "word_errors", "word_error_rate",
    "transcribe", "SpeechCTC", "make_speech_model", "save_speech_checkpoint",
    "load_speech_checkpoint", "checkpoint_layout", "generate_utterances", "formant_audio",
    "espeak_audio", "read_wav", "load_spoken_words", "speech_batches", "open_speech_source",
    "load_librispeech", "SPEECH_TFDS",
]
