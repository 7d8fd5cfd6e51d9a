"""Batched greedy generation from records (chat or raw prompts), with an optional forced prefill."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lit_safety.data.formatting import ChatFormatter
from lit_safety.data.records import Record


def prompt_ids(formatter: ChatFormatter, record: Record, prefill: str | None = None) -> list[int]:
    """Token ids of a record's prompt, followed by ``prefill`` (the start of the response) if given."""
    ids = formatter.encode_record(record, None).input_ids
    if prefill:
        ids = ids + formatter.tokenizer(prefill, add_special_tokens=False)["input_ids"]
    return ids


def left_pad(sequences: Sequence[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad for generation: every prompt ends at the same position."""
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(sequences), length, dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, length - len(s) :] = torch.tensor(s, dtype=torch.long)
        mask[i, length - len(s) :] = 1
    return ids, mask


@torch.no_grad()
def generate(
    model,
    formatter: ChatFormatter,
    records: Sequence[Record],
    prefill: str | Sequence[str | None] | None = None,
    max_new_tokens: int = 24,
    batch_size: int = 64,
    temperature: float | None = None,
) -> list[str]:
    """Greedy responses to ``records`` (sampled at ``temperature`` if given); with ``prefill`` the
    response starts with that text and the returned string includes it (judges see the whole response)."""
    tokenizer = formatter.tokenizer
    prefills = list(prefill) if isinstance(prefill, (list, tuple)) else [prefill] * len(records)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    responses: list[str] = []
    try:
        for start in range(0, len(records), batch_size):
            chunk = records[start : start + batch_size]
            chunk_prefills = prefills[start : start + batch_size]
            ids, mask = left_pad([prompt_ids(formatter, r, p) for r, p in zip(chunk, chunk_prefills)],
                                 tokenizer.pad_token_id)
            out = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens,
                **({"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} if temperature
                   else {"do_sample": False}),
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            for p, row in zip(chunk_prefills, out[:, ids.shape[1] :]):
                text = tokenizer.decode(row, skip_special_tokens=True).strip()
                responses.append(f"{p} {text}".strip() if p else text)
    finally:
        model.train(was_training)
    return responses


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip left padding (every row's first real token is position 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


@torch.no_grad()
def greedy_from_embeddings(model, embeddings: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                           eos_token_id: int, prompt_context=None) -> torch.Tensor:
    """Greedy decoding from left-padded input embeddings [B, T, D]; returns new token ids [B, N]
    (``eos_token_id`` after a row has finished). ``prompt_context`` (a context manager) is active
    only while the prompt is processed, e.g. a latent perturbation at prompt positions."""
    import contextlib

    mask = attention_mask.long()
    with prompt_context or contextlib.nullcontext():
        out = model(inputs_embeds=embeddings, attention_mask=mask, position_ids=positions(mask), use_cache=True)
    embed = model.get_input_embeddings()
    tokens, done = [], torch.zeros(embeddings.shape[0], dtype=torch.bool, device=embeddings.device)
    for _ in range(max_new_tokens):
        next_token = out.logits[:, -1].argmax(-1)
        next_token = torch.where(done, torch.full_like(next_token, eos_token_id), next_token)
        tokens.append(next_token)
        done |= next_token == eos_token_id
        if done.all():
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        out = model(inputs_embeds=embed(next_token)[:, None], attention_mask=mask,
                    position_ids=positions(mask)[:, -1:], cache=out.cache, use_cache=True)
    return torch.stack(tokens, dim=1)
