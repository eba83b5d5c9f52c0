"""benchmarks/decode_trace.py: decode rates from a step trace, worked out by hand, and engine_bench.engine_decode's
trace of a stand-in engine."""

import threading
from types import SimpleNamespace

import pytest

from benchmarks.decode_trace import Step, decode_run
from benchmarks.engine_bench import engine_decode


def test_lockstep_trace_gives_one_rate():
    # two requests prefilled in one step (1 token each at t=1), then three steps of one token each
    steps = [Step(1.0, (1, 1), 0), Step(2.0, (2, 2), 0), Step(3.0, (3, 3), 0), Step(4.0, (4, 4), 2)]
    run = decode_run(0.5, steps)
    assert run.ttft == pytest.approx(0.5)
    assert run.rate == pytest.approx(6 / 3)  # 8 tokens at the end, 2 held at t=1
    assert run.all_rows == pytest.approx(run.rate)
    assert run.job_s == pytest.approx(3.5)


def test_staggered_trace_subtracts_held_tokens_and_stops_all_rows_at_the_first_finish():
    # A prefilled alone, then B's prefill with A riding along; A finishes one step before B
    steps = [Step(1.0, (1, 0), 0), Step(2.0, (2, 1), 0), Step(3.0, (3, 2), 0), Step(4.0, (4, 3), 1),
             Step(5.0, (4, 4), 2)]
    run = decode_run(0.0, steps)
    assert run.ttft == pytest.approx(2.0)
    assert run.rate == pytest.approx((8 - 3) / (5.0 - 2.0))
    assert run.all_rows == pytest.approx((7 - 3) / (4.0 - 2.0))  # the step that ended A still decoded both
    assert run.job_s == pytest.approx(5.0)
    # the formula from first/last token times alone counts A's token made before B's first: higher than the truth
    metrics_rate = (8 - 2) / (5.0 - 2.0)
    assert metrics_rate > run.rate


def test_trace_without_a_decoding_step_is_refused():
    with pytest.raises(ValueError, match="no decoding step"):
        decode_run(0.0, [Step(1.0, (1, 0), 0), Step(2.0, (2, 1), 2)])
    with pytest.raises(ValueError, match="no decoding step"):
        decode_run(0.0, [Step(1.0, (1, 0), 0), Step(2.0, (2, 0), 0)])


class _StaggeredEngine:
    """Prefills one request per step (the earlier ones decode along), then decodes all: the af3 Engine's pattern."""

    def __init__(self):
        self.reqs = []

    def submit(self, conv, max_new_tokens, min_new_tokens):
        r = SimpleNamespace(tokens=[], done=threading.Event(), want=max_new_tokens)
        self.reqs.append(r)
        return r

    def step(self):
        started = [r for r in self.reqs if r.tokens]
        waiting = [r for r in self.reqs if not r.tokens]
        for r in [*started, *waiting[:1]]:
            if not r.done.is_set():
                r.tokens.append(0)
                if len(r.tokens) == r.want:
                    r.done.set()


def test_engine_decode_traces_the_engine_steps(monkeypatch):
    import benchmarks.engine_bench as eb

    clock = iter(range(100))  # submission at 0, step i ends at i
    monkeypatch.setattr(eb, "time", SimpleNamespace(perf_counter=lambda: float(next(clock))))
    run = engine_decode(_StaggeredEngine(), ["a", "b", "c"], 4)
    # steps: (1,0,0) (2,1,0) (3,2,1) <- all hold one, 6 tokens; (4,3,2) A ends; (4,4,3) B ends; (4,4,4)
    assert run.ttft == 3.0 and run.job_s == 6.0
    assert run.rate == pytest.approx((12 - 6) / (6 - 3))
    assert run.all_rows == pytest.approx((9 - 6) / (4 - 3))
