"""`coordinator chat`: an interactive chat with a running coordinator, answers streamed as
they are generated (server-sent events from /v1/chat/completions).

Commands at the prompt: /reset forgets the conversation, /quit (or Ctrl-D) leaves.
Ctrl-C while an answer streams stops that answer; the conversation goes on.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import time
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

from coordinator import console
from coordinator.errors import UserError

HELP = "/reset forgets the conversation, /quit or Ctrl-D leaves, Ctrl-C stops an answer"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("chat", help="chat with a running coordinator, answers streamed")
    p.add_argument(
        "--url",
        default=os.environ.get("LAYERLINK_URL", "http://127.0.0.1:8000"),
        help="the coordinator (default: $LAYERLINK_URL or http://127.0.0.1:8000)",
    )
    p.add_argument("--model", help="model id (default: the one the coordinator serves)")
    p.add_argument("--system", help="a system message to start the conversation with")
    p.add_argument("--max-tokens", type=int, help="tokens per answer (default: the server's)")
    p.add_argument("--temperature", type=float, help="0 = greedy (default: the server's, 1.0)")
    p.add_argument("--top-p", type=float, help="nucleus sampling mass")
    p.add_argument("--seed", type=int, help="sampler seed")
    p.add_argument(
        "--api-key",
        default=os.environ.get("LAYERLINK_API_KEY") or None,
        help="bearer key, when the coordinator requires one (default: $LAYERLINK_API_KEY)",
    )
    p.add_argument(
        "--cacert",
        default=None,
        metavar="PEM",
        help="trust this certificate (or CA) for an https:// coordinator, e.g. a self-signed one",
    )
    p.set_defaults(func=run)


@dataclass(frozen=True)
class Answer:
    text: str
    finish_reason: str
    completion_tokens: int
    ttft_s: float
    seconds: float


class ChatClient:
    """The few calls `chat` makes, over httpx."""

    def __init__(self, url: str, api_key: str | None = None, cacert: str | None = None) -> None:
        import ssl

        import httpx

        self._httpx = httpx
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(
            base_url=url.rstrip("/") + "/v1",
            headers=headers,
            timeout=httpx.Timeout(30.0, read=600.0),
            verify=ssl.create_default_context(cafile=cacert) if cacert else True,
        )

    def close(self) -> None:
        self.http.close()

    def _fail(self, response: Any) -> UserError:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text[:200]
        return UserError(f"the coordinator answered HTTP {response.status_code}: {message}")

    def model(self) -> str:
        try:
            r = self.http.get("/models")
        except self._httpx.HTTPError as e:
            raise UserError(f"cannot reach the coordinator at {self.http.base_url}: {e}") from None
        if r.status_code != 200:
            raise self._fail(r)
        return str(r.json()["data"][0]["id"])

    def stream(self, body: dict[str, Any]) -> Generator[str | Answer, None, None]:
        """Text pieces as they arrive, then one Answer."""
        t0 = time.perf_counter()
        ttft = 0.0
        parts: list[str] = []
        finish, tokens = "", 0
        try:
            with self.http.stream("POST", "/chat/completions", json=body) as r:
                if r.status_code != 200:
                    r.read()
                    raise self._fail(r)
                for line in r.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[len("data: ") :]
                    if data == "[DONE]":
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        raise UserError(f"generation failed: {chunk['error'].get('message')}")
                    if chunk.get("usage"):
                        tokens = int(chunk["usage"]["completion_tokens"])
                    for choice in chunk.get("choices", []):
                        piece = choice.get("delta", {}).get("content") or ""
                        if piece:
                            if not parts:
                                ttft = time.perf_counter() - t0
                            parts.append(piece)
                            yield piece
                        finish = choice.get("finish_reason") or finish
        except self._httpx.HTTPError as e:
            raise UserError(f"lost the coordinator at {self.http.base_url}: {e}") from None
        yield Answer("".join(parts), finish, tokens, ttft, time.perf_counter() - t0)


def _read_line(prompt: str) -> str | None:
    try:
        return console.console.input(prompt)
    except EOFError:
        return None


def run(args: argparse.Namespace) -> int:
    with contextlib.suppress(ImportError):
        importlib.import_module("readline")  # line editing and history for input()
    try:
        client = ChatClient(args.url, args.api_key, args.cacert)
    except OSError as e:  # ssl.SSLError is one
        raise UserError(f"cannot use --cacert {args.cacert}: {e}") from None
    try:
        model = args.model or client.model()
        console.info(f"chatting with {model} at {args.url} ({HELP})")
        base: list[dict[str, str]] = (
            [{"role": "system", "content": args.system}] if args.system else []
        )
        messages = list(base)
        while True:
            line = _read_line("[bold green]you>[/] ")
            if line is None:
                console.text("")
                return 0
            text = line.strip()
            if not text:
                continue
            if text in ("/quit", "/exit"):
                return 0
            if text == "/reset":
                messages = list(base)
                console.info("(conversation cleared)")
                continue
            if text.startswith("/"):
                console.info(HELP)
                continue
            messages.append({"role": "user", "content": text})
            body: dict[str, Any] = {
                "model": model,
                "messages": messages,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            for key in ("max_tokens", "temperature", "top_p", "seed"):
                value = getattr(args, key)
                if value is not None:
                    body[key] = value
            answer = _stream_answer(client, body)
            if answer is None:
                messages.pop()  # interrupted: the question stays unanswered
                continue
            messages.append({"role": "assistant", "content": answer.text})
    finally:
        client.close()


def _stream_answer(client: ChatClient, body: dict[str, Any]) -> Answer | None:
    console.console.print("[bold blue]assistant>[/] ", end="")
    # Generated text goes out byte for byte: no markup, emoji codes, wrapping or stripping.
    out = console.console.file
    answer: Answer | None = None
    pieces = client.stream(body)
    try:
        for item in pieces:
            if isinstance(item, Answer):
                answer = item
            else:
                out.write(item)
                out.flush()
    except KeyboardInterrupt:
        pieces.close()  # closes the HTTP stream: the coordinator cancels the request
        console.text("")
        console.info("(stopped)")
        return None
    console.text("")
    if answer is not None:
        rate = (
            (answer.completion_tokens - 1) / (answer.seconds - answer.ttft_s)
            if answer.completion_tokens > 1 and answer.seconds > answer.ttft_s
            else 0.0
        )
        console.info(
            f"[dim]{answer.completion_tokens} tokens, first after {answer.ttft_s * 1e3:.0f} ms, "
            f"{rate:.1f} tokens/s, finish: {answer.finish_reason}[/]"
        )
    return answer
