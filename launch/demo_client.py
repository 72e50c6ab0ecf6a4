"""The README demo's client: a few requests to a running moe_pd cluster with the openai package (one of
them streaming), the answers, then a summary of the router's metrics.

    python launch/demo_client.py --url http://127.0.0.1:8000
"""

from __future__ import annotations

import argparse
import sys
import time
import urllib.request

from openai import OpenAI

# What the trained tiny checkpoint (moe_pd/assets/tiny_dsv3) learned: facts, sums, and a chat question
PROMPTS = ["The capital of France is", "Question: What is 3 + 4?\nAnswer:", "What does a cow say?"]


def metrics_summary(url: str) -> list[str]:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        lines = [line for line in r.read().decode().splitlines() if line and not line.startswith("#")]
    values = {k: float(v) for k, v in (line.rsplit(" ", 1) for line in lines)}

    def mean(name: str) -> str:
        count = total(f"{name}_count")
        return f"{1000 * total(f'{name}_sum') / count:.1f} ms" if count else "n/a"

    def total(name: str) -> float:  # over the backend label
        return sum(v for k, v in values.items() if k == name or k.startswith(name + "{"))

    backends = sorted({k.split('backend="')[1].split('"')[0] for k in values
                       if k.startswith("moe_pd_kv_transfer_seconds_count{")})
    transfers = total("moe_pd_kv_transfer_seconds_count")
    out = [f"requests finished: {sum(v for k, v in values.items() if k.startswith('moe_pd_requests_total')):.0f}",
           f"tokens generated: {values.get('moe_pd_generated_tokens_total', 0):.0f}",
           f"mean time to first token: {mean('moe_pd_time_to_first_token_seconds')}",
           f"mean time per output token: {mean('moe_pd_time_per_output_token_seconds')}"]
    if transfers:
        kib = total("moe_pd_kv_transfer_bytes_total") / 1024
        out.append(f"KV transfers ({', '.join(backends)}): {transfers:.0f}, {kib:.1f} KiB, "
                   f"mean {mean('moe_pd_kv_transfer_seconds')}")
    out += [f"{k.split('{')[1].rstrip('}')}: {v:.0f} KV pages in use" for k, v in values.items()
            if k.startswith("moe_pd_kv_pages_used")]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--max-tokens", type=int, default=24)
    args = parser.parse_args()
    client = OpenAI(base_url=args.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    model = client.models.list().data[0].id
    for prompt in PROMPTS[:-1]:
        answer = client.completions.create(model=model, prompt=prompt, max_tokens=args.max_tokens, temperature=0)
        print(f"> {prompt}\n{answer.choices[0].text!r} ({answer.usage.completion_tokens} tokens, "
              f"{answer.choices[0].finish_reason})\n")
    print(f"> {PROMPTS[-1]}  (streaming)")
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPTS[-1]}],
                                            max_tokens=args.max_tokens, temperature=0, stream=True)
    chunks = 0
    for chunk in stream:
        chunks += 1
        print(repr(chunk.choices[0].delta.content or ""), end=" ", flush=True)
    print(f"\n({chunks} chunks)\n\nmetrics:")
    time.sleep(1.0)  # one heartbeat, so the page gauges show the cluster after these requests
    for line in metrics_summary(args.url):
        print(f"  {line}")
    print("(the trained tiny checkpoint knows only its generated corpus: docs/tiny_checkpoint.md)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
