#!/usr/bin/env python3
"""End-to-end test of `logprobs` (and `echo`) in both endpoints of `cachette serve` (stdlib only).

With the bundled Q8_0 model: the formats of /v1/completions (legacy: tokens, token_logprobs,
top_logprobs, text_offset) and /v1/chat/completions (content entries with bytes and
top_logprobs), streamed and not; values are log-probabilities (<= 0, the top list sorted, the
greedy token on top at temperature 0, exp of the top ones summing to at most 1); echo with
max_tokens 0 scores the prompt (one entry per prompt token, the first null), as lm-eval's
local-completions model asks; bad values are 400s naming the field.

With the F32 model and with the Q8_0 one (the matmul is batch-invariant for both): a request's
logprobs, compared as JSON number text, are identical alone, batched with other requests
(prefill chunks cut differently), and after an earlier request cached its prefix; and the
prompt's logprobs sum to minus the NLL `cachette eval ppl` computes over the same tokens.

Usage: logprobs_test.py --binary build/.../cachette --model models/cachette-tiny-q8_0.gguf
                        --f32-model ../shared/models/cachette-tiny-f32.gguf
"""
import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time

from e2e_util import Server, check, report

PROMPT = ("The history of the English dictionary begins with glossaries of hard words. "
          "Later works tried to list every word of the language, with its meanings, its "
          "spelling and its origin, and")


def completion(s, prompt, **kw):
    body = {"prompt": prompt, "max_tokens": 8, "temperature": 0}
    body.update(kw)
    return s.post("/v1/completions", body)


def chat(s, text, **kw):
    body = {"messages": [{"role": "user", "content": text}], "max_tokens": 8, "temperature": 0}
    body.update(kw)
    return s.post("/v1/chat/completions", body)


def check_completion_logprobs(lp, n, top_n, what, greedy=True):
    """The legacy object: n entries, values <= 0, the top map within N + 1 keys holding the
    chosen token, the greedy token's value the largest."""
    if not check(isinstance(lp, dict) and all(
            len(lp.get(k) or []) == n
            for k in ("tokens", "token_logprobs", "top_logprobs", "text_offset")),
            "%s: four arrays of %d entries: %s" % (what, n, lp)):
        return
    offsets = lp["text_offset"]
    check(offsets == sorted(offsets), "%s: text_offset ascending" % what)
    for tok, v, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        if v is None:
            continue
        check(v <= 0, "%s: logprob %s <= 0" % (what, v))
        check(isinstance(top, dict) and top_n <= len(top) <= top_n + 1,
              "%s: top_logprobs holds N or N + 1 tokens: %s" % (what, top))
        check(tok in top, "%s: the chosen token %r is in top_logprobs" % (what, tok))
        check(sum(math.exp(x) for x in top.values()) <= 1 + 1e-9,
              "%s: exp of the top logprobs sums to <= 1" % what)
        if greedy:
            check(v == max(top.values()), "%s: greedy token %r has the largest logprob (%s, %s)"
                  % (what, tok, v, top))


def check_chat_logprobs(lp, n, top_n, what):
    content = lp.get("content") if isinstance(lp, dict) else None
    if not check(isinstance(content, list) and len(content) == n,
                 "%s: %d content entries: %s" % (what, n, lp)):
        return
    for e in content:
        check(set(e) == {"token", "logprob", "bytes", "top_logprobs"}, "%s: entry keys %s"
              % (what, sorted(e)))
        check(e["logprob"] <= 0, "%s: logprob <= 0" % what)
        check(bytes(e["bytes"]).decode("utf-8", "replace") == e["token"]
              or e["token"].startswith("bytes:"), "%s: bytes spell the token" % what)
        top = e["top_logprobs"]
        check(len(top) == top_n, "%s: %d top_logprobs" % (what, top_n))
        values = [t["logprob"] for t in top]
        check(values == sorted(values, reverse=True), "%s: top sorted" % what)
        check(sum(math.exp(x) for x in values) <= 1 + 1e-9, "%s: exp sums to <= 1" % what)
        if top_n > 0:
            check(top[0]["token"] == e["token"] and top[0]["logprob"] == e["logprob"],
                  "%s: the greedy token is first in top_logprobs: %s" % (what, e))


