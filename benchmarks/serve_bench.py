"""Decode speed of an OpenAI-compatible chat server: single stream, and C concurrent streams.

Works against any server with `/v1/models` and streaming `/v1/chat/completions` (chattune serve, llama.cpp's
servers, vLLM, ...), so two servers can be compared on the same model with the same client. Needs only the
standard library and httpx.

Method
- Every request streams (`stream: true`), uses temperature 0 and `max_tokens N`, and asks for
  `stream_options: {"include_usage": true}`. Completion tokens are taken from `usage.completion_tokens` when the
  server sends it; otherwise the content-bearing chunks are counted (one per token on most servers). The output
  says which ("tokens from").
- One untimed warm-up request is sent first (the first request often pays for loading or compiling).
- Single stream: one request at a time, repeated `--repeats` times (3) with the first prompt of the set.
  TTFT = time from sending the request to the first chunk with non-empty content.
  decode tok/s = (completion tokens - 1) / (time of the last chunk - time of the first content chunk):
  the first token is excluded because its time is the prefill (TTFT). Reported as the median of the repeats.
- Aggregate: C threads (`--clients`), each with its own connection and a different prompt, are released together
  by a barrier; each streams one request. aggregate tok/s = total completion tokens of all clients / wall time
  from the first request sent to the last stream finished. Per client: its tokens, TTFT, decode tok/s (as above)
  and end-to-end tok/s (tokens / its own request time). A server that serialises requests shows an aggregate
  close to the single-stream rate and TTFTs that grow with the client's place in the queue.
- The model may stop before N tokens (end of turn); the token counts are reported, and rates use them.

Example: python benchmarks/serve_bench.py --base-url http://127.0.0.1:8000/v1 --clients 8 --max-tokens 128 \
         --json out.json
"""
import argparse
import json
import statistics
import threading
import time

import httpx

PROMPT_SETS = {
    "short": [
        "Write a short story about a robot who learns to paint.",
        "Explain how a rainbow forms, step by step.",
        "Describe a walk through a busy market in the morning.",
        "What are the main differences between cats and dogs as pets?",
        "Give me advice for a student starting at university.",
        "Explain what a computer does when it boots up.",
        "Write a letter to a friend about a trip to the mountains.",
        "Describe how bread is made, from flour to loaf.",
    ],
    "tiny": ["Hi!", "Tell me a joke.", "Name three colours.", "What is 2+2?",
             "Say hello in French.", "Count to five.", "Name a fruit.", "What day comes after Monday?"],
}


