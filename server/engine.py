"""The engine: continuous batching of generation requests on one model. It knows nothing about HTTP.

One thread owns the model and loops over steps. A step
  1. takes in new requests and aborts (thread-safe inbox), fails timed-out sequences;
  2. admits waiting sequences while batch slots and KV budget allow (FIFO);
  3. prefills: up to `prefill_chunk` prompt tokens of admitted sequences, packed into one forward;
     a sequence whose prompt is complete samples its first token and joins the running batch;
  4. decodes: one token for every running sequence in one batched forward.
So requests join and leave the batch between steps and a long prompt never stalls running streams for
more than one chunk. When the KV cache must grow past its budget, the newest running sequence is
preempted (its cache dropped, recomputed from its tokens when re-admitted; its output is unaffected).

Outputs go to each request's `sink` (called on the engine thread; the caller hands them over to its own
thread); stats records go to `stats_sink`.
"""

from __future__ import annotations

import gc
import logging
import queue
import threading
import time
from collections import deque
from typing import Callable

import torch

from ucformat.errors import PackError

from .kv_cache import SlotKVCache
from .memory import trim_heap
from .runner import ModelRunner
from .sampling import Sampler, SamplingParams, TokenLogprob, logprob_entries
from .sequence import DONE, PREFILL, RUNNING, WAITING, EngineRequest, Sequence, SequenceOutput
from .stats import IterationStats, RequestRecord, SchedulerStats

log = logging.getLogger(__name__)

IDLE_RELEASE_S = 0.5  # how long the engine stays idle before it frees the KV cache


class EngineError(Exception):
    """Base of what submit() refuses."""


class QueueFull(EngineError):
    def __init__(self, queued: int, limit: int) -> None:
        super().__init__(f"the server is at capacity (batch full and {queued} sequences waiting, --max-queue "
                         f"{limit}); retry later")


class EngineStopped(EngineError):
    pass