def test_completion_format(s):
    status, r = completion(s, PROMPT, logprobs=3)
    if not check(status == 200, "completion with logprobs: %s %s" % (status, r)):
        return
    choice = r["choices"][0]
    n = r["usage"]["completion_tokens"]
    check_completion_logprobs(choice["logprobs"], n, 3, "completion")
    lp = choice["logprobs"]
    check(lp["text_offset"][0] == 0, "completion: the first offset is 0 without echo")
    check("".join(lp["tokens"]) == choice["text"], "completion: the tokens spell the text")

    status, r0 = completion(s, PROMPT, logprobs=0)
    tops = r0["choices"][0]["logprobs"]["top_logprobs"]
    check(status == 200 and all(len(t) == 1 for t in tops),
          "logprobs 0: top_logprobs holds the chosen token only (OpenAI's N + 1): %s" % tops)
    status, r1 = completion(s, PROMPT)
    check(status == 200 and r1["choices"][0]["logprobs"] is None, "no logprobs: null")

    # Streaming: each chunk carries its tokens' entries; together they equal the response's.
    status, events, done = s.stream("/v1/completions", {
        "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "logprobs": 3, "stream": True})
    check(status == 200 and done, "streamed completion with logprobs")
    merged = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for e in events:
        c = e["choices"][0]
        if c["finish_reason"] is not None:
            continue
        check(len(c["logprobs"]["tokens"]) == 1, "one token per streamed chunk")
        for k in merged:
            merged[k] += c["logprobs"][k]
    # Q8_0 kernels round differently for a 1-token recompute (the prompt is cached now) than
    # for a whole prefill (docs/serving.md "Known warts"): same tokens, values within rounding.
    check(merged["tokens"] == lp["tokens"] and merged["text_offset"] == lp["text_offset"],
          "streamed logprobs list the non-streamed tokens")
    check(all(abs(a - b) < 0.05 for a, b in zip(merged["token_logprobs"], lp["token_logprobs"])),
          "streamed logprobs within rounding of the non-streamed ones")


def test_chat_format(s):
    status, r = chat(s, "What is a cat?", logprobs=True, top_logprobs=4)
    if not check(status == 200, "chat with logprobs: %s %s" % (status, r)):
        return
    n = r["usage"]["completion_tokens"]
    lp = r["choices"][0]["logprobs"]
    check(lp.get("refusal", 0) is None, "chat logprobs: refusal null")
    check_chat_logprobs(lp, n, 4, "chat")
    status, r0 = chat(s, "What is a cat?", logprobs=True)
    check(status == 200, "chat logprobs without top_logprobs")
    check_chat_logprobs(r0["choices"][0]["logprobs"], r0["usage"]["completion_tokens"], 0,
                        "chat top 0")
    status, r1 = chat(s, "What is a cat?")
    check(status == 200 and r1["choices"][0]["logprobs"] is None, "chat without logprobs: null")

    status, events, done = s.stream("/v1/chat/completions", {
        "messages": [{"role": "user", "content": "What is a cat?"}], "max_tokens": 8,
        "temperature": 0, "logprobs": True, "top_logprobs": 4, "stream": True})
    check(status == 200 and done, "streamed chat with logprobs")
    content = []
    for e in events:
        c = e["choices"][0]
        if c["finish_reason"] is None:
            content += c["logprobs"]["content"]
    check([e["token"] for e in content] == [e["token"] for e in lp["content"]]
          and all(abs(a["logprob"] - b["logprob"]) < 0.05 for a, b in zip(content, lp["content"])),
          "streamed chat logprobs: the non-streamed tokens, values within rounding")


def test_echo(s):
    # lm-eval's loglikelihood request: token ids, echo, max_tokens 0, logprobs 1, temperature 0.
    status, r = completion(s, PROMPT, echo=True, max_tokens=0, logprobs=1)
    if not check(status == 200, "echo scoring: %s %s" % (status, r)):
        return
    u = r["usage"]
    choice = r["choices"][0]
    lp = choice["logprobs"]
    check(choice["text"] == PROMPT, "echo: the text is the prompt")
    check(u["completion_tokens"] == 0 and choice["finish_reason"] == "length",
          "echo + max_tokens 0 generates nothing")
    check(u["prompt_tokens_details"]["cached_tokens"] == 0, "echo reuses no cached prefix")
    check_completion_logprobs(lp, u["prompt_tokens"], 1, "echo", greedy=False)
    check(lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None,
          "echo: the first prompt token has no logprob (null)")
    check(all(v is not None for v in lp["token_logprobs"][1:]), "echo: every later token has one")
    check(lp["tokens"][0] == "<|endoftext|>", "echo: BOS shown as its text")

    # Again: the prompt is cached now, yet echo prefills it all; same numbers.
    status, again = completion(s, PROMPT, echo=True, max_tokens=0, logprobs=1)
    check(again["usage"]["prompt_tokens_details"]["cached_tokens"] == 0,
          "echo again: still no reuse")
    check(again["choices"][0]["logprobs"] == lp, "echo again: the same logprobs")
    # A plain request afterwards hits what the echo request committed.
    status, plain = completion(s, PROMPT, max_tokens=1)
    check(plain["usage"]["prompt_tokens_details"]["cached_tokens"] > 0,
          "echo's KV enters the prefix cache: %s" % plain["usage"])

    # The same count as a plain request's prompt_tokens.
    status, r = completion(s, PROMPT, max_tokens=0)
    check(len(lp["tokens"]) == r["usage"]["prompt_tokens"], "echo: one entry per prompt token")

    # echo with generation: prompt entries, then the completion's.
    status, r = completion(s, PROMPT, echo=True, max_tokens=4, logprobs=2)
    choice = r["choices"][0]
    n = r["usage"]["prompt_tokens"] + r["usage"]["completion_tokens"]
    check_completion_logprobs(choice["logprobs"], n, 2, "echo + generation", greedy=False)
    check(choice["text"].startswith(PROMPT), "echo + generation: the text starts with the prompt")
    offs = choice["logprobs"]["text_offset"]
    check(offs[r["usage"]["prompt_tokens"]] == len(PROMPT.encode()),
          "the first generated token starts after the echoed prompt")
    gen = choice["logprobs"]["token_logprobs"][r["usage"]["prompt_tokens"]:]
    gen_top = choice["logprobs"]["top_logprobs"][r["usage"]["prompt_tokens"]:]
    check(all(v == max(t.values()) for v, t in zip(gen, gen_top)),
          "echo + generation: generated tokens are greedy")

    # Echo without logprobs: just the text.
    status, r = completion(s, PROMPT, echo=True, max_tokens=2)
    check(status == 200 and r["choices"][0]["text"].startswith(PROMPT)
          and r["choices"][0]["logprobs"] is None, "echo without logprobs")

    # Streamed echo: the prompt's chunk first, then the tokens'.
    status, events, done = s.stream("/v1/completions", {
        "prompt": PROMPT, "max_tokens": 0, "echo": True, "logprobs": 1, "stream": True})
    check(status == 200 and done, "streamed echo")
    first = events[0]["choices"][0] if events else {}
    check(first.get("text") == PROMPT and first.get("logprobs") == lp,
          "streamed echo: the first chunk holds the prompt and its logprobs")


def test_token_id_prompt(s):
    # lm-eval's local-completions sends token ids (BOS first, as its tokenizer adds it).
    ids = [8191] + [(17 * i + 300) % 8000 for i in range(40)]
    status, r = completion(s, ids, echo=True, max_tokens=0, logprobs=1)
    if not check(status == 200, "token-id prompt with echo: %s %s" % (status, r)):
        return
    lp = r["choices"][0]["logprobs"]
    check(len(lp["token_logprobs"]) == len(ids) == r["usage"]["prompt_tokens"],
          "token ids: one entry per id")
    check(isinstance(r["choices"][0]["text"], str), "token ids: echoed text decoded")
    # lm-eval: greedy iff each token_logprob equals max(top.values()); with logprobs 1 the map
    # holds the top token and the chosen one, so the top value bounds the chosen one's.
    for v, top in zip(lp["token_logprobs"][1:], lp["top_logprobs"][1:]):
        check(v <= max(top.values()), "the top token's logprob bounds the chosen one's")


def test_errors(s):
    cases = [
        ("/v1/completions", {"prompt": "hi", "logprobs": 21}, "logprobs"),
        ("/v1/completions", {"prompt": "hi", "logprobs": -1}, "logprobs"),
        ("/v1/completions", {"prompt": "hi", "logprobs": True}, "logprobs"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                  "top_logprobs": 3}, "top_logprobs"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                  "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                  "logprobs": 2}, "logprobs"),
    ]
    for path, body, param in cases:
        status, r = s.post(path, body)
        check(status == 400 and r["error"]["param"] == param,
              "%s %s: 400 naming %s (got %s %s)" % (path, body, param, status, r))
    check(s.healthy(), "the server serves on after bad logprobs requests")


def first_diff(got, want):
    """Where two logprobs objects first differ, for a failure message."""
    for k in want:
        for i, (x, y) in enumerate(zip(got.get(k, []), want[k])):
            if x != y:
                return " (%s[%d]: %s != %s)" % (k, i, x, y)
        if len(got.get(k, [])) != len(want[k]):
            return " (%s: %d entries, not %d)" % (k, len(got.get(k, [])), len(want[k]))
    return ""


def raw_post(s, path, body):
    """Like post, but numbers kept as their JSON text (parse_float=str): compared digit for
    digit."""
    status, data = s.request("POST", path, body)
    return status, json.loads(data, parse_float=str)


def raw_stream_content(s, body):
    """A streamed chat's logprobs content entries, numbers as their JSON text."""
    c = s.conn()
    try:
        c.request("POST", "/v1/chat/completions", body=json.dumps(body),
                  headers={"Content-Type": "application/json"})
        r = c.getresponse()
        content = []
        for line in r.fp:
            line = line.decode().rstrip("\r\n")
            if line == "data: [DONE]":
                break
            if not line.startswith("data: "):
                continue
            ch = json.loads(line[len("data: "):], parse_float=str)["choices"]
            if ch and ch[0]["finish_reason"] is None:
                content += ch[0]["logprobs"]["content"]
        return content
    finally:
        c.close()


def test_exact(binary, model, tag):
    """Digit-for-digit logprobs on `model` (tagged `tag` in the messages): the weight matmul
    sums every output in one order whatever the step size (docs/kernels.md, batch invariance),
    for F32 and Q8_0 weights alike, so alone, batched and after a prefix hit agree."""
    # Small steps, so the prefill is cut into chunks, and cut differently when other requests
    # run in the same steps.
    s = Server(binary, model, "--step-tokens", "32")
    try:
        prompt = PROMPT + " the words of the law, of the church and of the sea."
        score = {"prompt": prompt, "max_tokens": 0, "logprobs": 5, "echo": True,
                 "temperature": 0}
        status, alone = raw_post(s, "/v1/completions", dict(score, cache_salt="alone"))
        if not check(status == 200, tag + " alone: %s %s" % (status, alone)):
            return
        ref = alone["choices"][0]["logprobs"]
        n_prompt = alone["usage"]["prompt_tokens"]
        check(n_prompt > 40, "the exactness prompt spans several chunks (%d tokens)" % n_prompt)

        # The sum of the prompt's logprobs is minus the NLL `cachette eval ppl` computes over the
        # same tokens (one window of the whole prompt; it scores the second half).
        with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
            f.write(prompt)
        try:
            out = subprocess.run([binary, "eval", "ppl", "-m", model, "-f", f.name, "--ctx",
                                  str(n_prompt), "--threads", "2", "--json", "-q"],
                                 capture_output=True, text=True, timeout=120)
        finally:
            os.unlink(f.name)
        if check(out.returncode == 0, "eval ppl: %s" % out.stderr[-2000:]):
            e = json.loads(out.stdout)
            base = [x for x in e["results"] if x.get("baseline")][0]
            scored = [float(v) for v in ref["token_logprobs"][n_prompt // 2 + 1:]]
            check(e["n_scored"] == len(scored) and
                  abs(sum(scored) + base["mean_nll"] * e["n_scored"]) < 1e-6 * len(scored),
                  "echo logprobs sum to minus eval ppl's NLL: %s vs %s"
                  % (sum(scored), -base["mean_nll"] * e["n_scored"]))

        def neighbours(n, max_tokens):
            """n streams that decode meanwhile; returns (threads, results, started)."""
            started = threading.Semaphore(0)
            results = {}

            def other(i):
                b = {"prompt": "Other request %d: a list of animals that live in the sea, such as"
                     % i, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                     "cache_salt": "o%d-%f" % (i, time.time()), "ignore_eos": True}
                first = []

                def on_event(e):
                    if not first:
                        first.append(1)
                        started.release()
                results[i] = s.stream("/v1/completions", b, on_event=on_event)[0]

            threads = [threading.Thread(target=other, args=(i,)) for i in range(n)]
            for t in threads:
                t.start()
            for _ in range(n):
                started.acquire(timeout=30)
            return threads, results

        def join(threads, results, what):
            running = any(t.is_alive() for t in threads)
            for t in threads:
                t.join()
            check(running, "%s: the other requests were still running (batched steps)" % what)
            check(all(v == 200 for v in results.values()), "%s: others %s" % (what, results))

        # Prompt scoring batched with three decoding requests: chunks cut differently.
        threads, results = neighbours(3, 64)
        status, batched = raw_post(s, "/v1/completions", dict(score, cache_salt="batched"))
        join(threads, results, "scoring")
        got = batched["choices"][0]["logprobs"] if status == 200 else {}
        check(got == ref, tag + ": prompt logprobs batched == alone, digit for digit%s"
              % first_diff(got, ref))

        # Echo and generation, alone and beside one decoding request.
        gen_body = dict(score, max_tokens=12)
        status, gen_alone = raw_post(s, "/v1/completions", dict(gen_body, cache_salt="g1"))
        gen_ref = gen_alone["choices"][0]["logprobs"]
        check(gen_ref["token_logprobs"][:n_prompt] == ref["token_logprobs"],
              tag + ": the echo's prompt part equals the scoring request's")
        threads, results = neighbours(1, 160)
        status, gen_batched = raw_post(s, "/v1/completions", dict(gen_body, cache_salt="g2"))
        join(threads, results, "generation")
        got = gen_batched["choices"][0]["logprobs"] if status == 200 else {}
        check(got == gen_ref, tag + ": echo + generation batched == alone, digit for digit%s"
              % first_diff(got, gen_ref))

        # Cached: an earlier request shares the prompt's first ~2/3; a plain (non-echo) request
        # then reuses it, and its generated tokens' logprobs equal those of a lone cold run.
        plain = {"prompt": prompt, "max_tokens": 12, "temperature": 0, "logprobs": 5}
        status, cold = raw_post(s, "/v1/completions", dict(plain, cache_salt="cold"))
        cut = prompt[: 2 * len(prompt) // 3]
        s.post("/v1/completions", {"prompt": cut + " and so on", "max_tokens": 2,
                                   "cache_salt": "warm"})
        status, warm = raw_post(s, "/v1/completions", dict(plain, cache_salt="warm"))
        cached = int(warm["usage"]["prompt_tokens_details"]["cached_tokens"])
        check(status == 200 and 16 <= cached < n_prompt - 6,
              tag + ": the warm request reused a cached prefix: %s" % warm.get("usage"))
        got, want = warm["choices"][0]["logprobs"], cold["choices"][0]["logprobs"]
        check(got == want, tag + ": logprobs after a prefix hit == cold, digit for digit%s"
              % first_diff(got, want))
        # A full hit: only the prompt's last token is recomputed, in a step of one token where
        # the cold run prefilled chunks of many.
        status, hit = raw_post(s, "/v1/completions", dict(plain, cache_salt="cold"))
        cached = int(hit["usage"]["prompt_tokens_details"]["cached_tokens"]) if status == 200 else 0
        check(cached == n_prompt - 1, tag + ": a full prefix hit: %s" % hit.get("usage"))
        got = hit["choices"][0]["logprobs"] if status == 200 else {}
        check(got == want, tag + ": logprobs after a full hit (1 token recomputed) == cold%s"
              % first_diff(got, want))
        # The generated part of the echo request (kAll logits) equals the plain one's (kLast).
        gen = {k: v[n_prompt:] for k, v in gen_ref.items()}
        want = dict(want)
        off = len(prompt.encode())
        want["text_offset"] = [o + off for o in want["text_offset"]]
        check(gen == want, tag + ": generated logprobs with echo == without%s"
              % first_diff(gen, want))
        # Echo after the prefix is cached: no reuse, same numbers.
        status, echo_warm = raw_post(s, "/v1/completions", dict(score, cache_salt="warm"))
        check(int(echo_warm["usage"]["prompt_tokens_details"]["cached_tokens"]) == 0,
              tag + ": echo skips the cached prefix")
        check(echo_warm["choices"][0]["logprobs"] == ref,
              tag + ": echo logprobs with a cached prefix == alone, digit for digit")

        # Chat, streamed beside one decoding request: equal to a lone non-streamed run.
        cbody = {"messages": [{"role": "user", "content": "Name three animals of the sea."}],
                 "max_tokens": 10, "temperature": 0, "logprobs": True, "top_logprobs": 5}
        status, lone = raw_post(s, "/v1/chat/completions", dict(cbody, cache_salt="c1"))
        threads, results = neighbours(1, 160)
        streamed = raw_stream_content(s, dict(cbody, stream=True, cache_salt="c2"))
        join(threads, results, "chat")
        want_c = lone["choices"][0]["logprobs"]["content"]
        check(status == 200 and len(want_c) > 0 and streamed == want_c,
              tag + " chat: streamed beside another request == a lone run, digit for digit")
    finally:
        s.close()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--binary", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--f32-model", required=True)
    a = p.parse_args()
    t0 = time.time()
    s = Server(a.binary, a.model)
    try:
        for t in (test_completion_format, test_chat_format, test_echo, test_token_id_prompt,
                  test_errors):
            t(s)
    finally:
        s.close()
    if os.path.exists(a.f32_model):
        test_exact(a.binary, a.f32_model, "f32")
    else:
        check(False, "the F32 model is missing: %s" % a.f32_model)
    test_exact(a.binary, a.model, "q8_0")
    return report(t0)


if __name__ == "__main__":
    sys.exit(main())
