#!/usr/bin/env python3
"""Writes an OpenAI Batch API file (JSONL) in SGLang's generated-shared-prefix shape.

--groups system prompts of --system-tokens tokens each, --prompts-per-group questions of
--question-tokens tokens per system prompt, every request asking for --output-tokens tokens
(greedy, ignore_eos, so the output length is fixed). Token counts are approximate: texts are
made of common English words that the bundled model's tokenizer reads as one token each (the
chat template adds a few tokens of its own). The lines are shuffled (seeded), so that a run in
file order (`cachette batch --order fcfs`) does not get the grouping for free.

Usage:
  scripts/gen_shared_prefix_batch.py -o batch.jsonl --groups 16 --prompts-per-group 8 \\
      --system-tokens 512 --question-tokens 32 --output-tokens 16 --seed 1
Then:
  cachette batch -i batch.jsonl -o results.jsonl --order batchllm
"""
import argparse
import json
import random
import sys

# Each a single token of the bundled model (cachette-tiny) when preceded by a space.
WORDS = """the of and to in is was for that on as with by he at from his it an were are which
this be or has had first one their its new after but who not they have her she two been other
when there all also into during time more school only years may would over most can some people
many where city about world three made such these later up team before used between state known
out part game under then than both season film called while them since year house water small
large number group system music river church family began war town history government well
against life album national university including because early each following series through
any day several public general held end local main being around same work however high without
last will did became area him death long line down even air off good home place just until
right land way old own book north south west east great light power side play party left best
money change course name night point story young week body order form word price market short
hand head eye face fact kind room road food stop color open red blue green black white
dark""".split()


def text(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-o", "--output", required=True, help="the batch file to write")
    ap.add_argument("--groups", type=int, default=16, help="system prompts (16)")
    ap.add_argument("--prompts-per-group", type=int, default=8, help="questions each (8)")
    ap.add_argument("--system-tokens", type=int, default=512, help="system prompt length (512)")
    ap.add_argument("--question-tokens", type=int, default=32, help="question length (32)")
    ap.add_argument("--output-tokens", type=int, default=16, help="max_tokens of each (16)")
    ap.add_argument("--seed", type=int, default=1, help="random seed (1)")
    ap.add_argument("--endpoint", choices=["chat", "completions"], default="chat",
                    help="chat: system + user messages; completions: one prompt (chat)")
    ap.add_argument("--model", default="", help="the body's model field (default: none)")
    args = ap.parse_args()
    for name in ("groups", "prompts_per_group", "system_tokens", "question_tokens"):
        if getattr(args, name) < 1:
            ap.error("--%s must be at least 1" % name.replace("_", "-"))
    if args.output_tokens < 0:
        ap.error("--output-tokens must be >= 0")

    rng = random.Random(args.seed)
    lines = []
    for g in range(args.groups):
        system = text(rng, args.system_tokens)
        for q in range(args.prompts_per_group):
            question = text(rng, args.question_tokens)
            body = {"max_tokens": args.output_tokens, "temperature": 0, "ignore_eos": True}
            if args.model:
                body["model"] = args.model
            if args.endpoint == "chat":
                url = "/v1/chat/completions"
                body["messages"] = [{"role": "system", "content": system},
                                    {"role": "user", "content": question}]
            else:
                url = "/v1/completions"
                body["prompt"] = system + "\n\n" + question
            lines.append({"custom_id": "g%d-q%d" % (g, q), "method": "POST", "url": url,
                          "body": body})
    rng.shuffle(lines)
    with open(args.output, "w") as f:
        for line in lines:
            f.write(json.dumps(line) + "\n")
    print("%s: %d requests, %d groups x %d, ~%d + %d prompt tokens, %d output tokens" %
          (args.output, len(lines), args.groups, args.prompts_per_group, args.system_tokens,
           args.question_tokens, args.output_tokens), file=sys.stderr)


if __name__ == "__main__":
    main()
