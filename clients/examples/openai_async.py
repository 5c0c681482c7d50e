"""Many concurrent requests with the async openai SDK: the server batches them continuously.

    python clients/examples/openai_async.py --base-url http://127.0.0.1:8000/v1 --n 8
"""

import argparse
import asyncio
import time

from openai import AsyncOpenAI


async def main(a) -> None:
    client = AsyncOpenAI(base_url=a.base_url, api_key=a.api_key)
    model = (await client.models.list()).data[0].id
    questions = [f"Write one sentence about the number {i}." for i in range(a.n)]
    t = time.perf_counter()
    replies = await asyncio.gather(*(client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": q}], max_completion_tokens=32, temperature=0)
        for q in questions))
    dt = time.perf_counter() - t
    tokens = sum(r.usage.completion_tokens for r in replies)
    for q, r in zip(questions, replies):
        print(f"{q}\n  -> {r.choices[0].message.content.strip()}")
    print(f"{len(replies)} replies, {tokens} tokens in {dt:.1f} s ({tokens / dt:.1f} tok/s)")


p = argparse.ArgumentParser()
p.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
p.add_argument("--api-key", default="none")
p.add_argument("--n", type=int, default=8)
asyncio.run(main(p.parse_args()))
