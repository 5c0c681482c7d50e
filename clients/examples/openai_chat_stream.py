"""Streaming chat with the official openai SDK, with token usage at the end.

    python clients/examples/openai_chat_stream.py --base-url http://127.0.0.1:8000/v1 "Tell me a joke"
"""

import argparse

from openai import OpenAI

p = argparse.ArgumentParser()
p.add_argument("message", nargs="?", default="Give me three tips for writing clear code.")
p.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
p.add_argument("--api-key", default="none")
p.add_argument("--max-tokens", type=int, default=128)
a = p.parse_args()

client = OpenAI(base_url=a.base_url, api_key=a.api_key)
model = client.models.list().data[0].id
stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": a.message}],
                                        max_completion_tokens=a.max_tokens, stream=True,
                                        stream_options={"include_usage": True})
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        print(chunk.choices[0].delta.content, end="", flush=True)
    if chunk.usage:
        print(f"\n[{chunk.usage.prompt_tokens} prompt + {chunk.usage.completion_tokens} completion tokens]")
