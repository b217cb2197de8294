"""The generation worker: one thread owns the model and serves the requests of a bounded queue.

A full queue is refused at once (the API answers 503 with Retry-After) rather than letting requests pile up. Each
job carries a cancel flag that is checked after every token, so a client that disconnects frees its place within
a token; a job cancelled while still queued is never started. Generated text reaches the request's event loop
piece by piece through `loop.call_soon_threadsafe`.

Up to `max_batch` requests decode together (serve/engine.py: continuous batching, each row with its own sampling
settings, stop rules and length; newcomers join a running batch). That is used only where the worker's start-up
check finds batched logits equal to one-at-a-time ones on the loaded model; otherwise, and with `max_batch=1`,
requests run one at a time through transformers' `generate`. A request that samples with a `seed` runs alone,
so the same request and seed give the same answer whatever else is being served.

A job may ask for logprobs (serve/logprobs.py): of its answer's tokens (`logprobs`: how many alternatives each
lists), computed from the logits each token is chosen from, batched or alone; and of its prompt's tokens
(`prompt_logprobs`, for an echoed completion prompt), from one more pass over the prompt before it decodes. A job
with `max_new_tokens` 0 is answered after that pass, without decoding.

Where several LoRA adapters share the base (serve/adapters.py), each job names its adapter (peft's name,
`"__base__"` for none) and its template's stop tokens. Rows of different adapters share a batch through peft's
`adapter_names` where the start-up check (`engine.mixed_batching_is_exact`) finds that gives each row's lone
logits; otherwise requests run one at a time, each with its own adapter. chattune's decode step is not used then: it
applies the model's active adapters to every row.
"""

from __future__ import annotations

import asyncio
import collections
import queue
import threading
from dataclasses import dataclass, field

import torch
from transformers import StoppingCriteria, StoppingCriteriaList, TextStreamer

from chattune.models.decode_step import DecodeStep, install_for_generate, why_not
from chattune.sampling import SamplingSettings, StopStrings
from chattune.serve.engine import (Batch, _forward, Sampling, batching_is_exact, mixed_batching_is_exact, prefill,
                                   prompt_scores, step_matches_transformers)
from chattune.serve.logprobs import TokenScore, distribution, scores_for
from chattune.serve.prompt_cache import PromptCache, prefill_after, reuse_is_exact, row_cache


@dataclass
class Job:
    prompt_ids: list[int]
    max_new_tokens: int
    sampling: SamplingSettings  # chattune.sampling: the request's settings with the model's generation_config
    stop: list[str]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancel: threading.Event = field(default_factory=threading.Event)
    logprobs: int | None = None  # None: no logprobs for the answer; N: each token with its N most likely alternatives
    prompt_logprobs: int | None = None  # likewise for the prompt's tokens (an echoed completion prompt)
    prompt_scores: list[TokenScore] | None = None  # set by the worker where prompt_logprobs asks for them
    adapter: str | None = None  # the peft adapter it runs with where several are served (None: the model as it is)
    stop_ids: list[int] | None = None  # its template's stop tokens (None: the worker's model's)

    def emit(self, kind: str, value) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))

    @property
    def solo(self) -> bool:
        """Seeded sampling runs alone: batched logits differ from lone ones by float noise, which could change a
        sampled token, and a seed promises the same answer every time."""
        return not self.sampling.greedy and self.sampling.seed is not None

    def skip(self) -> None:
        """Answer a job cancelled while it waited, without running it: its handler (if still there) returns."""
        self.emit("done", self.result([], "", False))

    def result(self, new: list[int], text: str, hit_stop: bool, scores: list[TokenScore] | None = None) -> dict:
        return {"text": text, "completion_tokens": len(new), "prompt_tokens": len(self.prompt_ids),
                "stopped": hit_stop or len(new) < self.max_new_tokens, "cancelled": self.cancel.is_set(),
                "tokens": new, "logprobs": scores, "prompt_logprobs": self.prompt_scores}


class _Cancelled(StoppingCriteria):
    def __init__(self, flag: threading.Event):
        self.flag = flag

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.flag.is_set(), dtype=torch.bool, device=input_ids.device)


