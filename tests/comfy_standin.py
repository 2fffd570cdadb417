"""A small, documented stand-in for the parts of ComfyUI's SD1 CLIP contract this pack relies on.

What it mirrors (ComfyUI 0.3.x, ``comfy/sd1_clip.py`` and ``comfy/sd.py``; DESIGN §4):
- ``clip.tokenize(text, return_word_ids=False)`` returns ``{"l": chunks}``; each chunk is exactly
  77 entries ``(token, weight)`` (``(token, weight, word_id)`` with word ids): start token, up to 75
  prompt tokens, end token, then end tokens as padding. ``(word:1.2)`` sets a weight. Packing as
  ComfyUI's (word id per weighted segment; a segment under 8 tokens never straddles two chunks).
- ``clip.encode_from_tokens(tokens, return_pooled=True)`` and ``encode_from_tokens_scheduled``:
  an entry whose token is a tensor of the encoder width is spliced in as that position's input
  embedding; one of another width is dropped with a warning (as ComfyUI does); weights other
  than 1 scale each token's output away from the empty prompt's output at that position; chunks
  are encoded separately and concatenated along the sequence axis.
- ``clip.clone()`` returns a new object sharing the model.
The encoder is this package's ``ClipTextTransformer`` on a tiny SD1.5 ``text_encoder/`` folder,
which a separate test proves equal to transformers' ``CLIPTextModel``.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Optional

import torch

from adaface_core.clip_text import ClipTextTransformer

logger = logging.getLogger(__name__)

_WEIGHTED = re.compile(r"\(([^():]+):([0-9.]+)\)")


class StandInClip:
    def __init__(self, tokenizer, text_model: ClipTextTransformer):
        self.tokenizer = tokenizer
        self.text_model = text_model.eval()

    def clone(self) -> "StandInClip":
        return StandInClip(self.tokenizer, self.text_model)

    # -- tokenize -------------------------------------------------------------------------
    def _segments(self, text: str) -> list[tuple[str, float]]:
        """The prompt's weighted segments, as ComfyUI's ``token_weights`` splits it (no nesting here)."""
        pieces: list[tuple[str, float]] = []
        pos = 0
        for match in _WEIGHTED.finditer(text):
            pieces += [(text[pos : match.start()], 1.0), (match.group(1), float(match.group(2)))]
            pos = match.end()
        return [(piece, weight) for piece, weight in pieces + [(text[pos:], 1.0)] if piece.strip()]

    def tokenize(self, text: str, return_word_ids: bool = False) -> dict[str, list[list[tuple]]]:
        """ComfyUI's packing: one word id per segment; a segment of 8 tokens or more is cut at a chunk's
        end, a shorter one that does not fit moves whole into the next chunk."""
        start, end = self.tokenizer.bos_token_id, self.tokenizer.eos_token_id
        special = (lambda t: (t, 1.0, 0)) if return_word_ids else (lambda t: (t, 1.0))
        bodies: list[list[tuple]] = [[]]
        for word_id, (segment, weight) in enumerate(self._segments(text), start=1):
            group = [(token, weight, word_id) if return_word_ids else (token, weight)
                     for token in self.tokenizer(segment, add_special_tokens=False)["input_ids"]]
            large = len(group) >= 8
            while group:
                room = 75 - len(bodies[-1])
                if len(group) <= room:
                    bodies[-1] += group
                    group = []
                else:
                    if large:
                        bodies[-1] += group[:room]
                        group = group[room:]
                    bodies.append([])
        return {"l": [[special(start), *body, special(end)] + [special(end)] * (75 - len(body)) for body in bodies]}

    # -- encode ---------------------------------------------------------------------------
    def _chunk_embeds(self, chunk: list[tuple]) -> torch.Tensor:
        embedding = self.text_model.embeddings.token_embedding
        width = embedding.weight.shape[1]
        rows = []
        for entry in chunk:
            token = entry[0]
            if isinstance(token, torch.Tensor):
                vector = token.reshape(-1)
                if vector.shape[0] != width:
                    logger.warning("dropping an embedding of width %d (encoder width %d)", vector.shape[0], width)
                    vector = embedding.weight[self.tokenizer.eos_token_id]
                rows.append(vector.to(embedding.weight))
            elif isinstance(token, dict) and token.get("type") == "embedding":
                rows.append(token["data"].reshape(-1).to(embedding.weight))
            else:
                rows.append(embedding.weight[int(token)])
        return torch.stack(rows)

    @torch.no_grad()
    def encode_from_tokens(self, tokens: dict[str, list[list[tuple]]], return_pooled: bool = False) -> Any:
        outputs = []
        empty = self.text_model(input_ids=torch.tensor([[self.tokenizer.bos_token_id] + [self.tokenizer.eos_token_id] * 76]))
        empty = empty.last_hidden_state[0]
        pooled = None
        for chunk in tokens["l"]:
            hidden = self.text_model(token_embeds=self._chunk_embeds(chunk).unsqueeze(0)).last_hidden_state[0]
            weights = torch.tensor([float(entry[1]) for entry in chunk]).unsqueeze(1)
            hidden = (hidden - empty) * weights + empty
            outputs.append(hidden)
            if pooled is None:
                pooled = hidden[-1]
        cond = torch.cat(outputs, dim=0).unsqueeze(0)
        return (cond, pooled.unsqueeze(0)) if return_pooled else cond

    def encode_from_tokens_scheduled(self, tokens: dict[str, list[list[tuple]]], unprojected: bool = False,
                                     add_dict: Optional[dict] = None, show_pbar: bool = True) -> list:
        """Without hooks ComfyUI encodes once and merges ``add_dict`` (e.g. start/end percent) into the options."""
        cond, pooled = self.encode_from_tokens(tokens, return_pooled=True)
        return [[cond, {"pooled_output": pooled, **(add_dict or {})}]]
