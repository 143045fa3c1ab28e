"""Search spaces: one YAML file, three sections, validated completely before a search starts.

```yaml
experiment:            # how the search runs (ExperimentSettings)
  name: quickstart
  metric: val_acc
  ...
train:                 # the base TrainConfig: any subset, defaults fill the rest
  ...
search:                # distributions over TrainConfig key paths, in dependency order
  mix.mode: {choice: [none, mixup, cutmix, mixup_cutmix]}
  mix.mixup_alpha: {uniform: [0.1, 0.4], when: {mix.mode: [mixup, mixup_cutmix]}}
```

A distribution is exactly one of `{choice: [...]}`, `{uniform: [lo, hi]}`,
`{loguniform: [lo, hi]}`, `{int: [lo, hi]}`, with an optional `step` (uniform, int) and an
optional `when: {other.key: value-or-list}`: the key is sampled only in trials where every
listed key was itself sampled with one of the listed values; otherwise the trial keeps the
base value from `train`.

Rooms: `space.py` (the model), `distributions.py` (a searched key), `loader.py` (finding,
reading and validating a file). Data plus its loader: no Ray, no Optuna, no torch.
"""

from spaces.distributions import DISTRIBUTION_KINDS, Distribution
from spaces.loader import QUICKSTART, SPACES_DIR, list_spaces, load_space, resolve_space_path
from spaces.space import METRICS, ExperimentSettings, SamplerSettings, SchedulerSettings, Space, SpaceError

__all__ = [
    "DISTRIBUTION_KINDS",
    "METRICS",
    "QUICKSTART",
    "SPACES_DIR",
    "Distribution",
    "ExperimentSettings",
    "SamplerSettings",
    "SchedulerSettings",
    "Space",
    "SpaceError",
    "list_spaces",
    "load_space",
    "resolve_space_path",
]
