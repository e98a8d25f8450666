"""The training config: a small tree of dataclasses, loaded from YAML plus ``key=value`` overrides.

Every field has help text and every section validates itself in ``__post_init__``, so a bad config stops at
load with one line naming the key and what is allowed, not twenty minutes into a run. Unknown keys and wrong
types are caught by ``from_dict`` before any model is touched.

- ``fields``    the machinery: ``from_dict`` (type checks), ``require``, YAML and ``key=value`` overrides
- ``sections``  models, data, rollout, optim, eval, parallel
- ``teachers``  one teacher or several routed per prompt, and their cross-section check
- ``train``     ``TrainConfig`` and ``load_config``

    cfg = load_config("configs/tiny.yaml", ["max_steps=5", "rollout.n=2", "objective=opd"])
"""

from eopd.config.fields import ConfigError, deep_merge, from_dict, parse_overrides, read_yaml_mapping, require
from eopd.config.sections import (
    EMBEDDING_MODULE_NAMES,
    MIN_VOCAB_SIZE,
    DataConfig,
    EvalConfig,
    LoraSpec,
    ModelsConfig,
    OptimConfig,
    ParallelConfig,
    RolloutConfig,
    TinyModelSpec,
)
from eopd.config.teachers import TEACHER_APIS, RoutingConfig, TeacherConfig, TeacherSpec
from eopd.config.train import TrainConfig, load_config, to_dict

__all__ = [
    "EMBEDDING_MODULE_NAMES", "MIN_VOCAB_SIZE", "TEACHER_APIS", "ConfigError", "DataConfig", "EvalConfig", "LoraSpec",
    "ModelsConfig", "OptimConfig", "ParallelConfig", "RolloutConfig", "RoutingConfig", "TeacherConfig", "TeacherSpec",
    "TinyModelSpec", "TrainConfig", "deep_merge", "from_dict", "load_config", "parse_overrides", "read_yaml_mapping",
    "require", "to_dict",
]
