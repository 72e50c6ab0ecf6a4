"""Per-request KV transfer latency and MB/s, NIXL against the pyzmq channel, in the same run.

    python perf/bench_kv_transfer.py [--tokens 1024 4096 16384] [--repeats 7 5 3] [--out FILE.md]

Two processes on this host, a prefill rank (this one) and a decode rank (a child), each with a bf16 KV pool
of DeepSeek-V3's shape: 61 layers, pages of 64 tokens, rows of 512 latent + 64 rope values (70,272 bytes a
token). For each prompt length the request's pages are a random subset of each pool (as after some
serving), and the two backends take turns:
- zmq: moe_pd's KVSender/KVReceiver (gather the pages into one host buffer, one multipart message over
  TCP, the receiver copies it into the reserved pages, then answers);
- nixl: NixlEngine (one NIXL WRITE per request, a descriptor per layer and page run, straight into the
  reserved pages over UCX TCP on loopback, then a notice).
Latency is from the send call to the moment the decode rank's poll reports the request's KV in its pages
(both processes read the same monotonic clock). Each transfer is checked by a checksum of the first and
last layers' rows, which the decode side zeroes before each transfer. Prints medians and the ratio
zmq / nixl (> 1: NIXL is faster).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import platform
import statistics
import sys
import time

import torch

LAYERS, BLOCK, WIDTH = 61, 64, 512 + 64
DTYPE = torch.bfloat16
TOKEN_BYTES = LAYERS * WIDTH * 2


def checksum(pool: torch.Tensor, pages: list[int], n: int) -> float:
    rows = pool[[0, -1]][:, pages].reshape(2, -1, WIDTH)[:, :n]
    return float(rows.to(torch.float64).sum())


def poll_until_final(poll, seconds: float = 120.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if done := poll():
            return done
        time.sleep(0.0005)
    raise TimeoutError("no transfer ended within 120 s")


def decode_rank(conn, num_pages: int) -> None:
    from moe_pd.kvcache.transfer.nixl_agent import UCX_ONE_HOST_CPU
    from moe_pd.kvcache.transfer.nixl_engine import NixlEngine
    from moe_pd.kvcache.transfer.zmq_transport import KVReceiver

    pool = torch.zeros(LAYERS, num_pages, BLOCK, WIDTH, dtype=DTYPE)
    receiver, engine = KVReceiver(pool), NixlEngine("decode", pool, UCX_ONE_HOST_CPU)
    conn.send((receiver.address, engine.metadata()))
    while (message := conn.recv())[0] != "exit":
        _, backend, rid, pages, n = message
        pool[0, pages], pool[-1, pages] = 0, 0
        if backend == "zmq":
            receiver.expect(rid, pages, timeout_s=120)
            poll = lambda: receiver.poll(timeout_ms=1)  # noqa: E731
        else:
            engine.expect(rid, pages, timeout_s=120)
            poll = lambda: engine.poll().arrivals  # noqa: E731
        conn.send("ready")
        [done] = poll_until_final(poll)
        conn.send((time.monotonic(), done.state.value, checksum(pool, pages, n)))
    engine.close()
    receiver.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--repeats", type=int, nargs="+", default=[7, 5, 3], help="per prompt length")
    parser.add_argument("--out", help="also write the table to this markdown file")
    args = parser.parse_args()
    from moe_pd.kvcache.transfer.nixl_agent import UCX_ONE_HOST_CPU
    from moe_pd.kvcache.transfer.nixl_engine import NixlEngine
    from moe_pd.kvcache.transfer.zmq_transport import KVSender

    num_pages = -(-max(args.tokens) // BLOCK) + 64
    pool = torch.empty(LAYERS, num_pages, BLOCK, WIDTH, dtype=DTYPE).uniform_(-1, 1)
    ctx = mp.get_context("spawn")
    conn, child_end = ctx.Pipe()
    child = ctx.Process(target=decode_rank, args=(child_end, num_pages), daemon=True)
    child.start()
    sender, engine = KVSender("prefill"), NixlEngine("prefill", pool, UCX_ONE_HOST_CPU)
    lines = []
    try:
        address, metadata = conn.recv()
        peer = engine.add_peer(metadata)
        gen = torch.Generator().manual_seed(0)
        lines += [f"KV transfer per request, DeepSeek-V3 pages ({LAYERS} layers x {WIDTH} bf16 per token, "
                  f"{BLOCK}-token pages), prefill and decode processes on one host; torch {torch.__version__}, "
                  f"python {platform.python_version()}; median of --repeats {' '.join(map(str, args.repeats))}",
                  "", "| tokens | MB | zmq ms | nixl ms | zmq MB/s | nixl MB/s | zmq/nixl | nixl descriptors "
                  "| nixl post ms |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        print("\n".join(lines), flush=True)
        for n, repeats in zip(args.tokens, args.repeats, strict=True):
            pages = -(-n // BLOCK)
            src = torch.randperm(num_pages, generator=gen)[:pages].tolist()
            dst = torch.randperm(num_pages, generator=gen)[:pages].tolist()
            want = checksum(pool, src, n)
            times: dict[str, list[float]] = {"zmq": [], "nixl": [], "post": []}
            descs = 0
            for rep in range(repeats + 1):  # the first round warms both up (connections, page faults)
                for backend in ("zmq", "nixl") if rep % 2 else ("nixl", "zmq"):
                    rid = f"{backend}-{n}-{rep}"
                    conn.send(("expect", backend, rid, dst, n))
                    assert conn.recv() == "ready"
                    start = time.monotonic()
                    if backend == "zmq":
                        sent = sender.send(rid, address, pool, src, n, first_token=1, timeout_s=120)
                        poll_until_final(lambda: sender.poll(timeout_ms=1))
                    else:
                        sent = engine.write(rid, peer, src, dst, n, b"first-token", timeout_s=120)
                        posted = time.monotonic()
                        poll_until_final(lambda: engine.poll().writes)
                        descs = sent.num_descs
                    landed, state, got = conn.recv()
                    if state != "done" or sent.state.value != "done" or got != want:
                        raise RuntimeError(f"{rid}: sender {sent.state} {sent.detail}, receiver {state}, "
                                           f"checksum {got} != {want}")
                    if rep:
                        times[backend].append(landed - start)
                        if backend == "nixl":
                            times["post"].append(posted - start)
            zmq_s, nixl_s = statistics.median(times["zmq"]), statistics.median(times["nixl"])
            mb = n * TOKEN_BYTES / 1e6
            post_s = statistics.median(times["post"])
            line = (f"| {n} | {mb:.0f} | {zmq_s * 1e3:.1f} | {nixl_s * 1e3:.1f} | {mb / zmq_s:.0f} | "
                    f"{mb / nixl_s:.0f} | {zmq_s / nixl_s:.2f}x | {descs} | {post_s * 1e3:.1f} |")
            lines.append(line)
            print(line, flush=True)
    finally:
        conn.send(("exit",))
        child.join(30)
        if child.is_alive():
            child.kill()
        engine.close()
        sender.close()
    if args.out:
        with open(args.out, "a") as out:
            out.write(f"`python {' '.join(sys.argv)}`\n\n" + "\n".join(lines) + "\n\n")


if __name__ == "__main__":
    main()
