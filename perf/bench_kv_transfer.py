"""Per-request KV transfer latency and MB/s, NIXL against the pyzmq channel, in the same run, through the
transfer path the serving ranks use (the backends' two ends, moe_pd.kvcache.transfer).

    python perf/bench_kv_transfer.py [--tokens 128 1024 4096 16384] [--repeats 9 7 5 3] [--out FILE.md]

Two processes on this host, a prefill rank (this one) and a decode rank (a child), each with a bf16 KV pool
of DeepSeek-V3's shape: 61 layers, pages of 64 tokens, rows of 512 latent + 64 rope values (70,272 bytes a
token). For each prompt length the request's pages are a random subset of each pool (as after some
serving), and the two backends take turns, each through what the ranks run:
- zmq: KVReceiver.target names the reservation, KVSender.send gathers the rows into one host buffer and
  sends one multipart message over TCP, KVReceiver.poll copies it into the reserved pages and answers;
- nixl: NixlReceiver.target carries the decode agent's metadata and the reserved pages, NixlSender.send
  posts one NIXL WRITE (a descriptor per layer and page run) straight into them over UCX TCP on loopback,
  NixlReceiver.poll sees its notice; both agents progress UCX with the default pace (kvcache.nixl_*_ms).
Latency is from the send call to the moment the decode rank's poll reports the request's KV in its pages
(both processes read the same monotonic clock; the decode rank polls every 0.5 ms, as a busy serving loop
does). Each transfer is checked by a checksum of the first and last layers' rows, which the decode side
zeroes before each transfer. Prints medians and the ratio zmq / nixl (> 1: NIXL is faster).
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


def poll_until(poll, seconds: float = 120.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if done := poll():
            return done
        time.sleep(0.0005)
    raise TimeoutError(f"no transfer ended within {seconds} s")


def ends(role: str, pool: torch.Tensor, wait_ms: float | None):
    from moe_pd.config.kvcache import KVCacheConfig
    from moe_pd.kvcache.transfer.select import make_receiver, make_sender

    make = make_sender if role == "prefill" else make_receiver
    cfg = KVCacheConfig(transfer="nixl")
    if wait_ms is not None:
        cfg.nixl_wait_poll_ms = wait_ms
    return {backend: make(backend, cfg, pool, role, timeout_s=120) for backend in ("zmq", "nixl")}


def decode_rank(conn, num_pages: int, wait_ms: float | None) -> None:
    pool = torch.zeros(LAYERS, num_pages, BLOCK, WIDTH, dtype=DTYPE)
    receivers = ends("decode", pool, wait_ms)
    while (message := conn.recv())[0] != "exit":
        _, backend, rid, pages, n = message
        pool[0, pages], pool[-1, pages] = 0, 0
        receiver = receivers[backend]
        conn.send(receiver.target(pages, 120.0))
        [done] = poll_until(lambda: receiver.poll({rid: pages}.get))  # noqa: B023
        conn.send((time.monotonic(), done.state.value, checksum(pool, pages, n)))
    for receiver in receivers.values():
        receiver.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[128, 1024, 4096, 16384])
    parser.add_argument("--repeats", type=int, nargs="+", default=[9, 7, 5, 3], help="per prompt length")
    parser.add_argument("--nixl-wait-ms", type=float, help="kvcache.nixl_wait_poll_ms (default: the config's)")
    parser.add_argument("--out", help="also write the table to this markdown file")
    args = parser.parse_args()
    from moe_pd.kvcache.transfer.base import KVHeader

    num_pages = -(-max(args.tokens) // BLOCK) + 64
    pool = torch.empty(LAYERS, num_pages, BLOCK, WIDTH, dtype=DTYPE).uniform_(-1, 1)
    ctx = mp.get_context("spawn")
    conn, child_end = ctx.Pipe()
    child = ctx.Process(target=decode_rank, args=(child_end, num_pages, args.nixl_wait_ms), daemon=True)
    child.start()
    senders = ends("prefill", pool, args.nixl_wait_ms)
    lines = [f"KV transfer per request through the serving ranks' transfer ends, DeepSeek-V3 pages ({LAYERS} "
             f"layers x {WIDTH} bf16 per token, {BLOCK}-token pages), prefill and decode processes on one host; "
             f"torch {torch.__version__}, python {platform.python_version()}; median of --repeats "
             f"{' '.join(map(str, args.repeats))}", "",
             "| tokens | MB | zmq ms | nixl ms | zmq MB/s | nixl MB/s | zmq/nixl | nixl send call ms |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    print("\n".join(lines), flush=True)
    try:
        gen = torch.Generator().manual_seed(0)
        for n, repeats in zip(args.tokens, args.repeats, strict=True):
            pages = -(-n // BLOCK)
            src = torch.randperm(num_pages, generator=gen)[:pages].tolist()
            dst = torch.randperm(num_pages, generator=gen)[:pages].tolist()
            want = checksum(pool, src, n)
            times: dict[str, list[float]] = {"zmq": [], "nixl": [], "call": []}
            for rep in range(repeats + 1):  # the first round warms both up (connections, page faults)
                for backend in ("zmq", "nixl") if rep % 2 else ("nixl", "zmq"):
                    rid, sender = f"{backend}-{n}-{rep}", senders[backend]
                    conn.send(("expect", backend, rid, dst, n))
                    target = conn.recv()
                    start = time.monotonic()
                    sender.send(target, pool, src, KVHeader(rid, LAYERS, WIDTH, "bfloat16", n, 1),
                                start + 120)
                    called = time.monotonic()
                    [answer] = poll_until(sender.poll)
                    landed, state, got = conn.recv()
                    if state != "done" or answer.state.value != "done" or got != want:
                        raise RuntimeError(f"{rid}: sender {answer.state} {answer.detail}, receiver {state}, "
                                           f"checksum {got} != {want}")
                    if rep:
                        times[backend].append(landed - start)
                        if backend == "nixl":
                            times["call"].append(called - start)
            zmq_s, nixl_s = statistics.median(times["zmq"]), statistics.median(times["nixl"])
            mb = n * TOKEN_BYTES / 1e6
            line = (f"| {n} | {mb:.1f} | {zmq_s * 1e3:.1f} | {nixl_s * 1e3:.1f} | {mb / zmq_s:.0f} | "
                    f"{mb / nixl_s:.0f} | {zmq_s / nixl_s:.2f}x | {statistics.median(times['call']) * 1e3:.1f} |")
            lines.append(line)
            print(line, flush=True)
    finally:
        conn.send(("exit",))
        child.join(30)
        if child.is_alive():
            child.kill()
        for sender in senders.values():
            sender.close()
    if args.out:
        with open(args.out, "a") as out:
            out.write(f"`python {' '.join(sys.argv)}`\n\n" + "\n".join(lines) + "\n\n")


if __name__ == "__main__":
    main()
