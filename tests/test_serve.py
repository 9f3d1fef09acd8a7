"""``moerun serve`` as users drive it: a subprocess on a free loopback port, the real
``openai`` client and plain HTTP, in one process and under a torchrun layout. Every
greedy answer is checked against the engine run offline on the same prompt."""
from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import httpx
import pytest
import torch

from moerun.build import build_model
from moerun.engine import Engine, EngineConfig
from moerun.options import SamplingParams

from test_layouts import free_port

openai = pytest.importorskip("openai")

TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}w5 {{ m['content'] }} "
            "{% else %}w6 {{ m['role'] }} {{ m['content'] }} w7 {% endif %}{% endfor %}"
            "{% if add_generation_prompt %}w6 assistant {% endif %}")


class Server:
    """``python -m moerun.serve`` (or torchrun of it, or one process per rank) on a free port."""

    def __init__(self, args, nproc: int = 0, direct_ranks: int = 0, env=None, ready_s: float = 180):
        self.port = free_port()
        base = ["--host", "127.0.0.1", "--port", str(self.port), *map(str, args)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
        if direct_ranks:  # one process per rank, without torchrun's agent: exit codes per rank
            mport = free_port()
            self.procs = [subprocess.Popen([sys.executable, "-m", "moerun.serve", *base],
                                           env={**env, "RANK": str(r), "LOCAL_RANK": str(r),
                                                "WORLD_SIZE": str(direct_ranks), "MASTER_ADDR": "127.0.0.1",
                                                "MASTER_PORT": str(mport)},
                                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                          for r in range(direct_ranks)]
        else:
            cmd = ([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                    f"--master_port={free_port()}", "-m", "moerun.serve"] if nproc else
                   [sys.executable, "-m", "moerun.serve"])
            self.procs = [subprocess.Popen(cmd + base, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                           text=True)]
        self.url = f"http://127.0.0.1:{self.port}"
        t_end = time.time() + ready_s
        while True:
            if self.procs[0].poll() is not None:
                raise AssertionError(f"server exited {self.procs[0].returncode}: {self.procs[0].stderr.read()[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < t_end, "server did not become healthy"
            time.sleep(0.2)
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=120)

    def metric(self, name: str) -> float:
        text = httpx.get(self.url + "/metrics", timeout=10).text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(f"moerun:{name}{{") or line.startswith(f"moerun:{name} "))

    def stop(self):
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        return [p.wait(timeout=90) for p in self.procs]


@pytest.fixture(scope="module")
def checkpoint(hf_checkpoint, tmp_path_factory):
    """The mixtral test checkpoint with a word-level tokenizer.json and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    path, _ = hf_checkpoint("mixtral")
    d = tmp_path_factory.mktemp("served") / "ck"
    shutil.copytree(path, d)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 160)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.add_special_tokens(["<s>", "</s>"])
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "chat_template": TEMPLATE,
        "tokenizer_class": "PreTrainedTokenizerFast"}))
    return d


@pytest.fixture(scope="module")
def offline(checkpoint):
    model = build_model(str(checkpoint))

    def run(prompts, n):
        return Engine(model, EngineConfig(num_blocks=256)).generate(
            prompts, SamplingParams(max_new_tokens=n, ignore_eos=True))
    return run


@pytest.fixture(scope="module")
def server(checkpoint):
    s = Server(["--model", checkpoint, "--served-model-name", "mx", "--max-model-len", "256"])
    yield s
    codes = s.stop()
    assert codes == [0], s.procs[0].stderr.read()[-2000:]


def prompt_text(ids):
    return " ".join(f"w{i}" for i in ids)


def continuation(prompt, output):
    """The text of ``output`` as it continues ``prompt`` (a word after a word: a space first)."""
    return prompt_text(prompt + output)[len(prompt_text(prompt)):]


def test_completions_equal_the_engine(server, offline):
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 160, (int(n),), generator=g).tolist() for n in (4, 9, 2)]
    want = offline(prompts, 10)
    c = server.client
    for p, w in zip(prompts, want):  # token ids
        r = c.completions.create(model="mx", prompt=p, max_tokens=10, temperature=0, extra_body={"ignore_eos": True})
        assert r.choices[0].model_extra["token_ids"] == w and r.choices[0].finish_reason == "length"
        assert r.usage.prompt_tokens == len(p) and r.usage.completion_tokens == 10
    batch = c.completions.create(model="mx", prompt=[prompt_text(p) for p in prompts], max_tokens=10, temperature=0,
                                 extra_body={"ignore_eos": True})  # text: the tokenizer gives the same ids
    assert [ch.index for ch in batch.choices] == [0, 1, 2]
    assert [ch.model_extra["token_ids"] for ch in batch.choices] == want
    assert [ch.text for ch in batch.choices] == [continuation(p, w) for p, w in zip(prompts, want)]


def test_stream_concatenates_to_the_whole_answer(server):
    c = server.client
    kw = dict(model="mx", prompt=[5, 9, 33, 7], max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    whole = c.completions.create(**kw).choices[0].text
    chunks = list(c.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == whole
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    chat = [ch for ch in c.chat.completions.create(model="mx", messages=[{"role": "user", "content": "w9 w10"}],
                                                   max_tokens=6, temperature=0, stream=True)]
    assert chat[0].choices[0].delta.role == "assistant"
    streamed = "".join(ch.choices[0].delta.content or "" for ch in chat)
    full = c.chat.completions.create(model="mx", messages=[{"role": "user", "content": "w9 w10"}], max_tokens=6,
                                     temperature=0).choices[0].message.content
    assert streamed == full


def test_stream_keeps_every_piece_when_events_pile_up(checkpoint):
    """A stream that reads its pieces slower than the engine makes them (each read held back
    50 ms) still sends all the text, and the finish reason only on its last chunk."""
    s = Server(["--model", checkpoint, "--served-model-name", "mx"], env={"MOERUN_TEST_STREAM_DELAY": "0.05"})
    try:
        kw = dict(model="mx", max_tokens=8, temperature=0)
        for prompt in ([5, 9, 33, 7], "w9 w10 w11"):
            whole = s.client.completions.create(prompt=prompt, extra_body={"ignore_eos": True}, **kw).choices[0].text
            chunks = [ch for ch in s.client.completions.create(prompt=prompt, stream=True, extra_body={"ignore_eos": True},
                                                               **kw) if ch.choices]
            assert "".join(ch.choices[0].text for ch in chunks) == whole
            assert [ch.choices[0].finish_reason for ch in chunks] == [None] * (len(chunks) - 1) + ["length"]
        msgs = [{"role": "user", "content": "w9 w10"}]
        full = s.client.chat.completions.create(messages=msgs, **kw).choices[0].message.content
        chat = [ch for ch in s.client.chat.completions.create(messages=msgs, stream=True, **kw) if ch.choices]
        assert "".join(ch.choices[0].delta.content or "" for ch in chat) == full
        assert [ch.choices[0].finish_reason for ch in chat][:-1] == [None] * (len(chat) - 1)
    finally:
        assert s.stop() == [0]


def test_stream_interval_sends_tokens_n_at_a_time(checkpoint, offline):
    """--stream-interval 3: the first token alone, then 3 per chunk (more only when chunks
    pile up), the rest with the finish; the text, the token ids and the logprobs are those of
    the whole answer, and the latency metrics still count one gap per token."""
    s = Server(["--model", checkpoint, "--served-model-name", "mx", "--stream-interval", "3"])
    try:
        prompt, n = [5, 9, 33, 7], 11
        want = offline([prompt], n)[0]
        kw = dict(model="mx", prompt=prompt, max_tokens=n, temperature=0, logprobs=1, extra_body={"ignore_eos": True})
        whole = s.client.completions.create(**kw).choices[0]
        gaps0 = s.metric("inter_token_latency_seconds_count")
        chunks = [ch.choices[0] for ch in s.client.completions.create(stream=True, **kw) if ch.choices]
        sizes = [len(ch.model_extra["token_ids"]) for ch in chunks]
        # the engine sends 1, then 3s; a stream that reads late merges what piled up (1 + 3k)
        assert sizes[0] % 3 == 1 and sum(sizes) == n and all(k % 3 == 0 for k in sizes[1:-1]), sizes
        assert len(chunks) < n  # not one chunk per token
        assert [t for ch in chunks for t in ch.model_extra["token_ids"]] == want == whole.model_extra["token_ids"]
        assert "".join(ch.text for ch in chunks) == whole.text
        assert [len(ch.logprobs.tokens) for ch in chunks] == sizes
        assert [lp for ch in chunks for lp in ch.logprobs.token_logprobs] == pytest.approx(whole.logprobs.token_logprobs)
        assert [ch.finish_reason for ch in chunks] == [None] * (len(chunks) - 1) + ["length"]
        assert s.metric("inter_token_latency_seconds_count") - gaps0 == n - 1
        msgs = [{"role": "user", "content": "w9 w10"}]
        full = s.client.chat.completions.create(model="mx", messages=msgs, max_tokens=7, temperature=0)
        chat = [ch for ch in s.client.chat.completions.create(model="mx", messages=msgs, max_tokens=7, temperature=0,
                                                              stream=True) if ch.choices]
        assert "".join(ch.choices[0].delta.content or "" for ch in chat) == full.choices[0].message.content
    finally:
        assert s.stop() == [0]


def test_chat_renders_the_template_like_transformers(server, checkpoint, offline):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(checkpoint))
    messages = [{"role": "system", "content": "w3 w4"}, {"role": "user", "content": "w11 w12 w13"},
                {"role": "assistant", "content": "w20"}, {"role": "user", "content": "w30"}]
    want = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    want = list(want["input_ids"] if not isinstance(want, list) else want)
    got = httpx.post(server.url + "/tokenize", json={"messages": messages}).json()
    assert got["tokens"] == want
    r = server.client.chat.completions.create(model="mx", messages=messages, max_completion_tokens=8, temperature=0,
                                              extra_body={"ignore_eos": True})
    out = offline([want], 8)[0]
    assert r.choices[0].model_extra["token_ids"] == out
    assert r.choices[0].message.content == " " + prompt_text(out)  # continues the prompt's last word
    assert r.usage.prompt_tokens == len(want)


def test_concurrent_requests_each_equal_alone(server, offline):
    g = torch.Generator().manual_seed(9)
    prompts = [torch.randint(3, 160, (int(torch.randint(1, 12, (1,), generator=g)),), generator=g).tolist()
               for _ in range(32)]
    want = [offline([p], 6)[0] for p in prompts]

    def one(p):
        r = server.client.completions.create(model="mx", prompt=p, max_tokens=6, temperature=0,
                                             extra_body={"ignore_eos": True})
        return r.choices[0].model_extra["token_ids"]
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        got = list(pool.map(one, prompts))
    assert got == want


BAD = [  # (route, body, status, words the message must contain)
    ("/v1/completions", {"prompt": [1, 2], "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"prompt": [1, 2], "top_p": 1.5}, 400, "top_p"),
    ("/v1/completions", {"prompt": [1, 2], "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": [1, 500]}, 400, "outside the vocabulary"),
    ("/v1/completions", {"prompt": [1, 2], "max_tokens": 300}, 400, "maximum context length is 256"),
    ("/v1/completions", {"prompt": [1, 2], "colour": "red"}, 400, "colour"),
    ("/v1/completions", {"prompt": []}, 400, "prompt"),
    ("/v1/completions", {"prompt": [1, 2], "presence_penalty": 0.5}, 400, "presence_penalty"),
    ("/v1/completions", {"prompt": [1, 2], "model": "other"}, 404, "other"),
    ("/v1/completions", b"{not json", 400, ""),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "w3"}], "max_tokens": 4,
                              "max_completion_tokens": 5}, 400, "max_completion_tokens"),
]


@pytest.mark.parametrize("route, body, status, words", BAD, ids=[f"{i}" for i in range(len(BAD))])
def test_bad_requests_get_their_error_and_the_server_keeps_serving(server, route, body, status, words):
    r = (httpx.post(server.url + route, content=body, headers={"content-type": "application/json"})
         if isinstance(body, bytes) else httpx.post(server.url + route, json=body))
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert words in err["message"] and set(err) == {"message", "type", "param", "code"}
    ok = server.client.completions.create(model="mx", prompt=[3, 4], max_tokens=2, temperature=0)
    assert ok.usage.completion_tokens >= 1


def test_disconnect_mid_stream_frees_the_request(server):
    with httpx.stream("POST", server.url + "/v1/completions", timeout=60,
                      json={"prompt": [3, 4, 5], "max_tokens": 200, "stream": True, "ignore_eos": True}) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
        assert server.metric("num_requests_running") == 1
    t_end = time.time() + 10
    while server.metric("num_requests_running") or server.metric("kv_cache_usage_perc"):
        assert time.time() < t_end, "the request was not aborted"
        time.sleep(0.1)
    assert server.metric("request_success_total") >= 1  # counted, as "abort"


def test_max_waiting_and_drain(checkpoint):
    """A cache that holds one request: the second waits, the third gets 503; SIGTERM lets
    the running one finish, answers 503 meanwhile, and exits 0."""
    # 25 blocks of 16 tokens (and the scratch block); a request of 200 + 180 tokens takes 24 of
    # them, its prompt alone 13: while the first runs, the second's prompt cannot be admitted (a
    # request is admitted on its prompt's blocks, so with a short prompt the second would start
    # at once, be preempted later and come back: the waiting queue would empty before the
    # third request arrived on a loaded machine). Each tick held back 10 ms: the first request
    # runs for seconds, not for the fraction of one in which a fast machine would finish it.
    s = Server(["--model", checkpoint, "--kv-cache-gb", "0.0003", "--block-size", "16", "--max-waiting", "1",
                "--drain-timeout", "60"], env={"MOERUN_TEST_TICK_DELAY": "0.01"})
    body = {"prompt": [3 + i % 150 for i in range(200)], "max_tokens": 180, "ignore_eos": True, "temperature": 0}
    try:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            first = pool.submit(httpx.post, s.url + "/v1/completions", json=body, timeout=120)
            t_end = time.time() + 30
            while not s.metric("num_requests_running"):
                assert time.time() < t_end
                time.sleep(0.05)
            second = pool.submit(httpx.post, s.url + "/v1/completions", json=body, timeout=120)
            while not s.metric("num_requests_waiting"):
                assert time.time() < t_end
                time.sleep(0.05)
            r = httpx.post(s.url + "/v1/completions", json=body, timeout=60)  # a loaded CI machine may take > 5 s
            assert r.status_code == 503 and "--max-waiting" in r.json()["error"]["message"]
            assert s.metric("num_requests_waiting") == 1 and s.metric("num_preemptions_total") == 0  # never admitted
            s.procs[0].send_signal(signal.SIGTERM)
            t_end = time.time() + 10
            while httpx.get(s.url + "/health").status_code != 503:
                assert time.time() < t_end
                time.sleep(0.05)
            assert httpx.post(s.url + "/v1/completions", json=body, timeout=60).status_code == 503
            assert first.result().status_code == 200 and second.result().status_code == 200
            assert first.result().json()["usage"]["completion_tokens"] == 180
        assert s.procs[0].wait(timeout=60) == 0
    finally:  # a failed check must not leave the server running
        s.stop()


def test_layout_server_equals_one_process(checkpoint, offline):
    """TP2 PP2 DP2 with EP4 under torchrun: greedy answers equal the offline engine."""
    s = Server(["--model", checkpoint, "--tp", 2, "--pp", 2, "--dp", 2, "--ep", 4, "--timeout", 60], nproc=8)
    try:
        g = torch.Generator().manual_seed(21)
        prompts = [torch.randint(3, 160, (int(n),), generator=g).tolist() for n in (3, 7, 5, 2)]
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            got = list(pool.map(lambda p: s.client.completions.create(
                model=str(checkpoint), prompt=p, max_tokens=6, temperature=0,
                extra_body={"ignore_eos": True}).choices[0].model_extra["token_ids"], prompts))
        assert got == offline(prompts, 6)
    finally:
        s.stop()


def test_sigterm_drains_every_rank_and_a_dead_rank_fails_fast(checkpoint, tmp_path):
    s = Server(["--model", checkpoint, "--pp", 2, "--timeout", 30, "--profile-out", tmp_path / "prof"],
               direct_ranks=2)
    r = s.client.completions.create(model=str(checkpoint), prompt=[3, 4], max_tokens=3, temperature=0)
    assert r.usage.completion_tokens == 3
    assert s.stop() == [0, 0]  # SIGTERM to every rank, as torchrun forwards it
    summary = json.loads((tmp_path / "prof" / "summary.json").read_text())  # both ranks' profile, after the drain
    assert sorted(summary["phases_s"]) == ["0", "1"] and summary["workload"]["output_tokens"] == 3

    s = Server(["--model", checkpoint, "--pp", 2, "--timeout", 30], direct_ranks=2,
               env={"MOERUN_TEST_KILL": "1:40"})  # rank 1 dies at tick 40
    t0 = time.time()
    with httpx.stream("POST", s.url + "/v1/completions", timeout=60,
                      json={"prompt": [3, 4], "max_tokens": 200, "stream": True, "ignore_eos": True}) as resp:
        text = "".join(resp.iter_text())
    assert '"error"' in text and "[DONE]" in text  # the client got an error, not a hang
    codes = [p.wait(timeout=60) for p in s.procs]
    assert codes[1] == 3 and codes[0] != 0 and time.time() - t0 < 60, codes
