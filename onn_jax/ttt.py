"""Test-time training (TTT): every evaluation task fine-tunes its own copy of a few parameters
on leave-one-out sequences of its demonstrations, and is then scored with those weights.

What is adapted: the parameters whose path (``block_0/attn/q_proj/kernel``) matches one of the
``ttt.params`` fnmatch patterns, copied per task; the rest is the shared, frozen base. A subset
chosen by path needs no change to the model (LoRA would need adapter hooks in every projection
of every attention variant) and works for any attention implementation: the default adapts
everything under ``*/attn/*`` and the RMSNorm scales; ``ttt.params=["*"]`` fine-tunes the whole
model per task (small models only: memory grows with tasks x adapted parameters x 3).

How: a task's sequences come from its own :class:`BatchStream` (the training augmentations: D8,
colours, demo order), built from the task with its test pairs removed, so test outputs are
never read, and seeded from (train.seed, task id), so a task adapts the same whatever tasks it
is grouped with. Tasks are grouped by the bucket length (data.buckets) their leave-one-out
sequences need; chunks of a group train together (:func:`tasks_per_chunk`: ``ttt.chunk`` tasks
at ``data.pack_len``, proportionally more at shorter buckets and fewer at longer): the training
teacher-forcing step (:func:`onn_jax.steps.train_step`: its loss, clipping, AdamW) is vmapped
over a task axis that is split over a 1-D mesh of every device with shard_map. A task with
fewer than 2 demonstrations, or none of whose leave-one-out sequences fits the longest bucket,
is not adapted (counted and logged) and is evaluated with the base weights.

Evaluation (``app.evaluate_params``) then scores all tasks together: :func:`stack` puts the
adapters on one leading axis (index 0: the base's own leaves) and every row of a model call
runs under its task's adapter (:class:`onn_jax.evaluation.model_fns.RowParams`);
:func:`per_task_evaluate`, one task at a time, is the reference the tests compare it with.

TTT is not a stage of :mod:`onn_jax.stages`: stages are steps of the training run on one shared
train state, while TTT runs at evaluation, per task, on weights that are discarded afterwards.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import hashlib
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from onn_jax import config, objectives, output, steps
from onn_jax.config import Config, ConfigError
from onn_jax.data.pipeline import BatchStream
from onn_jax.data.tasks import DataError, Task
from onn_jax.evaluation import augscore
from onn_jax.model.transformer import Transformer, for_vmap, init_params
from onn_jax.parallel import AXIS, compile_at_once, compile_in_background, host_value, shard_map


def adapted_paths(params, patterns: Sequence[str]) -> list[tuple[str, ...]]:
  """Paths of the leaves that match any pattern. A pattern matching nothing is a ConfigError."""
  paths = list(flatten_dict(params))
  names = ["/".join(p) for p in paths]
  for pattern in patterns:
    if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
      raise ConfigError(f"ttt.params: {pattern!r} matches no parameter path (they look like "
                        f"{names[0]!r})")
  return [p for p, n in zip(paths, names) if any(fnmatch.fnmatchcase(n, q) for q in patterns)]


def check(cfg: Config) -> None:
  """Raises the ConfigError :func:`adapt` would, before any training or loading is spent."""
  if cfg.ttt.steps > 0:
    shapes = jax.eval_shape(lambda: init_params(cfg.model, jax.random.PRNGKey(0)))
    adapted_paths(shapes, cfg.ttt.params)


def split(params, paths: Sequence[tuple[str, ...]]):
  """The adapter: the leaves at ``paths``, nested like ``params``."""
  flat = flatten_dict(params)
  return unflatten_dict({p: flat[p] for p in paths})


def merge(base, adapter):
  """``base`` with the adapter's leaves in place of its own (a new tree; base is untouched)."""
  return unflatten_dict({**flatten_dict(base), **flatten_dict(adapter)})


class _Adapted:
  """The model as train_step sees it: its parameters are the adapter, the base is merged in."""

  def __init__(self, model: Transformer, base):
    self.model, self.base = model, base

  def apply(self, variables, *args, **kwargs):
    return self.model.apply({"params": merge(self.base, variables["params"])}, *args, **kwargs)


