"""CLIP's tokenizer: byte-level BPE (Sennrich et al. 2016; over bytes as in GPT-2, Radford et al. 2019)
with CLIP's 49408-id vocabulary (Radford et al. 2021), read from the vocabulary file that open_clip
ships, without importing open_clip.

Why our own: `import open_clip` pulls in torchvision and torch._dynamo, about 2.5 s of every CPU
txt2img's start-up, for a tokenizer that is a table lookup. The ids equal open_clip's SimpleTokenizer
(tests/models/test_clip_bpe.py checks them on a mixed corpus); `clip_bpe_for(name)` says when a
model name's tokenizer is that plain CLIP BPE, and the text encoders fall back to open_clip otherwise.
"""
from __future__ import annotations

import functools
import gzip
import html
import importlib.util
import json
import os
from pathlib import Path

SOT, EOT = "<start_of_text>", "<end_of_text>"
TRANSFORMERS_NAMES = {SOT: "<|startoftext|>", EOT: "<|endoftext|>"}   # transformers spells the specials so
N_MERGES = 49152 - 256 - 2      # merges kept: 256 bytes + 256 word-final bytes + merges + 2 specials = 49408 ids
VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
# Words are runs of letters, single digits, runs of other non-space characters, or English
# contractions; matched case-insensitively after lower-casing (CLIP's "lower" cleaning).
PATTERN = SOT + "|" + EOT + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def open_clip_dir() -> Path:
    """open_clip's package folder, found without running its __init__ (which imports torchvision)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("open_clip is not installed (pip install open-clip-torch): its vocabulary file "
                                  "is CLIP's tokenizer")
    return Path(next(iter(spec.submodule_search_locations)))


def byte_symbols() -> list[tuple[int, str]]:
    """(byte, symbol) in vocabulary order: bytes that print as themselves in Latin-1 keep their character
    (in byte order), then the others take the characters from U+0100 on (in byte order), so that every
    byte string becomes a printable string the merges can work on."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
                 *range(ord("\xae"), ord("\xff") + 1)]
    kept = set(printable)
    others = [b for b in range(256) if b not in kept]
    return [(b, chr(b)) for b in printable] + [(b, chr(256 + i)) for i, b in enumerate(others)]


class ClipBPE:
    """encode(text) -> ids, with `sot_token_id` / `eot_token_id` (the interface the text encoders use)."""

    def __init__(self, vocab_file: str | Path | None = None):
        import regex   # \p{L} / \p{N}; a dependency of open_clip, cheap to import
        path = Path(vocab_file) if vocab_file else open_clip_dir() / VOCAB_FILE
        with gzip.open(path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
        merges = [tuple(line.split()) for line in lines[1:N_MERGES + 1]]    # line 0 is a header
        symbols = byte_symbols()
        self.byte_symbol = dict(symbols)
        vocab = [s for _, s in symbols] + [s + "</w>" for _, s in symbols] + ["".join(m) for m in merges] + [SOT, EOT]
        self.ids = {token: i for i, token in enumerate(vocab)}
        self.rank = {pair: i for i, pair in enumerate(merges)}
        self.sot_token_id, self.eot_token_id, self.vocab_size = self.ids[SOT], self.ids[EOT], len(vocab)
        self.pattern = regex.compile(PATTERN, regex.IGNORECASE)
        self._words: dict[str, list[str]] = {SOT: [SOT], EOT: [EOT]}

    @staticmethod
    def clean(text: str) -> str:
        """Repair mojibake (ftfy), undo HTML escapes twice, collapse whitespace, lower-case."""
        import ftfy
        text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
        return " ".join(text.split()).lower()

    def merge(self, word: str) -> list[str]:
        """A word's symbols (the last marked as word-final), merged pair by pair in rank order: at each
        round the best-ranked adjacent pair is joined wherever it occurs, left to right."""
        if word in self._words:
            return self._words[word]
        parts = [*word[:-1], word[-1] + "</w>"]
        while len(parts) > 1:
            best = min(zip(parts, parts[1:]), key=lambda pair: self.rank.get(pair, N_MERGES))
            if best not in self.rank:
                break
            joined, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    joined.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    joined.append(parts[i])
                    i += 1
            parts = joined
        self._words[word] = parts
        return parts

    def encode(self, text: str) -> list[int]:
        ids = []
        for word in self.pattern.findall(self.clean(text)):
            symbols = "".join(self.byte_symbol[b] for b in word.encode("utf-8"))
            ids.extend(self.ids[part] for part in self.merge(symbols))
        return ids


@functools.lru_cache(maxsize=None)
def _shared() -> ClipBPE:
    return ClipBPE()


def clip_bpe_for(name: str) -> ClipBPE | None:
    """Ours when open_clip's `get_tokenizer(name)` would build the plain CLIP BPE (a built-in model config
    without an HF tokenizer or tokenizer options, not a SigLIP name), else None."""
    if ":" in name or "siglip" in name.lower():
        return None
    config = open_clip_dir() / "model_configs" / f"{name}.json"
    if not config.is_file():
        return None
    text_cfg = json.loads(config.read_text()).get("text_cfg", {})
    if "hf_tokenizer_name" in text_cfg or text_cfg.get("tokenizer_kwargs"):
        return None
    return _shared()


def write_clip_tokenizer(directory: str | Path, max_length: int = 77, pad_token: str | None = None) -> str:
    """transformers' CLIPTokenizer files for this vocabulary (vocab.json + merges.txt in its format, then
    its own save): the tokenizer of SD 1.x's text encoder (openai/clip-vit-large-patch14), no download.
    `pad_token`: the padding token when not the end token ("!", id 0, for SD 2.x's OpenCLIP)."""
    from transformers import CLIPTokenizer
    bpe = _shared()
    os.makedirs(directory, exist_ok=True)
    vocab, merges = os.path.join(directory, "vocab.json"), os.path.join(directory, "merges.txt")
    with open(vocab, "w", encoding="utf-8") as f:
        json.dump({TRANSFORMERS_NAMES.get(token, token): i for token, i in bpe.ids.items()}, f)
    with open(merges, "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for (a, b) in sorted(bpe.rank, key=bpe.rank.get)))
    options = {"pad_token": pad_token} if pad_token else {}
    CLIPTokenizer(vocab, merges, model_max_length=max_length, **options).save_pretrained(str(directory))
    return str(directory)
