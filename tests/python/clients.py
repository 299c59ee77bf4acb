"""The official `ollama` and `openai` Python clients against the gateway.

Run by tests/tests/python_clients.rs with GATEWAY=http://host:port; prints
one line per check and exits non-zero on the first failure.
"""
import base64
import hashlib
import json
import os
import sys

import ollama
import openai

GATEWAY = os.environ["GATEWAY"]
TEXT = "The sky is blue."
EMBEDDING = [0.25, 0.5, 0.75]
IMAGE = os.urandom(3 * 1024 * 1024)
IMAGE_B64 = base64.b64encode(IMAGE).decode()
IMAGE_URL = "data:image/png;base64," + IMAGE_B64
TOOLS = [{
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}]
ARGUMENTS = {"city": "Paris"}


def seen(*images):
    """What the stand-in answers a chat carrying these images (as sent) with."""
    digest = hashlib.sha256("".join(images).encode()).hexdigest()
    return f"images: {len(images)}, sha256 {digest}"


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

image_chat = [{"role": "user", "content": "what is this?", "images": [IMAGE]}]
r = client.chat(model="llama3:8b", messages=image_chat)
check("ollama chat with a 3 MiB image", r.message.content == seen(IMAGE_B64), r.message.content)
parts = [c.message.content for c in client.chat(model="llama3:8b", messages=image_chat, stream=True)]
check("ollama chat with a 3 MiB image, streamed", "".join(parts) == seen(IMAGE_B64) and len(parts) > 2, parts)

weather = [{"role": "user", "content": "weather in Paris?"}]
r = client.chat(model="llama3:8b", messages=weather, tools=TOOLS)
calls = r.message.tool_calls or []
check(
    "ollama tool call",
    len(calls) == 1 and calls[0].function.name == "get_weather" and dict(calls[0].function.arguments) == ARGUMENTS
    and r.done_reason == "stop",
    r,
)
chunks = list(client.chat(model="llama3:8b", messages=weather, tools=TOOLS, stream=True))
calls = [t for c in chunks for t in (c.message.tool_calls or [])]
check(
    "ollama tool call, streamed",
    len(calls) == 1 and calls[0].function.name == "get_weather" and dict(calls[0].function.arguments) == ARGUMENTS
    and chunks[-1].done and not any(c.done for c in chunks[:-1]),
    chunks,
)

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

image_chat = [{"role": "user", "content": [
    {"type": "text", "text": "what is this?"},
    {"type": "image_url", "image_url": {"url": IMAGE_URL}},
]}]
r = oa.chat.completions.create(model="llama3:8b", messages=image_chat)
check("openai chat with a 3 MiB image", r.choices[0].message.content == seen(IMAGE_URL), r.choices[0].message.content)
parts = [c.choices[0].delta.content or "" for c in oa.chat.completions.create(model="llama3:8b", messages=image_chat, stream=True)]
check("openai chat with a 3 MiB image, streamed", "".join(parts) == seen(IMAGE_URL) and len(parts) > 2, parts)

r = oa.chat.completions.create(model="llama3:8b", messages=weather, tools=TOOLS)
calls = r.choices[0].message.tool_calls or []
check(
    "openai tool call",
    len(calls) == 1 and calls[0].id == "call_1" and calls[0].function.name == "get_weather"
    and json.loads(calls[0].function.arguments) == ARGUMENTS and r.choices[0].finish_reason == "tool_calls",
    r,
)
chunks = list(oa.chat.completions.create(model="llama3:8b", messages=weather, tools=TOOLS, stream=True))
deltas = [t for c in chunks for t in (c.choices[0].delta.tool_calls or [])]
name = "".join(t.function.name or "" for t in deltas if t.function)
arguments = "".join(t.function.arguments or "" for t in deltas if t.function)
check(
    "openai tool call, streamed",
    len(deltas) >= 1 and all(t.index == 0 for t in deltas) and name == "get_weather"
    and json.loads(arguments or "null") == ARGUMENTS
    and [c.choices[0].finish_reason for c in chunks][-1] == "tool_calls",
    chunks,
)
print("all checks passed")
