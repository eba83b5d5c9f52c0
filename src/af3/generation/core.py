"""The decoding loop: the one loop in af3 that turns requests into tokens.

One :meth:`EngineCore.step` admits waiting requests (audio encoded, prefix copied from the prefix cache, the rest
prefilled, a first token chosen), then decodes one token for every running request, then retires the finished
ones (their keys/values kept in the prefix cache). New requests join between steps and finished ones leave
without stalling the rest (continuous batching).

Used by the :class:`~.engine.Engine` (conversations, text, streaming, any number of callers) and by
``AF3Model.generate`` (:mod:`.batch_generate`: token ids in, token ids out). The core is not thread-safe; its
owner (the Engine's loop owner, or ``generate``'s own call) calls :meth:`step`; :meth:`add` may come from anywhere.
"""

from __future__ import annotations

import math

import torch

from ..kernels import ops as kernel_ops
from ..kernels import policy as kernel_policy
from .output import OutputProcessor
from .runner import ModelRunner
from .sampling import pick, process
from .scheduler import PrefixCache, Request, Scheduler


#: Most prompt tokens per forward while other requests are decoding: each forward also carries one token of every
#: running row, so decoding goes on while new requests are prefilled and the weights are read once for both. A
#: longer prompt goes in chunks of equal size (799 tokens: 400 + 399). Smaller chunks let the running rows ride
#: more often instead of taking decoding steps of their own: on a 2-vCPU AMX Xeon with 15 rows decoding, two mixed
#: forwards of 400 prompt tokens cost a median 0.93x one of 800 plus a decoding step (``benchmarks/
#: prefill_chunk_bench.py``, interleaved pairs); 16 clients of 30 s clips got 8-10% more tokens/s (chunks of 420,
#: adjacent runs). Prompts admitted while nothing runs go whole.
PREFILL_CHUNK = 512
#: A prefix-cache match shorter than this is not used: recomputing a few tokens (a system prompt) costs less than
#: attending with an explicit mask instead of the causal kernel.
MIN_PREFIX_REUSE = 64


