"""A tiny in-process OpenAI-compatible completions server (aiohttp) for testing `sfmp bench`.

It streams one event per token like vLLM, appends a usage event when asked, and can be told to
fail: prompts whose first token id is FAIL_ID get HTTP 500; with `usage=False` it ignores
stream_options (as some servers do).
"""

from __future__ import annotations

import asyncio
import json
import threading
from dataclasses import dataclass, field

from aiohttp import web

FAIL_ID = 13


@dataclass
class FakeServer:
    usage: bool = True
    token_delay_s: float = 0.002
    requests: list[dict] = field(default_factory=list)
    url: str = ""

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/completions", self._completions)
        return app

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "fake-model"}]})

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        prompt = body["prompt"]
        if isinstance(prompt, list) and prompt and prompt[0] == FAIL_ID:
            return web.json_response({"error": "boom"}, status=500)
        n_prompt = len(prompt) if isinstance(prompt, list) else len(prompt.split())
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for i in range(body["max_tokens"]):
            await asyncio.sleep(self.token_delay_s)
            await _send(response, {"choices": [{"index": 0, "text": f"t{i}"}]})
        if self.usage and body.get("stream_options", {}).get("include_usage"):
            usage = {"prompt_tokens": n_prompt, "completion_tokens": body["max_tokens"],
                     "total_tokens": n_prompt + body["max_tokens"]}
            await _send(response, {"choices": [], "usage": usage})
        await response.write(b"data: [DONE]\n\n")
        return response

    def __enter__(self) -> "FakeServer":
        ready = threading.Event()
        self._loop = asyncio.new_event_loop()

        async def start() -> None:
            self._runner = web.AppRunner(self.app())
            await self._runner.setup()
            site = web.TCPSite(self._runner, "127.0.0.1", 0)
            await site.start()
            port = self._runner.addresses[0][1]
            self.url = f"http://127.0.0.1:{port}"
            ready.set()

        def run() -> None:
            asyncio.set_event_loop(self._loop)
            self._loop.run_until_complete(start())
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        assert ready.wait(10), "fake server did not start"
        return self

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


async def _send(response: web.StreamResponse, event: dict) -> None:
    await response.write(f"data: {json.dumps(event)}\n\n".encode())