def step_config(cfg: Config) -> Config:
  """The config train_step runs under at test time: the ``ttt`` optimizer settings in the
  ``train`` keys (warmup + cosine over ttt.steps, train.min_lr_ratio, train.grad_clip)."""
  t = cfg.ttt
  return config.replace(cfg, train={
      "pretrain_steps": t.steps, "eavi_steps": 0, "eavi_every": 0,
      "learning_rate": t.learning_rate, "warmup_steps": t.warmup_steps,
      "weight_decay": t.weight_decay, "ema_decay": 0.0, "batch_size": t.batch_size})


def task_seed(seed: int, task_id: str) -> int:
  """The seed of a task's TTT stream: fixed by (train.seed, task id) alone."""
  return int.from_bytes(hashlib.sha256(f"ttt/{seed}/{task_id}".encode()).digest()[:4], "little")


def task_stream(task: Task, cfg: Config) -> tuple[BatchStream | None, str]:
  """The task's leave-one-out stream at one bucket length, or (None, why it is not adapted).

  The length is the shortest bucket that holds every leave-one-out sequence with all its
  demos, else the longest bucket (trailing demos dropped, as in training's ``serialize.fit``).
  """
  if len(task.train) < 2:
    return None, "few_demos"
  demos_only = dataclasses.replace(task, test=[])  # the test pairs never reach TTT
  seed = task_seed(cfg.train.seed, task.id)
  data = dataclasses.replace(cfg.data, pack=False, pack_len=0)  # TTT batches are never packed
  try:
    probe = BatchStream([demos_only], data, cfg.ttt.batch_size, seed, answer_tokens=False)
  except DataError:  # not one leave-one-out sequence fits the longest bucket
    return None, "too_long"
  length = probe.buckets[max(k for k, ix in enumerate(probe.bucket_items) if len(ix))]
  data = dataclasses.replace(data, buckets=(length,))
  # Tasks' batches are stacked (one program per length): no answer_tokens, whose width, EAVI's
  # answer budget, is each task's own.
  return BatchStream([demos_only], data, cfg.ttt.batch_size, seed, answer_tokens=False), ""


def tasks_per_chunk(cfg: Config, length: int) -> int:
  """Tasks adapted at once at bucket ``length``: ``ttt.chunk`` at ``data.pack_len`` (0, or
  packing off: the longest bucket), proportionally more at shorter buckets and fewer (at least
  one) at longer ones, so a step holds about as many tokens at every length; 0
  (``ttt.chunk=0``): all."""
  return max(1, cfg.ttt.chunk * cfg.data.packed_len // length) if cfg.ttt.chunk else 0


def _stack(trees: Sequence[Any]) -> Any:
  return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *trees)


class _TaskAxis:
  """Functions of (base, per-task x, per-task batch) vmapped over tasks, split over a mesh."""

  def __init__(self, mesh: Mesh | None):
    self.mesh = mesh
    self.num_devices = 1 if mesh is None else mesh.devices.size

  def compile(self, fn: Callable) -> Callable:
    batched = jax.vmap(fn, in_axes=(None, 0, 0))
    if self.mesh is not None:
      batched = shard_map(batched, self.mesh, in_specs=(P(), P(AXIS), P(AXIS)),
                          out_specs=P(AXIS))
    return jax.jit(batched)

  def put_base(self, tree):
    if self.mesh is None:
      return jax.device_put(tree)
    return jax.device_put(tree, NamedSharding(self.mesh, P()))

  def put(self, tree):
    """Host arrays (identical on every process) with a leading task axis -> device arrays."""
    if self.mesh is None:
      return jax.tree.map(jnp.asarray, tree)
    sharding = NamedSharding(self.mesh, P(AXIS))
    return jax.tree.map(lambda a: jax.make_array_from_callback(
        a.shape, sharding, lambda index, a=a: a[index]), tree)


def _loo_ce(model: Transformer):
  def ce(base, adapter, batch):
    """Mean CE of a batch's loss-masked targets under base + adapter (one task)."""
    logits_BTV, _, _ = model.apply({"params": merge(base, adapter)}, batch["inputs"],
                                   batch["valid"])
    stats = objectives.answer_stats(logits_BTV, batch["targets"], batch["loss_mask"])
    return stats["ce_sum"] / jnp.maximum(stats["tokens"], 1.0)
  return ce


