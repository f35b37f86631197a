"""Training stages as a registry: a stage is a name, a per-device step function and a schedule.

A run is the registered stages in registration order, each for as many steps as its config
says (a stage of 0 steps is skipped). A stage may also *interleave*: with ``interleave(cfg) =
k > 0`` it takes every k-th step (the run's steps k-1, 2k-1, ...) that falls in the span of a
stage registered before it, at the learning rate of the schedule in force there (the joined
schedule does not change); its own span follows as before. The training loop
(:mod:`onn_jax.run`), the learning-rate schedule and the progress display read this plan and
never name a stage.

Adding a stage::

    stages.register(stages.Stage(
        name="mystage",
        step=my_step,                      # (state, batch, *, model, cfg, axis_name,
                                           #  num_devices) -> (state, metrics)
        num_steps=lambda cfg: cfg.train.mystage_steps,
        schedule=lambda cfg: optax.constant_schedule(cfg.train.learning_rate),
        interleave=lambda cfg: cfg.train.mystage_every))  # optional; default never

Teacher forcing ("pretrain") and EAVI ("eavi", interleaved every ``train.eavi_every`` steps)
register themselves in :mod:`onn_jax.steps`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import optax

from onn_jax.config import Config


@dataclasses.dataclass(frozen=True)
class Stage:
  name: str
  step: Callable[..., Any]  # the per-device step function (see onn_jax.steps.train_step)
  num_steps: Callable[[Config], int]
  schedule: Callable[[Config], optax.Schedule]  # learning rate over the stage's own steps
  # Whether the step takes packed rows (several sequences per row, data.pack): its batch then
  # has segment_start and answer_mask instead of answer_start and answer_len.
  packs: bool = False
  # k > 0: the stage also takes every k-th step (run steps k-1, 2k-1, ...) inside the spans of
  # the stages registered before it, at their schedule's learning rate; 0: only its own span.
  interleave: Callable[[Config], int] = lambda cfg: 0
  # Answer-length edges: the stage's unpacked batches take their rows from one answer-length
  # group (BatchStream.batch's ``answer_groups``); (): rows from the whole bucket.
  answer_groups: Callable[[Config], tuple[int, ...]] = lambda cfg: ()


_REGISTRY: dict[str, Stage] = {}


def register(stage: Stage) -> Stage:
  """Adds ``stage`` after the ones registered before it; a name is registered once."""
  if stage.name in _REGISTRY and _REGISTRY[stage.name] is not stage:
    raise ValueError(f"stage {stage.name!r} is already registered")
  _REGISTRY[stage.name] = stage
  return stage


def registered() -> tuple[Stage, ...]:
  return tuple(_REGISTRY.values())


@dataclasses.dataclass(frozen=True)
class Span:
  stage: Stage
  start: int  # the run's step at which the stage begins
  length: int

  @property
  def end(self) -> int:
    return self.start + self.length


def plan(cfg: Config) -> tuple[Span, ...]:
  """The stages this config runs, in order, with the run steps each one covers."""
  spans, start = [], 0
  for stage in registered():
    length = int(stage.num_steps(cfg))
    if length > 0:
      spans.append(Span(stage, start, length))
      start += length
  return tuple(spans)


def total_steps(cfg: Config) -> int:
  spans = plan(cfg)
  return spans[-1].end if spans else 0


def stage_at(cfg: Config, step: int) -> Stage:
  """The stage that takes the run's step ``step`` (0-based): the stage of the span holding it,
  unless a stage registered after that one interleaves and takes it (:class:`Stage`
  ``interleave``; where several would, the first registered)."""
  for span in plan(cfg):
    if step < span.end:
      return _interleaved(cfg, span.stage, step) or span.stage
  raise ValueError(f"step {step} is past the run's {total_steps(cfg)} steps")


def _interleaved(cfg: Config, owner: Stage, step: int) -> Stage | None:
  """The first stage registered after ``owner`` that takes ``step`` by interleaving, if any."""
  order = registered()
  for stage in order[order.index(owner) + 1:]:
    every = int(stage.interleave(cfg))
    if every > 0 and (step + 1) % every == 0:
      return stage
  return None


def learning_rate_schedule(cfg: Config) -> optax.Schedule:
  """Each stage's own schedule, restarted at the step where the stage begins. Interleaved steps
  (:func:`stage_at`) take the rate of the span they fall in."""
  spans = plan(cfg)
  if not spans:
    return optax.constant_schedule(0.0)
  return optax.join_schedules([span.stage.schedule(cfg) for span in spans],
                              [span.start for span in spans[1:]])
