"""From validated JSONL to training batches: tokenize, mask, pack, collate.

Each example becomes token ids plus *shifted* labels: labels[i] is the token the model
must predict after reading token i, or IGNORE when that token is not part of a response
(assistant turn or completion). Shifting inside the example (not across the packed row)
means a packed row never asks a token to predict the first token of the next example.

Packing puts several examples in one row of at most maxSeqLength tokens. Each example's
position ids restart at 0 and the attention mask is block-diagonal (causal inside an
example, nothing across examples), so a packed row computes exactly what the examples
would compute one by one -- minus the padding.
"""

from __future__ import annotations

import bisect
import random
from dataclasses import dataclass
from typing import Sequence

import torch

from . import formats, jsonlines, storage
from .errors import DataError
from .tiny import CHATML_TEMPLATE

IGNORE = -100
#: Padded rows are rounded up to a multiple of this (tensor-core friendly on GPUs, harmless on CPUs).
PAD_MULTIPLE = 8


@dataclass(frozen=True)
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]  # already shifted: labels[i] = target after input_ids[i], or IGNORE

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def trainable_tokens(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE)


# ---------------------------------------------------------------- reading


def read_examples(data_uri: str, name: str, fmt: str) -> list[formats.Example]:
    """Parse `{data_uri}/{name}`; a malformed line stops the run naming file and line.

    Read as the validation Job read it (jsonlines: streamed, split on "\\n" only), so a file it
    wrote -- where U+2028 and U+0085 stay raw inside strings -- parses line for line here too."""
    uri = storage.join(data_uri, name)
    try:
        lines = jsonlines.lines([(None, jsonlines.open_file(uri))])
        examples = []
        for line in lines:
            if line.problem is not None:
                raise DataError(f"{uri} line {line.number}: {line.problem}")
            if formats.is_blank(line.text):
                continue
            try:
                examples.append(formats.parse_line(line.text, fmt))
            except formats.FormatError as exc:
                raise DataError(f"{uri} line {line.number}: {exc}") from None
    except FileNotFoundError:
        raise DataError(f"{uri}: dataset file not found (expected train.jsonl and eval.jsonl)") from None
    except jsonlines.SourceProblem as exc:
        raise DataError(f"{uri}: {exc.problem}") from None
    if not examples:
        raise DataError(f"{uri}: no examples")
    return examples


# ---------------------------------------------------------------- tokenizing


def ensure_chat_template(tokenizer, log=None) -> None:
    """Use the model's own chat template; ChatML (documented default) when it has none."""
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = CHATML_TEMPLATE
        if log:
            log.warning("tokenizer has no chat template; using ChatML", extra={"event": "chat_template_default"})


def _response_pieces(example: formats.Example, tokenizer) -> list[tuple[str, bool]]:
    """Split the rendered example into (text, is_response) pieces, in order."""
    eos = tokenizer.eos_token or ""
    if example.raw:  # completion format: raw prompt + completion, no template
        prompt, completion = example.messages[0][1], example.messages[1][1]
        bos = tokenizer.bos_token or ""
        return [(bos + prompt, False), (completion + eos, True)]
    messages = [{"role": r, "content": c} for r, c in example.messages]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    pieces, cursor = [], 0
    for k, (role, content) in enumerate(example.messages):
        if role != "assistant" or not content.strip():
            continue
        # Search only after the conversation so far (plus the assistant header), so an answer that
        # repeats words of the prompt is never found inside the prompt.
        search_from = max(cursor, _rendered_prefix_length(tokenizer, messages[:k], text))
        # Templates may trim content; look for it as written, then trimmed.
        start = text.find(content, search_from)
        if start < 0:
            content = content.strip()
            start = text.find(content, search_from)
        if start < 0:
            continue
        end = start + len(content)
        if eos and text.startswith(eos, end):  # learn to stop: the end-of-turn token is a target too
            end += len(eos)
        pieces += [(text[cursor:start], False), (text[start:end], True)]
        cursor = end
    pieces.append((text[cursor:], False))
    return [(t, trainable) for t, trainable in pieces if t]


def _rendered_prefix_length(tokenizer, history: list[dict], text: str) -> int:
    """Length of the rendered `history` + generation prompt when the full rendering starts with it
    (true for ChatML, Llama, Qwen, ... templates); 0 when the template renders history differently."""
    if not history:
        return 0
    try:
        prefix = tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
    except Exception:  # templates may reject partial conversations; fall back to a plain search
        return 0
    return len(prefix) if text.startswith(prefix) else 0


def tokenize_example(example: formats.Example, tokenizer, max_len: int) -> TokenizedExample:
    """Token ids and shifted labels; truncated to max_len tokens."""
    ids: list[int] = []
    trainable: list[bool] = []
    for text, is_response in _response_pieces(example, tokenizer):
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        trainable += [is_response] * len(piece)
    ids, trainable = ids[:max_len], trainable[:max_len]
    labels = [ids[i + 1] if trainable[i + 1] else IGNORE for i in range(len(ids) - 1)] + [IGNORE]
    return TokenizedExample(ids, labels)


