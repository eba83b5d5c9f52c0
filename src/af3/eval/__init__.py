"""``af3 eval``: benchmark readers (:mod:`.tasks`), scores (:mod:`.metrics`), the run and its summary
(:mod:`.run`), the printed table (:mod:`.report`). Items run through the Engine with :mod:`af3.batch`'s machinery."""

from .run import evaluate, score, summarize
from .tasks import TASKS, load_task

__all__ = ["TASKS", "evaluate", "load_task", "score", "summarize"]