def _train(model: Transformer, step_cfg: Config):
  def step(base, state, batch):
    return steps.train_step(state, batch, model=_Adapted(model, base), cfg=step_cfg)
  return step


@functools.lru_cache(maxsize=8)
def _compiled(model: Transformer, step_cfg: Config, mesh: Mesh | None
              ) -> tuple[Callable, Callable]:
  """(train step, leave-one-out CE) over the task axis; cached so repeated calls reuse them."""
  axis = _TaskAxis(mesh)
  return axis.compile(_train(model, step_cfg)), axis.compile(_loo_ce(model))


@dataclasses.dataclass
class _Plan:
  """What :func:`adapt` runs for a config, a base's shapes and a task list: the tasks grouped
  by length, the chunk size and width per length, the step functions and their inputs."""
  step_cfg: Config
  axis: _TaskAxis
  train_fn: Callable
  ce_fn: Callable
  base: Any
  state0: Any
  groups: dict[int, list[tuple[Task, BatchStream]]]
  not_adapted: dict[str, list[str]]
  sizes: dict[int, int]
  widths: dict[int, int]

  def lower(self) -> list:
    """(train step, leave-one-out CE) of every length, lowered for one chunk's width;
    :meth:`programs` pairs them up once compiled. Compiled at once in threads
    (:func:`compile_at_once`), not one pair per length after another: those compilations were
    most of TTT's time on a GPU."""
    sharding = None if self.axis.mesh is None else NamedSharding(self.axis.mesh, P(AXIS))

    def stacked(tree, width):
      return jax.tree.map(lambda x: jax.ShapeDtypeStruct((width, *np.shape(x)), x.dtype,
                                                         sharding=sharding), tree)

    return [fn.lower(self.base, stacked(tree, self.widths[length]),
                     stacked(group[0][1].batch(0), self.widths[length]))
            for length, group in self.groups.items()
            for fn, tree in ((self.train_fn, self.state0), (self.ce_fn, self.state0.params))]

  def programs(self, done: list) -> dict[int, tuple[Callable, Callable]]:
    return {length: (done[2 * k], done[2 * k + 1]) for k, length in enumerate(self.groups)}

  def key(self) -> tuple:
    """What the compiled programs depend on (see :func:`compile_ahead`)."""
    leaves = tuple((np.shape(x), str(x.dtype)) for x in jax.tree.leaves(self.base))
    # In the groups' order, the order of lower()'s programs.
    return (self.step_cfg, self.axis.mesh, tuple((n, self.widths[n]) for n in self.groups),
            jax.tree.structure(self.base), leaves)


