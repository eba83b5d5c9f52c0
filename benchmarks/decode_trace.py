"""Decode rates from a step trace: one definition for every engine that is stepped (af3's Engine in
``engine_bench.engine_decode``, vLLM's ``LLMEngine`` in ``vllm_runner.py``).

A trace is what the benchmark saw after each engine step: the time, the tokens each request holds, and how many
requests have finished. Both engines run a request's prefill and its first token in one step and may prefill
requests in different steps, so a request can hold several tokens by the time the last one gets its first; vLLM's
``RequestOutput.metrics`` only give each request's first and last token times, and ``(tokens - 1) / (last - first)``
over them counts those early tokens without their time. Computing both engines' rates from their traces compares
the same quantity. Standard library only: ``vllm_runner.py`` imports it inside the vLLM venv.
"""

from __future__ import annotations

from typing import NamedTuple


class Step(NamedTuple):
    time: float  #: perf_counter after the step
    tokens: tuple[int, ...]  #: tokens each request holds
    finished: int  #: requests that have finished


class DecodeRun(NamedTuple):
    ttft: float  #: seconds from submission until every request holds its first token
    rate: float  #: decode tok/s summed over the requests, from that moment to the last token
    all_rows: float  #: the same over the steps in which every request decodes (none has finished before the step)
    job_s: float  #: seconds from submission to the last token of the last request


def decode_run(t0: float, steps: list[Step]) -> DecodeRun:
    """The rates of a trace that starts at submission time ``t0``.

    Decode time runs from the step after which every request holds its first token to the last step and counts only
    the tokens made in between (those a request already held at that moment are subtracted). Requests that got their
    first tokens in different steps do not finish together, so the last steps may carry fewer rows: ``all_rows``
    counts only the steps up to the one in which the first request finishes (that step still decoded every row);
    when every request got its first token in one step, as in a batch that runs in lockstep, the two rates are one.
    """
    first = next((i for i, s in enumerate(steps) if all(s.tokens)), None)
    if first is None or first == len(steps) - 1:
        raise ValueError("decode_run: the trace has no decoding step after every request's first token")
    start, held = steps[first].time, sum(steps[first].tokens)
    last = steps[-1]
    full = first + 1  # the last step in which every request decoded
    while full + 1 < len(steps) and steps[full].finished == 0:
        full += 1
    rate = (sum(last.tokens) - held) / (last.time - start)
    all_rows = (sum(steps[full].tokens) - held) / (steps[full].time - start)
    return DecodeRun(start - t0, rate, all_rows, last.time - t0)
