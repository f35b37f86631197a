"""ARC data: loading and validation, serialisation to tokens and back, augmentation, batching."""

from onn_jax.data.augment import View, augment_task
from onn_jax.data.pipeline import BatchStream, build_training_tasks, collate
from onn_jax.data.serialize import (Example, decode_grid, encode_grid, fit, leave_one_out,
                                    parse_sequence, serialize)
from onn_jax.data.tasks import (DataError, Task, TaskList, filter_max_grid, load_tasks,
                                remove_leaked)

__all__ = [
    "BatchStream", "DataError", "Example", "Task", "TaskList", "View", "augment_task",
    "build_training_tasks", "collate", "decode_grid", "encode_grid", "filter_max_grid", "fit",
    "leave_one_out", "load_tasks", "parse_sequence", "remove_leaked", "serialize",
]
