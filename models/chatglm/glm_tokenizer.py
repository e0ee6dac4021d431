"""The tokenizers of ChatGLM2-6B and ChatGLM3-6B (SentencePiece plus special ids after its pieces) and of GLM-4
(tiktoken-style byte BPE in a `tokenizer.model` of base64 tokens and ranks), per spec section 11.4."""

from __future__ import annotations

import base64
from collections.abc import Sequence
from pathlib import Path

import sentencepiece as spm

SP_SPECIALS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop")
ROLES = ("<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")
GLM4_SPECIALS = (
    "<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", *ROLES,
    "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>", "<|end_of_video|>",
)  # fmt: skip
# GLM-4's pre-tokenizer split (cl100k's): contractions, letters, 1-3 digits, punctuation runs, newlines, spaces
GLM4_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)


class TokenizerFileError(Exception):
    """A tokenizer file of the wrong kind for its model."""


def is_tiktoken_file(path: Path) -> bool:
    """A tiktoken vocabulary is text: one `base64 rank` pair per line; a SentencePiece model is a protobuf."""
    head = path.read_bytes()[:4096]
    try:
        lines = head.decode("ascii").splitlines()[:-1] or head.decode("ascii").splitlines()
    except UnicodeDecodeError:
        return False
    return bool(lines) and all(len(line.split()) == 2 and line.split()[1].isdigit() for line in lines if line)


def without_leading_space(sp: spm.SentencePieceProcessor, ids: list[int], text: str, offset: int = 0) -> list[int]:
    """SentencePiece ids of `text` (numbered from `offset`) as ids of text in the middle of an answer: SentencePiece
    starts a text with a space (`▁`) the text does not have; its first piece loses it (the piece without it, or
    that piece's bytes)."""
    if not ids or text.startswith(" ") or ids[0] < offset:
        return ids
    first = sp.id_to_piece(ids[0] - offset)
    if not first.startswith("\u2581"):
        return ids
    rest = first[1:]
    swap = sp.piece_to_id(rest) if rest else None
    if swap is None:
        return ids[1:]
    if not sp.is_unknown(swap):
        return [swap + offset, *ids[1:]]
    return [sp.piece_to_id(f"<0x{b:02X}>") + offset for b in rest.encode()] + ids[1:]


class SentencePieceTokenizer:
    """ChatGLM2/3: SentencePiece ids, then `[MASK] [gMASK] [sMASK] sop eop` (and ChatGLM3's role tokens)."""

    def __init__(self, model_file: Path, roles: bool) -> None:
        if is_tiktoken_file(model_file):
            raise TokenizerFileError(f"{model_file}: a tiktoken vocabulary, not the SentencePiece model expected")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        except (RuntimeError, OSError) as exc:
            raise TokenizerFileError(f"{model_file}: not a SentencePiece model ({exc})") from exc
        self.pieces = self.sp.vocab_size()
        names = (*SP_SPECIALS, *(ROLES if roles else ()))
        self.special = {name: self.pieces + i for i, name in enumerate(names)}
        self.vocab_size = self.pieces + len(names)
        self.eos_token_id = self.sp.eos_id()

    def encode(self, text: str) -> list[int]:
        return list(self.sp.encode(text))

    def token_bytes(self) -> list[bytes]:
        """Each id's bytes, as a grammar library reads the vocabulary: `▁` is a space, byte pieces their byte,
        control and special tokens `\\xff` and their name (llguidance's mark for a special token)."""
        out: list[bytes] = []
        for i in range(self.pieces):
            piece = self.sp.id_to_piece(i)
            if self.sp.is_byte(i):
                out.append(bytes([int(piece[3:5], 16)]))
            elif self.sp.is_control(i) or self.sp.is_unknown(i):
                out.append(b"\xff" + piece.encode())
            else:
                out.append(piece.replace("\u2581", " ").encode())
        names = sorted(self.special, key=self.special.__getitem__)
        return out + [b"\xff" + name.encode() for name in names]

    def tokenize_bytes(self, text: bytes) -> list[int]:
        """Ids of text in the middle of an answer: without the leading space SentencePiece adds to a text."""
        decoded = text.decode("utf-8", errors="replace")
        return without_leading_space(self.sp, list(self.sp.encode(decoded)), decoded)

    def decode(
        self, ids: Sequence[int], skip_special_tokens: bool = False, clean_up_tokenization_spaces: bool = False
    ) -> str:
        """Text of the SentencePiece ids; the special ids after them read as nothing."""
        return str(self.sp.decode([i for i in ids if 0 <= i < self.pieces]))


class TiktokenTokenizer:
    """GLM-4: byte BPE by rank (the `tokenizer.model` lines), its special tokens numbered after the ranks."""

    def __init__(self, model_file: Path) -> None:
        import tiktoken

        if not is_tiktoken_file(model_file):
            raise TokenizerFileError(f"{model_file}: not a tiktoken vocabulary (GLM-4 ships one as tokenizer.model)")
        ranks: dict[bytes, int] = {}
        for line in model_file.read_text().splitlines():
            if line.strip():
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
        self.pieces = len(ranks)
        self.special = {name: self.pieces + i for i, name in enumerate(GLM4_SPECIALS)}
        self.vocab_size = self.pieces + len(GLM4_SPECIALS)
        self.enc = tiktoken.Encoding("glm4", pat_str=GLM4_SPLIT, mergeable_ranks=ranks, special_tokens=self.special)
        self._by_rank = sorted(ranks, key=ranks.__getitem__)
        self.eos_token_id = self.special["<|endoftext|>"]

    def encode(self, text: str) -> list[int]:
        """Ids of text; special-token text in it is ordinary text, never a control token."""
        return list(self.enc.encode(text, disallowed_special=()))

    def token_bytes(self) -> list[bytes]:
        """Each id's bytes, special tokens `\\xff` and their name (llguidance's mark for a special token)."""
        return [*self._by_rank, *(b"\xff" + name.encode() for name in GLM4_SPECIALS)]

    def tokenize_bytes(self, text: bytes) -> list[int]:
        return self.encode(text.decode("utf-8", errors="replace"))

    def decode(
        self, ids: Sequence[int], skip_special_tokens: bool = False, clean_up_tokenization_spaces: bool = False
    ) -> str:
        """Text of the byte tokens (U+FFFD for an unfinished character); special tokens read as nothing."""
        return str(self.enc.decode([i for i in ids if 0 <= i < self.pieces]))
