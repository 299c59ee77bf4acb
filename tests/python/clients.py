"""The official `ollama` and `openai` Python clients against the gateway.

Run by tests/tests/python_clients.rs with GATEWAY=http://host:port; prints
one line per check and exits non-zero on the first failure.
"""
import os
import sys

import ollama
import openai

GATEWAY = os.environ["GATEWAY"]
TEXT = "The sky is blue."
EMBEDDING = [0.25, 0.5, 0.75]


def check(name, ok, detail=""):
    print(("ok   " if ok else "FAIL ") + name + (f": {detail}" if detail and not ok else ""))
    if not ok:
        sys.exit(1)


client = ollama.Client(host=GATEWAY)

r = client.chat(model="llama3:8b", messages=[{"role": "user", "content": "hi"}])
check("ollama chat", r.message.content == TEXT, r)
parts = [c.message.content for c in client.chat(model="llama3:8b", messages=[{"role": "user", "content": "hi"}], stream=True)]
check("ollama chat, streamed token by token", "".join(parts) == TEXT and len(parts) > 2, parts)
r = client.generate(model="llama3:8b", prompt="why?")
check("ollama generate", r.response == TEXT, r)
parts = [c.response for c in client.generate(model="llama3:8b", prompt="why?", stream=True)]
check("ollama generate, streamed", "".join(parts) == TEXT and len(parts) > 2, parts)
names = sorted(m.model for m in client.list().models)
check("ollama list", names == ["llama3:8b", "nomic-embed-text:latest"], names)
r = client.embed(model="nomic-embed-text", input=["a", "b"])
check("ollama embed", [list(e) for e in r.embeddings] == [EMBEDDING, EMBEDDING], r)
try:
    client.chat(model="no-such-model:1b", messages=[{"role": "user", "content": "hi"}])
    check("ollama unknown model", False, "no error")
except ollama.ResponseError as e:
    check("ollama unknown model is 404", e.status_code == 404 and "no-such-model" in e.error, e)

oa = openai.OpenAI(base_url=GATEWAY + "/v1", api_key="unused")
r = oa.chat.completions.create(model="llama3:8b", messages=[{"role": "user", "content": "hi"}])
check("openai chat", r.choices[0].message.content == TEXT, r)
parts = [c.choices[0].delta.content or "" for c in oa.chat.completions.create(model="llama3:8b", messages=[{"role": "user", "content": "hi"}], stream=True)]
check("openai chat, streamed", "".join(parts) == TEXT and len(parts) > 2, parts)
r = oa.completions.create(model="llama3:8b", prompt="why?")
check("openai completion", r.choices[0].text == TEXT, r)
parts = [c.choices[0].text for c in oa.completions.create(model="llama3:8b", prompt="why?", stream=True)]
check("openai completion, streamed", "".join(parts) == TEXT, parts)
r = oa.embeddings.create(model="nomic-embed-text", input="a")
check("openai embeddings", list(r.data[0].embedding) == EMBEDDING, r)
ids = sorted(m.id for m in oa.models.list())
check("openai models", ids == ["llama3:8b", "nomic-embed-text:latest"], ids)
try:
    oa.chat.completions.create(model="no-such-model:1b", messages=[{"role": "user", "content": "hi"}])
    check("openai unknown model", False, "no error")
except openai.NotFoundError as e:
    check("openai unknown model is 404", e.status_code == 404, e)
print("all checks passed")