def _plan(cfg: Config, params, tasks: Sequence[Task], mesh: Mesh | None, *,
          place: bool = True) -> _Plan:
  """``place``: the base on the devices; else its shapes only (enough to lower the steps;
  placing it over a mesh of several hosts would be a cross-host transfer)."""
  paths = adapted_paths(params, cfg.ttt.params)
  model = for_vmap(Transformer(cfg.model))  # tasks vmapped: no sparse expert dispatch
  step_cfg = step_config(cfg)
  axis = _TaskAxis(mesh)
  train_fn, ce_fn = _compiled(model, step_cfg, mesh)
  state0 = steps.init_state(step_cfg, model, jax.random.PRNGKey(0),
                            params=split(jax.device_get(params), paths))
  groups: dict[int, list[tuple[Task, BatchStream]]] = {}
  not_adapted: dict[str, list[str]] = {"few_demos": [], "too_long": []}
  for task in tasks:
    stream, why = task_stream(task, cfg)
    if stream is None:
      not_adapted[why].append(task.id)
    else:
      groups.setdefault(stream.buckets[0], []).append((task, stream))
  n = axis.num_devices  # a chunk fills whole devices; the last is padded to full width
  sizes = {length: -(-(tasks_per_chunk(cfg, length) or len(group)) // n) * n
           for length, group in groups.items()}
  widths = {length: min(sizes[length], -(-len(group) // n) * n)
            for length, group in groups.items()}
  replicated = None if mesh is None else NamedSharding(mesh, P())
  base = axis.put_base(params) if place else jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=replicated), params)
  return _Plan(step_cfg, axis, train_fn, ce_fn, base, state0, groups, not_adapted, sizes,
               widths)


_ahead: list[tuple[dict, Any]] = []  # ({"key": _Plan.key()}, future of compile_in_background)


def compile_ahead(cfg: Config, params, tasks: Sequence[Task], *, mesh: Mesh | None = None
                  ) -> None:
  """Starts compiling the steps that :func:`adapt` will run for ``tasks`` under a base of
  ``params``' shapes, on a worker thread (:func:`compile_in_background`; the tasks' streams
  are built and the steps lowered there too), e.g. while training runs; ``adapt`` then waits
  for them instead of compiling. ``params`` is copied to the host here, so the caller may go
  on with (or donate) its arrays; replicated over the devices of several hosts, too."""
  params, made = jax.tree.map(host_value, params), {}

  def lower():
    plan = _plan(cfg, params, tasks, mesh, place=False)
    made["key"] = plan.key()
    return plan.lower()

  _ahead.append((made, compile_in_background("ttt steps", lower)))


def adapt(cfg: Config, params, tasks: Sequence[Task], *, mesh: Mesh | None = None,
          log: Callable[[str], None] = output.say) -> tuple[dict[str, Any], dict]:
  """Runs TTT on every task; ``params`` (the base) is not changed.

  Returns ({task id: its adapter (numpy, nested like params)} for the adapted tasks, an info
  dict for scores.json: the ttt settings, counts, mean leave-one-out CE before/after).
  The leave-one-out CE is measured on a draw the steps did not train on (step ``ttt.steps``).
  Its steps were compiled ahead when :func:`compile_ahead` was called for the same config,
  shapes and tasks.
  """
  t = cfg.ttt
  start = time.time()
  plan = _plan(cfg, params, tasks, mesh)
  base, state0, groups, not_adapted = plan.base, plan.state0, plan.groups, plan.not_adapted
  sizes, widths, axis = plan.sizes, plan.widths, plan.axis
  lengths, tick, programs = ', '.join(map(str, sorted(groups))), time.time(), None
  ahead, _ahead[:] = list(_ahead), []  # started for this evaluation: the match is taken
  for made, future in ahead:
    if future.cancelled():  # by a training run that stopped
      continue
    try:
      done, seconds = future.result()
    except Exception as err:  # e.g. out of host memory beside the training: compile here
      log(f"ttt: compiling the steps in the background failed ({type(err).__name__}: {err}); "
          "compiling them here")
      continue
    if programs is None and made["key"] == plan.key():
      programs = plan.programs(done)
      log(f"ttt: compiled the steps at lengths {lengths} in the background in {seconds:.1f} "
          f"s (waited {time.time() - tick:.1f} s)")
  if programs is None:
    programs = plan.programs(compile_at_once(plan.lower()))
    if groups:
      log(f"ttt: compiled the steps at lengths {lengths} at once in {time.time() - tick:.1f} s")

  adapters: dict[str, Any] = {}
  before, after, skipped = [], [], 0
  for length in sorted(groups):
    group, size, width = groups[length], sizes[length], widths[length]
    train_at, ce_at = programs[length]
    for first in range(0, len(group), size):
      chunk = group[first:first + size]
      streams = [s for _, s in chunk] + [chunk[-1][1]] * (width - len(chunk))  # padding rows
      state = axis.put(_stack([state0] * width))
      held = axis.put(_stack([s.batch(t.steps) for s in streams]))
      ce_before = host_value(ce_at(base, state.params, held))
      for step in range(t.steps):
        state, _ = train_at(base, state, axis.put(_stack([s.batch(step) for s in streams])))
      ce_after = host_value(ce_at(base, state.params, held))
      adapter_K = jax.tree.map(host_value, state.params)
      skipped += int(np.sum(host_value(state.skipped)[:len(chunk)]))
      for k, (task, _) in enumerate(chunk):
        adapters[task.id] = jax.tree.map(lambda x, k=k: x[k], adapter_K)
      before.extend(ce_before[:len(chunk)].tolist())
      after.extend(ce_after[:len(chunk)].tolist())
      log(f"ttt: length {length}: tasks {first + 1}..{first + len(chunk)} of {len(group)}: "
          f"leave-one-out CE {np.mean(ce_before[:len(chunk)]):.4f} -> "
          f"{np.mean(ce_after[:len(chunk)]):.4f}")

  for why, ids in not_adapted.items():
    if ids:
      reason = ("fewer than 2 demonstrations" if why == "few_demos" else
                f"no leave-one-out sequence fits data.buckets={list(cfg.data.buckets)}")
      log(f"ttt: {len(ids)} tasks not adapted ({reason}), evaluated with the base weights: "
          + ", ".join(ids[:10]) + (" ..." if len(ids) > 10 else ""))
  info = {
      "steps": t.steps, "learning_rate": t.learning_rate, "warmup_steps": t.warmup_steps,
      "weight_decay": t.weight_decay, "batch_size": t.batch_size, "params": list(t.params),
      "chunk": t.chunk,
      "adapted_params_per_task": int(sum(np.size(x) for x in jax.tree.leaves(state0.params))),
      "adapted": len(adapters),
      "not_adapted": {why: len(ids) for why, ids in not_adapted.items()},
      "skipped_updates": skipped,
      "loo_ce_before": float(np.mean(before)) if before else None,
      "loo_ce_after": float(np.mean(after)) if after else None,
      "seconds": round(time.time() - start, 1),
  }
  log(f"ttt: adapted {len(adapters)} of {len(tasks)} tasks in {info['seconds']} s "
      f"({t.steps} steps, {info['adapted_params_per_task']} parameters per task)")
  return adapters, info


def stack(base, adapters: dict[str, Any]) -> tuple[Any, dict[str, int]]:
  """The adapters of :func:`adapt` as one tree for pooled evaluation, and their indices.

  Every leaf gets a leading axis K = 1 + len(adapters): index 0 holds the base's own leaves
  (the tasks that were not adapted), index k the k-th adapter in the dict's order. Returns
  (that tree, {task id: k}); (None, {}) without adapters. Host (numpy) arrays.
  """
  if not adapters:
    return None, {}
  paths = list(flatten_dict(next(iter(adapters.values()))))
  trees = [split(base, paths), *adapters.values()]
  return _stack(trees), {task_id: k for k, task_id in enumerate(adapters, 1)}


def placeholder_adapters(cfg: Config, params) -> Any:
  """Adapters of the leaf shapes that :func:`adapt` then :func:`stack` give (holding the base's
  values), for compiling the evaluation's programs before TTT has run: those depend on the
  adapters' leaf shapes, not on how many tasks they hold."""
  return stack(params, {"": split(params, adapted_paths(params, cfg.ttt.params))})[0]


def per_task_evaluate(base, adapters: dict[str, Any], make_fns: Callable[[Any], Any]
                      ) -> Callable[..., list[dict]]:
  """:func:`augscore.evaluate` with every adapted task scored under base + its adapter, one
  task at a time: the reference that the pooled evaluation (``app.evaluate_params``: one
  :class:`~onn_jax.evaluation.model_fns.ModelFns` with every adapter, rows of any tasks in a
  call) is tested against.

  The tasks left with the base weights are evaluated together through the generate_fn and
  logprob_fn given; each adapted task alone through ``make_fns(its params)`` (an object with
  ``generate`` and ``logprob``, e.g. a ModelFns). Records come back in the tasks' order.
  """
  def evaluate(tasks: Sequence[Task], *, generate_fn, logprob_fn=None, **kwargs) -> list[dict]:
    records: dict[str, list[dict]] = {}
    plain = [task for task in tasks if task.id not in adapters]
    if plain:
      for r in augscore.evaluate(plain, generate_fn=generate_fn, logprob_fn=logprob_fn,
                                 **kwargs):
        records.setdefault(r["task_id"], []).append(r)
    for task in tasks:
      if task.id in adapters:
        fns = make_fns(merge(base, adapters[task.id]))
        records[task.id] = augscore.evaluate(
            [task], generate_fn=fns.generate,
            logprob_fn=None if logprob_fn is None else fns.logprob, **kwargs)
    return [r for task in tasks for r in records.get(task.id, [])]
  return evaluate
