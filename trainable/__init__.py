"""One trick-configurable training run of a ResNet-vd: config, data, tricks, and the Ray
Train worker loop. Knows nothing of Tune or Optuna.

`import trainable` and its config modules import no torch; the training modules
(`trainable.loop`, `trainable.data`, ...) do, and are imported where they are used.
"""

from trainable.config import ConfigError, TrainConfig
from trainable.config_io import load_config, save_config

__all__ = ["ConfigError", "TrainConfig", "load_config", "save_config"]
