"""The Engine: conversations in, answers out, for any number of callers in one process (today the CLI's commands and
long-form transcription; every other surface is meant to be a thin shell over it).

A thin front over one :class:`~.core.EngineCore` (scheduler, model runner, sampling, output processing): it turns a
conversation into a :class:`~.scheduler.Request` (the processor's template, tokens and audio features; a prefix-
cache key; the options resolved once) and waits for it. Exactly one thread steps the core at a time, the loop owner:

* after :meth:`Engine.start`, a background thread (for servers; ``agenerate`` / ``astream`` are the asyncio
  forms);
* without it, whichever caller is waiting takes a turn: each step, under one lock, advances every running request,
  so concurrent ``generate`` / ``stream`` / ``agenerate`` calls from any threads share batches and are safe.

Memory follows the work: the runner's KV cache holds ``max_batch_size`` rows and grows with the longest running
sequence (at most ``max_seq_len`` slots per row; a growth that would not fit in memory is refused as an error). Two
caches save work across requests: the audio cache (projected embeddings per 30 s window; a clip seen before is not
encoded again) and the prefix cache (keys/values of finished conversations: a second question about the same
recording neither re-encodes the audio nor re-runs its prefill).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from .. import kernels
from ..errors import InputError
from ..features import conv_output_lengths
from ..fetch import DEFAULT_POLICY, FetchPolicy
from ..model.kv_cache import GROW_STEP
from ..system import release_free_memory
from .core import EngineCore
from .options import GenerationOptions, check_option_names
from .output import Delta, Output, OutputProcessor, TokenLogprob
from .runner import ModelRunner, hash_window
from .sampling import build_chain
from .scheduler import PrefixCache, Request, Scheduler

logger = logging.getLogger("af3")


class Engine:
    """Batched, streaming, cached AF3 inference over one model + processor (see the module docstring)."""

    def __init__(self, model, processor, *, max_batch_size: int = 8, max_seq_len: int | None = None,
                 audio_cache_bytes: int = 512 * 1024**2, prefix_cache_bytes: int = 1024**3,
                 max_prefill_tokens: int = 16384, think_adapter: str | None = None, allow_pickle: bool = False,
                 audio_policy: FetchPolicy | None = None, max_audios: int = 32):
        for name, value, low in (("max_batch_size", max_batch_size, 1), ("max_seq_len", max_seq_len, 2),
                                 ("audio_cache_bytes", audio_cache_bytes, 0),
                                 ("prefix_cache_bytes", prefix_cache_bytes, 0),
                                 ("max_prefill_tokens", max_prefill_tokens, 1), ("max_audios", max_audios, 0)):
            if value is None and name == "max_seq_len":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise InputError(f"{name} must be a whole number >= {low}, got {value!r}")
        self.model = model.eval()
        self.processor = processor
        #: The limits every request's audio is loaded under (byte caps, download deadline, private networks):
        #: :data:`af3.fetch.DEFAULT_POLICY` unless the operator sets one.
        self.audio_policy = audio_policy if audio_policy is not None else DEFAULT_POLICY
        if not isinstance(self.audio_policy, FetchPolicy):
            raise InputError(f"audio_policy must be an af3.fetch.FetchPolicy, not {type(audio_policy).__name__}")
        text = model.config.text_config
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len or min(text.max_position_embeddings, 32768)
        #: Most audio parts one conversation may carry (each is decoded before the prompt's length is known).
        self.max_audios = max_audios
        self.lora = None
        if think_adapter is not None:
            from ..model.adapters import SwitchableLoRA, check_non_lora, read_lora

            check_non_lora(think_adapter, model, allow_pickle)
            self.lora = SwitchableLoRA(model, read_lora(think_adapter))
        # The KV cache starts small and grows with the longest sequence running (up to max_seq_len per row).
        self.runner = ModelRunner(model, max_batch_size, self.max_seq_len, audio_cache_bytes=audio_cache_bytes,
                                  lora=self.lora, kv_capacity=GROW_STEP)
        self.prefix_cache = PrefixCache(prefix_cache_bytes)
        self.core = EngineCore(self.runner, Scheduler(max_batch_size, max_prefill_tokens),
                               OutputProcessor(self._decode_text, self.max_seq_len), self.prefix_cache)
        self.audio_token_id = model.config.audio_token_id
        self._ids = itertools.count()
        self._step_lock = threading.Lock()  # held by the loop owner while it steps the core
        self._wake = threading.Condition()  # the background thread sleeps on it while there is no work
        self._thread: threading.Thread | None = None
        self._stop = False
        if model.device.type == "cpu" and model.dtype in kernels.policy.HALF_DTYPES:
            kernels.policy.current().kernels_usable()  # build (first run: ~2 s) or load them now, not mid-request

    @classmethod
    def from_pretrained(cls, path: str, dtype: torch.dtype | None = None, device: str = "cpu",
                        think: bool | str = "auto", quantize: str | None = None, allow_pickle: bool = False,
                        **kwargs) -> Engine:
        """Load a checkpoint folder; ``think="auto"`` also loads its think adapter (``think/`` or ``stage35/``)
        when there is one, ``True`` requires it, ``False`` skips it. ``quantize="int8"``: int8 decoder weights."""
        from ..model.adapters import find_adapter
        from ..model.af3 import AF3Model
        from ..processor import AF3Processor

        processor = AF3Processor.from_pretrained(path)
        model = AF3Model.from_pretrained(path, dtype=dtype, device=device, quantize=quantize,
                                         allow_pickle=allow_pickle)
        adapter = find_adapter(path) if think else None
        if think is True and adapter is None:
            raise InputError(f"{path!r} has no think adapter (think/ or stage35/ with adapter_config.json)")
        return cls(model, processor, think_adapter=adapter, allow_pickle=allow_pickle, **kwargs)

    @property
    def stats(self) -> dict[str, int]:
        return self.runner.stats

    def invalidate(self) -> None:
        """Call after changing the model's modules or weights between requests (the runner re-plans)."""
        self.runner.invalidate()

    # ------------------------------------------------------------------ submitting
    def submit(self, conversation: Sequence[dict], options: GenerationOptions | None = None, *,
               stream: bool = False, on_update: Callable[[], None] | None = None, **kwargs: Any) -> Request:
        """Queue one conversation; returns a handle to wait on (``handle.done``) or read (``handle.output``).
        ``on_update()`` is called from the loop's thread after each streamed piece and when the request ends (an
        asyncio server sets an event with it instead of holding a thread per request)."""
        options = options or GenerationOptions()
        if not isinstance(options, GenerationOptions):
            raise InputError(f"options must be a GenerationOptions, not {type(options).__name__}")
        if kwargs:
            check_option_names(kwargs)
            options = replace(options, **kwargs)
        gc, vocab = self.model.generation_config, self.model.config.text_config.vocab_size
        options.resolved(gc, 0, vocab)  # every value checked before any work (resolved again with the prompt below)
        self._check_conversation(conversation)
        if options.think:
            if self.lora is None:
                raise InputError("think mode needs the checkpoint's think adapter; this engine was loaded without one")
            conversation = _with_think_suffix(conversation)
        inputs = self.processor.apply_chat_template(conversation, tokenize=True, add_generation_prompt=True,
                                                    return_dict=True, policy=self.audio_policy)
        ids = inputs["input_ids"][0]
        options = options.resolved(gc, ids.numel(), vocab)
        if ids.numel() + options.max_new_tokens > self.max_seq_len:
            if ids.numel() >= self.max_seq_len:
                raise InputError(f"the prompt has {ids.numel()} tokens; this engine holds at most "
                                 f"{self.max_seq_len} per sequence")
            options = replace(options, max_new_tokens=self.max_seq_len - ids.numel())
        features, mask = inputs.get("input_features"), inputs.get("input_features_mask")
        generator = None
        if options.seed is not None:
            generator = torch.Generator(device=self.model.device).manual_seed(options.seed)
        constraint = None
        if options.json_schema is not None:
            from .structured import JsonSchemaConstraint

            schema = None if options.json_schema is True else options.json_schema
            constraint = JsonSchemaConstraint(self.processor.tokenizer, schema, options.stop_token_ids)
        hashes = [] if features is None else [hash_window(f, m) for f, m in zip(features, mask, strict=True)]
        req = Request(next(self._ids), ids, options, key=self._prompt_key(ids, hashes, mask), features=features,
                      features_mask=mask, window_hashes=hashes, generator=generator, constraint=constraint,
                      chain=build_chain(options, constraint), stream=queue.Queue() if stream else None,
                      on_update=on_update)
        req.audio_tokens = int((ids == self.audio_token_id).sum())
        self.core.add(req)
        with self._wake:
            self._wake.notify()
        return req

    def cancel(self, req: Request) -> None:
        """End ``req`` at the loop's next step (a client that went away, a timeout): a waiting request never starts,
        a running one frees its KV row; it finishes with ``finish_reason="cancelled"`` and nothing is cached."""
        req.cancelled = True
        with self._wake:
            self._wake.notify()

    @property
    def load(self) -> tuple[int, int]:
        """(waiting, running) requests now."""
        return len(self.core.scheduler.waiting), len(self.core.scheduler.running)

    def _check_conversation(self, conversation: Sequence[dict]) -> None:
        """What the processor cannot know: a request must ask something, and carry at most ``max_audios`` audios."""
        from ..chat import normalize_conversation

        messages, audios = normalize_conversation(conversation)
        if not any(m["role"] == "user" for m in messages):
            raise InputError("the conversation has no user message: there is nothing to answer")
        if len(audios) > self.max_audios:
            raise InputError(f"the conversation has {len(audios)} audio parts; this engine takes at most "
                             f"{self.max_audios} per request")

    def _prompt_key(self, ids: Tensor, hashes: list[int], mask: Tensor | None) -> Tensor:
        """Token ids, with each audio token replaced by a negative number derived from its window's content hash,
        so that equal keys mean equal inputs to the decoder (same text, same audio)."""
        key = ids.clone()
        if mask is None:
            return key
        post = conv_output_lengths(mask.sum(-1).long())[1].tolist()
        codes = []
        for base, n in zip(hashes, post, strict=True):
            codes.extend(-((base + i) % (1 << 62)) - 1 for i in range(n))
        slots = (ids == self.audio_token_id).nonzero().flatten()
        if len(codes) != len(slots):
            raise InputError(f"audio features and <sound> tokens do not match: {len(slots)} tokens, "
                             f"{len(codes)} audio frames")
        if codes:
            key[slots] = torch.tensor(codes, dtype=torch.long)
        return key

    def token_text(self, token_id: int) -> str:
        """One token as text (for logprobs); a token that is part of a multi-byte character may show as U+FFFD."""
        return self.processor.tokenizer.decode([token_id])

    def _decode_text(self, ids: list[int]) -> str:
        return self.processor.decode(ids, skip_special_tokens=True)

    # ------------------------------------------------------------------ front ends
    def generate(self, conversations: Sequence[dict] | Sequence[Sequence[dict]],
                 options: GenerationOptions | None = None, **kwargs: Any) -> Output | list[Output]:
        """Run one conversation (→ Output) or a list of them (→ list of Outputs, batched together)."""
        batched = len(conversations) > 0 and isinstance(conversations[0], (list, tuple))
        convs = list(conversations) if batched else [conversations]
        reqs = [self.submit(c, options, **kwargs) for c in convs]
        self._wait(reqs)
        outs = [_result(r) for r in reqs]
        return outs if batched else outs[0]

    def stream(self, conversation: Sequence[dict], options: GenerationOptions | None = None,
               **kwargs: Any) -> Iterator[Delta]:
        """Yield :class:`Delta` pieces as tokens are decoded; the last one has ``finished`` and the output."""
        req = self.submit(conversation, options, stream=True, **kwargs)
        while True:
            delta = self._next_delta(req)
            if delta.finished:
                _result(req)
            yield delta
            if delta.finished:
                return

    async def agenerate(self, conversation: Sequence[dict], options: GenerationOptions | None = None,
                        **kwargs: Any) -> Output:
        """asyncio form of :meth:`generate` for one conversation."""
        req = self.submit(conversation, options, **kwargs)
        await asyncio.get_running_loop().run_in_executor(None, self._wait, [req])
        return _result(req)

    async def astream(self, conversation: Sequence[dict], options: GenerationOptions | None = None,
                      **kwargs: Any) -> AsyncIterator[Delta]:
        """asyncio form of :meth:`stream`."""
        req = self.submit(conversation, options, stream=True, **kwargs)
        loop = asyncio.get_running_loop()
        while True:
            delta = await loop.run_in_executor(None, self._next_delta, req)
            if delta.finished:
                _result(req)
            yield delta
            if delta.finished:
                return

    # ------------------------------------------------------------------ the loop owner
    def step(self) -> None:
        """One step of the core (admit + prefill, then decode one token for every running request)."""
        with self._step_lock:
            self._step_owned()

    def _wait(self, reqs: Sequence[Request]) -> None:
        for r in reqs:
            while not r.done.is_set():
                if self._thread is not None:
                    r.done.wait()
                else:
                    self._take_turn(lambda r=r: r.done.is_set())

    def _next_delta(self, req: Request) -> Delta:
        while req.stream.empty() and self._thread is None:
            self._take_turn(lambda: not req.stream.empty())
        return req.stream.get()

    def _take_turn(self, satisfied) -> None:
        """Step the core once as its loop owner, unless another caller's step already did what we wait for."""
        with self._step_lock:
            if not satisfied() and self._thread is None:
                self._step_owned()

    def _step_owned(self) -> None:
        """One core step; the caller holds the step lock."""
        try:
            self.core.step()
        except Exception as e:  # one bad batch must not leave its requests waiting forever
            logger.exception("engine step failed")
            self.core.fail_all(e)

    def start(self) -> Engine:
        """Run the loop in a background thread (for servers and concurrent callers)."""
        if self._thread is None:
            self._stop = False
            self._thread = threading.Thread(target=self._loop, name="af3-engine", daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _loop(self) -> None:
        busy = False
        while True:
            with self._wake:
                if busy and not self.core.has_work:
                    # Idle again: give the pages freed by the finished requests (audio, features, activations)
                    # back to the OS, so that a server's memory returns to its size between bursts.
                    release_free_memory()
                    busy = False
                while not self._stop and not self.core.has_work:
                    self._wake.wait()
                if self._stop:
                    return
            busy = True
            self.step()

    # ------------------------------------------------------------------ introspection
    def cache_info(self) -> dict[str, Any]:
        audio, prefix = self.runner.audio_cache, self.prefix_cache
        return {
            "kv_cache_bytes": self.runner.cache.nbytes,
            "audio_cache": {"entries": len(audio.items), "bytes": audio.bytes, "hits": audio.hits,
                            "misses": audio.misses},
            "prefix_cache": {"entries": len(prefix), "bytes": prefix.lru.bytes},
            **self.stats,
        }


def _result(req: Request) -> Output:
    """The request's output, or its error raised."""
    if req.error is not None:
        raise req.error
    return req.output


def _with_think_suffix(conversation: Sequence[dict]) -> list[dict]:
    """Append AF3's think-mode instruction to the last user message."""
    from ..model.adapters import THINK_SUFFIX

    conv = [dict(m) for m in conversation]
    for m in reversed(conv):
        if m.get("role") != "user":
            continue
        content = m.get("content")
        if isinstance(content, str):
            m["content"] = content + THINK_SUFFIX
        else:
            parts = [dict(p) if isinstance(p, dict) else {"type": "text", "text": p} for p in content or []]
            texts = [p for p in parts if p.get("type", "text") == "text" and "text" in p]
            if texts:
                texts[-1]["text"] += THINK_SUFFIX
            else:
                parts.append({"type": "text", "text": THINK_SUFFIX.lstrip()})
            m["content"] = parts
        break
    return conv


__all__ = ["Delta", "Engine", "GenerationOptions", "Output", "TokenLogprob"]
