"""The CLIP tokenizer, from files the user already has; never from a hub."""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path
from typing import Union

from transformers import CLIPTokenizer

from .errors import ModelFileMissingError

TOKENIZER_FILES = ("vocab.json", "merges.txt")


def find_tokenizer_folder(path: Union[str, Path]) -> Path:
    """The folder holding ``vocab.json`` and ``merges.txt``: the path itself or its ``tokenizer/`` child.

    Accepts an SD1.5 diffusers folder, its ``tokenizer/`` folder, or ComfyUI's ``comfy/sd1_tokenizer``.
    """
    path = Path(path)
    for candidate in (path, path / "tokenizer"):
        if all((candidate / name).is_file() for name in TOKENIZER_FILES):
            return candidate
    raise ModelFileMissingError(
        f"no CLIP tokenizer at {path}: expected {' and '.join(TOKENIZER_FILES)} there or in {path / 'tokenizer'} "
        "(an SD1.5 diffusers folder, or ComfyUI's comfy/sd1_tokenizer folder)"
    )


def load_clip_tokenizer(path: Union[str, Path]) -> CLIPTokenizer:
    """A CLIP BPE tokenizer (77 tokens, pad = end-of-text) from a local folder."""
    return CLIPTokenizer.from_pretrained(str(find_tokenizer_folder(path)), model_max_length=77, local_files_only=True)


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte -> printable-character table (GPT-2 scheme)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def write_tokenizer_from_bpe(bpe_gz: Path, out_dir: Path) -> Path:
    """Writes ``vocab.json``/``merges.txt`` from CLIP's original ``bpe_simple_vocab_16e6.txt.gz``.

    The vocabulary is built the way CLIP builds it (bytes, bytes + ``</w>``, merges, then the two
    special tokens), so ids match the OpenAI CLIP-L tokenizer that SD1.5 ships.
    """
    lines = gzip.open(bpe_gz, "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    vocab = list(_bytes_to_unicode().values())
    vocab += [v + "</w>" for v in vocab]
    vocab += ["".join(pair) for pair in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}), encoding="utf-8")
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(p) for p in merges) + "\n", encoding="utf-8")
    return out_dir


def packaged_clip_bpe() -> Path:
    """CLIP's BPE file as shipped inside the ``open_clip_torch`` package (used by tests and the smoke run)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ModelFileMissingError(
            "the CLIP vocabulary for tiny models comes from the open_clip_torch package: "
            "pip install --no-deps open_clip_torch"
        )
    path = Path(spec.submodule_search_locations[0]) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise ModelFileMissingError(f"{path} is missing from the installed open_clip_torch")
    return path


def single_token_id(tokenizer: CLIPTokenizer, word: str) -> list[int]:
    """Token ids of ``word`` alone, without the start and end tokens."""
    return tokenizer(word, add_special_tokens=False)["input_ids"]
