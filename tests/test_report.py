"""codit-report: the page's numbers equal the dataset's, every sampled token is on it, two datasets
side by side, and the page renders in a real headless browser without script errors."""

import html.parser
import io
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from codit_jax import generate as generate_app
from codit_jax import report
from codit_jax.config_files import sibling_config
from codit_jax.errors import CoditError
from codit_jax.report import scan as scan_lib
from codit_jax.report import tokens as tokens_lib

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"


# ------------------------------------------------------------------------------------------ datasets

@pytest.fixture(scope="module")
def demo(tmp_path_factory):
  """The demo dataset in both modes (tiny random pair, 48 prompts), as codit-generate writes it."""
  root = tmp_path_factory.mktemp("report-demo")
  dirs = {}
  for mode in ("codit", "direct"):
    config = sibling_config(str(REPO / "configs" / "demo.py"), "demo.py")
    config.update(dict(mode=mode, output_dir=str(root / mode), compilation_cache_dir="", log_every_seconds=0.0,
                       write_jsonl=False))
    generate_app.generate(config)
    dirs[mode] = str(root / mode)
  return dirs


def _rows(directory) -> dict:
  builder = tfds.builder_from_directory(directory)
  out = {}
  for ex in tfds.as_numpy(builder.as_dataset(split="train", shuffle_files=False)):
    out[ex["id"].decode()] = ex
  return out


