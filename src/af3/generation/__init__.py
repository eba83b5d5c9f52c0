"""Inference: options, sampling, the model runner, the scheduler, output processing and the Engine.

Layout (each concept in one file): ``options`` (what a request asks for), ``sampling`` (logits processors, the
pick), ``runner`` (the only code executing the model: prefill / decode → logits, KV and audio caches, backend
choice), ``fused_plan`` (the decoder handed to the fused C step), ``scheduler`` (requests, rows, prefix cache),
``output`` (stops, text, logprobs), ``core`` (the one decoding loop), ``engine`` (the front: conversations in,
answers out, one loop owner), ``batch_generate`` (``AF3Model.generate`` on the same loop), ``structured`` (JSON).

This package's ``__init__`` imports nothing, so that importing one module does not pull in the others.
"""
