"""One trick-configurable training run of a ResNet-vd: config, data, tricks, and the Ray
Train worker loop. Knows nothing of Tune or Optuna."""

from trainable.config import ConfigError, TrainConfig, load_config, save_config
from trainable.syncbn import SyncBatchNorm, convert_sync_batchnorm

__all__ = ["ConfigError", "SyncBatchNorm", "TrainConfig", "convert_sync_batchnorm", "load_config", "save_config"]
