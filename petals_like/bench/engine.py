"""Engine workloads of the benchmark (continuous batching, chunked prefill, prefix cache, paged pool).

(d) N concurrent sessions (16-token prompt + 64 new tokens each), N = 1, 4, 16, 32:
    aggregate tokens/s and p50 / p90 per-token latency
(e) 8 sessions decoding while one session prefills 2048 tokens: their p50 / p90 step latency,
    against the same 8 sessions without the prefill
(f) two sessions with the same 1024-token prefix: prefill seconds of the second vs the first
(g) with a pool of 4096 tokens, how many sessions of max_length=2048 that each use 200 tokens
    are open at once
(p) (d)'s 1 and 16 sessions from a client whose sessions share one mux stream per server
    (client/mux.py) and from one where each session has its own streams, side by side: aggregate
    tokens/s, 16 vs 1, and the client's messages per server per round
"""

from __future__ import annotations

import statistics
import threading
import time

from petals_like.bench.harness import TokenTimer, percentile, pick_median, prompt, server_infos, sessions_at_once


def concurrent_sessions(model, counts=(1, 4, 16, 32), prompt_len: int = 16, new_tokens: int = 64, rounds: int = 1) -> dict:
    """(d). Each round runs every count once, in order; per count, the median round is reported, and
    vs_one_session is the median over rounds of its rate over the one-session rate of the same
    round (a noisy moment of the machine then weighs on both sides of a ratio alike)."""
    runs: dict[int, list[dict]] = {count: [] for count in counts}
    for _ in range(rounds):
        for count in counts:
            runs[count].append(sessions_at_once(model, count, prompt_len, new_tokens))
    results = {}
    for count, measured in runs.items():
        ratios = [m["aggregate_tokens_per_s"] / one["aggregate_tokens_per_s"] for m, one in zip(measured, runs[counts[0]])]
        results[str(count)] = dict(
            pick_median(measured, "aggregate_tokens_per_s"),
            vs_one_session=round(statistics.median(ratios), 2),
            tokens_per_s_per_round=[m["aggregate_tokens_per_s"] for m in measured],
            vs_one_session_per_round=[round(r, 2) for r in ratios],
        )
    return results


def multiplexed_sessions(swarm, count: int = 16, new_tokens: int = 64, rounds: int = 1) -> dict:
    """(p). Both clients run on the same swarm, one after the other in each round (the order swaps
    every round); per client, the median round is reported, and the 16-vs-1 ratio is the median of
    the per-round ratios. A round of `count` sessions is one step of each; the client's messages
    are the steps it sent on sessions' own streams plus its mux messages, counted by the servers."""
    from petals_like import AutoDistributedModelForCausalLM

    own = AutoDistributedModelForCausalLM.from_pretrained(
        swarm.model_dir, initial_peers=swarm.peers, torch_dtype="float32", multiplex=False
    )
    clients = {"own_streams": own, "multiplexed": swarm.model}
    runs: dict[str, list[tuple[dict, dict, float]]] = {name: [] for name in clients}
    try:
        for model in clients.values():  # warm-up: routes, streams, muxes
            sessions_at_once(model, count, new_tokens=8)
        for r in range(rounds):
            for name in list(clients)[:: 1 if r % 2 == 0 else -1]:
                model = clients[name]
                one = sessions_at_once(model, 1, new_tokens=new_tokens)
                before = server_infos(model)
                many = sessions_at_once(model, count, new_tokens=new_tokens)
                after = server_infos(model)
                messages = [
                    (a.stream_steps_received + a.mux_messages_received)
                    - (before[p].stream_steps_received + before[p].mux_messages_received)
                    for p, a in after.items()
                    if p in before
                ]
                runs[name].append((one, many, max(messages) / new_tokens))
    finally:
        own.shutdown()
    results = {}
    for name, measured in runs.items():
        ratios = [many["aggregate_tokens_per_s"] / one["aggregate_tokens_per_s"] for one, many, _ in measured]
        results[name] = {
            "1": pick_median([one for one, _, _ in measured], "aggregate_tokens_per_s"),
            str(count): pick_median([many for _, many, _ in measured], "aggregate_tokens_per_s"),
            f"{count}_vs_one_session": round(statistics.median(ratios), 2),
            "vs_one_session_per_round": [round(r, 2) for r in ratios],
            "client_messages_per_server_per_round": round(statistics.median(m for _, _, m in measured), 2),
        }
    return results


def decode_during_prefill(model, decoders: int = 8, prefill_len: int = 2048, steps: int = 24) -> dict:
    """(e)"""

    def decode_latencies(with_prefill: bool) -> list[float]:
        timers = [TokenTimer() for _ in range(decoders)]
        started = threading.Event()

        def decoder(i: int) -> None:
            with model.inference_session(max_length=16 + steps, reuse_prefix=False) as session:
                model.generate(prompt(16, 100 + i), max_new_tokens=2, session=session, eos_token_id=[])
                started.set()
                timers[i].started = time.perf_counter()
                model.generate(None, max_new_tokens=steps - 2, session=session, eos_token_id=[], streamer=timers[i])

        def prefiller() -> None:
            started.wait()
            with model.inference_session(max_length=prefill_len + 1, reuse_prefix=False) as session:
                session.step(model.local.embed(prompt(prefill_len, 7, model.spec.vocab_size)))

        threads = [threading.Thread(target=decoder, args=(i,)) for i in range(decoders)]
        if with_prefill:
            threads.append(threading.Thread(target=prefiller))
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return [lat for timer in timers for lat in timer.latencies()]

    alone, during = decode_latencies(False), decode_latencies(True)
    summary = {
        name: {"p50_ms": round(1000 * statistics.median(lat), 1), "p90_ms": round(1000 * percentile(lat, 0.9), 1)}
        for name, lat in (("without_prefill", alone), ("during_prefill", during))
    }
    summary["p90_ratio"] = round(summary["during_prefill"]["p90_ms"] / summary["without_prefill"]["p90_ms"], 2)
    return summary


def shared_prefix(model, prefix_len: int = 1024) -> dict:
    """(f)"""
    input_ids = prompt(prefix_len, 11, model.spec.vocab_size)
    times, reused = [], []
    for _ in range(2):
        with model.inference_session(max_length=prefix_len + 1) as session:
            hidden = model.local.embed(input_ids)
            started = time.perf_counter()
            session.step(hidden, token_ids=input_ids)
            times.append(time.perf_counter() - started)
            reused.append(session.reused_tokens)
    return {
        "first_s": round(times[0], 3),
        "second_s": round(times[1], 3),
        "ratio": round(times[1] / times[0], 3),
        "second_reused_tokens": reused[1],
    }


def sessions_in_pool(model, max_length: int = 2048, used: int = 200, limit: int = 64) -> dict:
    """(g): open sessions until a server refuses one for lack of pages."""
    sessions, error = [], ""
    try:
        for i in range(limit):
            session = model.inference_session(max_length=max_length, reuse_prefix=False)
            model.config.max_retries, retries = 0, model.config.max_retries  # a refusal must not reroute
            try:
                session.step(model.local.embed(prompt(used, 200 + i, model.spec.vocab_size)))
            except Exception as e:
                error = str(e)[:200]
                session.close()
                break
            finally:
                model.config.max_retries = retries
            sessions.append(session)
    finally:
        for session in sessions:
            session.close()
    return {"sessions_open_at_once": len(sessions), "refusal": error, "reserving_max_length_would_admit": 4096 // max_length}
