"""The real `air serve` binary on loopback, driven by the official `openai` package and raw HTTP.

Run through scripts/e2e.sh, which installs the pinned packages of requirements.txt and points
AIR_BIN at the built binary and AIR_MODELS_DIR at the fetched models.
"""

import asyncio
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
import unittest
import urllib.error
import urllib.request

import openai

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
AIR = os.environ.get("AIR_BIN", os.path.join(ROOT, "target", "debug", "air"))
MODEL = os.path.join(os.environ.get("AIR_MODELS_DIR", os.path.join(ROOT, "models")), "SmolLM2-135M-Instruct.Q4_1.gguf")
KEY = "e2e-secret"


class Server:
    """An `air serve` process on a free loopback port; its log is kept for failure messages."""

    def __init__(self, *flags):
        self.proc = subprocess.Popen(
            [AIR, "serve", "-m", f"smol={MODEL}", "--port", "0", "--threads", "2", *flags],
            stderr=subprocess.PIPE,
            text=True,
        )
        self.log = []
        for line in self.proc.stderr:
            self.log.append(line)
            found = re.search(r"on http://([0-9.]+:[0-9]+)", line)
            if found:
                self.address = found.group(1)
                break
        else:
            raise RuntimeError("air serve did not start:\n" + "".join(self.log))
        threading.Thread(target=lambda: self.log.extend(self.proc.stderr), daemon=True).start()
        self.url = f"http://{self.address}"

    def stop(self):
        """SIGTERM; returns the exit status."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)

    def raw(self, method, path, body=None, key=KEY, raw_body=None):
        """(status, headers, parsed JSON or text) of one HTTP request."""
        data = raw_body if raw_body is not None else (json.dumps(body).encode() if body is not None else None)
        request = urllib.request.Request(self.url + path, data=data, method=method)
        request.add_header("Content-Type", "application/json")
        if key:
            request.add_header("Authorization", f"Bearer {key}")
        try:
            with urllib.request.urlopen(request, timeout=120) as r:
                status, headers, text = r.status, r.headers, r.read().decode()
        except urllib.error.HTTPError as e:
            status, headers, text = e.code, e.headers, e.read().decode()
        try:
            return status, headers, json.loads(text)
        except ValueError:
            return status, headers, text

    def metrics(self):
        """{series: value} of a /metrics scrape, series written as in the text format."""
        status, _, text = self.raw("GET", "/metrics", key=None)
        assert status == 200, text
        values = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                series, value = line.rsplit(" ", 1)
                values[series] = float(value)
        return values


def series(values, name, **labels):
    """The value of the one series `name` with (at least) `labels`, or None."""
    for key, value in values.items():
        metric = key.split("{", 1)[0]
        if metric == name and all(f'{k}="{v}"' in key for k, v in labels.items()):
            return value
    return None


def air_generate(prompt, max_tokens, chat=False):
    """`air generate`'s greedy text for `prompt`."""
    args = [AIR, "generate", "--model", MODEL, "--prompt", prompt, "--max-tokens", str(max_tokens),
            "--temperature", "0", "--format", "json", "--threads", "2"]
    out = subprocess.run(args + (["--chat"] if chat else []), capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["text"]


class OpenAiApi(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.server = Server("--api-key", KEY)
        cls.client = openai.OpenAI(base_url=cls.server.url + "/v1", api_key=KEY, max_retries=0, timeout=300)

    @classmethod
    def tearDownClass(cls):
        cls.client.close()
        status = cls.server.stop()
        assert status == 0, "".join(cls.server.log)

    def chat(self, content, **kw):
        return self.client.chat.completions.create(
            model="smol", messages=[{"role": "user", "content": content}], **kw)

    def test_models(self):
        listed = self.client.models.list()
        self.assertEqual([m.id for m in listed.data], ["smol"])
        self.assertEqual(self.client.models.retrieve("smol").id, "smol")
        with self.assertRaises(openai.NotFoundError):
            self.client.models.retrieve("nope")

    def test_greedy_output_equals_air_generate(self):
        prompt = "The three primary colors are"
        api = self.client.completions.create(model="smol", prompt=prompt, max_tokens=24, temperature=0)
        self.assertEqual(api.choices[0].text, air_generate(prompt, 24))
        question = "What is the capital of France?"
        answer = self.chat(question, max_tokens=24, temperature=0)
        self.assertEqual(answer.choices[0].message.content, air_generate(question, 24, chat=True))

    def test_chat_plain_and_streamed_with_usage(self):
        messages = [{"role": "system", "content": "You are brief."},
                    {"role": "user", "content": [{"type": "text", "text": "Name a fruit."}]}]
        whole = self.client.chat.completions.create(model="smol", messages=messages, max_tokens=16,
                                                    temperature=0, user="e2e")
        self.assertEqual(whole.object, "chat.completion")
        self.assertTrue(whole.id.startswith("chatcmpl-"))
        choice = whole.choices[0]
        self.assertEqual(choice.message.role, "assistant")
        self.assertIn(choice.finish_reason, ("stop", "length"))
        self.assertTrue(choice.message.content)
        u = whole.usage
        self.assertEqual(u.total_tokens, u.prompt_tokens + u.completion_tokens)

        stream = self.client.chat.completions.create(model="smol", messages=messages, max_tokens=16, temperature=0,
                                                     stream=True, stream_options={"include_usage": True})
        chunks = list(stream)
        self.assertEqual(chunks[0].choices[0].delta.role, "assistant")
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        self.assertEqual(text, choice.message.content)
        finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        self.assertEqual(finishes, [choice.finish_reason])
        self.assertEqual(chunks[-1].choices, [])
        self.assertEqual(chunks[-1].usage.completion_tokens, u.completion_tokens)
        self.assertEqual(chunks[-1].usage.prompt_tokens, u.prompt_tokens)

    def test_completions_plain_streamed_and_from_token_ids(self):
        whole = self.client.completions.create(model="smol", prompt="Once upon a time", max_tokens=12, temperature=0)
        self.assertEqual(whole.object, "text_completion")
        self.assertEqual(whole.choices[0].finish_reason, "length")
        self.assertEqual(whole.usage.completion_tokens, 12)
        streamed = self.client.completions.create(model="smol", prompt="Once upon a time", max_tokens=12,
                                                  temperature=0, stream=True)
        self.assertEqual("".join(c.choices[0].text for c in streamed if c.choices), whole.choices[0].text)
        ids = self.client.completions.create(model="smol", prompt=[9012, 2056, 253, 655], max_tokens=4,
                                             temperature=0)
        self.assertEqual(ids.usage.prompt_tokens, 4)

    def test_n_choices_and_seed_reproducibility(self):
        kw = dict(model="smol", prompt="My favourite animal is", max_tokens=16, temperature=1.0, n=2)
        a = self.client.completions.create(seed=7, **kw)
        b = self.client.completions.create(seed=7, **kw)
        c = self.client.completions.create(seed=8, **kw)
        self.assertEqual([ch.index for ch in a.choices], [0, 1])
        self.assertEqual([ch.text for ch in a.choices], [ch.text for ch in b.choices])
        self.assertNotEqual(a.choices[0].text, a.choices[1].text)
        self.assertNotEqual([ch.text for ch in a.choices], [ch.text for ch in c.choices])
        self.assertEqual(a.usage.completion_tokens, 32)
        chat = self.chat("Tell me a word.", n=2, max_tokens=8, temperature=0.9, seed=3)
        self.assertEqual(len(chat.choices), 2)

    def test_stop_sequences_are_not_emitted(self):
        prompt = "The capital of France is"
        full = self.client.completions.create(model="smol", prompt=prompt, max_tokens=24, temperature=0)
        text = full.choices[0].text
        # A stop string inside the greedy text, and one that can only match across tokens.
        stop = text[len(text) // 2:len(text) // 2 + 3]
        want = text[:text.index(stop)]
        for stream in (False, True):
            r = self.client.completions.create(model="smol", prompt=prompt, max_tokens=24, temperature=0,
                                               stop=[stop, "never-said"], stream=stream)
            if stream:
                chunks = list(r)
                got = "".join(c.choices[0].text for c in chunks if c.choices)
                reason = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
                self.assertEqual(reason, ["stop"])
            else:
                got = r.choices[0].text
                self.assertEqual(r.choices[0].finish_reason, "stop")
            self.assertEqual(got, want, f"stop={stop!r}")
            self.assertNotIn(stop, got)

    def test_logprobs(self):
        r = self.chat("Say hello.", max_tokens=6, temperature=0, logprobs=True, top_logprobs=3)
        content = r.choices[0].logprobs.content
        self.assertEqual(len(content), r.usage.completion_tokens)
        for entry in content:
            self.assertLessEqual(entry.logprob, 0.0)
            self.assertEqual(len(entry.top_logprobs), 3)
            # Greedy: the chosen token is the most likely one.
            self.assertEqual(entry.top_logprobs[0].token, entry.token)
            self.assertAlmostEqual(entry.top_logprobs[0].logprob, entry.logprob, places=4)
        self.assertEqual("".join(e.token for e in content), r.choices[0].message.content)
        t = self.client.completions.create(model="smol", prompt="One, two,", max_tokens=5, temperature=0, logprobs=2)
        lp = t.choices[0].logprobs
        self.assertEqual(len(lp.tokens), 5)
        self.assertEqual(len(lp.token_logprobs), 5)
        self.assertTrue(all(len(alts) == 2 for alts in lp.top_logprobs))

    def test_errors_in_openai_shape(self):
        bad_key = openai.OpenAI(base_url=self.server.url + "/v1", api_key="wrong", max_retries=0)
        with self.assertRaises(openai.AuthenticationError):
            bad_key.models.list()
        self.assertEqual(self.server.raw("GET", "/v1/models", key=None)[0], 401)
        for path in ("/health", "/ready", "/metrics"):
            self.assertEqual(self.server.raw("GET", path, key=None)[0], 200, path)
        with self.assertRaises(openai.NotFoundError) as e:
            self.client.completions.create(model="nope", prompt="hi", max_tokens=2)
        self.assertEqual(e.exception.body["param"], "model")
        for bad in (dict(temperature=3), dict(n=0), dict(max_tokens=0), dict(top_p=1.5), dict(top_logprobs=5)):
            with self.assertRaises(openai.BadRequestError, msg=str(bad)):
                self.chat("hi", **bad)
        with self.assertRaises(openai.BadRequestError) as e:
            self.client.completions.create(model="smol", prompt="word " * 9000, max_tokens=2)
        self.assertEqual(e.exception.code, "context_length_exceeded")
        status, _, body = self.server.raw("POST", "/v1/completions", raw_body=b"{not json")
        self.assertEqual(status, 400)
        self.assertEqual(body["error"]["type"], "invalid_request_error")
        status, _, body = self.server.raw("POST", "/v1/completions",
                                          {"model": "smol", "prompt": "x" * (3 << 20)})
        self.assertEqual(status, 413)
        self.assertIn("message", body["error"])
        self.assertEqual(self.server.raw("GET", "/v1/nothing")[0], 404)

    def test_tokenize_and_detokenize(self):
        status, _, t = self.server.raw("POST", "/tokenize", {"model": "smol", "prompt": "Hello world"})
        self.assertEqual(status, 200, t)
        usage = self.client.completions.create(model="smol", prompt="Hello world", max_tokens=1).usage
        self.assertEqual(t["count"], usage.prompt_tokens)
        status, _, text = self.server.raw("POST", "/detokenize", {"tokens": t["tokens"]})
        self.assertEqual((status, text["prompt"]), (200, "Hello world"))
        self.assertEqual(self.server.raw("POST", "/detokenize", {"tokens": [10 ** 9]})[0], 400)

    def test_64_concurrent_streams_complete_with_the_batch_free_outputs(self):
        prompts = ["List four colors:", "Count to ten:", "Name a planet:", "Write a greeting:"]
        expected = [self.client.completions.create(model="smol", prompt=p, max_tokens=20, temperature=0)
                    for p in prompts]

        async def one(client, i):
            stream = await client.completions.create(model="smol", prompt=prompts[i % 4], max_tokens=20,
                                                     temperature=0, stream=True,
                                                     stream_options={"include_usage": True})
            text, usage, reasons = "", None, []
            async for chunk in stream:
                if chunk.choices:
                    text += chunk.choices[0].text
                    if chunk.choices[0].finish_reason:
                        reasons.append(chunk.choices[0].finish_reason)
                if chunk.usage:
                    usage = chunk.usage
            return text, usage, reasons

        async def all_of_them():
            async with openai.AsyncOpenAI(base_url=self.server.url + "/v1", api_key=KEY, max_retries=0,
                                          timeout=600) as client:
                return await asyncio.gather(*(one(client, i) for i in range(64)))

        results = asyncio.run(all_of_them())
        for i, (text, usage, reasons) in enumerate(results):
            want = expected[i % 4]
            self.assertEqual(text, want.choices[0].text, f"client {i}")
            self.assertEqual(reasons, [want.choices[0].finish_reason], f"client {i}")
            self.assertEqual(usage.completion_tokens, want.usage.completion_tokens, f"client {i}")

    def test_a_client_killed_mid_stream_frees_its_kv_blocks(self):
        before = self.server.metrics()
        cancelled = series(before, "air_requests_finished_total", model="smol", finish_reason="cancelled") or 0
        host, port = self.server.address.rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        body = {"model": "smol", "prompt": "Tell a very long story.", "max_tokens": 4000, "stream": True,
                "ignore_eos": True}
        conn.request("POST", "/v1/completions", json.dumps(body),
                     {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
        response = conn.getresponse()
        self.assertEqual(response.status, 200)
        self.assertTrue(response.readline().startswith(b"data: "))
        during = self.server.metrics()
        self.assertGreaterEqual(series(during, "air_requests_running", model="smol"), 1)
        self.assertGreater(series(during, "air_kv_blocks", model="smol", state="used"), 0)
        conn.sock.shutdown(socket.SHUT_RDWR)  # the client dies without a goodbye
        response.close()
        conn.close()
        deadline = time.time() + 60
        while True:
            after = self.server.metrics()
            freed = (series(after, "air_requests_running", model="smol") == 0
                     and series(after, "air_kv_blocks", model="smol", state="used") == 0)
            if freed or time.time() > deadline:
                break
            time.sleep(0.1)
        self.assertTrue(freed, after)
        self.assertEqual(series(after, "air_requests_finished_total", model="smol", finish_reason="cancelled"),
                         cancelled + 1)


class Overload(unittest.TestCase):
    def test_a_full_queue_answers_429_with_retry_after(self):
        server = Server("--max-seqs", "1", "--max-queue", "1")
        try:
            client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)
            long = dict(model="smol", prompt="Tell a story.", max_tokens=4000, stream=True, extra_body={"ignore_eos": True})
            running = client.completions.create(**long)
            next(iter(running))
            waiting = client.completions.create(**long)
            with self.assertRaises(openai.RateLimitError) as e:
                client.completions.create(model="smol", prompt="hi", max_tokens=2)
            self.assertEqual(e.exception.response.headers.get("retry-after"), "1")
            self.assertEqual(e.exception.body["type"], "rate_limit_error")
            status, headers, body = server.raw("POST", "/v1/completions", {"model": "smol", "prompt": "hi"})
            self.assertEqual(status, 429)
            self.assertEqual(headers["Retry-After"], "1")
            running.close()
            waiting.close()
            client.close()
        finally:
            self.assertEqual(server.stop(), 0, "".join(server.log))


if __name__ == "__main__":
    unittest.main()