class EngineCore:
    """Scheduler + runner + sampling + output processing, stepped by one owner."""

    def __init__(self, runner: ModelRunner, scheduler: Scheduler, output: OutputProcessor,
                 prefix_cache: PrefixCache | None = None):
        self.runner = runner
        self.scheduler = scheduler
        self.output = output
        self.prefix_cache = prefix_cache if prefix_cache is not None and prefix_cache.max_bytes > 0 else None

    def add(self, req: Request) -> None:
        self.scheduler.add(req)

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    @torch.inference_mode()
    def step(self) -> None:
        """Admit (prefill) while rows are free, then decode one token for every running request."""
        for req in self.scheduler.take_cancelled():  # cancelled before they started: nothing to free
            req.finish_reason = "cancelled"
            self.output.finish(req)
        self._retire()  # cancelled running requests leave their rows now
        admitted = self.scheduler.admit()
        rode = False
        if admitted:
            self.runner.check_backend()
            self.runner.encode_audio([r for _, r in admitted])
            for row, req in admitted:  # rows before ``row`` are prefilled: they decode along with its chunks
                rode |= self._prefill(row, req)
            self._retire()  # requests done after their first token (max_new_tokens=1, an immediate end token)
        running = list(self.scheduler.running)
        if running and not rode:  # (rows that rode along with a prefill have their token for this step)
            logits = self.runner.decode([r.tokens[-1] for r in running], [r.length for r in running],
                                        [r.options.think for r in running])
            for r in running:
                r.length += 1
            self._choose_rows(running, logits)
            self._retire()

    def fail_all(self, error: BaseException) -> None:
        """End every request with ``error`` (the loop could not go on)."""
        for r in self.scheduler.drain():
            self.output.fail(r, error)

    # ------------------------------------------------------------------
    def _prefill(self, row: int, req: Request) -> bool:
        """Prefill ``req`` into ``row``; while rows ``0 .. row-1`` are decoding, in chunks that each carry one of
        their tokens. Returns whether any row decoded along."""
        start = 0
        if self.prefix_cache is not None and req.key is not None:
            entry, start = self.prefix_cache.match(req.key, req.options.think)
            if entry is not None and start >= min(MIN_PREFIX_REUSE, req.prompt_tokens - 1):
                self.runner.write_row(row, entry.kv, start)
                req.cached_prompt_tokens = start
                self.runner.stats["prefix_cached_tokens"] += start
            else:
                start = 0
        rode = False
        embeds = None
        while True:
            riders = self._riders(row, req)
            if not riders:  # the rest of the prompt in one forward
                logits = self.runner.prefill(row, req, start)
                break
            embeds = self.runner.prompt_embeds(req) if embeds is None else embeds
            left = req.prompt_tokens - start
            stop = start + -(-left // -(-left // PREFILL_CHUNK))  # the next of equal chunks of at most PREFILL_CHUNK
            logits, decoded = self.runner.prefill_mixed(row, req, embeds, start, stop, [r.tokens[-1] for r in riders],
                                                        [r.length for r in riders])
            live = [i for i, r in enumerate(riders) if r.finish_reason is None]  # (a finished row only fills its place)
            for i in live:
                riders[i].length += 1
            self._choose_rows([riders[i] for i in live], decoded[live] if len(live) < len(riders) else decoded)
            rode, start = True, stop
            if start == req.prompt_tokens:
                break
        req.length = req.prompt_tokens
        self._choose(req, logits)
        return rode

    def _riders(self, row: int, req: Request) -> list[Request]:
        """The rows that decode along with ``req``'s next prefill chunk: rows ``0 .. row-1`` (prefilled), as one
        contiguous block. A row that finished during this step stays in the block: its token is written past its
        last kept slot and dropped. None when no row is still going, with the think adapter (its switch is per
        batch row), or when a row's next slot would not fit the cache."""
        riders = self.scheduler.running[:row]
        if req.options.think or not any(r.finish_reason is None for r in riders):
            return []
        if any(r.options.think for r in riders) or max(r.length for r in riders) >= self.runner.max_len:
            return []
        return riders

    def _choose_rows(self, reqs: list[Request], logits: torch.Tensor) -> None:
        """:meth:`_choose` for each request and its row of ``logits`` [n, V]. Rows that only take the argmax (greedy,
        no logprobs, no processor but ``min_new_tokens``' end-token ban) share one argmax and one copy to the host:
        no device sync per row, and no fp32 copy of the logits (on a CPU, one pass of af3's argmax over them: a
        batch-1 step of the benchmark model spent 0.4 ms in ``float()`` and torch's argmax). The ban is written into
        those rows of ``logits`` first (nothing else reads them)."""
        plain = [_argmax_only(r) for r in reqs]
        tokens = None
        if any(plain):
            short = [i for i, r in enumerate(reqs) if plain[i] and len(r.tokens) < r.options.min_new_tokens]
            banned = [(i, t) for i in short for t in reqs[i].chain.argmax_ban if t < logits.shape[-1]]
            if banned:  # rows still short of min_new_tokens: their end tokens cannot be chosen yet
                rows, ids = zip(*banned, strict=True)
                logits[torch.tensor(rows, device=logits.device), torch.tensor(ids, device=logits.device)] = -math.inf
            tokens = _argmax_rows(logits)
        for i, r in enumerate(reqs):
            if tokens is not None and plain[i]:
                self.output.accept(r, tokens[i], None)
            else:
                self._choose(r, logits[i : i + 1])

    def _choose(self, req: Request, logits: torch.Tensor) -> None:
        """Process ``logits`` [1, V] (fp32 from here on) with the request's chain, pick its next token, hand it to the
        output."""
        o = req.options
        logits = logits.float()
        seen = None
        if o.repetition_penalty != 1.0:  # the only processor that reads the sequence
            context = req.input_ids if req.penalty_ids is None else req.penalty_ids
            seen = torch.cat([context, torch.tensor(req.tokens, dtype=torch.long)])[None]  # [1, S]
        processed = process(req.chain, logits, seen, len(req.tokens))
        token = int(pick(processed, o.do_sample, req.generator))
        self.output.accept(req, token, logits if o.logprobs else None)

    def _retire(self) -> None:
        for req in self.scheduler.retire(self._remember, self.runner.move_row):
            self.output.finish(req)

    def _remember(self, row: int, req: Request) -> None:
        """Keep a finished sequence's keys/values (prompt + reply) for follow-up turns."""
        if self.prefix_cache is None or req.key is None or not req.options.keep_cache or req.cancelled:
            return
        length = req.length  # the last chosen token has no keys/values yet
        reply = torch.tensor(req.tokens[: length - req.prompt_tokens], dtype=torch.long)
        key = torch.cat([req.key, reply])[:length]
        self.prefix_cache.put(key, self.runner.read_row(row, length), req.options.think)


def _argmax_only(req: Request) -> bool:
    """``req``'s next token is the argmax of its logits after at most its chain's end-token ban (see
    ``sampling.Chain``), and nothing but the token is wanted (no logprobs)."""
    return not req.options.logprobs and req.chain.argmax_ban is not None


def _argmax_rows(logits: torch.Tensor) -> list[int]:
    """The argmax of each row of ``logits`` [n, V] as host ints: af3's one-pass C kernel on the logits as computed
    (bf16 too: widening is exact, so the argmax is the fp32 one) where it runs; else torch's, on the device."""
    if logits.device.type == "cpu" and kernel_policy.current().kernels_usable() and logits.stride(-1) == 1:
        return kernel_ops.argmax_rows(logits)
    return logits.argmax(dim=-1).tolist()
