"""The Engine: where requests are batched, cached and decoded (used by the CLI, the server, batch jobs, eval).

One scheduler step admits waiting requests (prefill) and then decodes one token for every running request, so
new requests join between decode steps and finished ones leave without stalling the rest (continuous batching).

Memory is preallocated: a :class:`SlotCache` holds ``max_batch_size`` sequence slots of ``max_seq_len`` keys and
values per layer. Each running request owns one slot and is stored unpadded from slot position 0, so a row's
rotary position is simply its length. Two caches save work across requests:

* the **audio cache** keeps projected audio embeddings per 30 s window, keyed by a hash of the window's
  features, in a byte-bounded LRU (and encodes the missing windows of all admitted requests in one batch);
* the **prefix cache** keeps the keys/values of finished conversations; a request whose tokens (audio included)
  start with a cached sequence copies that prefix and prefills only the rest — a second question about the same
  10-minute recording neither re-encodes the audio nor re-runs its prefill.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from ..errors import InputError
from ..kernels import binding as cpu_kernels
from ..model.decoder import attention_mask_4d
from ..model.linear import HALF_DTYPES
from .sampling import apply_repetition_penalty, apply_top_k, apply_top_p

logger = logging.getLogger("af3")


# ---------------------------------------------------------------------------------------------- options, results
@dataclass(frozen=True)
class GenerationOptions:
    """How one request is decoded. ``None`` fields take the checkpoint's generation config."""

    max_new_tokens: int | None = None
    min_new_tokens: int = 0
    temperature: float | None = None  # 0 = greedy
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    do_sample: bool | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] | None = None
    logprobs: bool = False
    top_logprobs: int = 0
    think: bool = False  # switch on the checkpoint's thinking / long-audio LoRA adapter for this request
    #: JSON output: a JSON schema (dict or JSON string), or True for any JSON object (llguidance-constrained).
    json_schema: dict | str | bool | None = None

    def resolved(self, gc: Any, default_max_new_tokens: int = 512) -> GenerationOptions:
        """Fill unset fields from a :class:`af3.config.GenerationConfig` and check the values."""
        do_sample = self.do_sample
        if do_sample is None:
            do_sample = gc.do_sample if self.temperature is None else self.temperature > 0
        temperature = self.temperature if self.temperature is not None else gc.temperature
        if do_sample and not temperature > 0:
            do_sample = False  # temperature 0 means greedy
        out = replace(
            self,
            do_sample=bool(do_sample),
            temperature=float(temperature if do_sample else 1.0),
            top_k=int(self.top_k if self.top_k is not None else (gc.top_k or 0)),
            top_p=float(self.top_p if self.top_p is not None else gc.top_p),
            repetition_penalty=float(self.repetition_penalty if self.repetition_penalty is not None
                                     else gc.repetition_penalty),
            max_new_tokens=int(self.max_new_tokens if self.max_new_tokens is not None
                               else (gc.max_new_tokens or default_max_new_tokens)),
            stop=tuple(self.stop) if not isinstance(self.stop, str) else (self.stop,),
            stop_token_ids=tuple(self.stop_token_ids) if self.stop_token_ids is not None else tuple(gc.eos_ids),
        )
        if out.max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be at least 1 (got {out.max_new_tokens})")
        if out.top_k < 0 or not 0 < out.top_p <= 1 or not out.repetition_penalty > 0:
            raise InputError("top_k must be >= 0, top_p in (0, 1] and repetition_penalty > 0")
        if out.top_logprobs < 0 or out.top_logprobs > 20:
            raise InputError("top_logprobs must be between 0 and 20")
        return out


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class Output:
    """A finished request."""

    request_id: int
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (end token or stop string) or "length"
    prompt_tokens: int
    cached_prompt_tokens: int = 0  # prompt tokens whose keys/values came from the prefix cache
    audio_windows_cached: int = 0
    logprobs: list[TokenLogprob] | None = None


@dataclass
class Delta:
    """One streamed piece of a request: new text (possibly empty) and, on the last one, the whole output."""

    request_id: int
    text: str
    token_ids: list[int]
    finished: bool = False
    output: Output | None = None


