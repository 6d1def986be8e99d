"""kt-serve against a live server on 127.0.0.1 (uvicorn in a background thread) with the tiny pack.

Oracles: a separate Engine on the same pack (what kt-run would print), the non-streamed reply for
the streamed one (greedy), and sequential runs for concurrent ones. Clients: the official `openai`
and `ollama` packages, httpx, raw sockets for clients that vanish, headless Chromium for the page.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="kt-serve needs the `serve` extra: pip install -e .[serve]")
pytest.importorskip("uvicorn", reason="kt-serve needs the `serve` extra: pip install -e .[serve]")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai", reason="the tests use the official openai client (test extra)")
ollama = pytest.importorskip("ollama", reason="the tests use the official ollama client (test extra)")

import torch  # noqa: E402
import uvicorn  # noqa: E402

from ktpack.runtime.engine import Engine  # noqa: E402
from ktpack.runtime.sampling import SamplingParams  # noqa: E402
from ktpack.runtime.server import create_app  # noqa: E402

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
CTX = 1024
LONG = 1000  # tokens asked by the clients that go away: they must be stopped well before
GREEDY = SamplingParams(temperature=0)


class LiveServer:
    """create_app(...) served by uvicorn in a daemon thread on a free loopback port."""

    def __init__(self, folder: Path, **kw):
        self.app = create_app(Engine(folder, ctx_size=CTX), model_name="tiny", **kw)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        cfg = uvicorn.Config(self.app, log_level="warning", timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(cfg)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)

    @property
    def scheduler(self):
        return self.app.state.kt.scheduler

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health", timeout=10).json()

    def wait(self, cond, timeout: float = 20.0, what: str = "condition") -> dict:
        deadline = time.monotonic() + timeout
        while True:
            h = self.health()
            if cond(h):
                return h
            assert time.monotonic() < deadline, f"timed out waiting for {what}: {h}"
            time.sleep(0.02)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.sock.close()


@pytest.fixture(scope="module")
def pack(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from ktpack.convert.gguf_source import open_gguf
    from ktpack.convert.plan import ConvertOptions, make_plan
    from ktpack.convert.writer import write

    out = tmp_path_factory.mktemp("serve") / "tiny-pack"
    write(make_plan(open_gguf(tiny_dir / "tiny-Q8_0.gguf"), ConvertOptions(target="cpu")), out, progress=False)
    return out


@pytest.fixture(scope="module")
def ref(pack: Path) -> Engine:
    """An engine of its own: what kt-run prints for the same ids."""
    return Engine(pack, ctx_size=CTX)


@pytest.fixture(scope="module")
def srv(pack: Path):
    """The main server: API key required, 32 may wait."""
    s = LiveServer(pack, api_key=KEY, max_queue=32)
    yield s
    s.close()


@pytest.fixture(scope="module")
def open_srv(pack: Path):
    """No API key, one waiting place: the page and the queue-full case."""
    s = LiveServer(pack, max_queue=1)
    yield s
    s.close()


def expect_chat(ref: Engine, messages: list[dict], n: int) -> str:
    return ref.generate(ref.tokenizer.encode_chat(messages), GREEDY, max_new_tokens=n).text


def oai(srv: LiveServer, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{srv.url}/v1", api_key=key, max_retries=0, timeout=60)


def raw_request(srv: LiveServer, path: str, body: dict, key: str | None = KEY) -> socket.socket:
    """Sends a POST and returns the open socket, for a client that vanishes (sock.close())."""
    data = json.dumps(body).encode()
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    if key:
        head += f"Authorization: Bearer {key}\r\n"
    head += f"Content-Length: {len(data)}\r\n\r\n"
    s = socket.create_connection(("127.0.0.1", srv.port), timeout=30)
    s.sendall(head.encode() + data)
    return s


def read_until(s: socket.socket, marker: bytes, count: int = 1) -> bytes:
    buf = b""
    while buf.count(marker) < count:
        chunk = s.recv(4096)
        assert chunk, f"connection closed early: {buf[-300:]!r}"
        buf += chunk
    return buf


# ----------------------------------------------------------------------------------------------
# OpenAI


def test_health_models_and_page_are_served(srv: LiveServer):
    h = httpx.get(f"{srv.url}/health").json()
    assert h["status"] == "ok" and h["model"] == "tiny" and h["ctx_size"] == CTX and h["auth"] is True
    assert "<title>kt-serve</title>" in httpx.get(f"{srv.url}/").text  # / and /health stay open
    assert [m.id for m in oai(srv).models.list()] == ["tiny"]
    c = ollama.Client(host=srv.url, headers=AUTH)
    assert [m.model for m in c.list().models] == ["tiny"]
    show = c.show("tiny:latest")
    assert show.details.family == "deepseek2" and show.details.quantization_level == "Q8_0"
    assert show.modelinfo["deepseek2.context_length"] == CTX
    assert "<｜User｜>" in show.template


def test_openai_chat_stream_equals_nonstream(srv: LiveServer, ref: Engine):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why is the sky blue?"}]
    want = expect_chat(ref, msgs, 12)
    client = oai(srv)
    r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=12, temperature=0)
    assert r.choices[0].message.content == want and r.choices[0].message.role == "assistant"
    n_prompt = len(ref.tokenizer.encode_chat(msgs))
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (n_prompt, 12, n_prompt + 12)
    assert r.choices[0].finish_reason == "length"

    chunks = list(
        client.chat.completions.create(
            model="tiny",
            messages=msgs,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1  # really streamed
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens == n_prompt
    assert chunks[-1].model_extra["timings"]["predicted_n"] == 12


def test_openai_completions_stream_stop_and_seed(srv: LiveServer, ref: Engine):
    client = oai(srv)
    prompt = "The quick brown fox"
    want = ref.generate(ref.tokenizer.encode_raw(prompt), GREEDY, max_new_tokens=16).text
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=16, temperature=0)
    assert r.choices[0].text == want
    assert r.usage.prompt_tokens == len(ref.tokenizer.encode_raw(prompt)) and r.usage.completion_tokens == 16
    s = client.completions.create(model="tiny", prompt=prompt, max_tokens=16, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in s if c.choices) == want
    # token ids as the prompt
    ids = ref.tokenizer.encode_raw(prompt)
    assert client.completions.create(model="tiny", prompt=ids, max_tokens=16, temperature=0).choices[0].text == want

    # a stop string in the middle of the reply: both ways cut there, and nothing after it leaks out
    stop = want[len(want) // 2 : len(want) // 2 + 2]
    assert stop and stop in want
    cut = want[: want.index(stop)]
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=16, temperature=0, stop=[stop])
    assert r.choices[0].text == cut and r.choices[0].finish_reason == "stop"
    s = client.completions.create(model="tiny", prompt=prompt, max_tokens=16, temperature=0, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in s if c.choices) == cut

    # sampling with a seed: reproducible, and the same streamed or not
    kw = dict(model="tiny", prompt=prompt, max_tokens=10, temperature=1.0, top_p=0.9, seed=1234)
    a = client.completions.create(**kw).choices[0].text
    assert client.completions.create(**kw).choices[0].text == a
    assert "".join(c.choices[0].text for c in client.completions.create(**kw, stream=True) if c.choices) == a
    assert a == ref.generate(ids, SamplingParams(temperature=1.0, top_p=0.9, seed=1234), max_new_tokens=10).text


# ----------------------------------------------------------------------------------------------
# Ollama


def test_ollama_chat_and_generate(srv: LiveServer, ref: Engine):
    c = ollama.Client(host=srv.url, headers=AUTH)
    msgs = [{"role": "user", "content": "Name three colours."}]
    want = expect_chat(ref, msgs, 10)
    opts = {"temperature": 0, "num_predict": 10}
    r = c.chat(model="tiny", messages=msgs, options=opts)
    assert r.message.content == want and r.done and r.done_reason == "length"
    assert r.eval_count == 10 and r.prompt_eval_count == len(ref.tokenizer.encode_chat(msgs))
    parts = list(c.chat(model="tiny", messages=msgs, options=opts, stream=True))
    assert "".join(p.message.content for p in parts) == want
    assert parts[-1].done and parts[-1].eval_count == 10 and not any(p.done for p in parts[:-1])
    # the OpenAI route runs the same loop: same text
    o = oai(srv).chat.completions.create(model="tiny", messages=msgs, max_tokens=10, temperature=0)
    assert o.choices[0].message.content == want

    want = expect_chat(ref, [{"role": "user", "content": "Write a haiku."}], 10)
    g = c.generate(model="tiny", prompt="Write a haiku.", options=opts)
    assert g.response == want and g.done and g.eval_count == 10
    assert list(g.context[: g.prompt_eval_count]) == ref.tokenizer.encode_chat(
        [{"role": "user", "content": "Write a haiku."}]
    )
    parts = list(c.generate(model="tiny", prompt="Write a haiku.", options=opts, stream=True))
    assert "".join(p.response for p in parts) == want and parts[-1].done
    assert c.generate(model="tiny").done_reason == "load"  # Ollama's "load the model" call
    raw = c.generate(model="tiny", prompt="Once upon", raw=True, options=opts)
    assert raw.response == ref.generate(ref.tokenizer.encode_raw("Once upon"), GREEDY, max_new_tokens=10).text


# ----------------------------------------------------------------------------------------------
# Concurrency


def _stream_chat(url: str, i: int) -> str:
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": f"Tell me about the number {i}."}],
        "max_tokens": 8,
        "temperature": 0,
        "stream": True,
    }
    out = []
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, headers=AUTH, timeout=120) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                for ch in json.loads(line[6:])["choices"]:
                    out.append(ch["delta"].get("content") or "")
    return "".join(out)


def test_sixteen_concurrent_streams_and_vanishing_clients(srv: LiveServer):
    n = 16
    client = oai(srv)
    sequential = [
        client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": f"Tell me about the number {i}."}],
            max_tokens=8,
            temperature=0,
        )
        .choices[0]
        .message.content
        for i in range(n)
    ]
    assert len(set(sequential)) > 1
    before = srv.health()

    # a client that is served first and goes away mid-stream, with a long generation ahead of it
    long = {"model": "tiny", "prompt": "Go on and on", "max_tokens": LONG, "ignore_eos": True, "stream": True}
    killed_running = raw_request(srv, "/v1/completions", long)
    read_until(killed_running, b"data: ", 3)  # two text chunks are in: it runs
    with ThreadPoolExecutor(n) as pool:
        futs = [pool.submit(_stream_chat, srv.url, i) for i in range(n)]
        srv.wait(lambda h: h["queued"] >= 4, what="clients queued")
        # a client that goes away while it waits in the queue: dropped at once
        killed_queued = raw_request(
            srv, "/v1/chat/completions", long | {"messages": [{"role": "user", "content": "x"}]}
        )
        srv.wait(lambda h: h["queued"] >= 5, what="the last client queued")
        killed_queued.close()
        killed_running.close()
        got = [f.result(timeout=120) for f in futs]
    assert got == sequential
    h = srv.wait(lambda h: not h["running"] and h["queued"] == 0, what="an idle server")
    assert h["cancelled"] == before["cancelled"] + 2
    assert h["served"] == before["served"] + n
    # the running one stopped early (LONG tokens were asked for): it did not hold the others back
    assert max(srv.scheduler.last_generated.values()) < LONG


def test_queue_full_is_503_with_retry_after(open_srv: LiveServer):
    long = {"model": "tiny", "prompt": "Go on", "max_tokens": LONG, "ignore_eos": True, "stream": True}
    running = raw_request(open_srv, "/v1/completions", long, key=None)
    read_until(running, b"data: ", 2)
    waiting = raw_request(open_srv, "/v1/completions", long, key=None)
    open_srv.wait(lambda h: h["queued"] == 1, what="one queued")
    r = httpx.post(f"{open_srv.url}/v1/completions", json=long | {"stream": False})
    assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
    assert r.json()["error"]["code"] == "queue_full"
    r = httpx.post(f"{open_srv.url}/api/generate", json={"model": "tiny", "prompt": "hi", "stream": False})
    assert r.status_code == 503 and "busy" in r.json()["error"]
    waiting.close()
    open_srv.wait(lambda h: h["queued"] == 0, timeout=5, what="the queued client dropped")
    running.close()
    open_srv.wait(lambda h: not h["running"], what="the running client stopped")
    r = httpx.post(f"{open_srv.url}/v1/completions", json={"prompt": "hi", "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


# ----------------------------------------------------------------------------------------------
# Errors


def test_bad_requests_get_json_4xx_and_the_server_goes_on(srv: LiveServer):
    u = srv.url
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0}
    long_text = "word " * (2 * CTX)
    cases = [
        # (method, path, body or raw bytes, headers, status, code or None)
        ("/v1/chat/completions", b"{not json", AUTH, 400, "invalid_json"),
        ("/v1/chat/completions", b"[1, 2]", AUTH, 400, "invalid_json"),
        ("/v1/chat/completions", chat | {"model": "gpt-17"}, AUTH, 404, "model_not_found"),
        ("/v1/chat/completions", chat | {"max_tokens": -1}, AUTH, 400, "invalid_value"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": -5}, AUTH, 400, "invalid_value"),
        ("/v1/chat/completions", chat | {"temperature": "hot"}, AUTH, 400, None),
        ("/v1/chat/completions", chat | {"messages": []}, AUTH, 400, None),
        ("/v1/chat/completions", chat | {"messages": [{"role": "user", "content": long_text}]}, AUTH, 400,
         "context_length_exceeded"),
        ("/v1/completions", {"prompt": long_text, "stream": True}, AUTH, 400, "context_length_exceeded"),
        ("/v1/completions", {"prompt": [5, 999999]}, AUTH, 400, None),
        ("/v1/completions", {"prompt": "hi", "seed": 2**70}, AUTH, 400, None),
        ("/v1/completions", {"prompt": "hi", "n": 2}, AUTH, 400, None),
        ("/v1/chat/completions", chat, {"Authorization": "Bearer wrong"}, 401, "invalid_api_key"),
        ("/v1/chat/completions", chat, {}, 401, "invalid_api_key"),
        ("/v1/nope", chat, AUTH, 404, None),
    ]  # fmt: skip
    for path, body, headers, status, code in cases:
        kw = {"content": body} if isinstance(body, bytes) else {"json": body}
        r = httpx.post(u + path, headers=headers, timeout=30, **kw)
        assert r.status_code == status, (path, body if isinstance(body, bytes) else list(body), r.text)
        err = r.json()["error"]
        assert isinstance(err["message"], str) and err["message"] and err["type"], r.text
        if code:
            assert err["code"] == code, r.text
        ok = httpx.post(f"{u}/v1/chat/completions", json=chat, headers=AUTH, timeout=30)  # still serving
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2

    # Ollama routes answer Ollama's {"error": "..."}
    for body, headers, status in [
        (b"{oops", AUTH, 400),
        ({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, AUTH, 404),
        ({"model": "tiny", "messages": [{"role": "user", "content": long_text}]}, AUTH, 400),
        ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}, {"Authorization": "Bearer x"}, 401),
    ]:
        kw = {"content": body} if isinstance(body, bytes) else {"json": body}
        r = httpx.post(f"{u}/api/chat", headers=headers, timeout=30, **kw)
        assert r.status_code == status and isinstance(r.json()["error"], str), r.text
    # the official clients see them as their own errors
    with pytest.raises(openai.AuthenticationError):
        oai(srv, key="wrong").chat.completions.create(model="tiny", messages=chat["messages"])
    with pytest.raises(openai.NotFoundError):
        oai(srv).chat.completions.create(model="gpt-17", messages=chat["messages"])
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        oai(srv).completions.create(model="tiny", prompt=long_text)
    with pytest.raises(ollama.ResponseError) as e:
        ollama.Client(host=u, headers=AUTH).chat(model="nope", messages=chat["messages"])
    assert e.value.status_code == 404
    assert oai(srv).chat.completions.create(**chat).usage.completion_tokens == 2


# ----------------------------------------------------------------------------------------------
# The chat page, in headless Chromium

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def test_chat_page_in_chromium(open_srv: LiveServer, ref: Engine, tmp_path: Path):
    exe = CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium")
    if not exe:
        pytest.skip("needs Debian's `chromium` package (apt-get install -y chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs the `playwright` Python package (test extra)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 700})
            page.goto(open_srv.url + "/")
            page.wait_for_function("document.getElementById('model').textContent.includes('tiny')")
            page.fill("#temperature", "0")
            page.fill("#max-tokens", "8")
            page.fill("#input", "Hello there!")
            page.press("#input", "Enter")
            page.wait_for_selector(".msg.assistant .meta.speed", timeout=60_000)
            want = expect_chat(ref, [{"role": "user", "content": "Hello there!"}], 8)
            assert page.text_content(".msg.user .body") == "Hello there!"
            assert page.text_content(".msg.assistant .answer") == want
            meta = page.text_content(".msg.assistant .meta")
            assert re.match(r"8 tokens · \d+(\.\d+)? tok/s", meta), meta
            page.screenshot(path=str(tmp_path / "chat.png"))

            # the history goes back with the next turn; a long reply is stopped by the button
            page.fill("#max-tokens", str(LONG))
            page.fill("#input", "And again")
            page.press("#input", "Enter")
            page.wait_for_function(
                "document.querySelectorAll('.msg.assistant .answer')[1]?.textContent.length > 0", timeout=60_000
            )
            assert open_srv.health()["running"]
            page.click("#stop")
            page.wait_for_function("document.querySelectorAll('.msg.assistant .meta')[1].textContent === 'stopped'")
            open_srv.wait(lambda h: not h["running"], timeout=10, what="the stopped generation to end")
            assert max(open_srv.scheduler.last_generated.values()) < LONG
            page.screenshot(path=str(tmp_path / "chat-stopped.png"))

            # <think> sections fold once the answer starts
            folded = page.evaluate(
                """() => { const b = document.createElement('div'); document.getElementById('log').appendChild(b);
                   renderReply(b, '<think>pondering</think>The answer.');
                   const d = b.querySelector('details.think'), a = b.querySelector('.answer');
                   return [d.open, d.querySelector('.think-text').textContent, a.textContent]; }"""
            )
            assert folded == [False, "pondering", "The answer."]
            open_thinking = page.evaluate(
                """() => { const b = document.createElement('div'); renderReply(b, 'still <think>going');
                   return b.querySelector('details.think').open; }"""
            )
            assert open_thinking is True
        finally:
            browser.close()
    assert (tmp_path / "chat.png").stat().st_size > 1000


# ----------------------------------------------------------------------------------------------
# CLI


def test_cli_help_and_bad_folder(tmp_path: Path):
    from click.testing import CliRunner

    from ktpack.runtime.server.cli import main

    r = CliRunner().invoke(main, ["--help"])
    assert r.exit_code == 0 and "--api-key" in r.output and "--max-queue" in r.output and "--kv-cache" in r.output
    r = CliRunner().invoke(main, [str(tmp_path / "missing")])
    assert r.exit_code == 1 and "kt-serve: error:" in r.output
    r = CliRunner().invoke(main, [str(tmp_path), "--kv-cache", "q8"])
    assert r.exit_code == 2 and "'q8' is not one of 'f32', 'f16'" in r.output


def test_app_takes_the_kv_cache_type(pack: Path):
    app = create_app(pack, ctx_size=32, kv_cache="f16")
    assert app.state.kt.engine.cache.c_kv.dtype == torch.float16
