"""Segment timestamps of a transcript already decoded: Whisper's own timestamp tokens,
placed by the model around the transcript's tokens.

The transcript comes from the search without timestamps (decode.py: faster-whisper's
``without_timestamps=True``, what every audio job's text is). Decoding again with
timestamps could say something else, so the text is held fixed and only the timestamps
are decoded: the decoder runs in timestamp mode (prompt ``[<|startoftranscript|>]``, as
an English-only model takes it), teacher-forced on the window's tokens, and Whisper's
timestamp rules (openai-whisper's ``ApplyTimestampRules``) decide, greedily:

- the first token is a timestamp of at most 1.00 s (``max_initial_timestamp``);
- after a text token, the segment ends where the timestamps' total probability exceeds
  the next text token's (greedy decoding's rule that forces a timestamp, with the text
  narrowed to what was said: compared with the likeliest text token instead, a sentence
  whose full stop the search left out never ended, as the stop outbid the timestamps);
  its end is the likeliest timestamp after the segment's start (never an empty one);
- an ended segment is followed by the next one's start, the likeliest timestamp not
  before that end, and the text goes on;
- after the window's last token the segment ends at the likeliest later timestamp.

Each pass runs every unfinished window's sequence so far (committed tokens, then the
rest of its text as if no timestamp came) through the decoder at once, one row per
window, and scans each row's next-token distributions from its last decision to its next
segment end; the positions before that are exactly what a step-by-step decode would have
seen, so the result is the step-by-step one in about (segments + 2) passes. Timestamp
token ``<|t|>`` is ``<|notimestamps|> + 1 + t / 0.02 s``; they go up to 30.00 s.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from core.model.whisper.cache import CrossKV
from core.model.whisper.model import TextDecoder
from core.model.whisper.tokens import WhisperTokens

SECONDS_PER_STEP = 0.02  # one timestamp token: two mel frames, one encoder position
MAX_INITIAL = 50  # the first timestamp is at most 1.00 s (openai-whisper's default)
N_STEPS = 1500  # <|0.00|> .. <|30.00|>


@dataclass(frozen=True)
class TimedSegment:
    start: float  # seconds from the window's start
    end: float
    tokens: tuple[int, ...]  # the segment's text tokens (a slice of the transcript's)


@dataclass
class _Window:
    text: list[int]  # the forced text tokens
    seq: list[int]  # committed generated tokens (timestamps and text), prompt excluded
    pos: int = 0  # text[:pos] are committed
    done: bool = False


def _split_ok(tok: WhisperTokens, text: list[int], k: int) -> bool:
    """A segment may end before ``text[k]`` only where the text splits cleanly (a
    character whose bytes span two tokens must not be cut in half)."""
    return tok.decode(text[:k]) + tok.decode(text[k:]) == tok.decode(text)


@torch.inference_mode()
def align_timestamps(dec: TextDecoder, cross: CrossKV, tok: WhisperTokens,
                     texts: list[list[int]]) -> list[list[TimedSegment]]:
    """``cross``: B windows' cross keys/values; ``texts``: each window's transcript tokens
    (the search's, end token excluded). -> each window's segments, in window seconds;
    a window without text has none.

    Every rule compares logits of one distribution (the timestamps' together against
    the next text token, or timestamps among themselves), so no softmax over the whole
    vocabulary is needed: only the 1,501 timestamp rows and the text token's row of the
    output projection are multiplied, about 30x less than full logits per position."""
    dev = cross.k[0].device
    ts0 = tok.no_timestamps + 1  # <|0.00|>
    max_ctx = dec.cfg.n_text_ctx
    wins = [_Window([t for t in x if t < tok.eot], []) for x in texts]
    for w in wins:
        w.done = not w.text
    W = dec.tok.weight  # (V, C): the tied output projection
    W_ts = W[ts0:ts0 + N_STEPS + 1]  # (1501, C): <|0.00|> .. <|30.00|>

    # The first timestamp, after the prompt alone: one position per window.
    live = [i for i, w in enumerate(wins) if not w.done]
    if live:
        h = dec.hidden(torch.full((len(live), 1), tok.sot, device=dev),
                       cross.select(torch.tensor(live, device=dev)))[:, 0]  # (b, C)
        first = (h @ W_ts[:MAX_INITIAL + 1].T).float().argmax(-1).tolist()  # (b,)
        for i, t in zip(live, first, strict=True):
            wins[i].seq.append(ts0 + t)

    while live := [i for i, w in enumerate(wins) if not w.done]:
        rows = [[tok.sot] + wins[i].seq + wins[i].text[wins[i].pos:] for i in live]
        T = max(len(r) for r in rows)
        batch = torch.full((len(live), T), tok.eot, dtype=torch.long)  # (b, T) end-padded
        for j, r in enumerate(rows):
            batch[j, :len(r)] = torch.tensor(r)
        h = dec.hidden(batch.to(dev), cross.select(torch.tensor(live, device=dev)))  # (b, T, C)
        for j, i in enumerate(live):
            _scan(wins[i], h[j], W, W_ts, tok, ts0, max_ctx)
    return [_segments(w, ts0) for w in wins]


def _scan(w: _Window, h: torch.Tensor, W: torch.Tensor, W_ts: torch.Tensor,
          tok: WhisperTokens, ts0: int, max_ctx: int) -> None:
    """Walk one window's row (``h``: (T, C) its decoder states) from its last committed
    token, committing text until the rules end a segment (or the text)."""
    # Row position p holds token row[p]; its states predict row[p + 1]. The last
    # committed token sits at position len(seq) (the prompt is position 0).
    p0 = len(w.seq)
    rest = w.text[w.pos:]
    hs = h[p0:p0 + len(rest) + 1]  # (n+1, C): before each remaining token, and after all
    ts_logits = (hs @ W_ts.T).float()  # (n+1, 1501)
    text_logit = (hs[:len(rest)] * W[rest]).sum(-1).float().tolist()  # (n,) the text's own
    for k in range(len(rest) + 1):  # k: text tokens committed in this pass before it
        last = w.seq[-1] if k == 0 else rest[k - 1]
        if last >= ts0 and k == 0 and (len(w.seq) < 2 or w.seq[-2] >= ts0):
            continue  # a segment's start: text must follow
        last_step = max(t for t in w.seq if t >= ts0) - ts0
        if last >= ts0:  # a segment ended just before: the next one's start, not earlier
            w.seq.append(ts0 + last_step + int(ts_logits[k, last_step:].argmax()))
            return  # the text after it needs a new pass
        end_of_text = k == len(rest)
        lo = last_step + 1  # a segment is never empty of time
        ts = ts_logits[k, lo:]
        if ts.numel() == 0:  # the window's last timestamp is taken: no more breaks
            if end_of_text:
                w.seq += rest + [ts0 + N_STEPS]
                w.pos, w.done = len(w.text), True
                return
            continue
        room = len(w.seq) + k + 2 + (len(rest) - k) + 1 < max_ctx
        brk = end_of_text or (
            room and float(torch.logsumexp(ts, 0)) > text_logit[k]
            and _split_ok(tok, w.text, w.pos + k))
        if brk:
            w.seq += rest[:k] + [ts0 + lo + int(ts.argmax())]
            w.pos += k
            w.done = end_of_text
            return
    raise AssertionError("unreachable: the text's end always ends a segment")


def _segments(w: _Window, ts0: int) -> list[TimedSegment]:
    out, start, toks = [], None, []
    for t in w.seq:
        if t < ts0:
            toks.append(t)
        elif start is None:
            start = t
        else:
            out.append(TimedSegment((start - ts0) * SECONDS_PER_STEP,
                                    (t - ts0) * SECONDS_PER_STEP, tuple(toks)))
            start, toks = None, []
    return out