class Engine:
    def __init__(self, model, tokenizer, kv: SlotKVCache, *, max_num_seqs: int = 32, max_queue: int = 256,
                 max_model_len: int, prefill_chunk: int = 512, eos_token_ids: tuple[int, ...] = (),
                 stats_sink: Callable[[object], None] | None = None, cuda_graphs: bool = True,
                 pack: str | None = None, probe: Callable[[], None] | None = None) -> None:
        """`pack`: the pack the weights come from (named in errors); `probe`: re-checks the pack files still read
        while serving and raises PackError if one is unusable (the runtime's check_files)."""
        self.model, self.tokenizer, self.kv = model, tokenizer, kv
        self.pack, self.probe = pack, probe
        self._fault: str | None = None  # why the pack could not be read, since a forward failed reading it
        self.runner = ModelRunner(model, kv, cuda_graphs=cuda_graphs)
        self.max_num_seqs, self.max_queue = max_num_seqs, max_queue
        self.max_model_len, self.prefill_chunk = max_model_len, prefill_chunk
        self.eos = tuple(eos_token_ids)
        head = model.get_output_embeddings()
        vocab = getattr(head, "out_features", None) or head.weight.shape[0]
        self.sampler = Sampler(min(vocab, len(tokenizer)), self.eos)
        self.vocab_size = self.sampler.vocab_size
        self.stats_sink = stats_sink or (lambda rec: None)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._queued = 0  # sequences submitted and not yet admitted (guarded by _lock)
        self._preempted_waiting = 0  # preempted sequences waiting to be re-admitted (engine thread)
        self._unfinished = 0  # sequences not finished (guarded by _lock)
        self.waiting: deque[Sequence] = deque()
        self.prefilling: list[Sequence] = []
        self.running: list[Sequence] = []  # running[i].row == i
        self.row_owner: list[Sequence | None] = []
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    # -- public API (any thread) -------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="uc-engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._inbox.put(("wake", None))
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, req: EngineRequest) -> None:
        if self._stop.is_set():
            raise EngineStopped("the engine is shut down")
        with self._lock:
            # room: free batch slots (read racily from the engine thread: a bound, not a promise) + the queue
            free = max(self.max_num_seqs - len(self.running) - len(self.prefilling), 0)
            if self._queued + req.n > self.max_queue + free:
                raise QueueFull(self._queued, self.max_queue)
            self._queued += req.n
            self._unfinished += req.n
        self._inbox.put(("add", req))

    def abort(self, request_id: str, record: bool = True) -> None:
        """End the request's sequences as aborted and free their slots at the next step. record=False: the
        caller counts the failure itself (under its own reason), so the engine records no outcome."""
        self._inbox.put(("abort", (request_id, record)))

    def num_unfinished(self) -> int:
        return self._unfinished

    def scheduler_stats(self) -> SchedulerStats:
        owners = [s for s in self.row_owner if s is not None]
        return SchedulerStats(
            running=len(self.running) + len(self.prefilling), waiting=self._queued + self._preempted_waiting,
            kv_used_tokens=sum(s.cached for s in owners), kv_capacity_tokens=self.kv.budget_tokens,
            kv_allocated_bytes=self.kv.allocated_bytes, kv_budget_bytes=self.kv.budget_tokens * self.kv.shape.bytes_per_token)

    def pack_fault(self) -> str | None:
        """Why the pack can no longer be read, or None. Set when a forward fails reading it; cleared once the
        probe finds its files usable again (a file restored), so readiness follows the files."""
        if self._fault is not None and self.probe is not None:
            try:
                self.probe()
            except PackError as exc:
                self._fault = str(exc)
            else:
                log.info("the pack %s is readable again", self.pack)
                self._fault = None
        return self._fault

    def warmup(self, timeout: float = 600.0) -> None:
        """Generate one token through the whole path; raise if that fails."""
        done = threading.Event()
        result: list[SequenceOutput] = []

        def sink(out: SequenceOutput) -> None:
            if out.finished:
                result.append(out)
                done.set()

        prompt = self.tokenizer("Hello", add_special_tokens=True).input_ids or [0]
        self.submit(EngineRequest("warmup", prompt, SamplingParams(max_tokens=1, temperature=0.0), sink,
                                  internal=True))
        if not done.wait(timeout) or result[0].error:
            raise RuntimeError(f"warm-up failed: {result[0].error_message if result else 'timed out'}")
        # the model's Python objects (modules, parameters, tokenizer: ~10^5 of them) into the permanent
        # generation: the collections that each step's allocations trigger stop walking them (py-spy/perf on
        # a 16-row SmolLM2 decode: ~2% of the CPU in gc_collect_main before)
        gc.collect()
        gc.freeze()

    # -- loop ------------------------------------------------------------------------------------------
    def _has_work(self) -> bool:
        return bool(self.waiting or self.prefilling or self.running)

    def _loop(self) -> None:
        with torch.inference_mode():  # KV buffers, logits and sampling all live in inference mode
            self._run()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._drain_inbox(block=not self._has_work())
                if not self._has_work():
                    continue
                self._step()
            except Exception as exc:  # never let the loop die: fail what was in flight, keep serving
                log.exception("engine step failed")
                self._fail_all(f"internal error: {type(exc).__name__}: {exc}")
        self._fail_all("the server is shutting down", error="aborted")

    def _drain_inbox(self, block: bool) -> None:
        timeout = None
        if block:
            # idle: give the KV memory back, but only once the engine has stayed idle IDLE_RELEASE_S. Clients
            # that send their next request as soon as the last one ends would otherwise pay a reallocation
            # (zeroed, page-faulted in again) at every turn: ~5% of the engine's time at 16 closed-loop clients.
            timeout = IDLE_RELEASE_S if self.kv.rows else 1.0
        while True:
            try:
                kind, item = self._inbox.get(block=block, timeout=timeout)
            except queue.Empty:
                if block and self.kv.rows:
                    self.kv.release()
                    trim_heap()
                return
            block = False
            if kind == "add":
                for i in range(item.n):
                    self.waiting.append(Sequence(item, i, self.tokenizer))
            elif kind == "abort":
                rid, record = item
                for seq in [*self.waiting, *self.prefilling, *self.running]:
                    if seq.req.request_id == rid:
                        self._finish(seq, error="aborted", message="the client went away", record=record)

    def _step(self) -> None:
        now = time.monotonic()
        for seq in [*self.waiting, *self.prefilling, *self.running]:
            if seq.deadline is not None and now > seq.deadline:
                self._finish(seq, error="timeout", message=f"the request timed out after {seq.req.timeout:g} s")
        self._admit(now)
        prompt_tokens, ttfts, itls, preempted = 0, [], [], 0
        if self.prefilling:
            prompt_tokens = self._prefill(ttfts)
        gen = len(ttfts)
        if self.running:
            preempted = self._make_room()
            if self.running:
                gen += self._decode(itls)
        self._record(IterationStats(prompt_tokens, gen, tuple(ttfts), tuple(itls), preempted))

    # -- scheduling ---------------------------------------------------------------------------------------
    def _used_rows(self) -> int:
        while self.row_owner and self.row_owner[-1] is None:
            self.row_owner.pop()
        return len(self.row_owner)

    def _max_cached(self) -> int:
        return max((s.cached for s in self.row_owner if s is not None), default=0)

    def _admit(self, now: float) -> None:
        # a burst of arrivals takes its cache rows in one reallocation, not one per doubling
        expect = min(len(self.running) + len(self.prefilling) + len(self.waiting), self.max_num_seqs)
        while self.waiting and len(self.running) + len(self.prefilling) < self.max_num_seqs:
            seq = self.waiting[0]
            row = next((i for i in range(len(self.running), len(self.row_owner)) if self.row_owner[i] is None),
                       len(self.row_owner))
            need_cols = max(self._max_cached() + 1,
                            max((len(s.all_ids) + 1 for s in self.row_owner if s is not None), default=0),
                            len(seq.all_ids) + 1)
            need_rows = max(row + 1, self._used_rows())
            if not self.kv.fits(need_rows, need_cols):
                if not self.prefilling and not self.running:  # cannot fit even alone: validation let it through
                    self._finish(seq, error="internal", message="the sequence does not fit the KV cache budget")
                    continue
                break
            self.waiting.popleft()
            self.kv.ensure(need_rows, need_cols, self._used_rows(), self._max_cached(), expect)
            if row == len(self.row_owner):
                self.row_owner.append(None)
            self.row_owner[row] = seq
            seq.row, seq.cached, seq.state = row, 0, PREFILL
            if seq.t_admitted is None:
                seq.t_admitted = now
                self._dequeued(seq)
            else:
                self._preempted_waiting -= 1
            self.prefilling.append(seq)

    def _dequeued(self, seq: Sequence) -> None:
        with self._lock:
            self._queued -= 1

    def _make_room(self) -> int:
        """Before a decode step: grow the cache by one column if needed, preempting the newest running
        sequences while the budget does not allow it. Returns how many were preempted."""
        preempted = 0
        while True:
            need_cols = max(s.cached for s in self.running) + 1
            if self.kv.fits(self._used_rows(), need_cols) or len(self.running) + len(self.prefilling) <= 1:
                break
            victim = max(self.running + self.prefilling, key=lambda s: s.t_admitted)
            log.info("KV budget full: preempting %s (recomputed later)", victim.req.request_id)
            self._release_row(victim)
            victim.state, victim.cached = WAITING, 0
            if not victim.prompt_logprobs_sent and victim.prompt_logprobs is not None:
                victim.prompt_logprobs = [None]
            self.waiting.appendleft(victim)
            self._preempted_waiting += 1
            preempted += 1
            if not self.running:
                return preempted
        self.kv.ensure(self._used_rows(), need_cols, self._used_rows(), self._max_cached())
        return preempted

    def _release_row(self, seq: Sequence) -> None:
        """Take a sequence out of the batch, keeping running rows contiguous."""
        if seq.state == RUNNING:
            i, last = seq.row, self.running[-1]
            if last is not seq:
                self.kv.move_row(last.row, i, last.cached)
                last.row, self.running[i], self.row_owner[i] = i, last, last
            self.running.pop()
            self.row_owner[len(self.running)] = None
        elif seq.state == PREFILL:
            self.prefilling.remove(seq)
            self.row_owner[seq.row] = None
        seq.row = None

    def _to_running(self, seq: Sequence) -> None:
        """A prefilled sequence takes row R (the first after the running ones)."""
        r = len(self.running)
        if seq.row != r:
            other = self.row_owner[r]
            if other is None:
                self.kv.move_row(seq.row, r, seq.cached)
                self.row_owner[seq.row] = None
            else:  # another prefilling sequence sits there: swap them
                self.kv.swap_rows(seq.row, r, max(seq.cached, other.cached))
                other.row, self.row_owner[seq.row] = seq.row, other
            seq.row, self.row_owner[r] = r, seq
        self.prefilling.remove(seq)
        seq.state = RUNNING
        self.running.append(seq)

    # -- forwards -----------------------------------------------------------------------------------------
    def _prefill(self, ttfts: list[float]) -> int:
        budget, segments, tokens, keep, plan = self.prefill_chunk, [], [], [], []
        for seq in self.prefilling:
            if budget <= 0:
                break
            take = min(len(seq.all_ids) - seq.cached, budget)
            start = len(tokens)
            segments.append((seq.row, seq.cached, take))
            tokens += seq.all_ids[seq.cached: seq.cached + take]
            done = seq.cached + take == len(seq.all_ids)
            want_prompt = seq.prompt_logprobs is not None and not seq.prompt_logprobs_sent
            first_keep = len(keep)
            if want_prompt:
                keep += range(start, start + take)
            elif done:
                keep.append(start + take - 1)
            plan.append((seq, take, done, want_prompt, first_keep))
            budget -= take
        try:
            logits = self.runner.prefill(segments, tokens, keep)
        except Exception as exc:
            self._forward_failed([seq for seq, *_ in plan], "prefill", exc)
            return 0
        now = time.monotonic()
        finishing, rows = [], []
        for seq, take, done, want_prompt, first_keep in plan:
            seq.cached += take
            if want_prompt:
                self._prompt_logprobs(seq, logits[first_keep: first_keep + take], take)
        for seq, take, done, want_prompt, first_keep in plan:
            if done:
                self._to_running(seq)
                if seq.params.max_tokens == 0 or (seq.num_output == 0 and len(seq.all_ids) >= self.max_model_len):
                    self._emit(seq, "", (), (), "length", now)
                    continue
                finishing.append(seq)
                rows.append(first_keep + (take - 1 if want_prompt else 0))
        if finishing:
            toks, lps = self.sampler(logits[rows], [s.rows for s in finishing])
            for seq, tok, lp in zip(finishing, toks, lps):
                if seq.t_first is None:
                    ttfts.append(now - seq.req.arrival)
                self._append(seq, tok, lp, now)
        return len(tokens)

    def _prompt_logprobs(self, seq: Sequence, logits: torch.Tensor, take: int) -> None:
        # logits[i] predicts the token after position cached-take+i
        lp = torch.log_softmax(logits[:, : self.vocab_size].float(), dim=-1)
        start = seq.cached - take
        nxt = seq.all_ids[start + 1: seq.cached + 1]
        k = seq.params.prompt_logprobs
        seq.prompt_logprobs += logprob_entries(lp[: len(nxt)], nxt, [k] * len(nxt))

    def _decode(self, itls: list[float]) -> int:
        seqs = list(self.running)
        try:
            logits = self.runner.decode([s.all_ids[-1] for s in seqs], [s.cached for s in seqs])
            toks, lps = self.sampler(logits, [s.rows for s in seqs])
        except Exception as exc:
            self._forward_failed(seqs, "decode", exc)
            return 0
        now = time.monotonic()
        for seq in seqs:
            seq.cached += 1
        for seq, tok, lp in zip(seqs, toks, lps):
            if seq.t_last is not None:
                itls.append(now - seq.t_last)
            self._append(seq, tok, lp, now)
        return len(seqs)

    def _forward_failed(self, seqs: list[Sequence], where: str, exc: Exception) -> None:
        """Fail the sequences of a forward that raised; the engine goes on with the next step. A pack that could
        not be read (a streamed layer's file altered or gone) is an error naming the pack, and marks it faulty."""
        if isinstance(exc, PackError):
            self._fault = str(exc)
            log.error("%s failed reading the pack %s: %s", where, self.pack, exc)
            error, message = "pack", f"the pack {self.pack} cannot be read: {exc}"
        else:
            log.exception("%s failed", where)
            error, message = "internal", f"internal error in {where}: {type(exc).__name__}: {exc}"
        for seq in seqs:
            self._finish(seq, error=error, message=message)

    # -- tokens and outputs -----------------------------------------------------------------------------------
    def _append(self, seq: Sequence, tok: int, lp: TokenLogprob | None, now: float) -> None:
        text, finish = seq.append(tok, self.eos, self.max_model_len)
        self._emit(seq, text, (tok,), (lp,) if lp is not None else (), finish, now)

    def _emit(self, seq: Sequence, text: str, toks: tuple, lps: tuple, finish: str | None, now: float) -> None:
        if seq.t_first is None and toks:
            seq.t_first = now
        if toks:
            seq.t_last = now
        prompt_lps = None
        if seq.prompt_logprobs is not None and not seq.prompt_logprobs_sent:
            prompt_lps, seq.prompt_logprobs_sent = tuple(seq.prompt_logprobs), True
        self._send(seq, SequenceOutput(seq.req.request_id, seq.index, toks, text, lps, prompt_lps, finish,
                                       num_prompt_tokens=seq.num_prompt, num_output_tokens=seq.num_output))
        if finish is not None:
            self._done(seq, finish, now)

    def _send(self, seq: Sequence, out: SequenceOutput) -> None:
        try:
            seq.req.sink(out)
        except Exception:  # a broken consumer must not take the engine down
            log.exception("output sink of %s failed", seq.req.request_id)

    def _finish(self, seq: Sequence, error: str, message: str, record: bool = True) -> None:
        """End a sequence with a failure (aborted, timeout, internal)."""
        if seq.state == DONE:
            return
        if seq.state == WAITING:
            if seq in self.waiting:
                self.waiting.remove(seq)
            if seq.t_admitted is None:
                self._dequeued(seq)
            else:  # admitted before, so preempted
                self._preempted_waiting -= 1
        self._send(seq, SequenceOutput(seq.req.request_id, seq.index, error=error, error_message=message,
                                       num_prompt_tokens=seq.num_prompt, num_output_tokens=seq.num_output))
        self._done(seq, error, time.monotonic(), record)

    def _done(self, seq: Sequence, outcome: str, now: float, record: bool = True) -> None:
        if seq.state in (RUNNING, PREFILL):
            self._release_row(seq)
        seq.state = DONE
        with self._lock:
            self._unfinished -= 1
        if seq.req.internal or not record:
            return
        arr = seq.req.arrival
        self._record(RequestRecord(
            outcome=outcome, prompt_tokens=seq.num_prompt, generation_tokens=seq.num_output, e2e=now - arr,
            queue=(seq.t_admitted - arr) if seq.t_admitted is not None else None,
            prefill=(seq.t_first - seq.t_admitted) if seq.t_first is not None and seq.t_admitted is not None else None,
            decode=(now - seq.t_first) if seq.t_first is not None else None, max_tokens=seq.params.max_tokens))

    def _fail_all(self, message: str, error: str = "internal") -> None:
        for seq in [*self.waiting, *self.prefilling, *self.running]:
            try:
                self._finish(seq, error=error, message=message)
            except Exception:
                log.exception("failing %s", seq.req.request_id)
        self.waiting.clear()
        self.prefilling.clear()
        self.running.clear()
        self.row_owner.clear()
        while True:  # requests still in the inbox
            try:
                kind, item = self._inbox.get_nowait()
            except queue.Empty:
                break
            if kind == "add":
                for i in range(item.n):
                    self._finish(Sequence(item, i, self.tokenizer), error=error, message=message)

    def _record(self, rec) -> None:
        try:
            self.stats_sink(rec)
        except Exception:
            log.exception("stats sink failed")
