"""Image<->text retrieval recall@k on N pairs, where a caption that occurs several times counts as right wherever it
appears.

Shapes: image (N, E), text (N, E), captions: N strings; image[i], text[i] and captions[i] are pair i.

Similarity is cosine (both sides L2-normalised here, in float32). For image i the gallery is every text; a text j is
*correct* for image i when ``captions[j] == captions[i]`` (so with duplicate captions more than one text is correct,
and exact-index recall would wrongly punish retrieving an identical caption of another pair). Symmetrically, image
i is correct for text j when ``captions[i] == captions[j]``.

Ranking: descending similarity, ties broken by index (lower index first), which makes the result deterministic and
independent of the chunk size. Instead of a top-k we compute, for each query, the rank of its best-ranked correct
item exactly:

    best  = max similarity over the correct items
    first = lowest index among the correct items with similarity == best
    rank  = #{items with similarity > best} + #{items with similarity == best and index < first}

recall@k is the fraction of queries with rank < k (k >= N always hits). Only a (chunk, N) block of the similarity
matrix exists at a time (chunk*N*4 bytes: 1024 x 50k is 200 MB), never the full N x N.

chance_recall_at_1 is the recall@1 a uniformly random ranking has in expectation: query i hits with probability
m_i / N, m_i the number of pairs whose caption is captions[i]; the same in both directions.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import torch
import torch.nn.functional as F


def _first_correct_rank(queries: torch.Tensor, query_ids: torch.Tensor, gallery: torch.Tensor,
                        gallery_ids: torch.Tensor, chunk: int) -> torch.Tensor:
    """Rank (0-based) of the best-ranked gallery item whose caption id equals the query's, for every query.

    queries: (N, E) normalised, query_ids: (N,), gallery: (N, E) normalised, gallery_ids: (N,) -> (N,) int64.
    """
    n = gallery.shape[0]
    index = torch.arange(n, device=gallery.device)  # (N,)
    ranks = []
    for start in range(0, queries.shape[0], chunk):
        sims = queries[start:start + chunk] @ gallery.T  # (c, N)
        correct = gallery_ids[None, :] == query_ids[start:start + chunk, None]  # (c, N)
        # Every query has at least one correct item (its own pair), so best is finite.
        best = sims.masked_fill(~correct, float("-inf")).amax(dim=1, keepdim=True)  # (c, 1)
        ties = sims == best  # (c, N)
        # argmax over a 0/1 tensor returns the first maximal index: the lowest-index correct item at `best`.
        first = (ties & correct).to(torch.uint8).argmax(dim=1, keepdim=True)  # (c, 1)
        ahead = (sims > best).sum(dim=1) + (ties & (index[None, :] < first)).sum(dim=1)  # (c,)
        ranks.append(ahead)
    return torch.cat(ranks)


def retrieval_recall(image: torch.Tensor, text: torch.Tensor, captions: Sequence[str],
                     ks: Sequence[int] = (1, 5, 10), chunk: int = 1024) -> dict[str, float]:
    """Recall@k both ways on N pairs, duplicates of a caption counting as right (see the module docstring).

    image: (N, E), text: (N, E), captions: N strings. ``chunk``: query rows per block of the similarity matrix.
    Returns ``i2t_recall_at_{k}`` and ``t2i_recall_at_{k}`` for each k in ks (named by the k asked for; a k above N
    is capped at N and so is 1.0), ``chance_recall_at_1``, ``num_pairs`` and ``distinct_captions``.
    """
    if image.dim() != 2 or text.dim() != 2 or image.shape != text.shape:
        raise ValueError(f"image and text must both be (N, E) with the same shape, got {tuple(image.shape)} and "
                         f"{tuple(text.shape)}")
    n = image.shape[0]
    if n == 0:
        raise ValueError("retrieval_recall needs at least one pair")
    if len(captions) != n:
        raise ValueError(f"{len(captions)} captions for {n} pairs")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be an integer >= 1, got {chunk!r}")
    ks = list(dict.fromkeys(ks))  # keep order, drop repeats
    if any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
        raise ValueError(f"every k must be an integer >= 1, got {ks!r}")

    with torch.no_grad():
        # Non-finite similarities compare false everywhere and would count as rank 0, i.e. a perfect score.
        if not (torch.isfinite(image).all() and torch.isfinite(text).all()):
            raise ValueError("image or text embeddings contain NaN or inf")
        img = F.normalize(image.float(), dim=1)  # (N, E)
        txt = F.normalize(text.float(), dim=1).to(img.device)  # (N, E)
        # Captions become integer ids: "same caption" is then one tensor comparison.
        vocab: dict[str, int] = {}
        ids = torch.tensor([vocab.setdefault(c, len(vocab)) for c in captions], dtype=torch.int64,
                           device=img.device)  # (N,)
        i2t_rank = _first_correct_rank(img, ids, txt, ids, chunk)  # (N,)
        t2i_rank = _first_correct_rank(txt, ids, img, ids, chunk)  # (N,)

    out: dict[str, float] = {}
    for k in ks:
        kk = min(k, n)
        out[f"i2t_recall_at_{k}"] = (i2t_rank < kk).double().mean().item()
        out[f"t2i_recall_at_{k}"] = (t2i_rank < kk).double().mean().item()
    counts = Counter(captions)
    out["chance_recall_at_1"] = sum(counts[c] for c in captions) / (n * n)
    out["num_pairs"] = n
    out["distinct_captions"] = len(counts)
    return out
