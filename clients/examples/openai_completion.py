"""Completions with the official openai SDK against `uc serve` (sync, then streamed).

    python clients/examples/openai_completion.py --base-url http://127.0.0.1:8000/v1
"""

import argparse

from openai import OpenAI

p = argparse.ArgumentParser()
p.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
p.add_argument("--api-key", default="none", help="the server's --api-key, if it has one")
a = p.parse_args()

client = OpenAI(base_url=a.base_url, api_key=a.api_key)
model = client.models.list().data[0].id

r = client.completions.create(model=model, prompt="The capital of France is", max_tokens=16, temperature=0)
print(repr(r.choices[0].text), r.choices[0].finish_reason, r.usage)

for chunk in client.completions.create(model=model, prompt="Three colours of the rainbow:", max_tokens=24,
                                       temperature=0.7, seed=1, stop=["\n\n"], stream=True):
    print(chunk.choices[0].text, end="", flush=True)
print()
