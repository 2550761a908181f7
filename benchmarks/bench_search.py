"""Similarity search over embeddings on the CPU: the exact index (``flat``) against the graph
(``hnsw``) of ``dinotune.embed.index``, at the sizes an embeddings file reaches.

Data: synthetic clustered embeddings, as image embeddings are (images of one kind sit together):
``--clusters`` gaussian clusters around random unit centres, each point ``centre + spread * noise /
sqrt(dim)``, L2-normalised; at ``--spread 1.0`` a point's nearest neighbour has cosine ~0.6, and
the noise fills every dimension (harder for a graph than real embeddings, whose spread has few
dimensions). Queries are ``--queries`` held-out points of the same clusters. Widths: 384 (ViT-S)
and 768 (ViT-B).

- build: seconds of ``build_index`` (normalisation and adding the rows included);
- latency: one query per ``VectorIndex.search`` call (as a server answers one request), median and
  95th percentile over the queries, after a few warm-up calls; FAISS's OpenMP threads = the cores
  (``--threads``), and for the flat index also one thread;
- recall@10: the share of ``exact_neighbours``'s (numpy brute force) 10 nearest found;
- the graph at ``M`` / ``efConstruction`` of the module, for each ``efSearch`` of ``--ef-search``
  (the module's own value marked), and the flat index beside it; ``vs flat``: latency ratio to the
  flat index on ``--threads`` threads. The 1-minute load average before and after is recorded: on a
  shared machine other jobs slow the multi-threaded scan most.

    python benchmarks/bench_search.py            # writes results/search-cpu.{json,md}, ~5 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from _common import machine_info

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dinotune.embed import index as vi  # noqa: E402
from dinotune.embed.store import Embeddings  # noqa: E402

BUDGET_MS = 50.0  # one query against the largest index must answer within this


def clustered(n: int, dim: int, clusters: int, spread: float, seed: int) -> np.ndarray:
    """``n x dim`` float32 unit rows around ``clusters`` random unit centres (same centres per seed)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = centres[rng.integers(0, clusters, n)]
    x += spread * rng.standard_normal((n, dim), dtype=np.float32) / np.sqrt(dim)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def latency_ms(index: vi.VectorIndex, queries: np.ndarray, k: int) -> tuple[list[float], np.ndarray]:
    """Milliseconds of each one-query search, and the ids found (Q x k)."""
    for q in queries[:5]:  # warm-up: page in the index, start the thread pool
        index.search(q, k)
    times, found = [], []
    for q in queries:
        t0 = time.perf_counter()
        _, ids = index.search(q, k)
        times.append((time.perf_counter() - t0) * 1e3)
        found.append(ids[0])
    return times, np.stack(found)


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found.tolist(), truth.tolist())]))


