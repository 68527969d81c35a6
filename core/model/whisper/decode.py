"""Batched greedy and beam search over many windows at once, and teacher-forced scoring.

The search is CTranslate2's (src/decoding.cc), which faster-whisper's ``transcribe`` runs
with ``beam_size=N, patience=1, length_penalty=1`` and, for tiny.en without timestamps,
the prompt ``[<|startoftranscript|>, <|notimestamps|>]``:

- suppressed tokens get -inf *before* the log-softmax (the distribution is renormalised
  over what may be said); at the first generated step " " and <|endoftext|> too;
- each step takes the top 2K candidates of all K beams' (score + log p); a candidate
  among the first K that ends (<|endoftext|>, or the 224th token) is recorded and its
  slot goes to the next candidate from the second K that does not end;
- a window is done once it has ``round(K * patience)`` finished hypotheses; they are
  ranked by cumulative log-probability (end token included) / length ** length_penalty,
  length without the end token;
- greedy is the same with K = 1;
- the no-speech probability is p(<|nospeech|>) after <|startoftranscript|>, unsuppressed;
  faster-whisper drops a window whose no-speech probability is over 0.6 while its
  average log-probability (cumulative / (length + 1)) is under -1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from core.model.whisper.cache import CrossKV
from core.model.whisper.model import TextDecoder
from core.model.whisper.tokens import WhisperTokens


@dataclass(frozen=True)
class DecodeConfig:
    beam_size: int = 5
    patience: float = 1.0
    length_penalty: float = 1.0
    # CTranslate2: min(max_length / 2, max_length - prompt) with max_length 448 and a
    # one-token prompt before the start token: 224 generated tokens at most.
    max_new_tokens: int = 224
    no_speech_threshold: float | None = 0.6
    log_prob_threshold: float | None = -1.0


@dataclass
class Hypothesis:
    tokens: list[int]  # text tokens, end token excluded
    cum_logprob: float  # end token included
    no_speech_prob: float

    @property
    def avg_logprob(self) -> float:
        return self.cum_logprob / (len(self.tokens) + 1)

    def silent(self, cfg: DecodeConfig) -> bool:
        """faster-whisper's no-speech rule: such a window yields no text."""
        return (cfg.no_speech_threshold is not None and cfg.log_prob_threshold is not None
                and self.no_speech_prob > cfg.no_speech_threshold
                and self.avg_logprob < cfg.log_prob_threshold)


def _masked_log_probs(logits: torch.Tensor, suppress: torch.Tensor,
                      first: torch.Tensor | None) -> torch.Tensor:
    """(rows, V) logits -> float32 log-probs with the suppressed tokens at -inf."""
    x = logits.float()
    x[:, suppress] = float("-inf")
    if first is not None:
        x[:, first] = float("-inf")
    return torch.log_softmax(x, dim=-1)  # (rows, V)


