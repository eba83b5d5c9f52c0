"""``af3 eval synthetic``: freshly generated clips of the tasks the embedded model was trained on
(:mod:`af3.training.synthetic`), scored by the label the answer names. With the defaults (seed 12345, clips drawn
task after task from one generator, the second turn scored for ``multi_turn``) these are the clips of the tiny
model's card, so ``af3 eval synthetic --n 100`` reproduces its numbers."""

from __future__ import annotations

import numpy as np

from ..batch.manifest import BatchItem
from ..training import synthetic as S

#: The seed of the embedded model's card (``af3.training.tiny_recipe.task_accuracy``).
CARD_SEED = 12345


def synthetic_items(n: int, seed: int = CARD_SEED) -> list[BatchItem]:
    """``n`` clips per task; each item holds its audio in memory (nothing is written to disk)."""
    rng = np.random.default_rng(seed)
    items = []
    for task in S.TASKS:
        turn = 1 if task == "multi_turn" else 0
        for i in range(n):
            sample = S.make_sample(task, rng)
            part = {"type": "audio", "audio": sample.audio, "sampling_rate": S.SR}
            messages = S.fill_audio(sample.messages, part)[: 1 + 2 * turn]
            items.append(BatchItem(f"{task}-{i}", len(items), messages,
                                   {"kind": "synthetic", "subset": task, "task": task, "turn": turn,
                                    "answer": S.expected_label(task, sample.label, turn)}))
    return items


def score_synthetic(extra: dict, text: str) -> dict:
    said = S.parse_answer(extra["task"], text, extra["turn"])
    return {"correct": said == extra["answer"], "said": said, "rule": "unmatched" if said is None else "label"}
