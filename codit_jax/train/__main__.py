"""`python -m codit_jax.train --config=configs/sft_demo.py`"""

from codit_jax.train import app

if __name__ == "__main__":
  app.run()