class _Pieces(TextStreamer):
    """transformers' streamer, handing each finished piece of text to the job instead of printing it."""

    def __init__(self, tokenizer, job: Job):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.job = job

    def on_finalized_text(self, text: str, stream_end: bool = False):
        if text:
            self.job.emit("text", text)


class _Row:
    """One request decoding in the batch: its tokens so far, how it samples, and whether it has ended."""

    def __init__(self, job: Job, tokenizer, stop_ids: list[int]):
        self.job, self.tokenizer, self.stop_ids = job, tokenizer, stop_ids
        self.sampling = Sampling(job.sampling, len(job.prompt_ids))
        self.stops = StopStrings(job.stop)
        self.streamer = _Pieces(tokenizer, job)
        self.streamer.put(torch.tensor(job.prompt_ids))  # the prompt, which the streamer skips
        self.new: list[int] = []
        self.scores: list[TokenScore] | None = [] if job.logprobs is not None else None
        self.result: dict | None = None
        self.error: BaseException | None = None  # this row's own failure (the others go on)

    @property
    def finished(self) -> bool:
        return self.result is not None or self.error is not None

    def report(self) -> None:
        """Send this finished row's outcome to its request."""
        if self.error is not None:
            self.job.emit("error", self.error)
        else:
            self.job.emit("done", self.result)

    def take_or_fail(self, logits: torch.Tensor) -> None:
        """`take`, with a failure (e.g. a sampling error) kept as this row's own."""
        try:
            self.take(logits)
        except Exception as e:  # noqa: BLE001 - this request fails, the batch goes on
            self.error = e
            self.streamer.end()

    def take(self, logits: torch.Tensor) -> None:
        """Choose the next token from this row's logits [V]; set `result` when the answer is complete."""
        # (the tokens seen so far only matter to the penalties: no list is built per token otherwise)
        seen = self.job.prompt_ids + self.new if self.sampling.needs_history else []
        raw = distribution(logits) if self.scores is not None else None  # before any processor sees the logits
        token = self.sampling.choose(logits, seen)
        self.new.append(token)
        if raw is not None:
            self.scores.append(scores_for(raw.unsqueeze(0), [token], self.job.logprobs)[0])
            self.job.emit("logprob", self.scores[-1])  # before the token's text, which a stream sends with it
        self.streamer.put(torch.tensor([token]))
        hit_stop = token in self.stop_ids or (bool(self.stops) and self._stop_string_ended())
        if hit_stop or len(self.new) >= self.job.max_new_tokens or self.job.cancel.is_set():
            self.streamer.end()
            self.result = self.job.result(self.new, self.tokenizer.decode(self.new, skip_special_tokens=True),
                                          hit_stop, self.scores)

    def _stop_string_ended(self) -> bool:
        """Did the newest token complete a stop string? Only the last tokens are decoded: a stop string of n
        characters that ends in this token starts at most n tokens back (a token is at least one character), and
        8 tokens more keep the window's own start (where a decoder may drop a leading space) away from it."""
        window = self.new[-(self.stops.longest + 8):]
        return self.stops.find(self.tokenizer.decode(window, skip_special_tokens=True)) >= 0


MIXED_WHY = "several adapters are served (chattune's step applies the same adapters to every row)"


