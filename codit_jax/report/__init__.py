"""codit-report: one self-contained HTML page to look at a dataset, and at what the contrast changed.

    codit-report OUTPUT_DIR [OTHER_DIR] --out=report.html [--samples=8 --seed=0 | --ids=a,b]

Streams each dataset once with tf.data (bounded memory), shades a sample of
responses token by token by log p_post - log p_pre, ranks token ids by mean
contrast over the whole dataset, and with OTHER_DIR puts the same ids of both
datasets side by side. The page has no network fetches: styles, script and SVG
plots are inline.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from codit_jax.errors import CoditError

__all__ = ["build_report", "run"]


def build_report(directory: str, other: str | None = None, *, out: str = "report.html", samples: int = 8,
                 seed: int = 0, ids: list[str] | None = None, top_k: int = 25, min_count: int = 5,
                 progress_stream=None) -> dict:
  """Reads the dataset(s), writes the page to `out`; returns what was read (for the caller's log)."""
  from codit_jax import __version__  # pylint: disable=g-import-not-at-top
  from codit_jax.report import page, scan, tokens  # pylint: disable=g-import-not-at-top
  primary = scan.scan(directory, num_samples=samples, seed=seed, ids=ids or None, label="A" if other else None,
                      progress_stream=progress_stream)
  second = None
  if other:
    second = scan.scan(other, ids=[r.id for r in primary.samples], label="B", progress_stream=progress_stream)
  pieces = tokens.load_pieces(primary.metadata.get("post_trained"))
  other_pieces = None
  if second is not None:
    same = second.metadata.get("post_trained") == primary.metadata.get("post_trained")
    other_pieces = pieces if same else tokens.load_pieces(second.metadata.get("post_trained"))
  text = page.render(primary, second, pieces, other_pieces, top_k=top_k, min_count=min_count,
                     version=__version__)
  path = Path(out)
  if path.parent and not path.parent.exists():
    path.parent.mkdir(parents=True, exist_ok=True)
  temporary = path.with_name(path.name + ".tmp")
  temporary.write_text(text, encoding="utf-8")
  os.replace(temporary, path)
  return {"out": str(path), "bytes": len(text.encode()), "datasets": [primary] + ([second] if second else [])}


def main(argv) -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top

  from codit_jax import runtime  # pylint: disable=g-import-not-at-top
  runtime.quiet_console()
  FLAGS = flags.FLAGS  # pylint: disable=invalid-name
  if len(argv) not in (2, 3):
    from absl import app  # pylint: disable=g-import-not-at-top
    raise app.UsageError("give one dataset folder, or two to compare: codit-report OUTPUT_DIR [OTHER_DIR] "
                         "--out=report.html")
  ids = [i.strip() for i in FLAGS.ids.split(",") if i.strip()] if FLAGS.ids else None
  if FLAGS.samples < 0 or FLAGS.top_k < 0 or FLAGS.min_count < 1:
    print("codit-report: error: --samples and --top_k must be >= 0 and --min_count >= 1.", file=sys.stderr)
    sys.exit(2)
  try:
    result = build_report(argv[1], argv[2] if len(argv) == 3 else None, out=FLAGS.out, samples=FLAGS.samples,
                          seed=FLAGS.seed, ids=ids, top_k=FLAGS.top_k, min_count=FLAGS.min_count)
  except CoditError as e:
    print(f"codit-report: error: {e}", file=sys.stderr)
    sys.exit(1)
  missing = [i for i in ids or [] if i not in {r.id for r in result["datasets"][0].samples}]
  if missing:
    print(f"codit-report: warning: {len(missing)} of the --ids are not in {argv[1]}: {', '.join(missing[:5])}",
          file=sys.stderr)
  rows = ", ".join(f"{d.directory}: {d.stats.rows} rows in {d.seconds:.1f}s" for d in result["datasets"])
  print(f"codit-report: wrote {result['out']} ({result['bytes'] / 1024:.0f} KiB; {rows}).")


def _define_flags() -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  if "out" in flags.FLAGS:
    return
  flags.DEFINE_string("out", "report.html", "Where to write the page.")
  flags.DEFINE_integer("samples", 8, "How many responses to draw token by token (a seeded sample).")
  flags.DEFINE_integer("seed", 0, "Seed of the sample (the same seed picks the same ids, whatever the shard order).")
  flags.DEFINE_string("ids", "", "Comma-separated ids to draw instead of a seeded sample.")
  flags.DEFINE_integer("top_k", 25, "How many token ids to list with the largest and the smallest mean contrast.")
  flags.DEFINE_integer("min_count", 5, "Only token ids emitted at least this often are ranked.")


def run() -> None:
  """Console script entry point (codit-report)."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  from absl import app  # pylint: disable=g-import-not-at-top

  from absl import flags  # pylint: disable=g-import-not-at-top

  from codit_jax import runtime  # pylint: disable=g-import-not-at-top
  _define_flags()
  usage = f"{__doc__}\n{flags.FLAGS.module_help(__name__)}"  # these flags are this module's, not __main__'s
  if any(arg in runtime.HELP_ARGS for arg in sys.argv[1:]):
    print(usage)  # absl's own --help exits 1
    sys.exit(0)
  runtime.import_tensorflow_quietly()  # it reads with tf.data; TensorFlow's native start-up lines dropped
  app.run(main)


if __name__ == "__main__":
  run()