def tokenize_all(examples: Sequence[formats.Example], tokenizer, max_len: int) -> list[TokenizedExample]:
    """Tokenize; examples left without any response token after truncation are dropped."""
    out = [tokenize_example(e, tokenizer, max_len) for e in examples]
    kept = [t for t in out if t.trainable_tokens > 0]
    if len(kept) < len(out):
        from .logs import get_logger

        get_logger("data").warning(
            f"{len(out) - len(kept)} of {len(out)} examples have no response token within {max_len} tokens "
            "and are skipped", extra={"event": "examples_skipped", "skipped": len(out) - len(kept)})
    return kept


# ---------------------------------------------------------------- batching

#: A micro-batch is a list of rows; a row is a list of example indices (one when not packing).
Batch = list[list[int]]


def pack_rows(order: Sequence[int], lengths: Sequence[int], max_len: int) -> list[list[int]]:
    """Best-fit packing of examples (in the given order; longest first packs tightest) into rows
    of at most max_len tokens. The open rows are kept sorted by free room, so each example costs
    a binary search: fine for millions of examples."""
    rows: list[list[int]] = []
    open_rows: list[tuple[int, int]] = []  # (free tokens, row index), sorted
    for idx in order:
        n = lengths[idx]
        pos = bisect.bisect_left(open_rows, (n, -1))  # the fullest row that still fits
        if pos < len(open_rows):
            free, r = open_rows.pop(pos)
            rows[r].append(idx)
        else:
            free, r = max_len, len(rows)
            rows.append([idx])
        if free - n > 0:
            bisect.insort(open_rows, (free - n, r))
    return rows


def epoch_batches(lengths: Sequence[int], *, epoch: int, seed: int, batch_size: int, max_len: int,
                  packing: bool, shuffle: bool = True) -> list[Batch]:
    """The micro-batches of one epoch: a pure function of (data, epoch, seed), so a resumed run
    rebuilds exactly the same order and only needs to remember a batch index."""
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    if shuffle:
        rng.shuffle(order)
    if packing:
        # Longest first packs tightest; rows are shuffled afterwards so batches stay mixed.
        rows = pack_rows(sorted(order, key=lambda i: -lengths[i]), lengths, max_len)
        if shuffle:
            rng.shuffle(rows)
        return [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]
    # Length-grouped batching: sort inside mega-batches so each batch pads little, then shuffle batches.
    mega = batch_size * 32
    batches: list[Batch] = []
    for start in range(0, len(order), mega):
        chunk = sorted(order[start:start + mega], key=lambda i: lengths[i])
        batches += [[[i] for i in chunk[j:j + batch_size]] for j in range(0, len(chunk), batch_size)]
    if shuffle:
        rng.shuffle(batches)
    return batches


def block_causal_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """[batch, 1, L, L] boolean mask (True = may attend): causal inside each example, nothing across
    examples. Built on the segment ids' device, so the L x L tensor never crosses the bus."""
    width = segment_ids.shape[1]
    same_example = segment_ids[:, :, None] == segment_ids[:, None, :]
    causal = torch.ones(width, width, dtype=torch.bool, device=segment_ids.device).tril()
    mask = same_example & causal & (segment_ids[:, :, None] > 0)
    # A padding query attending to nothing would make softmax NaN; let it see itself (its loss is ignored).
    mask |= torch.eye(width, dtype=torch.bool, device=segment_ids.device)
    return mask[:, None, :, :]


def collate(batch: Batch, examples: Sequence[TokenizedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Tensors for one micro-batch: input_ids, labels, position_ids (restarting per example),
    segment_ids (which example of the row each token belongs to; 0 = padding; see
    block_causal_mask), and token counts."""
    rows_ids, rows_labels, rows_pos, rows_seg = [], [], [], []
    for row in batch:
        ids, labels, pos, seg = [], [], [], []
        for k, idx in enumerate(row, start=1):
            ex = examples[idx]
            ids += ex.input_ids
            labels += ex.labels
            pos += range(len(ex))
            seg += [k] * len(ex)
        rows_ids.append(ids), rows_labels.append(labels), rows_pos.append(pos), rows_seg.append(seg)
    width = max(len(r) for r in rows_ids)
    width = -(-width // PAD_MULTIPLE) * PAD_MULTIPLE
    n = len(batch)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    labels = torch.full((n, width), IGNORE, dtype=torch.long)
    position_ids = torch.zeros((n, width), dtype=torch.long)
    segments = torch.zeros((n, width), dtype=torch.long)  # 0 = padding
    for r in range(n):
        k = len(rows_ids[r])
        input_ids[r, :k] = torch.tensor(rows_ids[r])
        labels[r, :k] = torch.tensor(rows_labels[r])
        position_ids[r, :k] = torch.tensor(rows_pos[r])
        segments[r, :k] = torch.tensor(rows_seg[r])
    return {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": position_ids,
        "segment_ids": segments,
        "rows": batch,  # which examples each row holds (objective.PrefixCache looks their states up)
        "n_targets": int((labels != IGNORE).sum()),
        "n_tokens": int((segments > 0).sum()),
        # sum of squared example lengths: the attention term of the FLOP count (benchmarks, MFU)
        "sum_sq_lengths": sum(len(examples[i]) ** 2 for row in batch for i in row),
    }
