"""Speech: CTC and word error rate, log-mel features, the recognizer, its checkpoints, the
spoken-word stand-in and the LibriSpeech pipeline on tfds mock data."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tensorflow_datasets as tfds

import metaopt.tasks.speech as speech
from metaopt.tasks import TaskConfig, make_task
from metaopt.train import train_grid


def ids(texts, size=24):
  return speech.pad_labels([speech.encode_text(t) for t in texts], size)


def test_word_error_rate_on_hand_written_hypotheses():
  refs = ["one two three", "yes no", "go", "a b c d", "stop", ""]
  hyps = ["one too three four", "no", "", "a x c d e", "stop", "up"]
  # substitution + insertion, deletion, deletion, substitution + insertion, exact, insertion
  expected = [2, 1, 1, 2, 0, 1]
  r, h = ids(refs), ids(hyps)
  errors, words = jax.jit(speech.word_errors)(r["labels"], r["label_lengths"], h["labels"],
                                              h["label_lengths"])
  assert errors.tolist() == expected
  assert words.tolist() == [3, 2, 1, 4, 1, 0]
  assert speech.word_error_rate(refs, hyps) == pytest.approx(7 / 11)
  # The jitted WER agrees with the host one on random word sequences.
  rng = np.random.default_rng(0)
  pick = lambda: " ".join(rng.choice(["on", "off", "one", "no", "go"], rng.integers(0, 5)))
  refs, hyps = [pick() for _ in range(20)], [pick() for _ in range(20)]
  r, h = ids(refs), ids(hyps)
  errors, words = jax.jit(speech.word_errors)(r["labels"], r["label_lengths"], h["labels"],
                                              h["label_lengths"])
  assert errors.sum() / max(1, words.sum()) == pytest.approx(speech.word_error_rate(refs, hyps))
  with pytest.raises(ValueError, match="2 references but 1 hypotheses"):
    speech.word_error_rate(["a", "b"], ["a"])


def test_greedy_decoding_and_ctc_loss():
  a, b, space = speech.CHAR_IDS["a"], speech.CHAR_IDS["b"], speech.SPACE
  path = jnp.array([[a, a, 0, a, space, b, b, 0, b, b]])
  paddings = jnp.zeros((1, 10)).at[0, 8:].set(1.0)  # the last two frames are padding
  logits = 8.0 * jax.nn.one_hot(path, len(speech.VOCAB))
  assert speech.transcribe(logits, paddings) == ["aa b"]
  objective = jax.jit(lambda y: (speech.ctc_losses((logits, paddings), y),
                                 speech.ctc_metrics((logits, paddings), y)))
  loss_right, right = objective(ids(["aa b"], 10))
  loss_wrong, wrong = objective(ids(["ab ba"], 10))
  assert np.isfinite(loss_right).all() and 0.0 <= float(loss_right[0]) < 0.1
  assert float(loss_wrong[0]) > 10 * float(loss_right[0])
  assert float(right["wer"]) == 0.0 and float(right["accuracy"]) == 1.0
  assert float(wrong["wer"]) == 1.0 and float(wrong["accuracy"]) == 0.0
  _, metrics = objective(ids(["aa c d e"], 10))
  assert float(metrics["wer"]) == pytest.approx(3 / 4)  # 1 substitution, 2 deletions


def test_log_mel_features():
  config = speech.LogMelConfig()
  t = np.arange(16000) / 16000
  tone = np.sin(2 * np.pi * 440 * t).astype(np.float32)
  batch = speech.batch_log_mel([tone, (tone[:8000] * 32767).astype(np.int16)], 16000,
                               max_frames=104)
  assert batch["features"].shape == (2, 104, config.n_mels)
  assert batch["features"].dtype == np.float32 and np.isfinite(batch["features"]).all()
  assert batch["lengths"].tolist() == [speech.num_frames(16000), speech.num_frames(8000)]
  assert batch["lengths"].tolist() == [98, 48]
  assert not batch["features"][1, 48:].any()  # padded frames are zero
  one = speech.log_mel(tone, 16000)
  np.testing.assert_allclose(one, batch["features"][0, :98], atol=1e-4)
  # The 440 Hz tone's energy sits in the band around 440 Hz.
  raw = speech.log_mel(tone, 16000, config._replace(normalize=False))
  centers = speech.mel_filterbank(config).argmax(0) * 16000 / config.n_fft
  assert abs(centers[raw.mean(0).argmax()] - 440) < 100
  with pytest.raises(ValueError, match="sample rate 8000 Hz does not match.*16000 Hz"):
    speech.batch_log_mel([tone], 8000)
  with pytest.raises(ValueError, match="98 frames, more than max_frames=50"):
    speech.batch_log_mel([tone], 16000, max_frames=50)


@functools.partial(jax.jit, static_argnames=("config", "frames"))
def _padded_log_mel(audio, num_samples, config, frames):
  """The former feature computation (every frame of the padded [B, S] audio transformed),
  kept as the reference for the packed one."""
  window = jnp.asarray(np.hanning(config.frame_length + 1)[:-1], jnp.float32)
  hop, k = config.hop_length, -(-config.frame_length // config.hop_length)
  blocks = jnp.pad(audio, ((0, 0), (0, (frames + k - 1) * hop - audio.shape[1])))
  blocks = blocks.reshape(audio.shape[0], frames + k - 1, hop)
  framed = jnp.concatenate([blocks[:, j:j + frames] for j in range(k)], axis=-1)
  spectrum = jnp.fft.rfft(framed[..., :config.frame_length] * window, n=config.n_fft)
  power = spectrum.real ** 2 + spectrum.imag ** 2
  mel = jnp.log(power @ jnp.asarray(speech.mel_filterbank(config)) + 1e-6)
  lengths = 1 + jnp.maximum(0, num_samples - config.frame_length) // config.hop_length
  valid = (jnp.arange(frames)[None, :] < lengths[:, None])[..., None]
  if config.normalize:
    count = lengths[:, None, None].astype(jnp.float32)
    mean = jnp.sum(jnp.where(valid, mel, 0.0), axis=1, keepdims=True) / count
    var = jnp.sum(jnp.where(valid, jnp.square(mel - mean), 0.0), axis=1, keepdims=True) / count
    mel = (mel - mean) / (jnp.sqrt(var) + 1e-3)
  return jnp.where(valid, mel, 0.0), lengths.astype(jnp.int32)


def padded_reference(audios, config, frames):
  floats = [speech._as_float(a) for a in audios]
  buf = np.zeros((len(floats), (frames - 1) * config.hop_length + config.frame_length),
                 np.float32)
  for i, a in enumerate(floats):
    buf[i, :min(len(a), buf.shape[1])] = a[:buf.shape[1]]
  num_samples = np.asarray([min(len(a), buf.shape[1]) for a in floats], np.int32)
  features, lengths = _padded_log_mel(buf, num_samples, config, frames)
  return np.asarray(features), np.asarray(lengths)


def test_packed_features_match_the_padded_computation():
  """Features computed over the real frames only (utterances packed back to back) equal
  the former computation over the whole padded batch, and padded frames stay zero."""
  audio = speech.generate_utterances(12, seed=5).audio
  rng = np.random.default_rng(0)
  audio += [rng.standard_normal(100).astype(np.float32),  # shorter than one frame
            (rng.standard_normal(4321) * 3000).astype(np.int16),  # 16-bit PCM
            np.zeros(560, np.float32)]  # silence, exactly 2 frames
  config = speech.LogMelConfig()
  frames = speech._round_up(max(speech.num_frames(len(a)) for a in audio), 8) + 16
  full = [rng.standard_normal((frames - 1) * 160 + 400 + i).astype(np.float32)
          for i in range(3)]  # no padding at all: packed as many frames as padded
  cases = [(config, b) for b in (audio, audio[:3], audio[-5:], full)]  # several packed sizes
  cases += [(config._replace(normalize=False), audio), (config._replace(n_fft=512), audio[:3])]
  for cfg, batch in cases:
    got = speech.batch_log_mel(batch, 16000, config=cfg, max_frames=frames)
    want, lengths = padded_reference(batch, cfg, frames)
    assert got["features"].shape == want.shape == (len(batch), frames, cfg.n_mels)
    assert got["lengths"].tolist() == lengths.tolist() == [
        speech.num_frames(len(a)) for a in batch]
    np.testing.assert_allclose(got["features"], want, rtol=1e-5, atol=1e-5)
    for f, n in zip(got["features"], got["lengths"]):
      assert not f[n:].any() and np.isfinite(f).all()  # padded frames are masked
      assert n < 3 or f[:n].any()
  assert speech.batch_log_mel(audio[:4], 16000)["features"].shape[1] == speech._round_up(
      max(speech.num_frames(len(a)) for a in audio[:4]), 8)
  # Packed frame counts are rounded up to 8 sizes per doubling: at most 12.5% extra work
  # and few distinct compiled shapes.
  sizes = [speech._frame_bucket(n) for n in range(1, 5000)]
  assert all(n <= b <= max(8, 1.125 * n) for n, b in zip(range(1, 5000), sizes))
  assert len(set(sizes[2048:4095])) == 8


def test_generator_is_deterministic_and_transcripts_consistent():
  a = speech.generate_utterances(20, seed=3)
  b = speech.generate_utterances(20, seed=3)
  c = speech.generate_utterances(20, seed=4)
  assert a.text == b.text and all(np.array_equal(x, y) for x, y in zip(a.audio, b.audio))
  assert a.text != c.text
  assert np.bincount(a.split).tolist() == [12, 4, 4]
  for text, who, split in zip(a.text, a.speaker, a.split):
    words = text.split()
    assert 1 <= len(words) <= speech.MAX_WORDS and set(words) <= set(speech.WORDS)
    test_speaker = who >= speech.NUM_SPEAKERS - speech.TEST_SPEAKERS
    assert test_speaker == (split == 2)
    held = any(speech._held_out_pair(speech.WORDS.index(x), speech.WORDS.index(y))
               for x, y in zip(words, words[1:]))
    assert not held or split == 2  # held-out word pairs only in test
    assert speech.decode_ids(speech.encode_text(text)) == text
  assert all(x.dtype == np.float32 and 0.3 < len(x) / 16000 < 3 for x in a.audio)


@pytest.mark.skipif(not speech.espeak_available(), reason="espeak-ng is not installed")
def test_espeak_synthesizer():
  u = speech.generate_utterances(4, seed=0, synthesizer="espeak")
  assert all(len(x) > 1600 and np.abs(x).max() > 0.01 for x in u.audio)
  again = speech.generate_utterances(4, seed=0, synthesizer="espeak")
  assert all(np.array_equal(x, y) for x, y in zip(u.audio, again.audio))


def test_espeak_missing_is_one_line(monkeypatch):
  monkeypatch.setattr(speech.shutil, "which", lambda name: None)
  with pytest.raises(FileNotFoundError, match="espeak-ng binary.*apt-get install espeak-ng"):
    speech.generate_utterances(2, synthesizer="espeak")
  # A header from a stream (no frame count) still gives the samples.
  import io
  import wave
  buf = io.BytesIO()
  with wave.open(buf, "wb") as w:
    w.setnchannels(1), w.setsampwidth(2), w.setframerate(22050)
    w.writeframes((np.arange(100, dtype=np.int16) * 100).tobytes())
  audio, rate = speech.read_wav(buf.getvalue())
  assert rate == 22050 and len(audio) == 100 and audio[1] == pytest.approx(100 / 32768)
  assert len(speech.resample(audio, 22050, 16000)) == 73


def tiny_batch():
  rng = np.random.default_rng(0)
  x = {"features": rng.standard_normal((2, 40, 8)).astype(np.float32),
       "lengths": np.array([40, 22], np.int32)}
  return x, ids(["ab c", "b"], 6)


def test_model_forward_backward_padding_and_checkpoints(tmp_path):
  model = speech.make_speech_model(width=16, depth=1, vocab_size=len(speech.VOCAB))
  x, y = tiny_batch()
  params = jax.jit(model.init)(jax.random.PRNGKey(0), x)["params"]

  def loss(p, x):
    outputs = model.apply({"params": p}, x)
    return speech.ctc_losses(outputs, y).mean(), outputs

  value_and_grad = jax.jit(jax.value_and_grad(loss, has_aux=True))
  (value, (logits, paddings)), grads = value_and_grad(params, x)
  assert logits.shape == (2, 10, len(speech.VOCAB)) and logits.dtype == jnp.float32
  assert paddings[1].tolist() == [0.0] * 6 + [1.0] * 4  # 22 frames -> 11 -> 6
  assert np.isfinite(value) and value > 0
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
  assert all(np.abs(g).max() > 0 for g in jax.tree.leaves(grads))
  # Padded frames do not change the loss: garbage after utterance 1's 22 frames.
  noisy = dict(x, features=x["features"].copy())
  noisy["features"][1, 22:] = 100.0
  assert float(value_and_grad(params, noisy)[0][0]) == pytest.approx(float(value), rel=1e-5)
  noisy["features"][1, 21] += 1.0  # a real frame does
  assert float(value_and_grad(params, noisy)[0][0]) != pytest.approx(float(value), rel=1e-5)

  # bfloat16 compute keeps float32 weights and gives float32 logits; off on the CPU.
  bf16 = speech.make_speech_model(width=16, depth=1, compute_dtype=jnp.bfloat16)
  out = jax.eval_shape(lambda p: bf16.apply({"params": p}, x), params)
  assert bf16.dtype == jnp.bfloat16 and out[0].dtype == jnp.float32
  assert speech.default_compute_dtype() == jnp.float32

  # Checkpoints: both formats round-trip; a model of another size is refused with one line.
  for name in ("ckpt.safetensors", "ckpt.npz"):
    path = speech.save_speech_checkpoint(tmp_path / name, params)
    back = speech.load_speech_checkpoint(path, jax.tree.map(jnp.zeros_like, params))
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(back),
                                                    jax.tree.leaves(params)))
  shapes = lambda width, depth: jax.eval_shape(
      speech.make_speech_model(width=width, depth=depth).init, jax.random.PRNGKey(0), x)["params"]
  with pytest.raises(ValueError, match=r"does not match the model: key 'conv0/bias' has shape "
                                       r"\(16,\), the model expects \(32,\)"):
    speech.load_speech_checkpoint(tmp_path / "ckpt.npz", shapes(32, 1))
  with pytest.raises(ValueError, match="missing key 'layer1_attention/key/bias'"):
    speech.load_speech_checkpoint(tmp_path / "ckpt.safetensors", shapes(16, 2))
  with pytest.raises(ValueError, match="unexpected key 'layer0_attention/"):
    speech.load_speech_checkpoint(tmp_path / "ckpt.npz", shapes(16, 0))
  assert "head/kernel" in speech.checkpoint_layout(params)
  with pytest.raises(ValueError, match="must end in .safetensors or .npz"):
    speech.save_speech_checkpoint(tmp_path / "ckpt.msgpack", params)


def test_make_task_and_train_grid_on_the_stand_in():
  task = make_task(TaskConfig("spoken_words_small", "speech_ctc", width=16, depth=1,
                              batch_size=8, total_steps=4, seed=0))
  data = task.data
  assert data.objective == "ctc" and data.info["vocab"] == speech.VOCAB
  assert data.x_train["features"].shape[1:] == (data.info["max_frames"], 40)
  assert len(data.info["texts"]["test"]) == data.num_examples("test") == 48
  first = data.y_test["labels"][0, :data.y_test["label_lengths"][0]]
  assert speech.decode_ids(first) == data.info["texts"]["test"][0]
  result, _ = train_grid(task, lambda h: optax.adam(h), jnp.array([3e-3]),
                         jax.random.PRNGKey(0)[None], steps=4, eval_every=2)
  assert result.train_loss.shape == (1, 4) and np.isfinite(result.train_loss).all()
  assert result.test_accuracy.shape == (1, 3)
  assert ((0 <= result.test_accuracy) & (result.test_accuracy <= 1)).all()


@pytest.fixture
def mock_librispeech():
  with tfds.testing.mock_data(num_examples=10):
    yield


def test_librispeech_pipeline_on_mock_data(mock_librispeech):
  kw = dict(split="train_clean100", batch_size=4, max_frames=16, max_label_length=64,
            num_threads=2)
  batches = list(speech.speech_batches("librispeech", seed=1, **kw))
  assert len(batches) == 2  # 10 examples, the partial batch dropped
  x, y = batches[0]["x"], batches[0]["y"]
  assert x["features"].shape == (4, 16, 40) and x["features"].dtype == np.float32
  assert x["lengths"].dtype == np.int32 and (x["lengths"] >= 1).all()
  assert y["labels"].shape == (4, 64) and y["labels"].dtype == np.int32
  assert (y["label_lengths"] > 0).all() and np.isfinite(x["features"]).all()
  again = list(speech.speech_batches("librispeech", seed=1, **kw))
  other = list(speech.speech_batches("librispeech", seed=2, **kw))
  same = lambda u, v: all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(u),
                                                               jax.tree.leaves(v)))
  assert same(batches, again) and not same(batches, other)
  val = list(speech.speech_batches("librispeech", split=speech.SPEECH_TFDS["librispeech"][3],
                                   batch_size=5, shuffle=False, max_frames=16,
                                   max_label_length=64, num_threads=1, prefetch=0))
  assert len(val) == 2 and val[0]["x"]["features"].shape == (5, 16, 40)
  two = list(speech.speech_batches("librispeech", num_epochs=2, **kw))
  assert len(two) == 5
  with pytest.raises(ValueError, match="unknown split 'validation' of dataset 'librispeech'"):
    speech.speech_batches("librispeech", split="validation")
  with pytest.raises(ValueError, match="unknown speech dataset 'timit'; accepted: librispeech"):
    speech.speech_batches("timit", split="train")


def test_librispeech_missing_data_names_the_command(tmp_path):
  with pytest.raises(FileNotFoundError, match="tfds build librispeech --data_dir"):
    speech.speech_batches("librispeech", split="dev_clean", data_dir=tmp_path)