@torch.inference_mode()
def beam_search(dec: TextDecoder, cross: CrossKV, tok: WhisperTokens,
                cfg: DecodeConfig) -> list[Hypothesis]:
    """Decode B windows (``cross`` holds their encoder keys/values); one hypothesis each."""
    B = cross.k[0].shape[0]
    K = cfg.beam_size
    dev = cross.k[0].device
    V = dec.cfg.n_vocab
    max_cand = max(1, round(K * cfg.patience))
    prompt = tok.prompt
    suppress = torch.tensor(tok.suppress, device=dev)
    first = torch.tensor(tok.suppress_begin, device=dev)
    # Later steps add this (V,) bias in the output projection's epilogue instead of
    # writing -inf into every step's (rows, V) logits.
    bias = torch.zeros(V, device=dev).index_fill_(0, suppress, float("-inf"))
    max_len = len(prompt) + cfg.max_new_tokens
    # The prompt once per window (one row each); rows become K beams after step 0.
    cache = dec.new_cache(B, max_len, cross.k[0])
    logits = dec(torch.tensor([prompt] * B, device=dev), cross, cache)  # (B, P, V)
    no_speech = torch.softmax(logits[:, len(prompt) - 2].float(), -1)[:, tok.no_speech]
    logp = _masked_log_probs(logits[:, -1], suppress, first)  # (B, V)
    scores, ids = logp.topk(2 * K, dim=-1)  # (B, 2K): one beam at step 0
    beam_of = torch.zeros_like(ids)

    alive = list(range(B))  # window index of each row group in the batch
    done: set[int] = set()  # windows finished but still in the batch (see below)
    results: list[list[tuple[float, list[int]]]] = [[] for _ in range(B)]
    seqs = torch.zeros(B, 0, dtype=torch.long, device=dev)  # (B*K_rows, t) alive sequences
    rows_per = 1  # rows per window in ``seqs`` / ``cache`` before this step's expansion
    for step in range(cfg.max_new_tokens):
        last = step + 1 == cfg.max_new_tokens
        sc, bi, ti = scores.tolist(), beam_of.tolist(), ids.tolist()
        keep, pick = [], []  # windows going on; their K candidate slots
        for i, w in enumerate(alive):
            if w in done:  # rides along until the next compaction; its output is ignored
                keep.append(i)
                pick.append(list(range(K)))
                continue
            nxt, chosen = K, []
            for k in range(K):
                c = k
                if ti[i][k] == tok.eot or last:
                    end = ti[i][k] == tok.eot
                    prev = seqs[i * rows_per + bi[i][k]].tolist()
                    results[w].append((sc[i][k], prev if end else prev + [ti[i][k]]))
                    while nxt < 2 * K and ti[i][nxt] == tok.eot:
                        nxt += 1
                    if nxt < 2 * K:
                        c, nxt = nxt, nxt + 1
                chosen.append(c)
            if last or len(results[w]) >= max_cand:
                done.add(w)
            keep.append(i)
            pick.append(chosen)
        n_live = len(alive) - sum(w in done for w in alive)
        if n_live == 0:
            break
        # Dropping finished windows copies every layer's cross keys/values of the rest
        # (about 18 MB per window): do it only once half the batch has finished.
        if 2 * n_live <= len(alive):
            keep_pick = [(i, p) for i, p in zip(keep, pick, strict=True)
                         if alive[i] not in done]
            keep, pick = [i for i, _ in keep_pick], [p for _, p in keep_pick]
        kept = torch.tensor(keep, device=dev)
        sel = torch.tensor(pick, device=dev)  # (B', K) candidate index per new beam
        new_scores = scores[kept].gather(1, sel)  # (B', K)
        new_tok = ids[kept].gather(1, sel)
        src_rows = (kept[:, None] * rows_per + beam_of[kept].gather(1, sel)).view(-1)
        seqs = torch.cat([seqs[src_rows], new_tok.view(-1, 1)], dim=1)  # (B'*K, t+1)
        cache = cache.select(src_rows)
        if len(keep) != len(alive):
            cross = cross.select(kept)
        alive = [alive[i] for i in keep]
        rows_per = K
        # A window's 2K best candidates are among its K rows' 2K likeliest tokens each:
        # where the decoder can, it hands back only each row's T (core/model/kernels/
        # logits_bf16.c picks them in bf16; T = 2K + 6 leaves room for its rounding to
        # misorder the 2K-th), else the full (rows, V) log-probabilities.
        top = dec.step_top(new_tok.view(-1, 1), cross, cache, bias, 2 * K + 6)
        if top is not None:
            lp, tid = top  # (B'*K, T) each
            T = lp.shape[1]
            lp = lp.add_(new_scores.view(-1, 1)).view(len(alive), K * T)
            scores, flat = lp.topk(2 * K, dim=-1)  # (B', 2K)
            beam_of, ids = flat // T, tid.view(len(alive), K * T).gather(1, flat)
            continue
        logits = dec(new_tok.view(-1, 1), cross, cache, all_logits=False,
                     bias=bias)  # (B'*K, V), suppressed tokens -inf
        logp = torch.log_softmax(logits.float(), dim=-1).add_(new_scores.view(-1, 1))
        scores, flat = logp.view(len(alive), K * V).topk(2 * K, dim=-1)  # (B', 2K)
        beam_of, ids = flat // V, flat % V

    out = []
    for w in range(B):
        best = max(results[w], key=lambda r: r[0] / max(len(r[1]), 1e-9) ** cfg.length_penalty
                   if r[1] else float("-inf"))
        out.append(Hypothesis(best[1], best[0], float(no_speech[w])))
    return out


@torch.inference_mode()
def score_sequences(dec: TextDecoder, cross: CrossKV, prompt: list[int],
                    seqs: list[list[int]], chunk_rows: int = 2048) -> torch.Tensor:
    """Teacher-forced sum of log p(seq | prompt, window) for every window and sequence.

    ``cross``: B windows; ``seqs``: L token sequences (each ending as the caller wants,
    usually with <|endoftext|>). All B*L sequences go through the decoder in one pass,
    R = L rows per window. Returns (B, L) float32."""
    B = cross.k[0].shape[0]
    dev = cross.k[0].device
    L = len(seqs)
    P = len(prompt)
    T = P + max(len(s) for s in seqs)
    rows = torch.full((L, T), prompt[0], dtype=torch.long)
    target_mask = torch.zeros(L, T - 1, dtype=torch.bool)
    for j, s in enumerate(seqs):
        rows[j, :P + len(s)] = torch.tensor(prompt + s)
        target_mask[j, P - 1:P - 1 + len(s)] = True
    rows, target_mask = rows.to(dev), target_mask.to(dev)
    tokens = rows.repeat(B, 1)  # (B*L, T): clip-major, as the decoder's rows are grouped
    h = dec.hidden(tokens[:, :-1], cross)  # (B*L, T-1, C)
    C = h.shape[-1]
    h = h.reshape(-1, C)  # (B*L*(T-1), C)
    tgt = tokens[:, 1:].reshape(-1)
    W = dec.tok.weight
    out = torch.empty(h.shape[0], dtype=torch.float32, device=dev)
    for a in range(0, h.shape[0], chunk_rows):  # (rows, V) logits in bounded pieces
        lg = (h[a:a + chunk_rows] @ W.T).float()
        out[a:a + chunk_rows] = lg.gather(1, tgt[a:a + chunk_rows, None])[:, 0] - \
            torch.logsumexp(lg, dim=-1)
    out = out.view(B, L, T - 1) * target_mask[None]
    return out.sum(-1)  # (B, L)