# ---------------------------------------------------------------------------------------------- caches
class SlotCache:
    """Keys/values of ``max_batch`` sequence slots: per layer [max_batch, kv_heads, max_len, head_dim].

    The decoder reads and writes rows ``rows`` (a slice set before each forward), at per-row or shared slots.
    """

    def __init__(self, num_layers: int, max_batch: int, max_len: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (max_batch, num_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.rows = slice(0, max_batch)

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    def update(self, layer: int, k: Tensor, v: Tensor, slots: int | Tensor) -> None:
        kc, vc = self.k[layer][self.rows], self.v[layer][self.rows]  # views [b, Hkv, L, Dh]
        if isinstance(slots, int):
            t = k.shape[2]
            kc[:, :, slots:slots + t] = k
            vc[:, :, slots:slots + t] = v
        else:  # per-row slots [b, T]
            rows = torch.arange(k.shape[0], device=k.device)[:, None]
            kc[rows, :, slots] = k.transpose(1, 2)
            vc[rows, :, slots] = v.transpose(1, 2)

    def keys_values(self, layer: int, length: int) -> tuple[Tensor, Tensor]:
        return self.k[layer][self.rows, :, :length], self.v[layer][self.rows, :, :length]

    def layer_tensors(self) -> tuple[list[Tensor], list[Tensor]]:
        """Per-layer key and value tensors whose first rows are ``rows`` (for fused decoding)."""
        if not self.rows.start:
            return self.k, self.v
        return [t[self.rows] for t in self.k], [t[self.rows] for t in self.v]

    def copy_row(self, src: int, dst: int, length: int) -> None:
        for kc, vc in zip(self.k, self.v, strict=True):
            kc[dst, :, :length] = kc[src, :, :length]
            vc[dst, :, :length] = vc[src, :, :length]

    def read(self, row: int, length: int) -> list[tuple[Tensor, Tensor]]:
        """A copy of one row's first ``length`` keys/values per layer."""
        return [(kc[row, :, :length].clone(), vc[row, :, :length].clone()) for kc, vc in zip(self.k, self.v,
                                                                                          strict=True)]

    def write(self, row: int, kv: list[tuple[Tensor, Tensor]], length: int) -> None:
        for (k, v), kc, vc in zip(kv, self.k, self.v, strict=True):
            kc[row, :, :length] = k[:, :length]
            vc[row, :, :length] = v[:, :length]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


class LRUBytes:
    """A byte-bounded least-recently-used map (values know their size via ``nbytes``)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.items: OrderedDict[Any, tuple[Any, int]] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    def get(self, key: Any) -> Any | None:
        item = self.items.get(key)
        if item is None:
            self.misses += 1
            return None
        self.items.move_to_end(key)
        self.hits += 1
        return item[0]

    def put(self, key: Any, value: Any, nbytes: int) -> None:
        if nbytes > self.max_bytes:
            return
        if key in self.items:
            self.bytes -= self.items.pop(key)[1]
        self.items[key] = (value, nbytes)
        self.bytes += nbytes
        while self.bytes > self.max_bytes:
            _, (_, size) = self.items.popitem(last=False)
            self.bytes -= size


@dataclass
class _PrefixEntry:
    key: Tensor  # [L] int64 token keys (audio tokens carry their audio's hash)
    kv: list[tuple[Tensor, Tensor]]  # per layer [Hkv, L, Dh]
    think: bool = False  # keys/values computed with the think adapter on

    @property
    def nbytes(self) -> int:
        return sum(k.numel() * k.element_size() * 2 for k, _ in self.kv)


# ---------------------------------------------------------------------------------------------- requests
@dataclass
class _Request:
    id: int
    input_ids: Tensor  # [T] int64
    key: Tensor  # [T] int64 prefix-cache key
    features: Tensor | None  # [W, mel, frames]
    features_mask: Tensor | None  # [W, frames]
    options: GenerationOptions
    generator: torch.Generator | None
    submitted: float = field(default_factory=time.time)
    tokens: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    length: int = 0  # tokens whose keys/values are in the slot
    cached_prompt_tokens: int = 0
    audio_windows_cached: int = 0
    emitted_chars: int = 0
    text: str = ""
    finish_reason: str | None = None
    output: Output | None = None
    stream: queue.Queue | None = None
    done: threading.Event = field(default_factory=threading.Event)
    constraint: Any = None  # a JsonSchemaConstraint for JSON output
    window_hashes: list[int] = field(default_factory=list)  # content hash of each audio window (cache keys)


def _hash_window(features: Tensor, mask: Tensor) -> int:
    h = hashlib.blake2b(digest_size=8)
    h.update(features.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    h.update(int(mask.sum()).to_bytes(4, "little"))
    return int.from_bytes(h.digest(), "little") & ((1 << 62) - 1)


# ---------------------------------------------------------------------------------------------- the engine
class Engine:
    """Batched, streaming, cached AF3 inference over one model + processor.

    ``generate`` / ``stream`` run the scheduler in the calling thread; :meth:`start` runs it in a background
    thread so that many callers (e.g. a web server) share batches; ``agenerate`` / ``astream`` are the asyncio
    forms.
    """

    def __init__(self, model, processor, *, max_batch_size: int = 8, max_seq_len: int | None = None,
                 audio_cache_bytes: int = 512 * 1024**2, prefix_cache_bytes: int = 1024**3,
                 max_prefill_tokens: int = 16384, think_adapter: str | None = None, allow_pickle: bool = False):
        self.model = model.eval()
        self.processor = processor
        text = model.config.text_config
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len or min(text.max_position_embeddings, 32768)
        self.max_prefill_tokens = max_prefill_tokens
        self.cache = SlotCache(text.num_hidden_layers, max_batch_size, self.max_seq_len, text.num_key_value_heads,
                               text.head_dim, model.dtype, model.device)
        self.audio_cache = LRUBytes(audio_cache_bytes)
        self.prefix_cache = LRUBytes(prefix_cache_bytes)
        self.audio_token_id = model.config.audio_token_id
        self.vocab_size = text.vocab_size
        self.pad_id = processor.pad_token_id
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._waiting: list[_Request] = []
        self._running: list[_Request] = []  # index = cache slot
        self._wake = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._stop = False
        self.stats = {"prefill_tokens": 0, "decode_steps": 0, "encoded_windows": 0}
        self.lora = None
        if think_adapter is not None:
            from ..model.adapters import SwitchableLoRA, check_non_lora, read_lora

            check_non_lora(think_adapter, model, allow_pickle)
            self.lora = SwitchableLoRA(model, read_lora(think_adapter))
        if model.device.type == "cpu" and model.dtype in HALF_DTYPES:
            cpu_kernels.available()  # build (first run: ~2 s) or load them now, not during the first request

    @classmethod
    def from_pretrained(cls, path: str, dtype: torch.dtype | None = None, device: str = "cpu",
                        think: bool | str = "auto", quantize: str | None = None, allow_pickle: bool = False,
                        **kwargs) -> Engine:
        """Load a checkpoint folder; ``think="auto"`` also loads its think adapter (``think/`` or ``stage35/``)
        when there is one, ``True`` requires it, ``False`` skips it. ``quantize="int8"``: int8 decoder weights."""
        from ..model import AF3Model
        from ..model.adapters import find_adapter
        from ..processor import AF3Processor

        processor = AF3Processor.from_pretrained(path)
        model = AF3Model.from_pretrained(path, dtype=dtype, device=device, quantize=quantize,
                                         allow_pickle=allow_pickle)
        adapter = find_adapter(path) if think else None
        if think is True and adapter is None:
            raise InputError(f"{path!r} has no think adapter (think/ or stage35/ with adapter_config.json)")
        return cls(model, processor, think_adapter=adapter, allow_pickle=allow_pickle, **kwargs)

    # ------------------------------------------------------------------ submitting
    def submit(self, conversation: Sequence[dict], options: GenerationOptions | None = None, *,
               stream: bool = False, **kwargs: Any) -> _Request:
        """Queue one conversation; returns a handle to wait on (``handle.done``) or read (``handle.output``)."""
        options = (options or GenerationOptions())
        if kwargs:
            options = replace(options, **kwargs)
        options = options.resolved(self.model.generation_config)
        if options.think:
            if self.lora is None:
                raise InputError("think mode needs the checkpoint's think adapter; this engine was loaded without one")
            conversation = _with_think_suffix(conversation)
        inputs = self.processor.apply_chat_template(conversation, tokenize=True, add_generation_prompt=True,
                                                    return_dict=True)
        ids = inputs["input_ids"][0]
        if ids.numel() + options.max_new_tokens > self.max_seq_len:
            if ids.numel() >= self.max_seq_len:
                raise InputError(f"the prompt has {ids.numel()} tokens; this engine holds at most "
                                 f"{self.max_seq_len} per sequence")
            options = replace(options, max_new_tokens=self.max_seq_len - ids.numel())
        features = inputs.get("input_features")
        mask = inputs.get("input_features_mask")
        generator = None
        if options.seed is not None:
            generator = torch.Generator(device=self.model.device).manual_seed(options.seed)
        constraint = None
        if options.json_schema is not None and options.json_schema is not False:
            from .structured import JsonSchemaConstraint

            schema = None if options.json_schema is True else options.json_schema
            constraint = JsonSchemaConstraint(self.processor.tokenizer, schema, options.stop_token_ids)
        hashes = [] if features is None else [_hash_window(f, m) for f, m in zip(features, mask, strict=True)]
        req = _Request(next(self._ids), ids, self._prompt_key(ids, hashes, mask), features, mask, options,
                       generator, stream=queue.Queue() if stream else None, constraint=constraint,
                       window_hashes=hashes)
        with self._wake:
            self._waiting.append(req)
            self._wake.notify()
        return req

    def _prompt_key(self, ids: Tensor, hashes: list[int], mask: Tensor | None) -> Tensor:
        """Token ids, with each audio token replaced by a negative number derived from its window's content hash,
        so that equal keys mean equal inputs to the decoder (same text, same audio)."""
        key = ids.clone()
        if mask is None:
            return key
        from ..features import conv_output_lengths

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

    # ------------------------------------------------------------------ blocking / streaming front ends
    def generate(self, conversations: Sequence[dict] | Sequence[Sequence[dict]],
                 options: GenerationOptions | None = None, **kwargs: Any) -> Output | list[Output]:
        """Run one conversation (→ Output) or a list of them (→ list of Outputs, batched together)."""
        batched = len(conversations) > 0 and isinstance(conversations[0], (list, tuple))
        convs = list(conversations) if batched else [conversations]
        reqs = [self.submit(c, options, **kwargs) for c in convs]
        self._wait(reqs)
        return [r.output for r in reqs] if batched else reqs[0].output

    def stream(self, conversation: Sequence[dict], options: GenerationOptions | None = None,
               **kwargs: Any) -> Iterator[Delta]:
        """Yield :class:`Delta` pieces as tokens are decoded; the last one has ``finished`` and the output."""
        req = self.submit(conversation, options, stream=True, **kwargs)
        while True:
            if self._thread is None:
                while req.stream.empty() and not req.done.is_set():
                    self.step()
            delta = req.stream.get()
            yield delta
            if delta.finished:
                return

    async def agenerate(self, conversation: Sequence[dict], options: GenerationOptions | None = None,
                        **kwargs: Any) -> Output:
        """asyncio form of :meth:`generate` for one conversation (needs :meth:`start`)."""
        self._require_thread()
        req = self.submit(conversation, options, **kwargs)
        await asyncio.get_running_loop().run_in_executor(None, req.done.wait)
        return req.output

    async def astream(self, conversation: Sequence[dict], options: GenerationOptions | None = None,
                      **kwargs: Any) -> AsyncIterator[Delta]:
        """asyncio form of :meth:`stream` (needs :meth:`start`)."""
        self._require_thread()
        req = self.submit(conversation, options, stream=True, **kwargs)
        loop = asyncio.get_running_loop()
        while True:
            delta = await loop.run_in_executor(None, req.stream.get)
            yield delta
            if delta.finished:
                return

    def _wait(self, reqs: Sequence[_Request]) -> None:
        if self._thread is not None:
            for r in reqs:
                r.done.wait()
            return
        while not all(r.done.is_set() for r in reqs):
            self.step()

    def _require_thread(self) -> None:
        if self._thread is None:
            raise RuntimeError("call engine.start() before using the asyncio API")

    def start(self) -> Engine:
        """Run the scheduler in a background thread (for servers and concurrent callers)."""
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
        while True:
            with self._wake:
                while not self._stop and not self._waiting and not self._running:
                    self._wake.wait()
                if self._stop:
                    return
            try:
                self.step()
            except Exception as e:  # never let one bad batch kill the server's engine thread
                logger.exception("engine step failed")
                self._fail_all(e)

    def _fail_all(self, error: Exception) -> None:
        with self._lock:
            reqs, self._running, self._waiting = self._running + self._waiting, [], []
        for r in reqs:
            r.finish_reason = "error"
            r.output = Output(r.id, f"error: {error}", r.tokens, "error", r.input_ids.numel())
            if r.stream is not None:
                r.stream.put(Delta(r.id, "", [], True, r.output))
            r.done.set()

    # ------------------------------------------------------------------ scheduling
    @torch.inference_mode()
    def step(self) -> None:
        """Admit waiting requests (prefill) while slots are free, then decode one token for every running one."""
        with self._lock:
            free = self.max_batch_size - len(self._running)
            admitted, budget = [], self.max_prefill_tokens
            while self._waiting and len(admitted) < free:
                nxt = self._waiting[0]
                if admitted and nxt.input_ids.numel() > budget:
                    break
                admitted.append(self._waiting.pop(0))
                budget -= nxt.input_ids.numel()
        if admitted:
            self._prefill(admitted)
            self._retire()  # requests done after their first token (max_new_tokens=1, an immediate end token)
        if self._running:
            self._decode()
            self._retire()

    def _audio_embeddings(self, reqs: list[_Request]) -> dict[int, Tensor]:
        """Projected audio embeddings per request ([tokens, D]), from the cache or one batched encoder run."""
        todo: list[tuple[_Request, int, int]] = []  # (request, window, hash)
        per_req: dict[int, list[Tensor | int]] = {}
        for r in reqs:
            if r.features is None:
                continue
            parts: list[Tensor | int] = []
            for w, h in enumerate(r.window_hashes):
                hit = self.audio_cache.get(h)
                if hit is None:
                    todo.append((r, w, h))
                    parts.append(h)
                else:
                    parts.append(hit)
                    r.audio_windows_cached += 1
            per_req[r.id] = parts
        fresh: dict[int, Tensor] = {}
        if todo:
            dev = self.model.device
            feats = torch.stack([r.features[w] for r, w, _ in todo]).to(dev, self.model.dtype)
            masks = torch.stack([r.features_mask[w] for r, w, _ in todo]).to(dev)
            self.stats["encoded_windows"] += len(todo)
            emb = self.model.get_audio_features(feats, masks)  # [sum tokens, D], window-major
            from ..features import conv_output_lengths

            lengths = conv_output_lengths(masks.sum(-1).long())[1].tolist()
            for (_, _, h), piece in zip(todo, emb.split(lengths), strict=True):
                fresh[h] = piece.clone()
                self.audio_cache.put(h, fresh[h], piece.numel() * piece.element_size())
        out = {}
        for rid, parts in per_req.items():
            pieces = [fresh[p] if isinstance(p, int) else p for p in parts]
            out[rid] = torch.cat(pieces) if pieces else None
        return out

    def _match_prefix(self, req: _Request) -> _PrefixEntry | None:
        best, best_len = None, 0
        n = req.key.numel() - 1  # always recompute the last prompt token (its logits start decoding)
        for entry, _ in self.prefix_cache.items.values():
            if entry.think != req.options.think:
                continue
            m = min(n, entry.key.numel())
            if m <= best_len:
                continue
            same = (entry.key[:m] == req.key[:m]).to(torch.int8)
            common = int(same.cumprod(0).sum())
            if common > best_len:
                best, best_len = entry, common
        if best is not None:
            self.prefix_cache.get(id(best))  # LRU touch
            req.cached_prompt_tokens = best_len
        return best

    def _prefill(self, reqs: list[_Request]) -> None:
        audio = self._audio_embeddings(reqs)
        embed = self.model.language_model.model.embed_tokens
        dev = self.model.device
        for req in reqs:
            with self._lock:
                slot = len(self._running)
                self._running.append(req)
            entry = self._match_prefix(req)
            start = req.cached_prompt_tokens
            if entry is not None and start:
                self.cache.write(slot, entry.kv, start)
            ids = req.input_ids.to(dev)
            x = embed(ids[None])  # [1, T, D]
            a = audio.get(req.id)
            if a is not None:
                x = x.masked_scatter((ids == self.audio_token_id)[None, :, None].expand_as(x), a.to(x.dtype))
            x = x[:, start:]
            t = x.shape[1]
            pos = torch.arange(start, start + t, device=dev)[None]
            mask = None if start == 0 else attention_mask_4d(torch.ones(1, start + t, dtype=torch.bool, device=dev),
                                                           start, t)
            self.cache.rows = slice(slot, slot + 1)
            self._lora_rows([req])
            try:
                hidden = self.model.language_model.model(x, pos, mask, self.cache, start)  # [1, T, D]
            finally:
                self._lora_rows([])
            logits = self.model.language_model.lm_head(hidden[:, -1]).float()  # [1, V]
            self.stats["prefill_tokens"] += t
            req.length = req.input_ids.numel()
            self._choose(req, logits[0])

    def _decode(self) -> None:
        reqs = list(self._running)
        if not reqs:
            return
        dev = self.model.device
        n = len(reqs)
        last = torch.tensor([r.tokens[-1] for r in reqs], device=dev)[:, None]  # [n, 1]
        lengths = torch.tensor([r.length for r in reqs], device=dev)  # [n]
        width = int(max(r.length for r in reqs)) + 1
        valid = torch.arange(width, device=dev)[None, :] <= lengths[:, None]  # [n, S]
        mask = valid[:, None, None, :]  # [n, 1, 1, S]
        x = self.model.language_model.model.embed_tokens(last)  # [n, 1, D]
        self.cache.rows = slice(0, n)
        self._lora_rows(reqs)
        try:
            hidden = self.model.language_model.model(x, lengths[:, None], mask, self.cache, lengths[:, None])
        finally:
            self._lora_rows([])  # the hooks stay on the shared model: leave them off between engine forwards
        logits = self.model.language_model.lm_head(hidden[:, -1]).float()  # [n, V]
        self.stats["decode_steps"] += 1
        for i, r in enumerate(reqs):
            r.length += 1
            self._choose(r, logits[i])

    def _lora_rows(self, reqs: list[_Request]) -> None:
        if self.lora is not None:
            rows = [r.options.think for r in reqs]
            self.lora.rows = torch.tensor(rows, device=self.model.device) if any(rows) else None

    # ------------------------------------------------------------------ tokens, stops, outputs
    def _choose(self, req: _Request, logits: Tensor) -> None:
        """Process ``logits`` [V] with the request's options, pick a token, check stop conditions, stream."""
        o = req.options
        logits = logits[: self.vocab_size][None]  # [1, V]
        raw = logits  # logprobs report the model's own distribution, before penalties and sampling filters
        c = req.constraint
        if c is not None:  # JSON output: only tokens the grammar allows (an end token once the JSON is complete)
            logits = logits.masked_fill(~c.allowed(logits.shape[-1], logits.device), float("-inf"))
        elif len(req.tokens) < o.min_new_tokens and o.stop_token_ids:
            logits = logits.index_fill(1, torch.tensor(o.stop_token_ids, device=logits.device), float("-inf"))
        if o.repetition_penalty != 1.0:
            seen = torch.cat([req.input_ids, torch.tensor(req.tokens, dtype=torch.long)]).to(logits.device)
            logits = apply_repetition_penalty(logits, seen[None], o.repetition_penalty)
        if o.do_sample:
            logits = logits / o.temperature
            if o.top_k:
                logits = apply_top_k(logits, o.top_k)
            if o.top_p < 1.0:
                logits = apply_top_p(logits, o.top_p)
            token = int(torch.multinomial(logits.softmax(-1), 1, generator=req.generator))
        else:
            token = int(logits.argmax(-1))
        if o.logprobs:
            lp = raw.log_softmax(-1)[0]
            top = []
            if o.top_logprobs:
                values, idx = lp.topk(o.top_logprobs)
                top = list(zip(idx.tolist(), values.tolist(), strict=True))
            req.logprobs.append(TokenLogprob(token, float(lp[token]), top))
        req.tokens.append(token)
        if c is not None and token not in o.stop_token_ids:
            c.advance(token)
        if token in o.stop_token_ids or (c is not None and c.is_complete()):
            req.finish_reason = "stop"
        elif len(req.tokens) >= o.max_new_tokens:
            req.finish_reason = "length"
        if req.finish_reason is None and req.length + 1 >= self.max_seq_len:
            req.finish_reason = "length"
        if req.stream is not None or o.stop or req.finish_reason is not None:
            self._update_text(req)  # detokenize per step only when someone reads the text before the end

    def _update_text(self, req: _Request) -> None:
        ids = req.tokens[:-1] if req.finish_reason == "stop" and req.tokens[-1] in req.options.stop_token_ids \
            else req.tokens
        text = self.processor.decode(ids, skip_special_tokens=True)
        cut = None
        for s in req.options.stop:
            k = text.find(s)
            if k >= 0 and (cut is None or k < cut):
                cut = k
        if cut is not None:
            text = text[:cut]
            req.finish_reason = "stop"
        req.text = text
        if req.stream is None:
            return
        # Hold back an incomplete UTF-8 character and anything that may be the start of a stop string.
        safe = len(text)
        if req.finish_reason is None:
            if text.endswith("\ufffd"):
                safe = len(text.rstrip("\ufffd"))
            for s in req.options.stop:
                for k in range(min(len(s) - 1, safe), 0, -1):
                    if text[:safe].endswith(s[:k]):
                        safe -= k
                        break
        if safe > req.emitted_chars:
            req.stream.put(Delta(req.id, text[req.emitted_chars:safe], [req.tokens[-1]]))
            req.emitted_chars = safe

    def _retire(self) -> None:
        """Move finished requests out of their slots (the last running row fills the hole) and finish them."""
        i = 0
        while i < len(self._running):
            r = self._running[i]
            if r.finish_reason is None:
                i += 1
                continue
            self._remember_prefix(i, r)
            with self._lock:
                last = len(self._running) - 1
                if i != last:
                    moved = self._running[last]
                    self.cache.copy_row(last, i, moved.length)
                    self._running[i] = moved
                self._running.pop()
            self._finish(r)

    def _remember_prefix(self, slot: int, req: _Request) -> None:
        """Keep the finished sequence's keys/values (prompt + reply) for follow-up turns."""
        if self.prefix_cache.max_bytes <= 0:
            return
        length = req.length  # the last sampled token has no keys/values yet
        key = torch.cat([req.key, torch.tensor(req.tokens[: length - req.input_ids.numel()], dtype=torch.long)])
        entry = _PrefixEntry(key[:length], self.cache.read(slot, length), req.options.think)
        self.prefix_cache.put(id(entry), entry, entry.nbytes)

    def _finish(self, req: _Request) -> None:
        tokens = list(req.tokens)
        req.output = Output(req.id, req.text, tokens, req.finish_reason or "stop", req.input_ids.numel(),
                            req.cached_prompt_tokens, req.audio_windows_cached,
                            req.logprobs if req.options.logprobs else None)
        if req.stream is not None:
            rest = req.text[req.emitted_chars:]
            req.stream.put(Delta(req.id, rest, [], True, req.output))
        req.done.set()

    # ------------------------------------------------------------------ introspection
    def cache_info(self) -> dict[str, Any]:
        return {
            "kv_cache_bytes": self.cache.nbytes,
            "audio_cache": {"entries": len(self.audio_cache.items), "bytes": self.audio_cache.bytes,
                            "hits": self.audio_cache.hits, "misses": self.audio_cache.misses},
            "prefix_cache": {"entries": len(self.prefix_cache.items), "bytes": self.prefix_cache.bytes},
            **self.stats,
        }


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
