"""python -m codit_jax.report OUTPUT_DIR [OTHER_DIR] --out=report.html"""

from codit_jax.report import run

run()
