"""TensorBoard's HParams view of an experiment: one session per trial of every phase (the
search, the confirmation, the ablation) with its searched tricks, its phase, label and seed,
the best and final value of the metric and the epochs run, updated as results arrive
(early-stopped trials included).

The view's columns are declared once (`<logdir>/hparams/experiment`): the searched tricks
first, in the reader's order (each trick without `when` in the space's order, e.g. mix mode,
smoothing, RandAugment, global batch; then the keys sampled under them), then phase, label
and seed; a choice or an on/off key with its values (shown as `mixup` or `True`, never as
0.0000 / 1.0000), a range as an interval. TensorBoard sorts columns by name and ticks the
first five, so each column's name starts with its place (`01 mix.mode`) and shows its key
(`display_name`). A key a trial's config does not use is left empty in its row."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

from ray.tune import Callback
from torch.utils.tensorboard import SummaryWriter

from search.experiment.phases import ABLATE, BASELINE, CONFIRM
from search.experiment.sampling import sampled_values
from spaces import Space

__all__ = ["HPARAMS_DIR", "HParamsCallback", "columns", "hparams_callback"]

HPARAMS_DIR = "hparams"
EXPERIMENT_RUN = "experiment"  # the run holding the columns' declaration
PHASE, LABEL, SEED = "phase", "label", "seed"
SEARCH = "search"


def columns(space: Space) -> dict[str, str]:
    """Key (a searched key path, or phase, label, seed) -> its column's name in the view, in
    the reader's order: the tricks, the keys sampled under them, then phase, label, seed."""
    tricks = space.tricks
    order = [*tricks, *(k for children in tricks.values() for k in children if k not in tricks)]
    order += [k for k in space.searched_paths if k not in order]
    return {k: f"{i + 1:02d} {k}" for i, k in enumerate([*order, PHASE, LABEL, SEED])}


def _labels(space: Space) -> list[str]:
    top_k = space.experiment.confirm.top_k if space.experiment.confirm else 1
    return [SEARCH, *(f"candidate {i + 1}" for i in range(top_k)), BASELINE, *(f"without {t}" for t in space.tricks)]


def _experiment_summary(space: Space, metric_tags: list[str]) -> Any:
    from google.protobuf import struct_pb2
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

    def discrete(values: list[Any]) -> struct_pb2.ListValue:
        return struct_pb2.ListValue(values=[_proto_value(v) for v in values])

    infos = []
    for key, name in columns(space).items():
        info = api_pb2.HParamInfo(name=name, display_name=key)
        dist = space.search.get(key)
        if key in (PHASE, LABEL):
            values = [SEARCH, CONFIRM, ABLATE] if key == PHASE else _labels(space)
            info.type = api_pb2.DATA_TYPE_STRING
            info.domain_discrete.CopyFrom(discrete(values))
        elif key == SEED:
            info.type = api_pb2.DATA_TYPE_FLOAT64
        elif dist is not None and dist.kind == "choice":
            values = list(dist.values)
            kinds = {type(v) for v in values}
            info.type = (api_pb2.DATA_TYPE_BOOL if kinds == {bool} else api_pb2.DATA_TYPE_STRING if kinds == {str}
                         else api_pb2.DATA_TYPE_FLOAT64)
            info.domain_discrete.CopyFrom(discrete(values))  # its values, each a tick box to filter on
        else:
            info.type = api_pb2.DATA_TYPE_FLOAT64
            if dist is not None and dist.low is not None and dist.high is not None:
                info.domain_interval.min_value, info.domain_interval.max_value = dist.low, dist.high
        infos.append(info)
    metrics = [api_pb2.MetricInfo(name=api_pb2.MetricName(tag=t), display_name=t.removeprefix("hparams/"))
               for t in metric_tags]
    data = plugin_data_pb2.HParamsPluginData(
        experiment=api_pb2.Experiment(hparam_infos=infos, metric_infos=metrics), version=metadata.PLUGIN_DATA_VERSION)
    return _summary(metadata.EXPERIMENT_TAG, data)


def _proto_value(v: Any) -> Any:
    from google.protobuf import struct_pb2

    if isinstance(v, bool):  # before int: a bool is an int in Python
        return struct_pb2.Value(bool_value=v)
    if isinstance(v, (int, float)):
        return struct_pb2.Value(number_value=float(v))
    return struct_pb2.Value(string_value=str(v))


def _summary(tag: str, data: Any) -> Any:
    from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
    from tensorboard.plugins.hparams import metadata

    meta = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name=metadata.PLUGIN_NAME,
                                                                  content=data.SerializeToString()))
    return Summary(value=[Summary.Value(tag=tag, metadata=meta)])


