"""A small OpenAI-compatible chat-completions server of the tests' own, whose answers a test scripts: verdicts from
the text or from log-probabilities, 429 with Retry-After, 5xx, garbage, a hang. In-process (`FakeJudge`) or as its
own process, to be killed mid-batch:

    python tests/fake_judge.py --port 18123 --script slow
"""

from __future__ import annotations

import argparse
import json
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Answer = tuple[int, dict[str, str], Any]  # status, headers, JSON body (or bytes)


def completion(text: str, logprobs: dict[str, float] | None = None, prompt_tokens: int = 50) -> Answer:
    """A 200 chat completion whose message is `text`; with `logprobs`, its first token's top candidates."""
    choice: dict[str, Any] = {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}
    if logprobs is not None:
        top = [{"token": t, "logprob": lp} for t, lp in logprobs.items()]
        choice["logprobs"] = {"content": [{**top[0], "top_logprobs": top}]}
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": 1, "total_tokens": prompt_tokens + 1}
    return 200, {}, {"object": "chat.completion", "choices": [choice], "usage": usage}


def longer_first(body: dict) -> Answer:
    """Prefers the longer response (the one that follows "[Response A]" in the default template is the first)."""
    text = body["messages"][-1]["content"]
    a = text.split("[Response A]\n", 1)[1].split("\n\n[Response B]", 1)[0]
    b = text.split("[Response B]\n", 1)[1].split("\n\nWhich response", 1)[0]
    return completion("A" if len(a) >= len(b) else "B")


def logprob_longer(body: dict) -> Answer:
    """Like `longer_first`, with the verdict only in the log-probabilities (the text names no letter)."""
    status, headers, answer = longer_first(body)
    first = answer["choices"][0]["message"]["content"] == "A"
    lp = {"A": math.log(0.8), "B": math.log(0.2)} if first else {"B": math.log(0.9), "A": math.log(0.1)}
    return completion("I think so", lp)


def rate_limited_once() -> Callable[[dict], Answer]:
    """A 429 with Retry-After: 1 to the first request, then `longer_first`."""
    seen: list[int] = []

    def script(body: dict) -> Answer:
        seen.append(1)
        return (429, {"Retry-After": "1"}, {"error": "rate limited"}) if len(seen) == 1 else longer_first(body)

    return script


SCRIPTS: dict[str, Callable[[dict], Answer]] = {
    "longer": longer_first,
    "logprobs": logprob_longer,
    "always_a": lambda body: completion("A"),
    "garbage": lambda body: completion("Both responses have merits."),
    "slow": lambda body: (time.sleep(30), completion("A"))[1],
}


@dataclass
class FakeJudge:
    """The server on a free loopback port; `script` answers each request (`queue` first, one answer each)."""

    script: Callable[[dict], Answer] = longer_first
    queue: list[Answer] = field(default_factory=list)
    requests: list[dict] = field(default_factory=list)  # {"body", "headers", "time"}
    port: int = 0  # 0: a free one
    echo: bool = False  # print a line per request (a test reading the log of a fake in its own process)

    def __post_init__(self) -> None:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                fake.requests.append({"body": body, "headers": dict(self.headers), "time": time.monotonic()})
                if fake.echo:
                    print("request", flush=True)
                status, headers, out = fake.queue.pop(0) if fake.queue else fake.script(body)
                data = out if isinstance(out, bytes) else json.dumps(out).encode()
                self.send_response(status)
                for k, v in {"content-type": "application/json", **headers}.items():
                    self.send_header(k, v)
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}/v1"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--script", default="longer", choices=[*sorted(SCRIPTS), "rate_limited_once"])
    args = parser.parse_args()
    script = rate_limited_once() if args.script == "rate_limited_once" else SCRIPTS[args.script]
    FakeJudge(script, port=args.port, echo=True)
    print("ready", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