def stream_one(client: httpx.Client, url: str, model: str, prompt: str, max_tokens: int, headers: dict) -> dict:
    """One streaming chat completion; returns token count, its source and the times (perf_counter seconds)."""
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "stream": True,
            "temperature": 0, "max_tokens": max_tokens, "stream_options": {"include_usage": True}}
    t_sent = time.perf_counter()
    t_first = t_last = None
    chunks, usage_tokens, text = 0, None, []
    with client.stream("POST", url, json=body, headers=headers) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.read().decode(errors='replace')[:300]}")
        for line in r.iter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            now = time.perf_counter()
            event = json.loads(data)
            t_last = now
            if event.get("usage") and event["usage"].get("completion_tokens") is not None:
                usage_tokens = event["usage"]["completion_tokens"]
            for choice in event.get("choices") or []:
                content = (choice.get("delta") or {}).get("content")
                if content:
                    chunks += 1
                    text.append(content)
                    if t_first is None:
                        t_first = now
    t_end = time.perf_counter()
    tokens = usage_tokens if usage_tokens is not None else chunks
    decode = (tokens - 1) / (t_last - t_first) if t_first is not None and tokens > 1 and t_last > t_first else None
    return {"tokens": tokens, "source": "usage" if usage_tokens is not None else "content chunks",
            "content_chunks": chunks, "ttft_s": None if t_first is None else t_first - t_sent,
            "decode_tok_s": decode, "t_sent": t_sent, "t_end": t_end, "e2e_tok_s": tokens / (t_end - t_sent),
            "text": "".join(text)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8000/v1")
    ap.add_argument("--model", help="model id to send (default: the first id from GET /v1/models)")
    ap.add_argument("--clients", type=int, default=8, help="concurrent streams for the aggregate test (default 8)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3, help="single-stream repetitions (default 3)")
    ap.add_argument("--prompt-set", choices=sorted(PROMPT_SETS), default="short")
    ap.add_argument("--api-key", help="sent as `Authorization: Bearer KEY`")
    ap.add_argument("--timeout", type=float, default=600.0, help="per-request timeout in seconds")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()

    base = args.base_url.rstrip("/")
    url = f"{base}/chat/completions"
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    prompts = PROMPT_SETS[args.prompt_set]
    timeout = httpx.Timeout(args.timeout, connect=10.0)
    with httpx.Client(timeout=timeout) as client:
        model = args.model or client.get(f"{base}/models", headers=headers).raise_for_status().json()["data"][0]["id"]
        stream_one(client, url, model, prompts[0], min(8, args.max_tokens), headers)  # warm-up, not timed
        singles = [stream_one(client, url, model, prompts[0], args.max_tokens, headers) for _ in range(args.repeats)]

    results: list = [None] * args.clients
    barrier = threading.Barrier(args.clients)

    def worker(i: int) -> None:
        with httpx.Client(timeout=timeout) as c:
            barrier.wait()
            try:
                results[i] = stream_one(c, url, model, prompts[i % len(prompts)], args.max_tokens, headers)
            except Exception as e:  # noqa: BLE001 - reported, not fatal to the others
                results[i] = {"error": str(e)}

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ok = [r for r in results if "error" not in r]
    t0 = min(r["t_sent"] for r in ok) if ok else 0.0
    wall = max(r["t_end"] for r in ok) - t0 if ok else float("nan")
    total = sum(r["tokens"] for r in ok)

    def median(values):
        values = [v for v in values if v is not None]
        return statistics.median(values) if values else None

    def fmt(v, spec=".1f"):
        return "-" if v is None else format(v, spec)

    sources = sorted({r["source"] for r in singles + ok})
    print(f"server {base}  model {model}  max_tokens {args.max_tokens}  prompt set {args.prompt_set}  "
          f"tokens from: {', '.join(sources)}")
    print(f"\nsingle stream ({args.repeats} runs, one at a time)\n  run  tokens  TTFT(s)  decode tok/s")
    for i, r in enumerate(singles):
        print(f"  {i + 1:>3}  {r['tokens']:>6}  {fmt(r['ttft_s'], '.3f'):>7}  {fmt(r['decode_tok_s']):>12}")
    single_decode = median(r["decode_tok_s"] for r in singles)
    print(f"  median decode tok/s: {fmt(single_decode)}  median TTFT: {fmt(median(r['ttft_s'] for r in singles), '.3f')} s")
    print(f"\naggregate ({args.clients} concurrent clients)\n  client  tokens  TTFT(s)  decode tok/s  e2e tok/s")
    for i, r in enumerate(results):
        if "error" in r:
            print(f"  {i:>6}  error: {r['error']}")
        else:
            print(f"  {i:>6}  {r['tokens']:>6}  {fmt(r['ttft_s'], '.3f'):>7}  {fmt(r['decode_tok_s']):>12}  "
                  f"{r['e2e_tok_s']:>9.1f}")
    aggregate = total / wall if ok else None
    print(f"  total tokens {total} in {wall:.2f} s wall  ->  aggregate tok/s: {fmt(aggregate)}"
          f"  ({len(ok)}/{args.clients} ok)")
    if any(r["tokens"] == 0 for r in ok):
        print("  WARNING: some streams ended with no tokens (llama_cpp.server interrupts a stream when another "
              "request waits unless started with --interrupt_requests False)")

    if args.json:
        strip = lambda r: {k: v for k, v in r.items() if k not in ("t_sent", "t_end")}  # noqa: E731
        out = {"base_url": base, "model": model, "max_tokens": args.max_tokens, "prompt_set": args.prompt_set,
               "clients": args.clients, "token_source": sources,
               "single": {"runs": [strip(r) for r in singles], "median_decode_tok_s": single_decode,
                          "median_ttft_s": median(r["ttft_s"] for r in singles)},
               "aggregate": {"wall_s": wall, "total_tokens": total, "aggregate_tok_s": aggregate,
                             "clients_ok": len(ok),
                             "per_client": [r if "error" in r else {**strip(r), "start_offset_s": r["t_sent"] - t0}
                                            for r in results]}}
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2, ensure_ascii=False)
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