def _session_start(hparams: Mapping[str, Any]) -> Any:
    from tensorboard.plugins.hparams import metadata, plugin_data_pb2

    info = plugin_data_pb2.SessionStartInfo()
    for name, v in hparams.items():
        info.hparams[name].CopyFrom(_proto_value(v))
    return _summary(metadata.SESSION_START_INFO_TAG,
                    plugin_data_pb2.HParamsPluginData(session_start_info=info, version=metadata.PLUGIN_DATA_VERSION))


def _session_end() -> Any:
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

    info = plugin_data_pb2.SessionEndInfo(status=api_pb2.STATUS_SUCCESS)
    return _summary(metadata.SESSION_END_INFO_TAG,
                    plugin_data_pb2.HParamsPluginData(session_end_info=info, version=metadata.PLUGIN_DATA_VERSION))


class HParamsCallback(Callback):
    """A Tune callback, run in the driver of any phase, writing `<logdir>/hparams/...`: the
    columns once per phase (the same each time), and one session per trial."""

    def __init__(self, space: Space, logdir: str, upload: Callable[[str, str], None] | None = None) -> None:
        """`logdir` is a local folder; with `upload(local_dir, relative_path)` each trial's
        files are also copied to the experiment's storage after every write."""
        self.space = space
        self.metric = space.experiment.metric
        self.mode = space.experiment.mode
        self.columns = columns(space)
        self.root = os.path.join(logdir, HPARAMS_DIR)
        self.metric_tags = [f"hparams/best_{self.metric}", f"hparams/final_{self.metric}", "hparams/epochs"]
        self.upload = upload
        self._writers: dict[str, SummaryWriter] = {}
        self._best: dict[str, float] = {}

    def setup(self, **info: Any) -> None:
        folder = os.path.join(self.root, EXPERIMENT_RUN)
        with SummaryWriter(log_dir=folder) as w:
            w.file_writer.add_summary(_experiment_summary(self.space, self.metric_tags))
        if self.upload is not None:
            self.upload(folder, f"{HPARAMS_DIR}/{EXPERIMENT_RUN}")

    def session(self, trial: Any) -> tuple[str, dict[str, Any]]:
        """The trial's session: its run's name under `hparams/` and its columns' values."""
        config = dict(getattr(trial, "config", None) or {})
        entry = config.get("entry")
        if isinstance(entry, Mapping):  # a confirmation or ablation run
            phase = ABLATE if entry.get("role") == "ablation" else CONFIRM
            values = self.space.active_values(entry.get("values") or {})
            seed = config.get("seed", self.space.train.run.seed)
            row = {**values, PHASE: phase, LABEL: entry.get("label"), SEED: seed}
            name = f"{phase}_{trial.trial_id}"
        else:
            row = {**sampled_values(config), PHASE: SEARCH, LABEL: SEARCH, SEED: self.space.train.run.seed}
            name = str(trial.trial_id)
        return name, {self.columns[k]: v for k, v in row.items() if k in self.columns and v is not None}

    def _writer(self, trial: Any) -> SummaryWriter:
        w = self._writers.get(trial.trial_id)
        if w is None:
            name, hparams = self.session(trial)
            w = SummaryWriter(log_dir=os.path.join(self.root, name))
            w.file_writer.add_summary(_session_start(hparams))
            self._writers[trial.trial_id] = w
        return w

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        value, epoch = result.get(self.metric), result.get("epoch")
        if value is None or epoch is None:
            return
        best = self._best.get(trial.trial_id)
        better = best is None or (value > best if self.mode == "max" else value < best)
        if better:
            self._best[trial.trial_id] = best = value
        w = self._writer(trial)
        step = int(epoch)
        w.add_scalar(self.metric_tags[0], best, step)
        w.add_scalar(self.metric_tags[1], value, step)
        w.add_scalar(self.metric_tags[2], step, step)
        w.flush()
        self._sync(trial)

    def _sync(self, trial: Any) -> None:
        if self.upload is not None:
            name, _ = self.session(trial)
            self.upload(os.path.join(self.root, name), f"{HPARAMS_DIR}/{name}")

    def _end(self, trial: Any) -> None:
        w = self._writers.pop(trial.trial_id, None)
        if w is not None:
            w.file_writer.add_summary(_session_end())
            w.close()
            self._sync(trial)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._end(trial)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._end(trial)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        for w in self._writers.values():
            w.close()
        self._writers.clear()


def hparams_callback(space: Space, exp: Any) -> HParamsCallback:
    """The HParams callback of a phase of `exp` (its files also uploaded to object storage)."""
    return HParamsCallback(space, exp.local, upload=None if exp.store.is_local else exp.store.upload)
