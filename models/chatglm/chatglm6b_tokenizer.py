"""ChatGLM-6B's tokenizer on `sentencepiece` (spec section 6), without `icetk` and without transformers' slow layer.

`ice_text.model` is a SentencePiece model; what the original tokenizer adds on top is a whitespace pre-mapping
(newlines, tabs and runs of spaces become pieces of their own), special tokens split out of the text, `[gMASK] <sop>`
appended, an optional id offset for image tokens, and transformers' old decode clean-up.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import sentencepiece as spm

from models.chatglm.glm_tokenizer import without_leading_space

# the whitespace pre-mapping (6.3) and its reverse (6.5)
NEWLINE, TAB = "<n>", "<|tab|>"
MAX_BLANK = 80
# runs of 2..80 spaces become one `<|blank_n|>` piece; longer runs are cut from the left in pieces of 80
_BLANKS = re.compile(r" {2,}")
_BLANK_PIECE = re.compile(r"<\|blank_(\d+)\|>")
# the bos/eos/unk/pad/mask tokens transformers split out of the text before SentencePiece sees it
SPLIT_TOKENS = ("<sop>", "<eop>", "<unk>", "<pad>", "[MASK]")
# transformers' `clean_up_tokenization` (applied by default on decode in the releases the original ran on)
CLEANUP: tuple[tuple[str, str], ...] = (
    (" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
    (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"),
)  # fmt: skip


class TokenizerError(Exception):
    """The vocabulary file is not a ChatGLM-6B `ice_text.model`."""


def _blank_run(match: re.Match[str]) -> str:
    n = len(match.group())
    pieces = f"<|blank_{MAX_BLANK}|>" * (n // MAX_BLANK)
    rest = n % MAX_BLANK
    return pieces + (f"<|blank_{rest}|>" if rest >= 2 else " " * rest)


def preprocess(text: str) -> str:
    """Newlines, tabs and runs of spaces as the pieces ChatGLM was trained with."""
    return _BLANKS.sub(_blank_run, text.replace("\n", NEWLINE).replace("\t", TAB))


def postprocess(text: str) -> str:
    """The reverse of `preprocess`, on decoded text."""
    text = text.replace(NEWLINE, "\n").replace(TAB, "\t")
    return _BLANK_PIECE.sub(lambda m: " " * int(m.group(1)) if 2 <= int(m.group(1)) <= MAX_BLANK else m.group(), text)


def clean_up_tokenization(text: str) -> str:
    """transformers' old default decode clean-up: no space before punctuation and English contractions."""
    for before, after in CLEANUP:
        text = text.replace(before, after)
    return text


class ChatGLMTokenizer:
    """Encode and decode exactly as the original ChatGLM-6B tokenizer does (spec 6.3-6.5)."""

    def __init__(self, model_file: Path, num_image_tokens: int = 0) -> None:
        self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        self.offset = num_image_tokens
        self.sp_size = self.sp.vocab_size()
        ids = {piece: self.sp.piece_to_id(piece) for piece in (*SPLIT_TOKENS, "[gMASK]", NEWLINE, TAB)}
        unknown = self.sp.unk_id()
        missing = [piece for piece, i in ids.items() if i == unknown and piece != "<unk>"]
        if missing:
            raise TokenizerError(f"{model_file.name} has no {', '.join(missing)} piece: not ChatGLM-6B's vocabulary")
        self.special = {piece: i + self.offset for piece, i in ids.items() if piece in (*SPLIT_TOKENS, "[gMASK]")}
        self.bos_token_id = self.special["<sop>"]
        self.eos_token_id = self.special["<eop>"]
        self.pad_token_id = self.special["<pad>"]
        self.mask_token_id = self.special["[MASK]"]
        self.gmask_token_id = self.special["[gMASK]"]
        self.unk_token_id = self.special["<unk>"]
        self._split = re.compile("|".join(re.escape(t) for t in SPLIT_TOKENS))
        self._skipped = frozenset(self.special[t] for t in SPLIT_TOKENS)

    @property
    def vocab_size(self) -> int:
        return self.sp_size + self.offset

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids; `[gMASK] <sop>` are appended unless add_special_tokens is False."""
        ids: list[int] = []
        segments = self._split.split(text)
        tokens = self._split.findall(text)
        for i, segment in enumerate(segments):
            # whitespace next to a special token belongs to neither (transformers' slow tokenizer strips it)
            if i > 0:
                segment = segment.lstrip()
            if i < len(tokens):
                segment = segment.rstrip()
            if segment:
                ids += [t + self.offset for t in self.sp.encode(preprocess(segment))]
            if i < len(tokens):
                ids.append(self.special[tokens[i]])
        if add_special_tokens:
            ids += [self.gmask_token_id, self.bos_token_id]
        return ids

    def token_bytes(self) -> list[bytes]:
        """Each id's bytes as a grammar library reads the vocabulary: the whitespace pieces the text they stand for
        (`<n>` a newline, `<|tab|>` a tab, `<|blank_k|>` k spaces), `▁` a space, byte pieces their byte; image,
        control and special tokens `\\xff` and their name (llguidance's mark for a special token)."""
        out = [b"\xff" + f"<image_{i}>".encode() for i in range(self.offset)]
        special = set(self.special.values())
        for i in range(self.sp_size):
            piece = self.sp.id_to_piece(i)
            if i + self.offset in special or self.sp.is_control(i) or self.sp.is_unknown(i):
                out.append(b"\xff" + piece.encode())
            elif self.sp.is_byte(i):
                out.append(bytes([int(piece[3:5], 16)]))
            elif piece in (NEWLINE, TAB) or _BLANK_PIECE.fullmatch(piece):
                out.append(postprocess(piece).encode())
            else:
                out.append(piece.replace("\u2581", " ").encode())
        return out

    def tokenize_bytes(self, text: bytes) -> list[int]:
        """Ids of text in the middle of an answer: without `[gMASK] <sop>` and without the leading space
        SentencePiece gives a text's first piece."""
        decoded = text.decode("utf-8", errors="replace")
        return without_leading_space(self.sp, self.encode(decoded, add_special_tokens=False), decoded, self.offset)

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": self.encode(text, add_special_tokens)}

    def decode(
        self, ids: Sequence[int], skip_special_tokens: bool = False, clean_up_tokenization_spaces: bool = True
    ) -> str:
        """Text of ids: padding always dropped, image tokens as `<image_k>`, ids past the vocabulary as nothing."""
        ids = [i for i in ids if i != self.pad_token_id and not (skip_special_tokens and i in self._skipped)]
        if any(i < self.offset for i in ids):
            pieces = [f"<image_{i}>" if i < self.offset else self.sp.id_to_piece(i - self.offset) for i in ids]
            text = self.sp.decode_pieces([p for p, i in zip(pieces, ids, strict=True) if i < self.vocab_size])
        else:
            text = self.sp.decode_ids([i - self.offset for i in ids if i < self.vocab_size])
        text = postprocess(text)
        return clean_up_tokenization(text) if clean_up_tokenization_spaces else text

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        return [f"<image_{i}>" if i < self.offset else self.sp.id_to_piece(i - self.offset) for i in ids]
