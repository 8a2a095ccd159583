"""The continuous-batching scheduler without any network: exactness, batching, chunking, priorities."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from petals_like.models.spec import ModelSpec
from petals_like.server.kv_cache import KVPool, SequencePages
from petals_like.server.loading import load_span
from petals_like.server.runtime import Priority
from petals_like.server.scheduler import InferenceWork, Scheduler


@pytest.fixture(scope="module")
def span(tiny_model: Path):
    spec = ModelSpec.from_pretrained(tiny_model)
    return load_span(tiny_model, spec, 0, spec.num_blocks, torch.float32, torch.device("cpu"), progress=False)


def make_scheduler(span, token_budget: int = 256, num_pages: int = 512) -> Scheduler:
    spec = span.spec
    pool = KVPool(
        num_layers=len(span.blocks),
        num_kv_heads=spec.num_kv_heads,
        head_dim=spec.head_dim,
        num_pages=num_pages,
        page_size=16,
        dtype=torch.float32,
        device="cpu",
    )
    return Scheduler(span, pool, token_budget=token_budget, gather_wait=0.05)


def alone(span, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Reference: all the steps of one sequence at once through BlockSpan.forward (no cache), split back."""
    with torch.inference_mode():
        out = span(torch.cat(inputs, dim=1))
    return list(out.split([x.shape[1] for x in inputs], dim=1))


