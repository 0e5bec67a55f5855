"""The plan's words: why each candidate lost, and why the choice won (one line per decision)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from edgerunner.pack.planner import Candidate


def explain_rejections(
    cands: list[Candidate], chosen: Candidate, min_tps: float, equal: set[str]
) -> None:
    """Set each candidate's `rejected` to why it lost (`equal`: presets of equal quality)."""
    for c in cands:
        if c is chosen or c.rejected:
            continue
        if chosen.decode_tps < min_tps:
            c.rejected = f"slower ({c.decode_tps:.1f} tok/s) than the fastest that fits"
        elif c.decode_tps < min_tps:
            c.rejected = f"decodes at {c.decode_tps:.1f} tok/s < {min_tps:g}"
        elif c.quant != chosen.quant:
            c.rejected = _versus_quant(c, chosen, equal)
        elif c.n_ctx < chosen.n_ctx:
            c.rejected = f"less context than {chosen.n_ctx}"
        else:
            c.rejected = _versus_config(c, chosen)


def _versus_quant(c: Candidate, chosen: Candidate, equal: set[str]) -> str:
    if c.quant in equal:
        delta = abs(c.kl_divergence - chosen.kl_divergence)
        return (f"equal quality to {chosen.quant} (ΔKLD {delta:.4f}) but slower "
                f"({c.decode_tps:.1f} vs {chosen.decode_tps:.1f} tok/s)")
    if c.kl_divergence > chosen.kl_divergence:
        return (f"lower quality than {chosen.quant} (KLD {c.kl_divergence:.4f} vs "
                f"{chosen.kl_divergence:.4f})")
    return f"slower than {chosen.quant}"


def _versus_config(c: Candidate, chosen: Candidate) -> str:
    """Why a configuration of the chosen quant with the same context lost."""
    if c.kv_type != chosen.kv_type:
        return f"{c.kv_type} KV cache not needed: {chosen.kv_type} reaches the same context"
    if c.swa_full != chosen.swa_full:
        return "trimmed sliding-window cache not needed: the full one reaches the same context"
    if c.flash_attn != chosen.flash_attn:
        more = c.memory.total_mb - chosen.memory.total_mb
        with_fa = "with" if chosen.flash_attn else "without"
        return f"same context and speed {with_fa} flash attention, {more:.0f} MiB more"
    return "same context, more levers than needed"


def choice_reasons(
    result_cands: list[Candidate], chosen: Candidate, rivals: list[Candidate], min_tps: float,
    budget_mb: float, max_ctx: int, band: float, forced: bool = False,
) -> list[str]:
    """One line each for why the quant, the context and the levers of the choice won.

    `rivals`: the other presets of equal quality, each as it would have been configured."""
    reasons = [f"{chosen.quant}: forced with --quant" if forced else
               _quant_reason(result_cands, chosen, rivals, min_tps, band)]
    limit = "the plan's maximum context" if chosen.n_ctx == max_ctx else (
        f"the largest that fits {budget_mb:.0f} MiB"
        + (f" and decodes at ≥ {min_tps:g} tok/s" if chosen.decode_tps >= min_tps else ""))
    reasons.append(f"n_ctx {chosen.n_ctx}: {limit}")
    same_quant = [c for c in result_cands if c.quant == chosen.quant and c is not chosen]
    lever = _lever_reason(same_quant, chosen, min_tps)
    if lever:
        reasons.append(lever)
    return reasons


def _quant_reason(
    cands: list[Candidate], chosen: Candidate, rivals: list[Candidate], min_tps: float,
    band: float,
) -> str:
    q = chosen.quant
    if chosen.decode_tps < min_tps:
        return f"{q}: nothing decodes at {min_tps:g} tok/s here; {q} is the fastest that fits"
    if rivals:
        rivals = sorted(rivals, key=lambda r: (r.kl_divergence, r.quant))
        delta = max(abs(r.kl_divergence - chosen.kl_divergence) for r in rivals)
        ratio = chosen.decode_tps / max(r.decode_tps for r in rivals)
        return (f"{q}: {_and([*(r.quant for r in rivals), q])} are within the near-lossless "
                f"band (ΔKLD {delta:.4f} ≤ {band:g} in llama.cpp's KL-divergence table), so "
                f"equal quality; {q} decodes {ratio:.1f}x faster than "
                f"{_and([r.quant for r in rivals])} ({chosen.decode_tps:.1f} vs "
                f"{_and([f'{r.decode_tps:.1f}' for r in rivals])} tok/s)")
    reason = f"{q}: the best quality (KLD {chosen.kl_divergence:.4f}) that fits"
    reason += f" and decodes at ≥ {min_tps:g} tok/s" if min_tps > 0 else ""
    better = [c for c in cands if c.kl_divergence < chosen.kl_divergence]
    if better:
        nearest = max(c.kl_divergence for c in better)
        runner = max((c for c in better if c.kl_divergence == nearest),
                     key=lambda c: (c.fits, c.decode_tps))
        why = f"decodes at {runner.decode_tps:.1f} tok/s < {min_tps:g}" if runner.fits else (
            f"needs {runner.memory.total_mb:.0f} MiB")
        reason += f"; {runner.quant} {why}"
    return reason


def _lever_reason(same_quant: list[Candidate], chosen: Candidate, min_tps: float) -> str | None:
    fast = chosen.decode_tps >= min_tps
    rivals = [c for c in same_quant if c.fits and (c.decode_tps >= min_tps or not fast)]
    at = f" at ≥ {min_tps:g} tok/s" if fast and min_tps > 0 else ""
    if chosen.kv_type != "f16":
        if not fast:
            return f"{chosen.kv_type} KV cache: the fastest, it reads fewer KV bytes per token"
        f16 = [c.n_ctx for c in rivals if c.kv_type == "f16"]
        return (f"{chosen.kv_type} KV cache: n_ctx {chosen.n_ctx}; "
                + (f"f16 reaches {max(f16)}{at}" if f16 else f"f16 fits no context{at}"))
    if not chosen.swa_full:
        full = [c.n_ctx for c in rivals if c.swa_full]
        full_reach = f"reaches {max(full)}" if full else "fits no context"
        return f"trimmed sliding-window cache: n_ctx {chosen.n_ctx}; the full one {full_reach}{at}"
    twin = next((c for c in same_quant if c.kv_type == chosen.kv_type
                 and c.swa_full == chosen.swa_full and c.flash_attn != chosen.flash_attn), None)
    if twin is None or not chosen.flash_attn:
        return None
    if twin.fits and twin.n_ctx == chosen.n_ctx:
        return (f"flash attention: same context and predicted speed as without, "
                f"{twin.memory.total_mb - chosen.memory.total_mb:.0f} MiB less "
                f"({chosen.memory.total_mb:.0f} vs {twin.memory.total_mb:.0f} MiB)")
    return f"flash attention: n_ctx {chosen.n_ctx}, {twin.n_ctx if twin.fits else 'none'} without"


def _and(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]
