"""The embedded world: a teacher and a base student trained here from scratch, and the demo that compares
objectives on them.

- ``build``   the world (task, teacher, base student), built once and cached, and its measurement
- ``sft``     supervised training of a small model on (prompt, completion) traces
- ``demo``    ``eopd demo``: the runs, their parallel schedule and the report
- ``report``  the report's tables, paired differences and plots
"""

from eopd.world.build import DEFAULT_WORLD, WorldConfig, build_world, named_world_config, world_names
from eopd.world.sft import SFTConfig, train_sft

__all__ = ["DEFAULT_WORLD", "SFTConfig", "WorldConfig", "build_world", "named_world_config", "train_sft",
           "world_names"]
