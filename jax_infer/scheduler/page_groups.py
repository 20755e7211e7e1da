"""Page groups: how many pages a request holds per group, and one byte budget split over groups.

A model whose layers attend over different windows keeps one page group per distinct window
(None: full attention), each with its own pool and allocator (see scheduler.py). A full group
holds every page of a request; a windowed group holds only the pages its window still reaches,
plus the pages the current step writes. Pure arithmetic, no tensors: the engine passes the
bytes a page takes in each group (its layers' K and V), the benchmark uses it without a model.
"""

from __future__ import annotations

from collections.abc import Sequence


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def request_pages(num_tokens: int, page_size: int, window: int | None, chunk: int) -> int:
    """The most pages one request of `num_tokens` tokens (the last never written) holds at a
    time in a group: all of them for full attention; with a window W, those covering the W - 1
    positions before a step's first query and the step's `chunk` tokens (+1 for straddling)."""
    full = _cdiv(num_tokens - 1, page_size)
    if window is None:
        return full
    return min(full, _cdiv(window - 1 + chunk, page_size) + 1)


def steady_pages(num_tokens: int, page_size: int, window: int | None) -> int:
    """Pages a request holds in a group while it decodes (one token a step)."""
    return request_pages(num_tokens, page_size, window, 1)


def split_page_budget(
    budget_bytes: int,
    page_bytes: Sequence[int],
    windows: Sequence[int | None],
    page_size: int,
    max_model_len: int,
    chunk: int,
) -> list[int]:
    """num_pages per group (each with its null page) for one byte budget.

    Sized so that all groups run out together when every request is max_model_len tokens
    long and decoding: n requests need n * steady_pages pages in each group. One request at a
    time may hold a whole prefill chunk on top (`chunk` tokens), so each windowed group gets
    that headroom once. With one full group this is budget // page_bytes, as before groups.
    """
    if len(page_bytes) != len(windows) or not windows:
        raise ValueError(
            f"page_bytes ({len(page_bytes)}) and windows ({len(windows)}) need one entry per "
            "page group"
        )
    if len(windows) == 1 and windows[0] is None:
        return [int(budget_bytes) // page_bytes[0]]
    steady = [steady_pages(max_model_len, page_size, w) for w in windows]
    peak = [request_pages(max_model_len, page_size, w, chunk) for w in windows]
    fixed = sum((p - s + 1) * b for p, s, b in zip(peak, steady, page_bytes))
    per_request = sum(s * b for s, b in zip(steady, page_bytes))
    n = max(0.0, (budget_bytes - fixed) / per_request)
    return [int(n * s) + p - s + 1 for s, p in zip(steady, peak)]


__all__ = ["request_pages", "split_page_budget", "steady_pages"]
