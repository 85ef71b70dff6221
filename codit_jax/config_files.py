"""Config files that start from another one: `sibling_config(__file__, "default.py")`.

Config files are loaded by path (`--config=configs/x.py`), not imported as a
package, so a config that extends configs/default.py loads it by its path too.
"""

import importlib.util
import os

from ml_collections import config_dict


def sibling_config(config_file: str, name: str, *args) -> config_dict.ConfigDict:
  """get_config(*args) of the config file `name` in the folder of `config_file`."""
  path = os.path.join(os.path.dirname(os.path.abspath(config_file)), name)
  spec = importlib.util.spec_from_file_location(f"codit_config_{name.removesuffix('.py')}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(*args)