def measure(dim: int, n: int, args: argparse.Namespace) -> list[dict]:
    """The rows of the table for ``n`` vectors of width ``dim``: flat, then the graph per efSearch."""
    import faiss

    data = clustered(n + args.queries, dim, args.clusters, args.spread, seed=dim)
    vectors, queries = data[:n], data[n:]
    rows = Embeddings([str(i) for i in range(n)], [""] * n, [""] * n, vectors, {"dim": dim})
    truth = vi.exact_neighbours(vectors, queries, args.k)[1]
    out = []
    for kind in ("flat", "hnsw"):
        if kind == "hnsw" and n > args.hnsw_max:
            continue
        t0 = time.perf_counter()
        index = vi.build_index(rows, kind)
        build = time.perf_counter() - t0
        # flat: also on one thread (one query's scan split over OpenMP threads waits for the slowest,
        # which a busy machine deschedules); the graph answers one query on one thread anyway
        settings = [(None, t) for t in dict.fromkeys((args.threads, 1))] if kind == "flat" else \
            [(ef, args.threads) for ef in args.ef_search]
        for ef, threads in settings:
            faiss.omp_set_num_threads(threads)
            if ef is not None:
                index.index.hnsw.efSearch = ef
            times, found = latency_ms(index, queries, args.k)
            row = {"dim": dim, "rows": n, "kind": kind, "efSearch": ef, "threads": threads,
                   "default": ef in (None, vi.HNSW_EF_SEARCH) and threads == args.threads,
                   "build_s": round(build, 2), "median_ms": round(statistics.median(times), 3),
                   "p95_ms": round(float(np.percentile(times, 95)), 3),
                   f"recall@{args.k}": round(recall(found, truth), 4)}
            out.append(row)
            print(json.dumps(row), flush=True)
        faiss.omp_set_num_threads(args.threads)
    flat = out[0]["median_ms"]
    for row in out:
        row["vs_flat"] = round(row["median_ms"] / flat, 3)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grid", nargs="+", default=["384:5000,10000,20000,50000,200000", "768:10000,20000,50000"],
                        help="DIM:ROWS,ROWS,... per width")
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--spread", type=float, default=1.0)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--ef-search", type=lambda s: [int(v) for v in s.split(",")], default=[16, 32, 64, 128, 256])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="FAISS OpenMP threads")
    parser.add_argument("--hnsw-max", type=int, default=1_000_000, help="build the graph only up to this many rows")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "search-cpu"))
    args = parser.parse_args()
    import faiss

    cores = os.cpu_count() or 1
    faiss.omp_set_num_threads(args.threads)
    load = [round(os.getloadavg()[0], 2)]
    started = time.perf_counter()
    rows: list[dict] = []
    for spec in args.grid:
        dim, sizes = spec.split(":")
        for n in sizes.split(","):
            rows += measure(int(dim), int(n), args)
    load.append(round(os.getloadavg()[0], 2))
    largest = max(r["rows"] for r in rows if r["dim"] == rows[0]["dim"])
    meets = [r for r in rows if r["rows"] == largest and r["dim"] == rows[0]["dim"] and r["median_ms"] < BUDGET_MS]
    command = "python benchmarks/bench_search.py" + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else "")
    summary = {"machine": machine_info("cpu"), "faiss": faiss.__version__, "faiss_threads": args.threads,
               "load_average_1min": {"start": load[0], "end": load[1]},
               "command": command, "seconds": round(time.perf_counter() - started), "queries": args.queries,
               "clusters": args.clusters, "spread": args.spread, "k": args.k,
               "module": {"EXACT_LIMIT": vi.EXACT_LIMIT, "M": vi.HNSW_M, "efConstruction": vi.HNSW_EF_CONSTRUCTION,
                          "efSearch": vi.HNSW_EF_SEARCH},
               f"under_{BUDGET_MS:g}ms_at_{largest}": [{k: r[k] for k in ("kind", "efSearch", "threads",
                                                                         "median_ms", f"recall@{args.k}")}
                                                             for r in meets],
               "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    m = summary["module"]
    lines = ["# Similarity search on the CPU: exact (flat) and graph (hnsw) indexes", "",
             f"`{command}`; {cores} cores ({summary['machine'].get('cpu_model', '?')}), faiss {faiss.__version__} "
             f"with {args.threads} OpenMP threads (flat also on 1); 1-minute load average {load[0]} at the start, "
             f"{load[1]} at the end (other jobs on the machine); {summary['seconds']} s in all. "
             f"{args.clusters} gaussian clusters, spread "
             f"{args.spread}, L2-normalised; {args.queries} held-out queries, one per call; recall@{args.k} against "
             f"numpy brute force. hnsw: M {m['M']}, efConstruction {m['efConstruction']}; **bold** = the module's "
             f"defaults (efSearch {m['efSearch']}; `auto` is exact up to EXACT_LIMIT = {m['EXACT_LIMIT']} rows).", "",
             "| dim | rows | kind | efSearch | threads | build s | median ms | p95 ms | recall@10 | vs flat |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = [r["dim"], r["rows"], r["kind"], r["efSearch"] or "", r["threads"], r["build_s"], r["median_ms"],
                 r["p95_ms"], r[f"recall@{args.k}"], r["vs_flat"]]
        text = [str(c) for c in cells]
        lines.append("| " + " | ".join(f"**{t}**" if r["default"] and t else t for t in text) + " |")
    lines += ["", f"One query against {largest} rows (dim {rows[0]['dim']}) under {BUDGET_MS:g} ms (median): "
              + (", ".join(f"{r['kind']}" + (f" efSearch {r['efSearch']}" if r["efSearch"] else "")
                           + f" on {r['threads']} thread(s) ({r['median_ms']} ms, recall {r[f'recall@{args.k}']})"
                           for r in meets) or "none") + ".", "",
              "The defaults side by side (median ms of one query; speed-up = flat / hnsw):", "",
              "| dim | rows | flat | flat, 1 thread | hnsw | speed-up | hnsw recall@10 | hnsw build s |",
              "|---|---|---|---|---|---|---|---|"]
    for dim, n in dict.fromkeys((r["dim"], r["rows"]) for r in rows):
        at = [r for r in rows if (r["dim"], r["rows"]) == (dim, n)]
        flat = next(r for r in at if r["kind"] == "flat")
        one = next((r for r in at if r["kind"] == "flat" and r["threads"] == 1), flat)
        graph = next((r for r in at if r["kind"] == "hnsw" and r["default"]), None)
        if graph:
            lines.append(f"| {dim} | {n} | {flat['median_ms']} | {one['median_ms']} | {graph['median_ms']} | "
                         f"{flat['median_ms'] / graph['median_ms']:.1f}x | {graph[f'recall@{args.k}']} | "
                         f"{graph['build_s']} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
