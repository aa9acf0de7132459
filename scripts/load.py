#!/usr/bin/env python3
"""A streaming load client for any OpenAI-compatible server (Air, llama-server, vLLM).

Each of C concurrent clients sends R streamed `/v1/completions` requests one after another:
a distinct prompt of random words (so that no server gains from a shared prefix), greedy,
exactly --gen-tokens tokens (`ignore_eos`). Prints one JSON line per concurrency level:
aggregate generated tokens/s (all tokens over the level's wall time), time to first token and
inter-token latency percentiles (ms), requests and errors.

Standard library only (asyncio, raw HTTP/1.1), so the client costs the server little CPU.

Usage: scripts/load.py URL MODEL [--concurrency 1,4,16] [--requests-per-client 2]
       [--prompt-words 48] [--gen-tokens 128] [--label NAME]
"""

import argparse
import asyncio
import json
import random
import time
import urllib.parse

WORDS = ("time person year way day thing man world life hand part child eye woman place work week case point "
         "government company number group problem fact river stone light music garden window story market "
         "island winter letter bridge forest doctor mountain question answer table paper water morning").split()


def prompt_for(level, client, request, words):
    rng = random.Random(f"{level}/{client}/{request}")
    return "Continue this list: " + " ".join(rng.choice(WORDS) for _ in range(words))


async def sse_events(reader, chunked):
    """The `data:` payloads of an event stream body, with their arrival times."""
    buf = b""

    async def pieces():
        if chunked:
            while True:
                size = int((await reader.readline()).split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    return
                yield await reader.readexactly(size)
                await reader.readexactly(2)
        else:
            while piece := await reader.read(65536):
                yield piece

    async for piece in pieces():
        buf += piece.replace(b"\r\n", b"\n")
        while b"\n\n" in buf:
            event, buf = buf.split(b"\n\n", 1)
            for line in event.split(b"\n"):
                if line.startswith(b"data: "):
                    yield time.perf_counter(), line[6:].decode()


async def one_request(url, body):
    """(ttft_s, [inter-token gaps], tokens) of one streamed request; raises on an HTTP error."""
    data = json.dumps(body).encode()
    start = time.perf_counter()
    reader, writer = await asyncio.open_connection(url.hostname, url.port or 80)
    try:
        head = (f"POST {url.path.rstrip('/')}/v1/completions HTTP/1.1\r\nHost: {url.netloc}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\nConnection: close\r\n\r\n")
        writer.write(head.encode() + data)
        await writer.drain()
        status = int((await reader.readline()).split()[1])
        chunked = False
        while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
            name, _, value = line.decode().partition(":")
            if name.strip().lower() == "transfer-encoding" and "chunked" in value.lower():
                chunked = True
        if status != 200:
            raise RuntimeError(f"HTTP {status}")
        arrivals, usage = [], None
        async for at, payload in sse_events(reader, chunked):
            if payload == "[DONE]":
                break
            event = json.loads(payload)
            if event.get("choices") and event["choices"][0].get("text"):
                arrivals.append(at)
            if event.get("usage"):
                usage = event["usage"]["completion_tokens"]
        if not arrivals:
            raise RuntimeError("no tokens")
        gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
        return arrivals[0] - start, gaps, usage if usage is not None else len(arrivals)
    finally:
        writer.close()


def percentile(values, p):
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


async def level(args, url, concurrency):
    ttfts, gaps, tokens, errors = [], [], 0, []

    async def client(c):
        nonlocal tokens
        for r in range(args.requests_per_client):
            body = {"model": args.model, "prompt": prompt_for(concurrency, c, r, args.prompt_words),
                    "max_tokens": args.gen_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
                    "stream_options": {"include_usage": True}}
            try:
                ttft, g, n = await one_request(url, body)
            except Exception as e:  # noqa: BLE001 - counted and reported
                errors.append(str(e))
                continue
            ttfts.append(ttft)
            gaps.extend(g)
            tokens += n

    start = time.perf_counter()
    await asyncio.gather(*(client(c) for c in range(concurrency)))
    wall = time.perf_counter() - start
    ms = lambda v: None if v is None else round(v * 1000, 1)  # noqa: E731
    return {
        "server": args.label, "concurrency": concurrency, "requests": len(ttfts), "errors": len(errors),
        "generated_tokens": tokens, "wall_s": round(wall, 2),
        "aggregate_tokens_per_s": round(tokens / wall, 2),
        "ttft_ms_p50": ms(percentile(ttfts, 50)), "ttft_ms_p99": ms(percentile(ttfts, 99)),
        "itl_ms_p50": ms(percentile(gaps, 50)), "itl_ms_p99": ms(percentile(gaps, 99)),
        "first_error": errors[0] if errors else None,
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("url", help="the server's base URL, e.g. http://127.0.0.1:8080")
    p.add_argument("model", help="the `model` of requests")
    p.add_argument("--concurrency", default="1,4,16", help="comma-separated levels")
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--prompt-words", type=int, default=48)
    p.add_argument("--gen-tokens", type=int, default=128)
    p.add_argument("--label", default="server")
    args = p.parse_args()
    url = urllib.parse.urlparse(args.url)
    for c in (int(x) for x in args.concurrency.split(",")):
        print(json.dumps(asyncio.run(level(args, url, c))), flush=True)


if __name__ == "__main__":
    main()