def write_dataset(directory: Path, rows, metadata: dict, codit: bool = True) -> str:
  """A TFDS dataset with the (new) codit_logprobs feature, written without the project's writer."""
  spec = {"id": tfds.features.Text(), "instruction": tfds.features.Text(), "response": tfds.features.Text(),
          "finish_reason": tfds.features.Text(),
          "response_tokens": tfds.features.Tensor(shape=(None,), dtype=np.int32),
          "post_logprobs": tfds.features.Tensor(shape=(None,), dtype=np.float32),
          "pre_logprobs": tfds.features.Tensor(shape=(None,), dtype=np.float32),
          "repetitive": tfds.features.Scalar(dtype=np.bool_)}
  if codit:
    spec["codit_logprobs"] = tfds.features.Tensor(shape=(None,), dtype=np.float32)
  features = tfds.features.FeaturesDict(spec)
  directory.mkdir(parents=True, exist_ok=True)
  template = "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"
  lengths = []
  shards = [rows[: len(rows) // 2], rows[len(rows) // 2:]]
  for i, shard in enumerate(shards):
    with tf.io.TFRecordWriter(str(directory / f"codit-train.tfrecord-{i:05d}-of-{len(shards):05d}")) as w:
      for row in shard:
        w.write(features.serialize_example({k: v for k, v in row.items() if k in spec}))
    lengths.append(len(shard))
  split = tfds.core.SplitInfo(
      name="train", shard_lengths=lengths, num_bytes=0,
      filename_template=tfds.core.ShardedFileTemplate(data_dir=str(directory), template=template,
                                                      dataset_name="codit", split="train", filetype_suffix="tfrecord"))
  tfds.folder_dataset.write_metadata(data_dir=str(directory), features=features, split_infos=[split],
                                     filename_template=template, check_data=False,
                                     metadata=tfds.core.MetadataDict(metadata))
  return str(directory)


def synthetic_rows(n: int, seed: int = 0, vocab: int = 40):
  rng = np.random.default_rng(seed)
  rows = []
  for i in range(n):
    k = int(rng.integers(0, 30))
    post = -rng.gamma(2.0, 1.0, k).astype(np.float32)
    pre = (post - rng.normal(0.5, 1.0, k)).astype(np.float32)
    rows.append(dict(id=f"s{i:04d}", instruction=f"say <b>{i}</b> & more", response="x" * k,
                     finish_reason="stop" if i % 3 else "length", repetitive=i % 7 == 0,
                     response_tokens=rng.integers(0, vocab, k).astype(np.int32), post_logprobs=post,
                     pre_logprobs=pre, codit_logprobs=(post - pre - 1.0).astype(np.float32)))
  return rows


# ----------------------------------------------------------------------------------------- page parse

class Page(html.parser.HTMLParser):
  """The page's data-* elements: summary cells, token spans (with their text), top-token rows."""

  def __init__(self, text):
    super().__init__(convert_charrefs=True)
    self.stats, self.settings, self.skipped, self.top, self.cards = {}, {}, {}, [], []
    self._stack, self._token, self._cell = [], None, None
    self.scripts_with_src, self.links = 0, 0
    self.feed(text)

  def handle_starttag(self, tag, attrs):
    a = dict(attrs)
    self._stack.append(tag)
    if tag == "script" and "src" in a:
      self.scripts_with_src += 1
    if tag in ("link", "img", "iframe"):
      self.links += 1
    if "data-stat" in a:
      self._cell = ("stat", a["data-stat"], int(a["data-ds"]), [])
    elif "data-skipped" in a:
      self._cell = ("skipped", a["data-skipped"], int(a["data-ds"]), [])
    if tag == "div" and "data-row" in a:
      self.cards.append({"id": a["data-row"], "ds": int(a["data-ds"]), "tokens": []})
    if tag == "span" and "t" in a.get("class", "").split() and self.cards and "data-i" in a:
      self._token = {"id": int(a["data-i"]), "post": float(a["data-a"]),
                     "pre": float(a["data-b"]) if "data-b" in a else None,
                     "codit": float(a["data-c"]) if "data-c" in a else None, "text": "", "marks": ""}
      self._token_depth = len(self._stack)
    if tag == "tr" and "data-top" in a:
      self.top.append({"kind": a["data-top"], "token": int(a["data-token"])})
    if tag == "td" and "data-mean" in a and self.top:
      self.top[-1]["mean"] = float(a["data-mean"])
    if tag == "i" and self._token is not None:
      self._in_mark = True

  def handle_endtag(self, tag):
    if tag == "i":
      self._in_mark = False
    if self._token is not None and tag == "span" and len(self._stack) == self._token_depth:
      self.cards[-1]["tokens"].append(self._token)
      self._token = None
    if self._cell is not None and tag in ("td", "b"):
      kind, key, ds, parts = self._cell
      {"stat": self.stats, "skipped": self.skipped}[kind][(key, ds)] = "".join(parts)
      self._cell = None
    if self._stack:
      self._stack.pop()

  def handle_data(self, data):
    if self._token is not None:
      if getattr(self, "_in_mark", False):
        self._token["marks"] += data
      else:
        self._token["text"] += data
    if self._cell is not None:
      self._cell[3].append(data)


def _visible(piece: str) -> str:
  return piece.translate({i: chr(0x2400 + i) for i in range(32) if i not in (9, 10)} | {127: "\u2421"})


@pytest.fixture(scope="module")
def one_page(demo, tmp_path_factory):
  out = tmp_path_factory.mktemp("report-page") / "one.html"
  result = report.build_report(demo["codit"], out=str(out), samples=6, seed=3, min_count=3)
  return out, Page(out.read_text()), result


@pytest.fixture(scope="module")
def two_page(demo, tmp_path_factory):
  out = tmp_path_factory.mktemp("report-page2") / "two.html"
  report.build_report(demo["codit"], demo["direct"], out=str(out), samples=5, seed=1)
  return out, Page(out.read_text())


# --------------------------------------------------------------------------------------------- tests

def test_summary_numbers_equal_the_dataset(demo, one_page):
  _, page, _ = one_page
  rows = _rows(demo["codit"])
  lengths = np.array([len(r["response_tokens"]) for r in rows.values()])
  finish = Counter(r["finish_reason"].decode() for r in rows.values())
  repetitive = sum(bool(r["repetitive"]) for r in rows.values())
  stat = lambda key: page.stats[(key, 0)]  # noqa: E731
  assert stat("rows") == str(len(rows)) == "48"
  assert stat("tokens") == str(lengths.sum())
  for reason, count in finish.items():
    assert stat(f"finish_{reason}") == f"{count} ({100 * count / len(rows):.1f}%)"
  assert stat("repetitive_fraction") == f"{100 * repetitive / len(rows):.1f}% ({repetitive})"
  assert stat("mean_length") == f"{lengths.mean():.1f}"
  for q in (10, 25, 50, 75, 90, 99):
    assert stat(f"length_p{q}") == str(int(np.percentile(lengths, q, method="lower")))
  assert stat("length_max") == str(lengths.max()) and stat("length_min") == str(lengths.min())
  post = np.concatenate([r["post_logprobs"] for r in rows.values()]).astype(np.float64)
  pre = np.concatenate([r["pre_logprobs"] for r in rows.values()]).astype(np.float64)
  assert stat("mean_post") == f"{post.mean():.3f}"
  assert stat("mean_contrast") == f"{(post - pre).mean():.3f}"
  if any("codit_logprobs" in r for r in rows.values()):
    codit = np.concatenate([r["codit_logprobs"] for r in rows.values()]).astype(np.float64)
    assert stat("mean_codit") == f"{codit.mean():.3f}"
  else:  # datasets written before codit_logprobs was recorded
    assert stat("mean_codit").startswith("—")
  meta = tfds.builder_from_directory(demo["codit"]).info.metadata
  text = one_page[0].read_text()
  for key in ("post_trained", "pre_trained"):
    assert f'data-setting="{key}" data-ds="0">{meta[key]}<' in text
  assert 'data-setting="alpha" data-ds="0">0.01<' in text


def test_every_sampled_token_is_on_the_page_with_its_logprobs(demo, one_page):
  _, page, result = one_page
  rows = _rows(demo["codit"])
  assert len(page.cards) == 6
  expected_ids = sorted(rows, key=lambda i: scan_lib.sample_key(3, i))[:6]
  assert [c["id"] for c in page.cards] == expected_ids  # the seeded sample: the 6 smallest keys
  pieces = tokens_lib.load_pieces("builtin:demo-post")
  assert pieces.available
  for card in page.cards:
    row = rows[card["id"]]
    assert [t["id"] for t in card["tokens"]] == row["response_tokens"].tolist()
    np.testing.assert_allclose([t["post"] for t in card["tokens"]], row["post_logprobs"], atol=6e-5)
    np.testing.assert_allclose([t["pre"] for t in card["tokens"]], row["pre_logprobs"], atol=6e-5)
    if "codit_logprobs" in row:
      np.testing.assert_allclose([t["codit"] for t in card["tokens"]], row["codit_logprobs"], atol=6e-5)
    else:
      assert all(t["codit"] is None for t in card["tokens"])
    # The pieces, joined, are the decoded response (control characters shown as their symbols).
    joined = "".join(t["text"] for t in card["tokens"])
    decoded = pieces.tokenizer.decode(row["response_tokens"].tolist(), skip_special_tokens=False,
                                      clean_up_tokenization_spaces=False)
    assert joined == _visible(decoded)
  assert result["datasets"][0].stats.rows == 48


def test_ids_choose_the_sample_and_seed_is_deterministic(demo, tmp_path):
  a = report.build_report(demo["codit"], out=str(tmp_path / "a.html"), ids=["demo-005", "demo-001", "nope"])
  assert [r.id for r in a["datasets"][0].samples] == ["demo-005", "demo-001"]
  b1 = scan_lib.scan(demo["codit"], num_samples=4, seed=9)
  b2 = scan_lib.scan(demo["codit"], num_samples=4, seed=9)
  assert [r.id for r in b1.samples] == [r.id for r in b2.samples]


def test_top_tokens_are_per_token_means_over_the_whole_dataset(demo, one_page):
  _, page, _ = one_page
  sums, counts = Counter(), Counter()
  for r in _rows(demo["codit"]).values():
    for t, c in zip(r["response_tokens"].tolist(), (r["post_logprobs"].astype(np.float64) - r["pre_logprobs"])):
      sums[t] += c
      counts[t] += 1
  means = {t: sums[t] / counts[t] for t in counts if counts[t] >= 3}
  ranked = sorted(means, key=lambda t: (-means[t], t))
  hi = [r for r in page.top if r["kind"] == "hi"]
  lo = [r for r in page.top if r["kind"] == "lo"]
  assert [r["token"] for r in hi] == ranked[:25]
  assert [r["token"] for r in lo] == sorted(means, key=lambda t: (means[t], t))[:25]
  for r in hi + lo:
    assert r["mean"] == pytest.approx(means[r["token"]], abs=2e-6)


def test_two_datasets_side_by_side(demo, two_page):
  out, page = two_page
  codit, direct = _rows(demo["codit"]), _rows(demo["direct"])
  assert page.stats[("rows", 0)] == str(len(codit)) and page.stats[("rows", 1)] == str(len(direct))
  for reason, count in Counter(r["finish_reason"].decode() for r in direct.values()).items():
    assert page.stats[(f"finish_{reason}", 1)].startswith(f"{count} (")
  left = [c for c in page.cards if c["ds"] == 0]
  right = [c for c in page.cards if c["ds"] == 1]
  assert len(left) == len(right) == 5 and [c["id"] for c in left] == [c["id"] for c in right]
  for card in right:
    assert [t["id"] for t in card["tokens"]] == direct[card["id"]]["response_tokens"].tolist()
    assert all(t["pre"] is None for t in card["tokens"])  # direct mode: no pre log-probs
  text = out.read_text()
  assert text.count("fill-opacity=\"0.5\"") > 0  # the overlaid length histograms
  assert "shaded by the post-trained log-prob" in text and page.stats[("mean_contrast", 1)].startswith("—")


def test_codit_logprobs_and_skipped_inputs_are_used_when_present(tmp_path):
  rows = synthetic_rows(60)
  meta = {"post_trained": str(tmp_path / "no-such-model"), "pre_trained": "x", "mode": "codit", "alpha": 0.1,
          "beta": 1.0, "skipped_inputs": {"too_long": 3, "bad_json": 1}}
  directory = write_dataset(tmp_path / "ds", rows, meta)
  out = tmp_path / "r.html"
  report.build_report(directory, out=str(out), samples=60, min_count=1)
  text = out.read_text()
  page = Page(text)
  assert page.skipped[("too_long", 0)] == "3" and page.skipped[("bad_json", 0)] == "1"
  by_id = {r["id"]: r for r in rows}
  assert len(page.cards) == 60
  for card in page.cards:
    row = by_id[card["id"]]
    np.testing.assert_allclose([t["codit"] for t in card["tokens"]], row["codit_logprobs"], atol=6e-5)
    assert [t["text"] for t in card["tokens"]] == [f"[{i}]" for i in row["response_tokens"]]
  codit = np.concatenate([r["codit_logprobs"] for r in rows]).astype(np.float64)
  assert page.stats[("mean_codit", 0)] == f"{codit.mean():.3f}"
  assert "could not be loaded" in text and "shown as ids" in text
  assert "&lt;b&gt;" in text and "<b>0</b>" not in text  # instructions are escaped


def test_page_is_self_contained(one_page, two_page):
  for out, page in (one_page[:2], two_page):
    text = out.read_text()
    assert page.scripts_with_src == 0 and page.links == 0
    urls = set(re.findall(r"https?://[^\s\"'<>]+", text)) - {"http://www.w3.org/2000/svg"}
    assert not urls, urls
    assert "<style>" in text and "data-report-ready" in text


def test_progress_bar_on_a_terminal():
  class Tty(io.StringIO):
    def isatty(self):
      return True
  stream = Tty()
  bar = scan_lib.Progress("reading A", 1000, stream=stream, after_seconds=0.0)
  bar.update(500, force=True)
  bar.close(1000)
  assert "500/1000 rows  50.0%" in stream.getvalue() and "1000/1000" in stream.getvalue()


def test_errors_say_what_to_fix(tmp_path):
  with pytest.raises(CoditError, match="missing' does not exist. Give the output_dir"):
    report.build_report(str(tmp_path / "missing"), out=str(tmp_path / "r.html"))
  (tmp_path / "notes").mkdir()
  with pytest.raises(CoditError, match="not a readable TFDS dataset"):
    report.build_report(str(tmp_path / "notes"), out=str(tmp_path / "r.html"))


def test_cli_writes_the_page(demo, tmp_path):
  out = tmp_path / "cli.html"
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu")
  run = subprocess.run([sys.executable, "-m", "codit_jax.report", demo["codit"], demo["direct"], f"--out={out}",
                        "--ids=demo-002,demo-003"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-2000:]
  assert "codit-report: wrote" in run.stdout
  assert not [line for line in run.stderr.splitlines() if "dataset_info.py" in line or "I0000" in line], run.stderr
  assert [c["id"] for c in Page(out.read_text()).cards] == ["demo-002", "demo-002", "demo-003", "demo-003"]
  bad = subprocess.run([sys.executable, "-m", "codit_jax.report", str(tmp_path / "nope"), f"--out={out}"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert bad.returncode == 1 and "codit-report: error:" in bad.stderr and "Traceback" not in bad.stderr
  assert "does not exist" in bad.stderr and "oneDNN" not in bad.stderr, bad.stderr
  unknown = subprocess.run([sys.executable, "-m", "codit_jax.report", demo["codit"], f"--out={out}",
                            "--ids=demo-002,no-such-id"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert unknown.returncode == 0 and "warning: 1 of the --ids are not in" in unknown.stderr, unknown.stderr
  usage = subprocess.run([sys.executable, "-m", "codit_jax.report", "--help"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=300)
  assert usage.returncode == 0 and "codit-report OUTPUT_DIR [OTHER_DIR]" in usage.stdout and "--samples: How" in usage.stdout


# ------------------------------------------------------------------------------------ headless browser

def _chromium(args, tmp_path, timeout=120):
  profile = tmp_path / f"chromium-profile-{len(list(tmp_path.iterdir()))}"
  command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--hide-scrollbars", f"--user-data-dir={profile}", *args]
  return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


@pytest.mark.skipif(not os.path.exists(CHROMIUM),
                    reason=f"{CHROMIUM} is absent (apt-get install chromium; .ci/run installs it): the page "
                           "was not opened in a real browser")
def test_page_renders_in_headless_chromium(two_page, one_page, tmp_path):
  for out, page in (one_page[:2], two_page):
    shot = tmp_path / (out.stem + ".png")
    run = _chromium(["--window-size=1200,1600", f"--screenshot={shot}", out.as_uri()], tmp_path)
    assert shot.exists() and shot.stat().st_size > 10_000, run.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    dom = _chromium(["--dump-dom", out.as_uri()], tmp_path).stdout
    head = dom[:dom.index("<head>")]
    assert 'data-report-ready="1"' in head, head
    assert "data-script-errors" not in head, head
    expected_tokens = sum(len(c["tokens"]) for c in page.cards)
    assert f'data-token-count="{expected_tokens}"' in head and expected_tokens > 0
  # The check is not vacuous: a script error on the page is caught and shows in the DOM.
  broken = tmp_path / "broken.html"
  broken.write_text(one_page[0].read_text().replace("</body>", "<script>noSuchFunction();</script></body>"))
  head = _chromium(["--dump-dom", broken.as_uri()], tmp_path).stdout.split("<head>")[0]
  assert 'data-script-errors="1"' in head and "noSuchFunction" in head
