"""Near-duplicate detection: MinHash signatures + LSH banding, vectorised.

Per-row Python MinHash objects are too slow for 67k rows on 2 cores, so the
shingle hashes of the whole corpus are computed at once with numpy (a rolling
polynomial hash over code points or word ids), permuted with datasketch's own
affine permutations (`MinHash(...).permutations`, scheme affine32), and
min-reduced per row. Banding uses the (b, r) datasketch's `MinHashLSH` picks for
the threshold; candidate pairs from shared buckets are verified by their
estimated Jaccard similarity, and verified pairs are joined into clusters.
"""

from __future__ import annotations

import numpy as np

_P = np.uint64(1_000_003)  # rolling-hash base
_MIX1, _MIX2 = np.uint64(0xFF51AFD7ED558CCD), np.uint64(0xC4CEB9FE1A85EC53)
_CHUNK = 1 << 17  # shingles per permutation block: bounds memory to ~64 MB at 128 permutations


def _normalise(text: str) -> str:
    return " ".join(text.lower().split())


def _mix64(h: np.ndarray) -> np.ndarray:
    h = h ^ (h >> np.uint64(33))
    h = h * _MIX1
    h = h ^ (h >> np.uint64(33))
    h = h * _MIX2
    return h ^ (h >> np.uint64(33))


def _rolling(symbols: np.ndarray, lengths: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Hash every n-gram of every row (rows padded to >= n symbols by the caller).
    Returns (32-bit shingle hashes, shingles per row)."""
    total = len(symbols) - n + 1
    h = np.zeros(max(total, 0), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for k in range(n):
            h = h * _P + symbols[k: k + total]
        per_row = lengths - n + 1
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        offsets = np.arange(per_row.sum()) - np.repeat(np.cumsum(per_row) - per_row, per_row)
        idx = np.repeat(starts, per_row) + offsets
        return (_mix64(h[idx]) & np.uint64(0xFFFFFFFF)).astype(np.uint32), per_row


def shingle_hashes(texts: list[str], shingle: str = "char", n: int = 5) -> tuple[np.ndarray, np.ndarray]:
    norm = [_normalise(t) for t in texts]
    if shingle == "char":
        # Rows shorter than n become one shingle (padded with NULs).
        padded = [t + "\0" * (n - len(t)) if len(t) < n else t for t in norm]
        symbols = np.frombuffer("".join(padded).encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
        lengths = np.array([len(t) for t in padded], dtype=np.int64)
        return _rolling(symbols, lengths, n)
    vocab: dict[str, int] = {}
    ids: list[int] = []
    lengths = np.zeros(len(norm), dtype=np.int64)
    for i, t in enumerate(norm):
        words = t.split() or [""]
        words += [""] * (n - len(words))
        ids.extend(vocab.setdefault(w, len(vocab) + 1) for w in words)
        lengths[i] = len(words)
    return _rolling(np.array(ids, dtype=np.uint64), lengths, n)


class NearDuplicates:
    """fit(texts) -> clusters of near-duplicate rows (estimated Jaccard >= threshold).

    Learned state: `signatures_` (rows x num_perm MinHash values), `pairs_`
    (verified pairs i < j with their similarity), `labels_` (a cluster id per row)."""

    def __init__(self, threshold: float = 0.8, shingle: str = "char", ngram: int = 5, num_perm: int = 128,
                 seed: int = 1):
        self.threshold, self.shingle, self.ngram, self.num_perm, self.seed = threshold, shingle, ngram, num_perm, seed

    def _signatures(self, texts: list[str]) -> np.ndarray:
        from datasketch import MinHash

        a, b = MinHash(num_perm=self.num_perm, seed=self.seed, scheme="affine32").permutations
        a, b = a.astype(np.uint32), b.astype(np.uint32)
        hashes, per_row = shingle_hashes(texts, self.shingle, self.ngram)
        sig = np.empty((len(texts), self.num_perm), dtype=np.uint32)
        bounds = np.concatenate([[0], np.cumsum(per_row)])
        row = 0
        while row < len(texts):
            # Take whole rows until the block holds ~_CHUNK shingles.
            end = int(np.searchsorted(bounds, bounds[row] + _CHUNK, side="right")) - 1
            end = max(end, row + 1)
            block = hashes[bounds[row]:bounds[end]]
            with np.errstate(over="ignore"):
                permuted = block[:, None] * a[None, :] + b[None, :]
            sig[row:end] = np.minimum.reduceat(permuted, bounds[row:end] - bounds[row], axis=0)
            row = end
        return sig

    def fit(self, texts: list[str]) -> "NearDuplicates":
        from datasketch import MinHashLSH
        from scipy.sparse import coo_matrix
        from scipy.sparse.csgraph import connected_components

        n = len(texts)
        self.signatures_ = sig = self._signatures(texts) if n else np.zeros((0, self.num_perm), np.uint32)
        lsh = MinHashLSH(threshold=self.threshold, num_perm=self.num_perm)
        self.bands_, self.rows_per_band_ = lsh.b, lsh.r
        firsts, seconds = [], []
        rng = np.random.default_rng(self.seed)
        weights = rng.integers(1, 2**63, size=lsh.r, dtype=np.uint64) | np.uint64(1)
        for band in range(lsh.b):
            cols = sig[:, band * lsh.r:(band + 1) * lsh.r].astype(np.uint64)
            with np.errstate(over="ignore"):
                key = _mix64((cols * weights).sum(axis=1))
            order = np.argsort(key, kind="stable")
            ks = key[order]
            same = ks[1:] == ks[:-1]
            if not same.any():
                continue
            # Link each bucket member to the previous one and to the bucket's first.
            firsts.append(order[:-1][same])
            seconds.append(order[1:][same])
            group_start = np.maximum.accumulate(np.where(np.concatenate([[True], ~same]), np.arange(n), 0))
            head = order[group_start[1:]][same]
            firsts.append(head)
            seconds.append(order[1:][same])
        if firsts:
            pairs = np.unique(np.sort(np.stack([np.concatenate(firsts), np.concatenate(seconds)], 1), 1), axis=0)
            pairs = pairs[pairs[:, 0] != pairs[:, 1]]
            sim = (sig[pairs[:, 0]] == sig[pairs[:, 1]]).mean(axis=1)
            keep = sim >= self.threshold
            self.pairs_, self.similarity_ = pairs[keep], sim[keep]
        else:
            self.pairs_, self.similarity_ = np.zeros((0, 2), np.int64), np.zeros(0)
        graph = coo_matrix((np.ones(len(self.pairs_)), (self.pairs_[:, 0], self.pairs_[:, 1])), shape=(n, n))
        _, self.labels_ = connected_components(graph, directed=False)
        return self

    def clusters(self) -> list[list[int]]:
        """Clusters of two or more rows, each sorted, largest first."""
        groups: dict[int, list[int]] = {}
        for i, lab in enumerate(self.labels_):
            groups.setdefault(int(lab), []).append(i)
        return sorted((g for g in groups.values() if len(g) > 1), key=lambda g: (-len(g), g[0]))