async def run_session(scheduler: Scheduler, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    pages = SequencePages()
    outputs = []
    for x in inputs:
        pages.reserve(scheduler.pool, x.shape[1])
        work = InferenceWork(x, [pages], [0], 0, len(scheduler.span.blocks))
        outputs.append(await scheduler.run_inference(work))
    pages.free(scheduler.pool)
    return outputs


async def lined_up(scheduler: Scheduler, steps: list) -> list:
    """Run the coroutines `steps` (one step each) with every one of them queued before an iteration starts."""
    with scheduler.hold():
        tasks = [asyncio.create_task(step) for step in steps]
        while scheduler.num_pending < len(tasks) and not any(t.done() for t in tasks):
            await asyncio.sleep(0)
    return await asyncio.gather(*tasks)


def test_concurrent_sessions_equal_alone_and_share_iterations(span):
    """Steps queued together run in one iteration: 8 sessions of 33 steps, in lockstep, take 33."""
    scheduler = make_scheduler(span)
    sizes: list[int] = []
    scheduler.on_iteration = lambda chosen: sizes.append(len(chosen))
    try:
        torch.manual_seed(0)
        sessions = [[torch.randn(1, n, 64)] + [torch.randn(1, 1, 64) for _ in range(32)] for n in range(3, 19, 2)]
        pages = [SequencePages() for _ in sessions]

        async def step(i: int, x: torch.Tensor) -> torch.Tensor:
            pages[i].reserve(scheduler.pool, x.shape[1])
            return await scheduler.run_inference(InferenceWork(x, [pages[i]], [0], 0, len(span.blocks)))

        async def main():
            rounds = []
            for r in range(33):
                rounds.append(await lined_up(scheduler, [step(i, s[r]) for i, s in enumerate(sessions)]))
            return [list(outputs) for outputs in zip(*rounds)]

        results = asyncio.run(main())
        for inputs, outputs in zip(sessions, results):
            for got, want in zip(outputs, alone(span, inputs)):
                assert torch.allclose(got, want, rtol=1e-4, atol=1e-3), (got - want).abs().max()
        # the prompts (80 tokens) fit the budget of 256, so every round is one iteration of all 8
        assert sizes == [8] * 33, sizes
        for p in pages:
            p.free(scheduler.pool)
        assert scheduler.pool.num_free == scheduler.pool.num_pages
    finally:
        scheduler.shutdown()


def test_hold_lines_up_a_long_prompt_with_decodes_and_chunks_it(span):
    """A 200-token prompt queued with 4 decode steps under a 64-token budget: the first iteration takes
    the 4 decodes and one prefill_chunk of the prompt; the prompt's rest runs in later iterations."""
    scheduler = make_scheduler(span, token_budget=64)
    plans: list[list[tuple[int, int]]] = []  # (rows, remaining) of each chosen work, per iteration
    scheduler.on_iteration = lambda chosen: plans.append([(w.hidden.shape[0], w.remaining) for w in chosen])
    try:
        torch.manual_seed(2)
        pages = [SequencePages() for _ in range(5)]
        for p in pages[:4]:
            p.reserve(scheduler.pool, 1)
        pages[4].reserve(scheduler.pool, 200)
        inputs = [torch.randn(1, 1, 64) for _ in range(4)] + [torch.randn(1, 200, 64)]

        async def main():
            works = [scheduler.run_inference(InferenceWork(x, [p], [0], 0, len(span.blocks))) for x, p in zip(inputs, pages)]
            return await lined_up(scheduler, works)

        outputs = asyncio.run(main())
        assert plans[0] == [(1, 1)] * 4 + [(1, 200)], plans[0]
        assert scheduler.stats.chunked_steps == 1 and outputs[4].shape == (1, 200, 64)
        # 4 decodes + one 16-token chunk, then the prompt alone in chunks of at most the budget
        assert [sum(1 for _, rem in plan if rem == 1) for plan in plans] == [4] + [0] * (len(plans) - 1)
        assert len(plans) == 1 + -(-(200 - scheduler.prefill_chunk) // 64), plans
        for p in pages:
            p.free(scheduler.pool)
    finally:
        scheduler.shutdown()


def test_chunked_prefill_never_leaves_a_decode_out(span):
    scheduler = make_scheduler(span, token_budget=64)
    scheduler.prefill_chunk = 64  # the setting: the budget alone limits the chunk
    seen: list[tuple[int, int]] = []  # (decode works pending, decode works chosen) per iteration

    def on_iteration(chosen):
        pending = [w for w in scheduler._pending if w.remaining == 1 and not w.cancelled]
        seen.append((len(pending), sum(1 for w in chosen if w.remaining == 1)))

    scheduler.on_iteration = on_iteration
    try:
        torch.manual_seed(1)
        prompt = torch.randn(1, 1024, 64)
        decoders = [[torch.randn(1, 5, 64)] + [torch.randn(1, 1, 64) for _ in range(30)] for _ in range(4)]

        async def main():
            decoding = [asyncio.create_task(run_session(scheduler, d)) for d in decoders]
            await asyncio.sleep(0.05)
            long = await run_session(scheduler, [prompt])
            return long, await asyncio.gather(*decoding)

        (long_out,), decoded = asyncio.run(main())
        with torch.inference_mode():
            unchunked = span(prompt)
        assert torch.allclose(long_out, unchunked, rtol=1e-4, atol=1e-3)
        assert scheduler.stats.chunked_steps >= 1 and scheduler.stats.max_batch_tokens <= 64
        assert all(chosen == pending for pending, chosen in seen), seen
        for inputs, outputs in zip(decoders, decoded):
            for got, want in zip(outputs, alone(span, inputs)):
                assert torch.allclose(got, want, rtol=1e-4, atol=1e-3)
    finally:
        scheduler.shutdown()


def test_forward_work_waits_for_inference(span):
    scheduler = make_scheduler(span, token_budget=50)
    try:

        async def main() -> int:
            pages = SequencePages()
            pages.reserve(scheduler.pool, 200)
            work = InferenceWork(torch.randn(1, 200, 64), [pages], [0], 0, len(span.blocks))
            inference = asyncio.create_task(scheduler.run_inference(work))
            await asyncio.sleep(0)  # the step is queued; it needs 4 iterations of 50 tokens
            remaining_when_forward_ran = await scheduler.submit(Priority.FORWARD, lambda: work.remaining)
            await inference
            return remaining_when_forward_ran

        assert asyncio.run(main()) == 0  # forward work ran only after every chunk of the inference step
        assert scheduler.stats.tasks == 1 and scheduler.stats.chunked_steps == 1
    finally:
        scheduler.shutdown()


def test_a_prompt_advances_by_chunks_while_other_sessions_are_active(span):
    """Between their steps, decoding sessions are elsewhere (other servers, their clients): a long
    prompt still advances only by prefill_chunk, so that they never come back to a long iteration."""
    scheduler = make_scheduler(span, token_budget=256)
    scheduler.prefill_chunk = 32
    active = {"sessions": 1}
    scheduler.expected_works = lambda: active["sessions"]
    try:
        prompt = torch.randn(1, 256, 64)
        asyncio.run(run_session(scheduler, [prompt]))
        assert scheduler.stats.max_batch_tokens == 256  # alone: the whole budget at once
        active["sessions"] = 5  # four more sessions are active, none has a step pending right now
        before = scheduler.stats.iterations
        (out,) = asyncio.run(run_session(scheduler, [prompt]))
        assert scheduler.stats.iterations - before == 256 // 32
        with torch.inference_mode():
            assert torch.allclose(out, span(prompt), rtol=1e-4, atol=1e-3)
    finally:
        scheduler.shutdown()


class _CancelledAsItIsRead(InferenceWork):
    """A work whose session goes away just as the scheduler first looks at it: the flag reads
    False once, then True (the event loop sets it from another thread at any moment)."""

    _reads = 0

    @property
    def cancelled(self) -> bool:
        self._reads += 1
        return self._reads > 1

    @cancelled.setter
    def cancelled(self, value: bool) -> None:
        pass


def test_a_work_cancelled_while_the_queue_is_read_keeps_its_pages_until_it_is_done(span):
    """The scheduler decides once whether a work runs or is dropped: a work that both ran and was
    dropped would have its pages freed (after_done) while an iteration still writes into them."""
    scheduler = make_scheduler(span)
    try:

        async def main() -> tuple[torch.Tensor, list[int]]:
            pages = SequencePages()
            pages.reserve(scheduler.pool, 40)
            work = _CancelledAsItIsRead(torch.randn(1, 40, 64), [pages], [0], 0, len(span.blocks))
            remaining_at_release = []
            released = asyncio.Event()

            def release() -> None:  # what SessionManager.close does for a session with a step in flight
                remaining_at_release.append(work.remaining)
                pages.free(scheduler.pool)
                released.set()

            work.after_done(release)
            out = await scheduler.run_inference(work)
            await asyncio.wait_for(released.wait(), 10)  # the scheduler hands the release to this loop
            return out, remaining_at_release

        out, remaining_at_release = asyncio.run(main())
        assert out.shape == (1, 40, 64)
        assert remaining_at_release == [0]  # released once, after its last token ran
        assert scheduler.pool.num_free == scheduler.pool.num_pages
    finally:
        scheduler.shutdown()