class Worker:
    def __init__(self, tuned, max_queue: int = 16, max_batch: int = 8, decode_step: str = "auto",
                 adapters: list[str] | None = None, prompt_cache_mb: int = 256):
        """`adapters`: the peft adapter names of the served models where several LoRA adapters share the base
        (serve/adapters.py); each job then says which one it runs with. `prompt_cache_mb`: the budget of the
        prompt cache (serve/prompt_cache.py; 0: none)."""
        if max_queue < 1:
            raise ValueError(f"max_queue must be at least 1 (got {max_queue})")
        self.tuned = tuned
        self.max_queue = max_queue
        # The bound covers both places a waiting request can be (submit checks `waiting`): the queue and the
        # solo (seeded) jobs taken from it while a batch ran.
        self.jobs: queue.Queue[Job] = queue.Queue()
        self.deferred: collections.deque[Job] = collections.deque()  # solo jobs taken from the queue, not yet run
        self.busy = threading.Event()
        self.max_batch = max(1, max_batch)
        t = tuned
        self.pad_id = t.pad_id
        # Decided before the first request, on the loaded model (a fraction of a second on small models).
        self.decode, self.decode_why = None, "--decode-step transformers"
        self.generate_step = False  # one request at a time, transformers' generate decoding through the step
        self.batching = False
        self.adapters = adapters
        if adapters:
            self.decode_why = MIXED_WHY
            self.batching = self.max_batch > 1 and batching_is_exact(t.model, self.pad_id) \
                and mixed_batching_is_exact(t.model, self.pad_id, adapters)
        elif self.max_batch > 1:
            self.decode, self.decode_why = self._decode_step(decode_step)
            self.batching = batching_is_exact(t.model, self.pad_id, decode=self.decode)
            if not self.batching and self.decode is not None:  # the engine without the step, or not at all
                self.decode, self.decode_why = None, "the engine's batching check failed with it"
                self.batching = batching_is_exact(t.model, self.pad_id)
        elif decode_step == "auto":  # --max-batch 1: generate, through the step where its own check passes
            self.decode_why = install_for_generate(t.model, self.pad_id)
            self.generate_step = self.decode_why is None
        self.prompt_cache, self.prompt_cache_why = PromptCache(0), "--prompt-cache 0"
        if prompt_cache_mb > 0:
            self.prompt_cache_why = ("it needs the batching engine" if not self.batching else
                                     None if reuse_is_exact(t.model, self.pad_id, self._forward_for(None), self.decode)
                                     else "reusing a prefix changed this model's logits")
            if self.prompt_cache_why is None:
                self.prompt_cache = PromptCache(prompt_cache_mb << 20)
        self.largest_batch = 0  # the most requests decoded together so far (reported by /health)
        self.thread = threading.Thread(target=self._run, name="chattune-generate", daemon=True)
        self.thread.start()

    def _decode_step(self, choice: str) -> tuple[DecodeStep | None, str | None]:
        """chattune's own decode step (models/decode_step.py) where it drives this model and gives transformers'
        logits on it; else (None, why not)."""
        if choice != "auto":
            return None, "--decode-step transformers"
        why = why_not(self.tuned.model)
        if why:
            return None, why
        step = DecodeStep(self.tuned.model)
        if not step_matches_transformers(self.tuned.model, step, self.pad_id):
            return None, "its logits differ from transformers' on this model"
        return step, None

    @property
    def decode_step(self) -> str:
        """Which code runs a decode step: "chattune" (models/decode_step.py) or "transformers"."""
        return "chattune" if self.decode is not None or self.generate_step else "transformers"

    def submit(self, job: Job) -> None:
        """Queue a job; raises queue.Full when max_queue jobs are already waiting (queued or deferred)."""
        if self.waiting >= self.max_queue:
            raise queue.Full
        self.jobs.put_nowait(job)

    @property
    def waiting(self) -> int:
        return self.jobs.qsize() + len(self.deferred)

    def _run(self) -> None:
        if self.batching:
            self._run_batched(self.pad_id)
        else:
            self._run_one_at_a_time()

    def _next_jobs(self, running: int) -> list[Job]:
        """Jobs to start now (blocking while nothing runs): deferred solo jobs first, then the queue; a solo job
        starts only into an empty batch, and nothing joins it."""
        taken: list[Job] = []
        while running + len(taken) < self.max_batch:
            idle = not (running or taken)
            if self.deferred and idle:
                job = self.deferred.popleft()
            elif self.deferred:
                break  # a seeded job waits for the batch to drain: nothing new joins it meanwhile, so it cannot starve
            else:
                try:
                    job = self.jobs.get() if idle else self.jobs.get_nowait()
                except queue.Empty:
                    break
            if job.cancel.is_set():
                job.skip()
                continue
            if job.solo and not idle:
                self.deferred.append(job)
                continue
            taken.append(job)
            if job.solo:
                break
        return taken

    @torch.inference_mode()
    def _run_batched(self, pad_id: int) -> None:
        t = self.tuned
        model, stop_ids = t.model, t.stop_ids
        rows: list[_Row] = []
        batch: Batch | None = None
        while True:
            newcomers = [] if any(r.job.solo for r in rows) else self._next_jobs(len(rows))
            try:
                if newcomers:
                    self.busy.set()
                    newcomers = self._score_prompts(newcomers)
                    for group, logits, fresh in (self._prefill(model, newcomers, pad_id) if newcomers else []):
                        if batch is None:
                            batch = fresh
                        else:
                            batch.merge(fresh)
                        for job, row_logits in zip(group, logits):
                            rows.append(_Row(job, t.tokenizer, stop_ids if job.stop_ids is None else job.stop_ids))
                            rows[-1].take_or_fail(row_logits)
                    newcomers = []
                    self.largest_batch = max(self.largest_batch, len(rows))
                going = [i for i, r in enumerate(rows) if not r.finished]
                if len(going) < len(rows):
                    for i, r in enumerate(rows):
                        if r.finished:
                            r.report()
                            self._keep_prompt(batch, i, r)
                    rows = [rows[i] for i in going]
                    if rows:
                        batch.keep(going)
                if not rows:
                    batch = None
                    self.busy.clear()
                    continue
                for r, row_logits in zip(rows, batch.step(model, [r.new[-1] for r in rows], self.decode)):
                    r.take_or_fail(row_logits)
            except Exception as e:  # noqa: BLE001 - a forward pass of the whole batch failed; the worker lives on
                for r in rows:  # a row that had finished still gets its answer; the others get the error
                    if r.finished:
                        r.report()
                    else:
                        r.job.emit("error", e)
                for job in newcomers:
                    job.emit("error", e)
                rows, batch = [], None
                self.busy.clear()

    def _score_prompts(self, jobs: list[Job]) -> list[Job]:
        """Score the prompts of the jobs that ask for it; returns the jobs still to decode (a job with
        max_new_tokens 0 is answered here; one whose scoring fails gets its error)."""
        going = []
        for job in jobs:
            try:
                if job.prompt_logprobs is not None:
                    job.prompt_scores = prompt_scores(self.tuned.model, job.prompt_ids, job.prompt_logprobs,
                                                      adapter=job.adapter)
                    job.emit("prompt", job.prompt_scores)  # a stream sends the echoed prompt with them first
                if job.max_new_tokens == 0:
                    job.emit("done", job.result([], "", False))
                    continue
            except Exception as e:  # noqa: BLE001 - this request fails, the others go on
                job.emit("error", e)
                continue
            going.append(job)
        return going

    def prompt_cache_stats(self) -> dict:
        """/health's `prompt_cache`: its budget and use, or why there is none."""
        c = self.prompt_cache
        if not c:
            return {"enabled": False, "why": self.prompt_cache_why}
        return {"enabled": True, "budget_mb": c.budget >> 20, "entries": len(c.entries),
                "mb": round(c.size / 2**20, 1), "hits": c.hits, "reused_tokens": c.reused_tokens}

    def _forward_for(self, adapter: str | None):
        rows = [adapter] if self.adapters else None
        return lambda model, ids, mask, positions, cache: _forward(model, ids, mask, positions, cache, rows)

    def _keep_prompt(self, batch: Batch, i: int, r: _Row) -> None:
        """Put a finished row's keys and values (its prompt and the answer tokens fed back) in the prompt cache."""
        if not self.prompt_cache or r.error is not None or r.job.cancel.is_set() or r.job.solo:
            return
        tokens = r.job.prompt_ids + r.new[:-1]
        n = len(tokens)
        if int(batch.mask[i].sum()) != n or not bool(batch.mask[i, batch.mask.shape[1] - n:].all()):
            return  # (never expected: a row's slots are its fed tokens, after its left padding)
        keys, values = row_cache(batch.cache, i, n)
        self.prompt_cache.put(r.job.adapter, tokens, keys, values)

    def _reuse(self, model, job: Job) -> tuple[list[Job], torch.Tensor, Batch] | None:
        """Prefill `job` after the longest prefix the prompt cache holds for it, or None (no such prefix, a
        seeded request, or a failure: the plain prefill then runs)."""
        if not self.prompt_cache or job.solo:
            return None
        hit = self.prompt_cache.find(job.adapter, job.prompt_ids)
        if hit is None:
            return None
        try:
            logits, cache, mask = prefill_after(model, hit[0], hit[1], job.prompt_ids, self._forward_for(job.adapter),
                                                self.decode)
        except Exception:  # noqa: BLE001 - the plain prefill decides this request's fate
            return None
        return [job], logits, Batch.start(cache, mask, [job.adapter] if self.adapters else None)

    def _prefill(self, model, jobs: list[Job], pad_id: int) -> list[tuple[list[Job], torch.Tensor, Batch]]:
        """Prefill `jobs`: each that the prompt cache holds a prefix for after that prefix, the others together."""
        parts, rest = [], []
        for job in jobs:
            part = self._reuse(model, job)
            if part is None:
                rest.append(job)
            else:
                parts.append(part)
        return parts + (self._prefill_together(model, rest, pad_id) if rest else [])

    def _prefill_together(self, model, jobs: list[Job], pad_id: int) -> list[tuple[list[Job], torch.Tensor, Batch]]:
        """Prefill `jobs` together; when that fails (e.g. out of memory on a long prompt), each on its own, so only
        the prompt that cannot be prefilled fails (its request gets the error)."""
        adapters = [j.adapter for j in jobs] if self.adapters else None
        rows = {"adapters": adapters} if adapters else {}  # (a one-model server calls it as it always did)
        try:
            logits, cache, mask = prefill(model, [j.prompt_ids for j in jobs], pad_id, **rows)
            return [(jobs, logits, Batch.start(cache, mask, adapters))]
        except Exception as e:  # noqa: BLE001 - see the docstring
            if len(jobs) == 1:
                jobs[0].emit("error", e)
                return []
            return [part for job in jobs for part in self._prefill_together(model, [job], pad_id)]

    def _run_one_at_a_time(self) -> None:
        while True:
            job = self.deferred.popleft() if self.deferred else self.jobs.get()
            if job.cancel.is_set():
                job.skip()
                continue
            self.busy.set()
            try:
                if not self._score_prompts([job]):
                    continue
                job.emit("done", self._generate(job))
            except Exception as e:  # noqa: BLE001 - reported to the request, the worker lives on
                job.emit("error", e)
            finally:
                self.busy.clear()

    def _generate(self, job: Job) -> dict:
        t = self.tuned
        device = next(t.model.parameters()).device
        ids = torch.tensor([job.prompt_ids], device=device)
        stop_ids = t.stop_ids if job.stop_ids is None else job.stop_ids
        kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=job.max_new_tokens,
                      eos_token_id=stop_ids, pad_token_id=t.tokenizer.pad_token_id,
                      streamer=_Pieces(t.tokenizer, job), stopping_criteria=StoppingCriteriaList([_Cancelled(job.cancel)]))
        if job.stop:
            kwargs.update(stop_strings=job.stop, tokenizer=t.tokenizer)
        if job.adapter is not None:  # peft's generate applies it to this request's row
            kwargs.update(adapter_names=[job.adapter])
        if not job.sampling.greedy and job.sampling.seed is not None:
            torch.manual_seed(job.sampling.seed)
        kwargs.update(job.sampling.generate_kwargs(), logits_processor=job.sampling.answer_processors(ids.shape[1]))
        if job.logprobs is not None:  # the raw logits of each step (`output_logits`; `output_scores` are processed)
            kwargs.update(output_logits=True, return_dict_in_generate=True)
        with torch.no_grad():
            out = t.model.generate(**kwargs)
        sequences = out.sequences if job.logprobs is not None else out
        new = sequences[0, ids.shape[1]:].tolist()
        scores = None
        if job.logprobs is not None:
            scores = scores_for(distribution(torch.cat(out.logits[:len(new)])), new, job.logprobs) if new else []
        return job.result(new, t.tokenizer.decode(new, skip_special_tokens=True), bool(new) and new[-1] in stop_ids,
                          scores)
